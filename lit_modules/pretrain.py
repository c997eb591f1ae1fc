"""Stage I as a LightningModule: write the facts into the memory encoder."""
from __future__ import annotations

import random

import torch

from lit_modules.common import TrainableOnlyCheckpoint, warmup_cosine
from mindbridge.encoder import MemoryEncoder
from mindbridge.pretraining import MemoryWriter, associate_batch, inject_batch

# `model.pretrain` keys that configure the datamodule and the stage, not the module.
STAGE_KEYS = ("batch_size", "out_batch_size", "prefix_datasets", "rewordings")


def module_hparams(pretrain_cfg) -> dict:
    """The `MemoryPretrainModule` arguments in a `model.pretrain` config."""
    return {k: v for k, v in dict(pretrain_cfg).items() if k not in STAGE_KEYS}


class MemoryPretrainModule(TrainableOnlyCheckpoint):
    """L_pre = λ1·L_inject + λ2·L_associate + λ3·L_exist with the official phase curriculum.

    Epochs [0, inject_epochs): inject only, E_m trains. Next `heads_epochs`: all losses, E_m
    frozen (H and Q_M catch up). Then all losses, everything trains. `joint_from_start` skips
    the curriculum (the paper's single summed objective).

    `inject_copies`: L_inject reads every fact of a batch that many times, each under its own
    random masks.

    Prefix augmentation (official code, spec §5): with probability `prefix_prob` an edit's text
    gets a random distractor prefix before the encoder reads it (the official pool is 25% blank,
    i.e. prefix_prob 0.75). Our prefixes are the out-of-scope prompts of the same batch, finished
    with their answers: text of records that are not edited, never evaluated.
    """

    def __init__(self, encoder: MemoryEncoder, lambda_inject: float = 1.0, lambda_associate: float = 1.0,
                 lambda_exist: float = 1.0, inject_epochs: int = 10, heads_epochs: int = 2,
                 joint_epochs: int = 20, joint_from_start: bool = False, lr: float = 2e-4,
                 weight_decay: float = 0.01, warmup_fraction: float = 0.05, span_mask_prob: float = 0.5,
                 word_mask_prob: float = 0.1, prefix_prob: float = 0.0, rewording_prob: float = 0.0,
                 inject_copies: int = 1, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.writer = MemoryWriter(encoder)
        self.rng = random.Random(seed)
        self.rewordings: list[list[str]] = []

    @property
    def encoder(self) -> MemoryEncoder:
        return self.writer.encoder

    def trainable_prefixes(self) -> tuple[str, ...]:
        return ("writer.encoder.", "writer.exist_head.", "writer.associate_projector.")

    def phase(self, epoch: int) -> str:
        hp = self.hparams
        if hp.joint_from_start:
            return "all"
        if epoch < hp.inject_epochs:
            return "inject"
        if epoch < hp.inject_epochs + hp.heads_epochs:
            return "heads"
        return "all"

    def on_train_epoch_start(self) -> None:
        phase = self.phase(self.current_epoch)
        # Toggle requires_grad on the body only: the tied decoder weight is the embedding matrix.
        self.encoder.mlm.requires_grad_(phase != "heads")
        self.log("phase_index", float(["inject", "heads", "all"].index(phase)), on_epoch=True, on_step=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        hp = self.hparams
        phase = self.phase(self.current_epoch)
        edit, out = batch["edit"], batch["out"]
        tok, max_len = self.encoder.tokenizer, self.encoder.max_length
        use_inject = hp.lambda_inject > 0
        use_assoc = phase != "inject" and hp.lambda_associate > 0
        use_exist = phase != "inject" and hp.lambda_exist > 0
        if phase == "inject" and not use_inject:
            use_assoc, use_exist = hp.lambda_associate > 0, hp.lambda_exist > 0
        if phase == "heads" and not (use_assoc or use_exist):
            return None          # the heads phase trains only H and Q_M; with λ2 = λ3 = 0 it has nothing to do
        facts = list(zip(edit["subject"], edit["prompt"], edit["target"]))
        # Each fact `inject_copies` times, each with its own masks: a fact is memorised after a
        # number of exposures, and an extra inject row costs a fraction of a step.
        inject = inject_batch(tok, facts * max(1, int(hp.inject_copies)), self.rng, max_len, hp.span_mask_prob,
                              hp.word_mask_prob) if use_inject else None
        # What the memory reads (L_associate, and L_exist's in-scope half): the prompt or, with
        # probability `rewording_prob`, one of its rewordings, behind a distractor prefix (finished
        # sentences of records not edited) with probability `prefix_prob`. L_inject writes the fact
        # in its own words: its random word masks would otherwise ask the encoder to memorise
        # distractor text.
        index = edit["index"].tolist() if "index" in edit else list(range(len(edit["prompt"])))
        sentences = [f"{p} {a}." if a else p for p, a in zip(out["prompt"], out.get("answer") or out["prompt"])]
        read = self.with_prefixes(self.reworded(index, edit["prompt"]), sentences)
        # The frozen copy M reads the bare fact.
        associate = (read, associate_batch(tok, list(zip(edit["prompt"], edit["target"])), max_len)) \
            if use_assoc else None
        exist = None
        if use_exist:
            # Balanced in-scope (what the memory read for the associate rows) vs out-of-scope
            # (prompts of non-edited records).
            half = min(len(read), len(out["prompt"]))
            texts = list(read[:half]) + list(out["prompt"][:half])
            exist = (texts, torch.tensor([1] * half + [0] * half))
        if inject is None and associate is None and exist is None:
            raise ValueError("All pretraining losses are switched off (λ1 = λ2 = λ3 = 0).")
        losses = self.writer.losses(inject, associate, exist)
        total = sum(w * losses[k] for k, w in (("inject", hp.lambda_inject), ("associate", hp.lambda_associate),
                                                ("exist", hp.lambda_exist)) if k in losses)
        bs = len(facts)
        for k, v in losses.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=bs, prog_bar=k in ("inject", "exist_acc"))
        self.log("train/loss", total, on_step=False, on_epoch=True, batch_size=bs)
        return total

    def set_rewordings(self, rewordings: list[list[str]]) -> None:
        """Other wordings of each edit's prompt (by edit index), from records that are not edited."""
        self.rewordings = [list(r) for r in rewordings]

    def reworded(self, index: list[int], prompts: list[str]) -> list[str]:
        """Each edit's prompt, or with probability `rewording_prob` one of its rewordings."""
        if self.hparams.rewording_prob <= 0 or not self.rewordings:
            return list(prompts)
        return [self.rng.choice(self.rewordings[i]) if self.rewordings[i] and self.rng.random() < self.hparams.rewording_prob
                else p for i, p in zip(index, prompts)]

    def with_prefixes(self, prompts: list[str], pool: list[str]) -> list[str]:
        """Prepend a random prefix from `pool` to each prompt with probability `prefix_prob`."""
        if self.hparams.prefix_prob <= 0 or not pool:
            return list(prompts)
        return [f"{self.rng.choice(pool)} {p}" if self.rng.random() < self.hparams.prefix_prob else p
                for p in prompts]

    def configure_optimizers(self):
        params = [p for n, p in self.writer.named_parameters() if not n.startswith("frozen_copy.")]
        # fused: one kernel for every tensor's update (a twentieth of a Stage I step otherwise).
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                fused=self.device.type in ("cpu", "cuda"))
        total, _ = self.epoch_steps()
        sched = warmup_cosine(opt, total, int(self.hparams.warmup_fraction * total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
