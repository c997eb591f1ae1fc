"""Stage II as a LightningModule: train the projector P_m for one frozen LLM."""
from __future__ import annotations

import torch

from lit_modules.common import TrainableOnlyCheckpoint, warmup_cosine
from mindbridge.bridge import MemoryAugmentedLM, MemoryProjector, answer_loss, distill_kl
from mindbridge.encoder import MemoryEncoder
from mindbridge.lm import PromptKVStore, causal_logits, continuation_logits


class MemoryBridgeModule(TrainableOnlyCheckpoint):
    """L_bridge = L_1 + λ_kl·KL, LLM and encoder frozen, only the projector trains.

    The encoder is frozen, so its features for every training prompt are computed once
    (`prepare`). The teacher's next-token logits on out-of-scope prompts do not change either.
    With the memory after the prompt (`position="suffix"`), the prompts' keys and values are
    constants too and are cached, so a step only runs the memory and answer tokens.
    """

    def __init__(self, llm, tokenizer, encoder: MemoryEncoder, projector: MemoryProjector,
                 lambda_kl: float = 1.0, kl_temperature: float = 1.5, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_fraction: float = 0.1, feature_noise: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["llm", "tokenizer", "encoder", "projector"])
        self.edited = MemoryAugmentedLM(llm, tokenizer, [encoder], [projector])
        self.edited.llm.requires_grad_(False)
        encoder.requires_grad_(False)
        self._edit_features: torch.Tensor | None = None
        self._out_features: torch.Tensor | None = None
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
        self.encoder.eval()
        return self

    def prepare(self, edit_prompts: list[str], out_prompts: list[str], batch_size: int = 32) -> None:
        """Cache what does not change while the projector trains (call before `fit`)."""
        self._edit_features = self.encoder.encode(edit_prompts, 4 * batch_size)
        self._out_features = self.encoder.encode(out_prompts, 4 * batch_size)
        self.projector.set_feature_statistics(torch.cat([self._edit_features, self._out_features]))
        if self.edited.position == "suffix":
            llm, tok = self.edited.llm, self.edited.tokenizer
            self._edit_kv = PromptKVStore(llm, tok, edit_prompts, batch_size)
            if self.hparams.lambda_kl > 0:
                self._out_kv = PromptKVStore(llm, tok, out_prompts, batch_size, keep_logits=True)

    def _teacher_logits(self, index: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        missing = [k for k, i in enumerate(index.tolist()) if i not in self._teacher]
        if missing:
            with torch.no_grad():
                fresh = causal_logits(self.edited.llm, input_ids[missing], mask[missing], keep=1)[:, -1]
            for k, row in zip(missing, fresh):
                # bf16 halves the cache; the KL is computed in fp32 from these logits.
                self._teacher[int(index[k])] = row.to(torch.bfloat16)
        return torch.stack([self._teacher[int(i)] for i in index.tolist()]).float()

    def _features(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Cached memory vectors, jittered while training.

        Paraphrases are never trained on (they are evaluation prompts); their memory vectors
        sit near, not on, the edit prompt's. Gaussian noise of `feature_noise` standard
        deviations per dimension (in the projector's standardised units) teaches the projector
        to answer the same way in that neighbourhood.
        """
        feats = table[index]
        if self.training and self.hparams.feature_noise > 0:
            feats = feats + self.hparams.feature_noise * self.projector.feature_scale * torch.randn_like(feats)
        return feats

    def _answer_logits(self, edit: dict) -> torch.Tensor:
        """Logits at the answer positions (plus one), laid out like `TeacherForcedBatch`."""
        tf, index = edit["tf"], edit["index"]
        features = self._features(self._edit_features, index)
        if self._edit_kv is None:
            return self.edited.logits(None, tf.input_ids, tf.attention_mask, tf.keep, tf.target_mask.sum(1),
                                      features=[features])
        memory = self.edited.memory_tokens(features=[features])
        cache, mask = self._edit_kv.batch(index.tolist())
        return continuation_logits(self.edited.llm, cache, mask, memory, tf.target_ids, tf.target_mask)[
            :, memory.shape[1] - 1:]

    def _out_of_scope_logits(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher, student) next-token logits after each out-of-scope prompt."""
        index = out["index"]
        if self._out_kv is None:
            teacher = self._teacher_logits(index, out["input_ids"], out["attention_mask"])
            student = self.edited.logits(None, out["input_ids"], out["attention_mask"], 1,
                                         features=[self._features(self._out_features, index)])[:, -1]
            return teacher, student
        memory = self.edited.memory_tokens(features=[self._features(self._out_features, index)])
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
        opt = torch.optim.AdamW(self.projector.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        total, _ = self.epoch_steps()
        sched = warmup_cosine(opt, total, int(self.hparams.warmup_fraction * total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
