"""Stage II as a LightningModule: train the projector P_m for one frozen LLM."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_modules.common import TrainableOnlyCheckpoint, warmup_cosine
from mindbridge.bridge import MemoryAugmentedLM, MemoryProjector, add_lora, answer_loss, distill_kl
from mindbridge.encoder import MemoryEncoder
from mindbridge.lm import PromptKVStore, causal_logits, continuation_logits, without_adapters


class MemoryBridgeModule(TrainableOnlyCheckpoint):
    """L_bridge = L_1 + λ_kl·KL, LLM and encoder frozen, only the projector trains.

    The encoder is frozen, so its features for every training prompt are computed once
    (`prepare`). The teacher's next-token logits on out-of-scope prompts do not change either.
    With the memory after the prompt (`position="suffix"`), the prompts' keys and values are
    constants too and are cached, so a step only runs the memory and answer tokens.
    """

    def __init__(self, llm, tokenizer, encoders: MemoryEncoder | Sequence[MemoryEncoder],
                 projectors: MemoryProjector | Sequence[MemoryProjector],
                 lambda_kl: float = 1.0, kl_temperature: float = 1.5, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_fraction: float = 0.1, feature_noise: float = 0.0,
                 lora: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["llm", "tokenizer", "encoders", "projectors"])
        # Several memories (Multi-MindBridge, Eq. 7) train their projectors jointly: one soft
        # token block per memory, concatenated in order.
        encoders = [encoders] if isinstance(encoders, MemoryEncoder) else list(encoders)
        projectors = [projectors] if isinstance(projectors, MemoryProjector) else list(projectors)
        llm.requires_grad_(False)
        if lora:
            # Optional adapters inside the LLM, trained with the projector (off by default).
            llm = add_lora(llm, **lora)
        self.edited = MemoryAugmentedLM(llm, tokenizer, encoders, projectors)
        for encoder in encoders:
            encoder.requires_grad_(False)
        self._edit_features: list[torch.Tensor] | None = None
        self._out_features: list[torch.Tensor] | None = None
        self._teacher: dict[int, torch.Tensor] = {}
        self._edit_kv: PromptKVStore | None = None
        self._out_kv: PromptKVStore | None = None

    @property
    def projector(self) -> MemoryProjector:
        return self.edited.projectors[0]

    @property
    def encoder(self) -> MemoryEncoder:
        return self.edited.encoders[0]

    def trainable_prefixes(self) -> tuple[str, ...]:
        return ("edited.projectors.",)

    def train(self, mode: bool = True):
        super().train(mode)
        self.edited.llm.eval()        # frozen parts never use dropout
        for encoder in self.edited.encoders:
            encoder.eval()
        return self

    def prepare(self, edit_prompts: list[str], out_prompts: list[str], batch_size: int = 32) -> None:
        """Cache what does not change while the projector trains (call before `fit`)."""
        self._edit_features, self._out_features = [], []
        for encoder, projector in zip(self.edited.encoders, self.edited.projectors):
            edit, out = encoder.encode(edit_prompts, 4 * batch_size), encoder.encode(out_prompts, 4 * batch_size)
            projector.set_feature_statistics(torch.cat([edit, out]))
            self._edit_features.append(edit)
            self._out_features.append(out)
        # Cached prompt keys/values are constants only while nothing inside the LLM trains.
        if self.edited.position == "suffix" and not self.hparams.lora:
            llm, tok = self.edited.llm, self.edited.tokenizer
            self._edit_kv = PromptKVStore(llm, tok, edit_prompts, batch_size)
            if self.hparams.lambda_kl > 0:
                self._out_kv = PromptKVStore(llm, tok, out_prompts, batch_size, keep_logits=True)

    def _teacher_logits(self, index: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        missing = [k for k, i in enumerate(index.tolist()) if i not in self._teacher]
        if missing:
            with torch.no_grad(), without_adapters(self.edited.llm):
                fresh = causal_logits(self.edited.llm, input_ids[missing], mask[missing], keep=1)[:, -1]
            for k, row in zip(missing, fresh):
                # bf16 halves the cache; the KL is computed in fp32 from these logits.
                self._teacher[int(index[k])] = row.to(torch.bfloat16)
        return torch.stack([self._teacher[int(i)] for i in index.tolist()]).float()

    def _features(self, tables: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """Cached memory vectors (one tensor per memory), jittered while training.

        Paraphrases are never trained on (they are evaluation prompts); their memory vectors
        sit near, not on, the edit prompt's. Gaussian noise of `feature_noise` standard
        deviations per dimension (in the projector's standardised units) teaches the projector
        to answer the same way in that neighbourhood.
        """
        feats = [table[index] for table in tables]
        if self.training and self.hparams.feature_noise > 0:
            feats = [f + self.hparams.feature_noise * proj.feature_scale * torch.randn_like(f)
                     for f, proj in zip(feats, self.edited.projectors)]
        return feats

    def _answer_logits(self, edit: dict) -> torch.Tensor:
        """Logits at the answer positions (plus one), laid out like `TeacherForcedBatch`."""
        tf, index = edit["tf"], edit["index"]
        features = self._features(self._edit_features, index)
        if self._edit_kv is None:
            return self.edited.logits(None, tf.input_ids, tf.attention_mask, tf.keep, tf.target_mask.sum(1),
                                      features=features)
        memory = self.edited.memory_tokens(features=features)
        cache, mask = self._edit_kv.batch(index.tolist())
        return continuation_logits(self.edited.llm, cache, mask, memory, tf.target_ids, tf.target_mask)[
            :, memory.shape[1] - 1:]

    def _out_of_scope_logits(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher, student) next-token logits after each out-of-scope prompt."""
        index = out["index"]
        if self._out_kv is None:
            teacher = self._teacher_logits(index, out["input_ids"], out["attention_mask"])
            student = self.edited.logits(None, out["input_ids"], out["attention_mask"], 1,
                                         features=self._features(self._out_features, index))[:, -1]
            return teacher, student
        memory = self.edited.memory_tokens(features=self._features(self._out_features, index))
        cache, mask = self._out_kv.batch(index.tolist())
        student = continuation_logits(self.edited.llm, cache, mask, memory)[:, -1]
        return self._out_kv.teacher_logits(index.tolist()), student

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._edit_features is None:
            raise RuntimeError("call prepare() before training the bridge")
        edit, out = batch["edit"], batch["out"]
        l1, acc = answer_loss(self._answer_logits(edit), edit["tf"])
        loss = l1
        bs = len(edit["prompt"])
        if self.hparams.lambda_kl > 0:
            teacher, student = self._out_of_scope_logits(out)
            kl = distill_kl(teacher, student, self.hparams.kl_temperature)
            loss = loss + self.hparams.lambda_kl * kl
            self.log("train/kl", kl, on_step=False, on_epoch=True, batch_size=bs, prog_bar=True)
        self.log("train/answer_nll", l1, on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/answer_acc", acc, on_step=False, on_epoch=True, batch_size=bs, prog_bar=True)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        total, _ = self.epoch_steps()
        sched = warmup_cosine(opt, total, int(self.hparams.warmup_fraction * total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
