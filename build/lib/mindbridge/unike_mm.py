"""UniKE on a vision-language model (BLIP-2: vision encoder + Q-Former + OPT), specs/unike.md §9.

The image enters the language model as its Q-Former tokens, a soft-token prefix before the text
(`causal_logits(..., memory=features)`), so UniKE runs unchanged on the language model's last
layers with hidden states that include the visual prefix. Scoring follows MMEdit (App. B): Rel
and T-Gen on the edit image, M-Gen on the rephrased image, T-Loc on text with no image, M-Loc on
an unrelated image question; every figure comes from the shared evaluator.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessor

from data.mmedit import MMEditRecord, image_path
from data.records import EditRecord
from mindbridge.evaluation import evaluate_edits
from mindbridge.loading import (_finish_tokenizer, _freeze, _load_from_hub, _load_local_dir,
                                _smollm2_tokenizer, _torch_dtype)
from mindbridge.unike import Request, UniKE, mean_metrics


def load_vision_lm(source: str, *, hub_id: str | None = None, path: str | None = None, dtype: str = "float32",
                   random_config: dict | None = None, seed: int = 0):
    """A frozen `Blip2ForConditionalGeneration` and its tokenizer ('hub', a local `path`, or 'random')."""
    torch_dtype = _torch_dtype(dtype)
    if path is not None:
        model, tok = _load_local_dir(Blip2ForConditionalGeneration, Path(path).expanduser(), "Vision-language model",
                                     dtype=torch_dtype)
    elif source == "hub":
        if not hub_id:
            raise ValueError("source='hub' needs hub_id")
        model, tok = _load_from_hub(Blip2ForConditionalGeneration, hub_id, "Vision-language model", "llm.path",
                                    dtype=torch_dtype)
    elif source == "random":
        if not random_config:
            raise ValueError("source='random' needs random_config (vision_config, qformer_config, text_config)")
        tok = _smollm2_tokenizer()
        cfg = dict(random_config)
        text = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id or tok.eos_token_id,
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "max_position_embeddings": 512,
                **cfg.pop("text_config", {})}
        cfg.pop("model_type", None)
        config = Blip2Config(text_config=text, **cfg)
        with torch.random.fork_rng(devices=[]):      # deterministic weights, caller's RNG untouched
            torch.manual_seed(seed)
            model = Blip2ForConditionalGeneration(config).eval().to(torch_dtype)
    else:
        raise ValueError(f"unknown vision-language model source {source!r}; expected 'hub' or 'random'")
    return _freeze(model), _finish_tokenizer(tok, causal=True)


class ImageFeatures:
    """Q-Former tokens of image files, `(Q, d)` in the language model's embedding space, cached."""

    def __init__(self, vlm: Blip2ForConditionalGeneration, image_root: str | None):
        self.vlm, self.root = vlm, image_root
        size = int(vlm.config.vision_config.image_size)
        self.processor = BlipImageProcessor(size={"height": size, "width": size})
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            from PIL import Image
            with Image.open(image_path(self.root, name)) as im:
                pixels = self.processor(im.convert("RGB"), return_tensors="pt")["pixel_values"]
            out = self.vlm.get_image_features(pixel_values=pixels.to(self.vlm.dtype), return_dict=True)
            self.cache[name] = out.pooler_output[0].detach()
        return self.cache[name]


class _WithPrefix:
    """A ScorableLM that puts the same image prefix before every row."""

    def __init__(self, lm, prefix: torch.Tensor | None):
        self.lm, self.prefix, self.tokenizer = lm, prefix, lm.tokenizer

    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None):
        prefix = None if self.prefix is None else self.prefix[None].expand(input_ids.shape[0], -1, -1)
        return self.lm.logits(prompts, input_ids, attention_mask, keep, answer_lengths, prefix=prefix)


def _record(rec: MMEditRecord, prompt: str, target: str, rephrase=(), loc=(), loc_answers=()) -> EditRecord:
    return EditRecord(rec.case_id, f"mmedit_{rec.task}", "", prompt, target, rec.wrong, tuple(rephrase), tuple(loc),
                      tuple(loc_answers))


def score_record(editor: UniKE, features: ImageFeatures, rec: MMEditRecord, batch_size: int) -> dict[str, float]:
    """Rel / T-Gen / M-Gen / T-Loc / M-Loc of one record under the currently active edits."""
    def run(record: EditRecord, image: str | None) -> dict:
        prefix = None if image is None else features(image)
        return evaluate_edits(_WithPrefix(editor, prefix), _WithPrefix(editor.unedited, prefix), [record], batch_size)
    edit = run(_record(rec, rec.prompt, rec.target, rephrase=[rec.rephrase]), rec.image)
    m_gen = run(_record(rec, rec.prompt, rec.target), rec.image_rephrase)
    t_loc = run(_record(rec, rec.prompt, rec.target, loc=[rec.loc_prompt], loc_answers=[rec.loc_answer]), None)
    m_loc = run(_record(rec, rec.prompt, rec.target, loc=[rec.m_loc_prompt], loc_answers=[rec.m_loc_answer]),
                rec.m_loc_image)
    return {"rel": edit["rel"], "rel_em": edit["rel_em"], "pre_rel": edit["pre_rel"],
            "t_gen": edit["gen"], "t_gen_em": edit["gen_em"], "pre_t_gen": edit["pre_gen"],
            "m_gen": m_gen["rel"], "m_gen_em": m_gen["rel_em"], "pre_m_gen": m_gen["pre_rel"],
            "t_loc": t_loc["loc"], "t_loc_em": t_loc["loc_em"], "m_loc": m_loc["loc"], "m_loc_em": m_loc["loc_em"],
            "num_scored_prompts": 6}


def score_mm(editor: UniKE, features: ImageFeatures, records: Sequence[MMEditRecord], edit_id: dict[int, int],
             sequential: bool, batch_size: int) -> dict:
    """Mean over records (one-step: each record with only its own edit on; sequential: all on).
    `gen` / `loc` average the text and multimodal figures; `avg` = (rel + gen + loc) / 3."""
    rows = []
    for i, rec in enumerate(records):
        with editor.active_edits(None if sequential else [edit_id[i]]):
            rows.append(score_record(editor, features, rec, batch_size))
    m = mean_metrics(rows)
    m["gen"], m["loc"] = (m["t_gen"] + m["m_gen"]) / 2, (m["t_loc"] + m["m_loc"]) / 2
    m["avg"] = (m["rel"] + m["gen"] + m["loc"]) / 3
    return m


def edit_requests(features: ImageFeatures, records: Sequence[MMEditRecord]) -> list[Request]:
    return [Request(r.prompt, r.target, r.wrong, features(r.image)) for r in records]


def memory_requests(features: ImageFeatures, records: Sequence[MMEditRecord]) -> list[Request]:
    """Unrelated inputs for the memory loss: NQ text (no image) and unrelated image questions."""
    return ([Request(r.loc_prompt, "") for r in records] +
            [Request(r.m_loc_prompt, "", prefix=features(r.m_loc_image)) for r in records])


def calibration_requests(features: ImageFeatures, records: Sequence[MMEditRecord]
                         ) -> tuple[list[Request], list[Request], list[Request]]:
    """Pseudo-edits (image question, its target), their text rephrases on the same image, and
    unrelated inputs (NQ text, unrelated image questions), for `UniKE.calibrate_weights`."""
    pseudo = [Request(r.prompt, r.target, prefix=features(r.image)) for r in records]
    reworded = [Request(r.rephrase, "", prefix=features(r.image)) for r in records]
    return pseudo, reworded, memory_requests(features, records)
