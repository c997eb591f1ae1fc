"""What the editing stages (NeuralDB, WISE, UniKE and later methods) share: their Trainer, the
facts of a run's edits, and the layer a method edits."""
from __future__ import annotations

import copy

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, open_dict

from lit_modules.runtime import RunContext, make_trainer
from mindbridge.facts import Fact
from mindbridge.ffn import decoder_layers


def method_config(cfg: DictConfig, method: str) -> DictConfig:
    """The method's hyperparameters: `cfg.model`, which the stage's defaults list sets to the
    method's config (`stage=wise` composes `model=wise`; `model=wise_paper` picks another one)."""
    if cfg.model.get("name") != method:
        raise ValueError(f"stage={cfg.stage.name} runs {method}, but model={cfg.model.get('name')} configures "
                         f"another method; leave model= out or choose one of {method}'s configs.")
    return cfg.model


def editing_trainer(ctx: RunContext, stage: str, epochs: int, steps_per_epoch: int) -> L.Trainer:
    """The run's Trainer without checkpoint callbacks (an editing method saves its own artifact) and
    without gradient clipping (the methods bound their own updates)."""
    cfg = copy.deepcopy(ctx.cfg)
    with open_dict(cfg):
        cfg.trainer.gradient_clip_val = None
        for name, cb in list((cfg.get("callbacks") or {}).items()):
            if cb is not None and issubclass(hydra.utils.get_class(cb._target_), ModelCheckpoint):
                cfg.callbacks[name] = None
        cfg.trainer.log_every_n_steps = max(1, min(int(cfg.trainer.get("log_every_n_steps") or 1), steps_per_epoch))
    return make_trainer(RunContext(cfg, ctx.run_dir), stage, epochs)


def resolve_layer(hp: DictConfig, llm_name: str, llm) -> int:
    """`layer`, else the per-LLM table, else floor(layer_fraction · L), never the last layer."""
    if hp.get("layer") is not None:
        return int(hp.layer)
    table = hp.get("layers") or {}
    if llm_name in table:
        return int(table[llm_name])
    n = len(decoder_layers(llm)[1])
    return max(0, min(int(hp.layer_fraction * n), n - 2))


def facts_for(records) -> list[Fact]:
    """One fact per edit record, id = case_id (made unique if a file repeats one)."""
    facts = [Fact.from_record(r) for r in records]
    if len({f.id for f in facts}) < len(facts):
        facts = [Fact(f"{f.id}#{i}", f.subject, f.prompt, f.target) for i, f in enumerate(facts)]
    return facts
