"""WISE: lifelong editing in a side memory with an activation-gap router (specs/wise.md).

Plain torch + transformers (no Lightning / Hydra / W&B). One FFN value matrix W_v of the LLM
(Llama/Gemma `down_proj`, GPT-2 `Conv1D` `c_proj`, GPT-J `fc_out`; for a mixture-of-experts
block the experts' value matrices) gets a trainable copy W_v' (the side memory); W_v itself,
the main memory, is never changed. `WISELayer` wraps the module that holds W_v:

* routing [P Eq. 3, 6]: per example, Δ_act = mean over tokens of ‖σ(a·W_v') − σ(a·W_v)‖
  (`act_space="code"`, σ = the model's activation, as upstream) or ‖a·(W_v' − W_v)‖
  (`act_space="paper"`); the side memory answers when Δ_act > ε. Each row of a batch is routed
  on its own (`torch.where`), and `generate` pins the route decided on the prompt for every
  decoding step;
* editing [P §2.3.2]: NLL of the target on the edit prompt and its random-prefix copies plus
  the margin loss L_a(α, β, γ) against an irrelevant text, SGD on W_v' with the gradient masked
  to the current shard's random subspace (ratio ρ), element-wise clamp around W_v, early stop;
* sharding and merging [P Eq. 7-8]: every `save_freq` edits the side memory is stored as a
  shard and a fresh one (new mask) starts; every `merge_freq` edits the stored shards are merged
  with TIES (WISE-Merge: one merged memory, re-merged 0.6/0.4 with later shards, as upstream)
  or kept as one more memory retrieved top-1 by Δ_act (WISE-Retrieve);
* `save` / `WISE.load`: memories, masks and routing statistics (safetensors + JSON, atomic).

Speed. Nothing below the wrapped layer depends on W_v', so for each batch of edits the hidden
states entering that decoder layer are computed once; every optimisation step runs only the
layers from there up (`BlockRunner`), and edits that have converged leave the batch. Several
edits can be optimised together (`batch_size`), each with its own loss and early stop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import ACT2FN

from mindbridge.artifacts import ArtifactError, open_llm_artifact, read_or_refuse, sealed
from mindbridge.atomic import write_dir_atomically
from mindbridge.lm import SwitchedOffLM, causal_logits, lm_head_only_at
from mindbridge.loading import model_identity, tensors_fingerprint
from mindbridge.facts import Fact, generate_prefixes
from mindbridge.ffn import OUT_PROJECTIONS, FFNSite, StopForward, decoder_layers, locate_ffn
from mindbridge.tokenization import _left_pad, encode_target, position_ids_for, prompt_batch

FORMAT_VERSION = 1
TENSORS_FILE = "wise.safetensors"
PREFIX_SEEDS = ("I", "You", "Because", "Yes", "Q: ")       # upstream's seed words [C utils.py]
VARIANTS = ("merge", "retrieve")
MERGE_ALGS = ("ties", "linear")


@dataclass
class WISEHParams:
    """Hyperparameters (spec §5; defaults are the paper's / upstream's LLaMA-2 values)."""

    variant: str = "merge"            # "merge" (WISE-Merge) | "retrieve" (WISE-Retrieve)
    optimizer: str = "sgd"            # "sgd" (paper) | "adam"
    lr: float = 1.0                   # step size η
    adam_eps: float = 1e-8
    n_iter: int = 70                  # optimisation steps per batch of edits (upper bound)
    mask_ratio: float = 0.2           # ρ
    alpha: float = 5.0                # ceiling of Δ_act on irrelevant text
    beta: float = 20.0                # floor of Δ_act on edits
    gamma: float = 10.0               # required gap edit − irrelevant
    margin_weight: float = 1.0        # weight of L_a in the edit loss (paper: 1)
    clip_grad_norm: float | None = None   # clip the (masked) gradient of W_v' to this norm (paper: none)
    act_ratio: float = 0.88           # ε = act_ratio · min over edits of Δ_act
    act_space: str = "code"           # "code": ‖σ(aW')−σ(aW)‖ | "paper": ‖a(W'−W)‖
    reduction: str = "masked"         # "masked": mean over real tokens | "faithful": upstream's mean / max
    train_gap_tokens: str = "all"     # edit tokens of the margin loss's Δ_act: "all" (prefix + prompt + target)
                                      # | "prompt" (the edit prompt's own tokens, what the router sees)
    skip_first_token: bool = True     # masked: leave each row's first token (an attention sink) out of Δ_act
    retrieve_by: str = "gap"          # WISE-Retrieve's top-1 among memories above their ε: "gap" (largest Δ_act,
                                      # the paper) | "ratio" (largest Δ_act / ε: memories of different scales compare)
    norm_constraint: float | None = 1.0   # element-wise clamp of W' around W
    weight_decay: float = 1e-5
    code_faithful_wd: bool = False    # True: SGD weight decay on every entry (upstream's leak, spec §8.14)
    save_freq: int = 500              # edits per shard
    merge_freq: int = 1000            # edits between merges (k = merge_freq / save_freq shards)
    merge_alg: str = "ties"
    density: float = 0.53             # TIES trim density
    merge_weight: float = 1.0         # λ_i = merge_weight / k
    remerge_old_weight: float = 0.6   # WISE-Merge, later merges: old merged memory 0.6, new shards 0.4 / n
    prefix_lengths: tuple[int, ...] = (5, 10)
    prefixes_per_length: int = 5      # ≤ len(PREFIX_SEEDS)
    batch_size: int = 1               # edits optimised together (1 = the paper's sequential setting)
    early_stop_loss: float = 0.02
    early_stop_delta: float = 1e-4
    max_target_tokens: int = 32
    irrelevant_per_edit: int = 1      # irrelevant texts per edit in the margin loss (upstream: 1)
    max_irrelevant_tokens: int = 256
    irrelevant_answers: bool = True   # irrelevant text = question + answer (upstream), else the question only
    replay_per_edit: int = 0          # WISE-Retrieve, L_memo [P App. B.3]: earlier shards' edits per edit whose
                                      # Δ_act on the current side memory is held below α (0: off, the paper's default)
    bucket_slack: float = 0.2         # rows of one forward pad to ≥ (1 - slack) of their longest
    # ε is at least this quantile of the memory's Δ_act on held-out irrelevant texts (`calibrate`;
    # None: ε from the edits alone, the paper). A memory whose weakest edit sits among unrelated text
    # would otherwise route many unrelated prompts to itself. Held out, because L_a pushes the texts it
    # was trained against far below what unseen unrelated prompts get.
    eps_quantile: float | None = None
    seed: int = 0                     # mask RNG

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WISEHParams":
        names = {f.name for f in dataclasses.fields(cls)}
        hp = cls(**{k: (tuple(v) if k == "prefix_lengths" else v) for k, v in d.items() if k in names})
        hp.check()
        return hp

    def check(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"WISE variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}.")
        if self.merge_alg not in MERGE_ALGS:
            raise ValueError(f"WISE merge_alg must be one of {', '.join(MERGE_ALGS)}, got {self.merge_alg!r}.")
        if self.act_space not in ("code", "paper") or self.reduction not in ("masked", "faithful"):
            raise ValueError(f"WISE act_space must be code|paper and reduction masked|faithful "
                             f"(got {self.act_space!r}, {self.reduction!r}).")
        if not 0.0 < self.mask_ratio <= 1.0 or not 0.0 < self.density <= 1.0:
            raise ValueError(f"WISE mask_ratio and density must be in (0, 1] (got {self.mask_ratio}, {self.density}).")
        if self.save_freq < 1 or self.merge_freq < self.save_freq or self.merge_freq % self.save_freq:
            raise ValueError(f"WISE merge_freq ({self.merge_freq}) must be a multiple of save_freq ({self.save_freq}).")
        if self.retrieve_by not in ("gap", "ratio"):
            raise ValueError(f"WISE retrieve_by must be gap|ratio, got {self.retrieve_by!r}.")
        if self.optimizer not in ("sgd", "adam") or self.train_gap_tokens not in ("all", "prompt"):
            raise ValueError(f"WISE optimizer must be sgd|adam and train_gap_tokens all|prompt "
                             f"(got {self.optimizer!r}, {self.train_gap_tokens!r}).")
        if self.batch_size < 1 or self.n_iter < 1 or self.irrelevant_per_edit < 1 or self.replay_per_edit < 0:
            raise ValueError("WISE batch_size, n_iter and irrelevant_per_edit must be at least 1, "
                             "replay_per_edit at least 0.")
        if self.eps_quantile is not None and not 0.0 < self.eps_quantile <= 1.0:
            raise ValueError(f"WISE eps_quantile must be in (0, 1] or null, got {self.eps_quantile}.")
        if self.replay_per_edit and self.variant != "retrieve":
            raise ValueError("WISE replay_per_edit (L_memo) keeps side memories apart, so it needs variant=retrieve; "
                             "WISE-Merge merges its shards into one memory.")


# --------------------------------------------------------------------------- where the side memory lives


def value_matrix_names(site: FFNSite) -> list[str]:
    """Names (inside the wrapped module) of the value matrices the side memory copies.

    A dense FFN's output projection has one, its `weight`. A mixture-of-experts block has the
    experts' fused value tensor (e.g. `experts.down_proj`, (E, d, d_ff)) and, where present, the
    shared expert's projection: every ≥2-D parameter whose path names an output projection.
    """
    module = site.module
    if site.kind == "out_proj":
        return ["weight"]
    names = [n for n, p in module.named_parameters()
             if p.dim() >= 2 and any(part in OUT_PROJECTIONS for part in n.split("."))]
    if not names:
        raise ValueError(f"WISE cannot find the experts' value matrices in {site.path} "
                         f"(looked for parameters under {', '.join(OUT_PROJECTIONS)}).")
    return names


def activation_function(model: PreTrainedModel):
    """σ of the model's FFN (upstream applies it to both outputs before the distance)."""
    c = model.config
    name = getattr(c, "hidden_act", None) or getattr(c, "hidden_activation", None) or \
        getattr(c, "activation_function", None) or "gelu"
    return ACT2FN[name]


# --------------------------------------------------------------------------- routing


def token_gaps(main: torch.Tensor, side: torch.Tensor, act, space: str) -> torch.Tensor:
    """Per-token activation gap `(B, T)` between a side memory's output and the main memory's."""
    diff = act(side.float()) - act(main.float()) if space == "code" else side.float() - main.float()
    return diff.norm(dim=-1)


def without_first_token(mask: torch.Tensor) -> torch.Tensor:
    """`mask` minus each row's first real token (kept when it is the row's only token).

    Models without a BOS token make the first token an attention sink whose FFN activation is
    huge and nearly the same whatever the word; its gap then moves with every edit and cannot
    separate edits from unrelated text (LLaMA-2's first token is always `<s>`, the same in both).
    """
    first = (mask.long().cumsum(1) == 1) & mask.bool()
    keep = mask.bool() & ~first
    return torch.where(keep.any(1, keepdim=True), keep, mask.bool()).to(mask.dtype)


def reduce_gaps(gaps: torch.Tensor, mask: torch.Tensor | None, reduction: str, inference: bool) -> torch.Tensor:
    """One Δ_act per row `(B,)`: mean over the masked tokens, or upstream's rule (`faithful`:
    mean over every position, padding included, or the max token when T > 100 at inference)."""
    if reduction == "faithful" or mask is None:
        if reduction == "faithful" and inference and gaps.shape[1] > 100:
            return gaps.max(dim=1).values
        return gaps.mean(dim=1)
    m = mask.to(gaps.dtype)
    return (gaps * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class Memory:
    """One side memory a router can pick: its value matrices and the Δ_act threshold inputs."""

    weights: dict[str, torch.Tensor]
    min_act: float = math.inf          # min over its edits of the recorded Δ_act
    shards: list[int] = field(default_factory=list)
    edits: int = 0
    kind: str = "side"                 # "side" (being written) | "shard" (saved, unmerged) | "merged"
    calibration_acts: list[float] = field(default_factory=list)  # Δ_act of each held-out irrelevant text on it


class WISELayer(nn.Module):
    """Wraps the module holding W_v: main output, or a side memory's, chosen per example.

    `candidates` are `(Memory, ε)` pairs; a row goes to the candidate with the largest Δ_act
    (`retrieve_by="ratio"`: Δ_act / ε) among those above their own ε, else to the main memory.
    `route_mask` `(B, T)` says which tokens count for Δ_act (the prompt, not a teacher-forced answer); `pin` keeps the first
    decision for the following calls (decoding steps with a KV cache). While `editing` holds
    side weights every row uses them and both outputs are kept for the losses.
    """

    def __init__(self, inner: nn.Module, value_names: Sequence[str], act, act_space: str = "code",
                 reduction: str = "masked", skip_first_token: bool = False, retrieve_by: str = "gap"):
        super().__init__()
        self.inner = inner
        self.value_names = list(value_names)
        self.act, self.act_space, self.reduction = act, act_space, reduction
        self.skip_first_token = skip_first_token
        self.retrieve_by = retrieve_by
        self.candidates: list[tuple[Memory, float]] = []
        self.mode = "route"                  # "route" | "main" (unedited) | "side" (always the newest memory)
        self.editing: dict[str, torch.Tensor] | None = None
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        self.route_mask: torch.Tensor | None = None
        self.pin = False
        self.pinned: torch.Tensor | None = None
        self.last_route: torch.Tensor | None = None
        self.last_gaps: torch.Tensor | None = None
        self.probe = None

    def main_weights(self) -> dict[str, torch.Tensor]:
        return {n: self.inner.get_parameter(n) for n in self.value_names}

    def _call(self, weights: dict[str, torch.Tensor], x, args, kwargs) -> torch.Tensor:
        out = functional_call(self.inner, weights, (x, *args), kwargs)
        return out[0] if isinstance(out, tuple) else out

    @contextlib.contextmanager
    def set_mode(self, mode: str) -> Iterator[None]:
        before, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = before

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.inner(x, *args, **kwargs)
        main = out[0] if isinstance(out, tuple) else out
        value = self._select(main, x, args, kwargs)
        if self.probe is not None:
            self.probe(self)
        if value is main:
            return out
        return (value, *out[1:]) if isinstance(out, tuple) else value

    def _select(self, main: torch.Tensor, x, args, kwargs) -> torch.Tensor:
        if self.editing is not None:
            side = self._call(self.editing, x, args, kwargs)
            self.recorded = (main, side)
            return side
        self.last_route = torch.full(main.shape[:1], -1, dtype=torch.long)
        if self.mode == "main" or not self.candidates:
            return main
        if self.mode == "side":
            self.last_route.fill_(len(self.candidates) - 1)
            return self._call(self.candidates[-1][0].weights, x, args, kwargs)
        if self.pin and self.pinned is not None and self.pinned.shape[0] == main.shape[0]:
            route = self.pinned
            outs = {j: self._call(self.candidates[j][0].weights, x, args, kwargs)
                    for j in route.unique().tolist() if j >= 0}
        else:
            mask = self.route_mask if self.route_mask is not None and self.route_mask.shape == main.shape[:2] else None
            if mask is not None and self.skip_first_token:
                mask = without_first_token(mask)
            outs, gaps = {}, []
            for j, (memory, _) in enumerate(self.candidates):
                outs[j] = self._call(memory.weights, x, args, kwargs)
                gaps.append(reduce_gaps(token_gaps(main, outs[j], self.act, self.act_space), mask,
                                        self.reduction, inference=True))
            gaps_t = torch.stack(gaps, dim=1)                                   # (B, M)
            eps = torch.tensor([e for _, e in self.candidates], dtype=gaps_t.dtype)
            above = gaps_t > eps
            score = gaps_t / eps.clamp_min(1e-12) if self.retrieve_by == "ratio" else gaps_t
            best = score.masked_fill(~above, -math.inf).argmax(dim=1)
            route = torch.where(above.any(dim=1), best, torch.full_like(best, -1))
            self.last_gaps = gaps_t
            if self.pin:
                self.pinned = route
        self.last_route = route
        value = main
        for j, o in outs.items():
            pick = (route == j).view(-1, *([1] * (main.dim() - 1)))
            value = torch.where(pick, o.to(main.dtype), value)
        return value


# --------------------------------------------------------------------------- running only the top of the model


class _Passthrough(nn.Module):
    """Stands in for a decoder layer below the side memory: returns its input unchanged."""

    def __init__(self, tuple_len: int):
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.tuple_len == 0 else (hidden_states,) + (None,) * (self.tuple_len - 1)


class BlockRunner:
    """Runs the model from decoder layer `layer` up, on cached inputs of that layer.

    The model's own forward still builds masks and positions; the layers below are swapped for
    pass-throughs and the hidden states entering `layer` are replaced by the cached ones, so
    a step costs only the layers from `layer` up (spec: nothing below depends on W_v').
    """

    def __init__(self, model: PreTrainedModel, layer: int):
        self.model, self.layer = model, layer
        self.layers = decoder_layers(model)[1]
        self.tuple_len = 0

    def _set_hidden(self, hidden: torch.Tensor):
        def pre(module, args, kwargs):
            return (hidden, *args[1:]), kwargs
        return self.layers[self.layer].register_forward_pre_hook(pre, with_kwargs=True)

    @torch.no_grad()
    def capture(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer `layer` `(B, T, d)` (layers above it are not run)."""
        captured: dict[str, torch.Tensor] = {}

        def pre(module, args, kwargs):
            captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise StopForward

        def post(module, args, out):
            self.tuple_len = len(out) if isinstance(out, tuple) else 0
        hooks = [self.layers[self.layer].register_forward_pre_hook(pre, with_kwargs=True),
                 self.layers[0].register_forward_hook(post)]
        try:
            self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), use_cache=False)
        except StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        return captured["h"]

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, keep: int,
               select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the last `keep` positions `(B, keep, V)`; with `select` `(B, keep)` only
        those positions', `(N, V)` in row-major order (`lm_head_only_at`)."""
        saved = [self.layers[i] for i in range(self.layer)]
        for i in range(self.layer):
            self.layers[i] = _Passthrough(self.tuple_len)
        hook = self._set_hidden(hidden)
        try:
            with lm_head_only_at(self.model, select) if select is not None else contextlib.nullcontext():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                                    use_cache=False, logits_to_keep=keep).logits
            return logits if select is None else logits[0]
        finally:
            hook.remove()
            for i, module in enumerate(saved):
                self.layers[i] = module


# --------------------------------------------------------------------------- merging


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (TIES step 1)."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.abs().reshape(-1).float().topk(k).indices] = True
    return delta * keep.view_as(delta)


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               density: float = 0.53, alg: str = "ties") -> torch.Tensor:
    """base + Ties({τ_i = tensors_i − base}) [P Eq. 8], as upstream's GTA(magnitude, sum, normalize).

    ties: trim each τ_i to its top-`density` magnitudes, elect a sign per entry from Σ λ_i τ_i,
    and take the λ-weighted mean of the entries that agree with it (disjoint mean).
    linear: the λ-weighted mean of the τ_i (no trim, no election).
    """
    w = torch.tensor(list(weights), dtype=torch.float32).view(-1, *([1] * base.dim()))
    if alg == "linear":
        deltas = torch.stack([t.float() - base.float() for t in tensors])
        return (base.float() + (deltas * w).sum(0) / w.sum(0)).to(base.dtype)
    deltas = torch.stack([trim_magnitude(t.float() - base.float(), density) for t in tensors])
    weighted = deltas * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (deltas.sign() == elected).float()
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1.0
    return (base.float() + (weighted * agree).sum(0) / divisor).to(base.dtype)


def random_mask(shape: torch.Size, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(ρ) gradient mask over every entry [P Eq. 7]."""
    return torch.rand(shape, generator=generator) < ratio


# --------------------------------------------------------------------------- the editor


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, template: str, prompt: str,
                  max_tokens: int = 256) -> tuple[list[int], int]:
    """Token ids of `template` filled with `prompt`, and the index of the prompt's first token.

    A random prefix is text the router will never see at inference; knowing where the edit
    prompt itself starts lets the margin loss look at the tokens the router looks at. Found from
    the character offsets (tokenizers without offsets: the whole row counts as the prompt).
    """
    text = template.replace("{}", prompt)
    at = template.index("{}")
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        enc = None
    if enc is None or "offset_mapping" not in enc:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][-max_tokens:]
        return ids, 0
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # The first token that ends inside the prompt (a token may carry the space before it).
    start = next((k for k, (a, b) in enumerate(offsets) if b > at and b > a), len(ids))
    cut = max(0, len(ids) - max_tokens)
    return ids[cut:], max(0, start - cut)


def length_buckets(lengths: Sequence[int], slack: float = 0.2) -> list[list[int]]:
    """Indices grouped so that each group pads to its longest row with little waste.

    Longest first; a row joins the open group while it is at least (1 - slack) times the
    group's longest. A batch of edits mixes 10-token prefixed copies with bare prompts and long
    irrelevant texts: padded to one width, two thirds of the computed tokens were padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= (1.0 - slack) * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class _Padded:
    """Some rows of a batch of edits, left-padded to their longest."""

    index: torch.Tensor          # (B,) row numbers in the batch
    ids: torch.Tensor            # (B, L)
    mask: torch.Tensor           # (B, L)
    prompt_mask: torch.Tensor    # (B, L) the edit prompt's own tokens (no random prefix, no target)
    target_ids: torch.Tensor     # (B, T) right-aligned, zeros for irrelevant rows
    target_mask: torch.Tensor    # (B, T)
    hidden: torch.Tensor | None = None   # (B, L, d) entering the side-memory layer


@dataclass
class _IrrelevantTokens:
    """Irrelevant texts as the router sees them: the inputs of the wrapped module, token by token.

    Nothing below the side memory depends on W_v', so these inputs are fixed while editing and
    the margin loss on irrelevant text needs only the module's two outputs, not the layers
    above it. The tokens of all texts are flattened, `(1, N, d_in)`.
    """

    x: torch.Tensor              # (1, N, d_in)
    main: torch.Tensor           # (1, N, d_out) the main memory's output
    text: torch.Tensor           # (N,) which text each token belongs to
    count: int                   # number of texts


@dataclass
class _Rows:
    """Token rows of one batch of edits: every template of every edit, then the irrelevant texts."""

    tokens: list[list[int]]      # prompt (+ target) ids per row
    prompt_lengths: list[int]    # prefix + prompt
    prompt_starts: list[int]     # where the edit prompt's own tokens start (after a random prefix)
    target_lengths: list[int]
    edit_of_row: torch.Tensor    # (R,) edit index in the batch, -1 for irrelevant rows
    template_of_row: torch.Tensor  # (R,) template index (0: the bare prompt), -1 for irrelevant rows
    pad_id: int

    def padded(self, index: Sequence[int]) -> _Padded:
        seqs = [self.tokens[i] for i in index]
        ids, mask = _left_pad(seqs, self.pad_id)
        width, twidth = ids.shape[1], max(1, max(self.target_lengths[i] for i in index))
        prompt_mask = mask.clone()
        target_ids = torch.zeros(len(seqs), twidth, dtype=torch.long)
        target_mask = torch.zeros(len(seqs), twidth, dtype=torch.bool)
        for b, i in enumerate(index):
            offset = width - len(seqs[b])
            prompt_mask[b, :offset + self.prompt_starts[i]] = 0
            prompt_mask[b, offset + self.prompt_lengths[i]:] = 0
            t = self.target_lengths[i]
            if t:
                target_ids[b, twidth - t:] = torch.tensor(seqs[b][-t:])
                target_mask[b, twidth - t:] = True
        return _Padded(torch.tensor(list(index)), ids, mask, prompt_mask, target_ids, target_mask)


class WISE:
    """WISE editing of one LLM (a `ScorableLM` for the shared evaluator).

    Construction wraps the FFN value matrix of `layer` (the model behaves exactly as before).
    `edit(facts, irrelevant)` writes a batch of edits into the side memory and `commit()`
    handles shard rollover and merging; `finish()` merges what is left (WISE-Merge).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int, *,
                 hparams: WISEHParams | None = None, llm_name: str | None = None,
                 llm_identity: dict | None = None, prefixes: Sequence[str] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.hparams = hp = hparams or WISEHParams()
        hp.check()
        self.site = locate_ffn(model, layer)
        if isinstance(self.site.module, WISELayer):
            raise ValueError(f"{self.site.path} already carries WISE; call .remove() on it first.")
        self.llm_identity = llm_identity or model_identity(model, llm_name or type(model).__name__)
        self.wrapper = WISELayer(self.site.module, value_matrix_names(self.site), activation_function(model),
                                 hp.act_space, hp.reduction, hp.skip_first_token, hp.retrieve_by)
        setattr(self.site.parent, self.site.attr, self.wrapper)
        self.runner = BlockRunner(model, self.site.layer)
        self._prefixes = list(prefixes) if prefixes is not None else None
        self.generator = torch.Generator().manual_seed(hp.seed)
        self.memories: list[Memory] = []     # retrieve: merged groups and saved shards; merge: ≤ 1 merged memory
        self.pending: list[Memory] = []      # merge: saved shards waiting for the next merge
        self.side = self._fresh_side(0)
        self.masks = self._new_masks()
        self.global_min_act = math.inf       # merge: ε uses the min over every edit
        self.total_edits = 0
        self.merges = 0
        self.edit_log: list[dict[str, Any]] = []
        self.calibration_texts: list[str] = []
        self._calibration_tokens: _IrrelevantTokens | None = None
        self._sync_candidates()

    # ---- state -------------------------------------------------------------------------------
    @property
    def layer(self) -> int:
        return self.site.layer

    def _fresh_side(self, shard: int) -> Memory:
        return Memory({n: w.detach().clone() for n, w in self.wrapper.main_weights().items()}, shards=[shard])

    def _new_masks(self) -> dict[str, torch.Tensor]:
        return {n: random_mask(w.shape, self.hparams.mask_ratio, self.generator) for n, w in self.side.weights.items()}

    @property
    def shard_index(self) -> int:
        return self.side.shards[0]

    def candidates(self) -> list[tuple[Memory, float]]:
        """What the router chooses from, each with its ε (spec §3, §8.5)."""
        hp = self.hparams
        live = [m for m in self.memories] + ([self.side] if self.side.edits else [])

        def eps(m: Memory) -> float:
            e = (self.global_min_act if hp.variant == "merge" else m.min_act) * hp.act_ratio
            if hp.eps_quantile is not None and m.calibration_acts:
                e = max(e, float(torch.tensor(m.calibration_acts).quantile(hp.eps_quantile)))
            return e
        return [(m, eps(m)) for m in live]

    def _sync_candidates(self) -> None:
        self.wrapper.candidates = self.candidates()

    def calibrate(self, texts: Sequence[str]) -> None:
        """Held-out irrelevant texts (never in the margin loss) whose Δ_act on each memory sets the
        `eps_quantile` floor of its ε; measured again whenever a memory's weights change."""
        self.calibration_texts = list(texts)
        self._calibration_tokens = None
        for m in [*self.memories, *self.pending, self.side]:
            self._measure_calibration(m)
        self._sync_candidates()

    def _measure_calibration(self, memory: Memory) -> None:
        if not self.calibration_texts or not memory.edits:
            return
        if self._calibration_tokens is None:
            self._calibration_tokens = self._irrelevant_tokens(self.calibration_texts)
        with torch.no_grad():
            memory.calibration_acts = self._irrelevant_gaps(self._calibration_tokens, memory.weights).tolist()

    @property
    def prefixes(self) -> list[str]:
        """Random prefixes: model-generated texts after the seed words, made once [P §3.1, C]."""
        if self._prefixes is None:
            with self.wrapper.set_mode("main"):
                self._prefixes = [p for n in self.hparams.prefix_lengths for p in generate_prefixes(
                    self.model, self.tokenizer, self.hparams.prefixes_per_length, n, PREFIX_SEEDS)]
        return self._prefixes

    @property
    def templates(self) -> list[str]:
        return ["{}"] + [f"{p} {{}}" for p in self.prefixes]

    # ---- editing -----------------------------------------------------------------------------
    def _rows(self, facts: Sequence[Fact]) -> _Rows:
        """Every template (bare prompt, random prefixes) of every edit, with its target."""
        tok, hp = self.tokenizer, self.hparams
        seqs, plens, starts, tlens, owner, template_of = [], [], [], [], [], []
        for e, fact in enumerate(facts):
            target = encode_target(tok, fact.target)[:hp.max_target_tokens]
            for j, template in enumerate(self.templates):
                prompt, start = prompt_tokens(tok, template, fact.prompt)
                seqs.append(prompt + target)
                plens.append(len(prompt))
                starts.append(start)
                tlens.append(len(target))
                owner.append(e)
                template_of.append(j)
        return _Rows(seqs, plens, starts, tlens, torch.tensor(owner), torch.tensor(template_of), tok.pad_token_id)

    @torch.no_grad()
    def _irrelevant_tokens(self, texts: Sequence[str]) -> _IrrelevantTokens:
        """The wrapped module's inputs on `texts` (layers above it are not run) and its main output."""
        tok, hp, w = self.tokenizer, self.hparams, self.wrapper
        seqs = [tok(t, add_special_tokens=True)["input_ids"][-hp.max_irrelevant_tokens:] for t in texts]
        xs, owners = [], []
        captured: dict[str, torch.Tensor] = {}

        def pre(module, args):
            captured["x"] = args[0].detach()
            raise StopForward
        hook = w.inner.register_forward_pre_hook(pre)
        try:
            for group in length_buckets([len(q) for q in seqs], hp.bucket_slack):
                ids, mask = _left_pad([seqs[i] for i in group], tok.pad_token_id)
                try:
                    self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), use_cache=False)
                except StopForward:
                    pass
                keep = without_first_token(mask) if hp.skip_first_token else mask
                x = captured["x"].reshape(*mask.shape, -1)
                xs.append(x[keep.bool()])
                owners.append(torch.tensor(group)[:, None].expand_as(mask)[keep.bool()])
        finally:
            hook.remove()
        x = torch.cat(xs)[None]
        return _IrrelevantTokens(x, w._call(w.main_weights(), x, (), {}).detach(), torch.cat(owners), len(seqs))

    def _irrelevant_gaps(self, irr: _IrrelevantTokens, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """Δ_act of each irrelevant text `(count,)`: the mean over its tokens."""
        w = self.wrapper
        gaps = token_gaps(irr.main, w._call(side, irr.x, (), {}), w.act, self.hparams.act_space)[0]
        total = gaps.new_zeros(irr.count).index_add(0, irr.text, gaps)
        return total / torch.bincount(irr.text, minlength=irr.count).clamp_min(1).to(gaps.dtype)

    def _margin_loss(self, d_in: torch.Tensor, d_out: torch.Tensor,
                     d_replay: torch.Tensor | None = None) -> torch.Tensor:
        """L_a [P Eq. 5], plus L_memo [P App. B.3] on replayed edits of earlier shards; each hinge
        averaged over its positive entries (upstream)."""
        hp = self.hparams

        def pos_mean(x: torch.Tensor) -> torch.Tensor:
            pos = x > 0
            return x[pos].mean() if bool(pos.any()) else x.new_zeros(())
        loss = (pos_mean(d_out - hp.alpha) + pos_mean(hp.beta - d_in)
                + pos_mean(d_out[:, None] - d_in[None, :] + hp.gamma))
        return loss if d_replay is None else loss + pos_mean(d_replay - hp.alpha)

    def _replay_texts(self, n: int) -> list[str]:
        """L_memo's x_m: `replay_per_edit` edits per new edit, drawn from the shards already saved,
        so the side memory being written stays inactive on them (WISE-Retrieve's precision)."""
        if not self.hparams.replay_per_edit:
            return []
        pool = [e["text"] for e in self.edit_log if e["shard"] != self.shard_index and e.get("text")]
        if not pool:
            return []
        pick = torch.randperm(len(pool), generator=self.generator)[:self.hparams.replay_per_edit * n]
        return [pool[i] for i in pick.tolist()]

    def edit(self, facts: Sequence[Fact], irrelevant: Sequence[str]) -> dict[str, float]:
        """Write a batch of edits into the side memory (one optimisation; spec §4).

        `irrelevant` are texts that must keep the main memory (one per edit upstream). Each edit
        has its own loss (NLL over its templates + L_a against the batch's irrelevant rows) and
        stops on its own; the batch's loss is their sum, so one edit gets the same gradient as alone.
        """
        facts = list(facts)
        if not facts:
            return {}
        if not irrelevant:
            raise ValueError("WISE needs at least one irrelevant text per batch of edits (the margin loss).")
        hp, w = self.hparams, self.wrapper
        start = time.perf_counter()
        rows = self._rows(facts)
        irr = self._irrelevant_tokens(list(irrelevant))
        replay = self._replay_texts(len(facts))
        replayed = self._irrelevant_tokens(replay) if replay else None
        lengths = [len(t) for t in rows.tokens]
        hidden: list[torch.Tensor] = [None] * len(lengths)         # per row: (len, d) entering the layer
        for group in length_buckets(lengths, hp.bucket_slack):
            batch = rows.padded(group)
            h = self.runner.capture(batch.ids, batch.mask)
            for b, i in enumerate(group):
                hidden[i] = h[b, h.shape[1] - lengths[i]:]
        main = {n: t.detach() for n, t in w.main_weights().items()}
        side = {n: t.requires_grad_(True) for n, t in self.side.weights.items()}
        masks = self.masks
        hooks = [side[n].register_hook(lambda g, m=masks[n]: g * m) for n in side]
        opt = self._optimizer(list(side.values()))
        n = len(facts)
        owner_all = rows.edit_of_row
        done = torch.zeros(n, dtype=torch.bool)
        prev = torch.full((n,), math.inf)
        steps = torch.zeros(n, dtype=torch.long)
        final_loss, final_nll, act = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        buckets, bucket_live = [], None
        try:
            for it in range(hp.n_iter):
                live = ~done[owner_all]
                if bucket_live is None or not torch.equal(live, bucket_live):
                    idx = live.nonzero().squeeze(1).tolist()
                    buckets = [self._bucket(rows, [idx[k] for k in g], hidden)
                               for g in length_buckets([lengths[i] for i in idx], hp.bucket_slack)]
                    bucket_live = live
                parts = [self._forward_rows(b, side) for b in buckets]
                index = torch.cat([b.index for b in buckets])
                d_in = torch.cat([p[0] for p in parts])
                d_route = torch.cat([p[1] for p in parts])
                nll_row = torch.cat([p[2] for p in parts])
                owner = owner_all[index]
                template = rows.template_of_row[index]
                d_out = self._irrelevant_gaps(irr, side)
                d_replay = self._irrelevant_gaps(replayed, side) if replayed is not None else None
                losses, nlls = {}, {}
                for e in owner.unique().tolist():
                    mine = owner == e
                    nlls[e] = nll_row[mine].mean()
                    losses[e] = nlls[e] + hp.margin_weight * self._margin_loss(d_in[mine], d_out, d_replay)
                    # The bare prompt (template 0) is what the router will see.
                    act[e] = float(d_route[mine & (template == 0)].mean())
                finishing = []
                for e, loss in losses.items():
                    value = float(loss.detach())
                    steps[e], final_loss[e], final_nll[e] = it, value, float(nlls[e].detach())
                    stop = value <= hp.early_stop_loss and abs(value - float(prev[e])) <= hp.early_stop_delta
                    prev[e] = value
                    if stop:
                        finishing.append(e)
                done[finishing] = True
                if bool(done.all()) or it == hp.n_iter - 1:
                    break
                total = sum(loss for e, loss in losses.items() if e not in finishing)
                opt.zero_grad()
                total.backward()
                if hp.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(side.values()), hp.clip_grad_norm)
                opt.step()
                with torch.no_grad():
                    for name, t in side.items():
                        if not hp.code_faithful_wd and hp.weight_decay:
                            # Decoupled decay of the task vector, inside the shard's subspace only (§8.14).
                            t.sub_(hp.lr * hp.weight_decay * (t - main[name]) * masks[name])
                        if hp.norm_constraint is not None:
                            t.copy_(torch.clamp(t, main[name] - hp.norm_constraint, main[name] + hp.norm_constraint))
        finally:
            for h in hooks:
                h.remove()
            for t in side.values():
                t.requires_grad_(False)
                t.grad = None
        seconds = time.perf_counter() - start
        for e, fact in enumerate(facts):
            self.side.min_act = min(self.side.min_act, float(act[e]))
            self.global_min_act = min(self.global_min_act, float(act[e]))
            self.edit_log.append({"id": fact.id, "text": f"{fact.prompt} {fact.target}",
                                  "position": self.total_edits + e, "shard": self.shard_index,
                                  "batch_seconds": seconds, "steps": int(steps[e]) + 1,
                                  "final_loss": float(final_loss[e]), "final_nll": float(final_nll[e]),
                                  "act": float(act[e]), "time": time.time()})
        self.side.edits += n
        self.total_edits += n
        self._measure_calibration(self.side)
        self._sync_candidates()
        return {"edits": n, "seconds": seconds, "replayed": len(replay), "final_loss": float(final_loss.mean()),
                "final_nll": float(final_nll.mean()), "steps": float(steps.float().mean()) + 1,
                "act": float(act.mean()), "act_min": float(act.min())}

    def _bucket(self, rows: _Rows, index: list[int], hidden: list[torch.Tensor]) -> _Padded:
        """Rows of one forward pass: padded tokens and the cached hidden states entering the layer."""
        batch = rows.padded(index)
        width = batch.ids.shape[1]
        h = hidden[index[0]].new_zeros(len(index), width, hidden[index[0]].shape[-1])
        for b, i in enumerate(index):
            h[b, width - hidden[i].shape[0]:] = hidden[i]
        batch.hidden = h
        return batch

    def _forward_rows(self, batch: _Padded, side: dict[str, torch.Tensor]):
        """One forward of some rows through the layers from the side memory up, with W_v'.

        Returns per row: Δ_act for the margin loss, Δ_act on the prompt (the router's view,
        no gradient) and the target NLL (0 for irrelevant rows). The LM head runs only where the
        NLL needs it: the positions that predict an edit's target tokens.
        """
        hp, w = self.hparams, self.wrapper
        keep = batch.target_ids.shape[1] + 1
        select = torch.cat([batch.target_mask, torch.zeros(len(batch.index), 1, dtype=torch.bool)], dim=1)
        w.editing = side
        try:
            logits = self.runner.logits(batch.hidden, batch.ids, batch.mask, keep, select)   # (N, V)
            main_out, side_out = w.recorded
        finally:
            w.editing, w.recorded = None, None
        gaps = token_gaps(main_out, side_out, w.act, hp.act_space)
        route_tokens = without_first_token(batch.prompt_mask) if hp.skip_first_token else batch.prompt_mask
        gap_tokens = route_tokens if hp.train_gap_tokens == "prompt" else (
            without_first_token(batch.mask) if hp.skip_first_token else batch.mask)
        d_train = reduce_gaps(gaps, gap_tokens, hp.reduction, inference=False)
        with torch.no_grad():
            d_route = reduce_gaps(gaps, route_tokens, hp.reduction, inference=True)
        tmask = batch.target_mask
        nll = torch.zeros(len(batch.index))
        if bool(tmask.any()):
            logp = logits.float().log_softmax(-1).gather(-1, batch.target_ids[tmask][:, None]).squeeze(-1)
            row_of_token = torch.arange(len(batch.index))[:, None].expand_as(tmask)[tmask]
            nll = nll.index_add(0, row_of_token, -logp) / tmask.sum(1).clamp_min(1)
        return d_train, d_route, nll

    def _optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        hp = self.hparams
        decay = hp.weight_decay if hp.code_faithful_wd else 0.0
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr, eps=hp.adam_eps, weight_decay=decay)
        return torch.optim.SGD(params, lr=hp.lr, weight_decay=decay)

    def commit(self) -> dict[str, bool]:
        """After a batch: store the shard and start a new one when it is full, or when the next full
        batch would not fit (a short batch mid-stream is then a shard of its own instead of having
        the next batch trained on top of it); merge when it is time (spec §4)."""
        hp = self.hparams
        saved = merged = False
        if self.side.edits and self.side.edits + hp.batch_size > hp.save_freq:
            self._save_shard()
            saved = True
            if len(self._unmerged()) >= hp.merge_freq // hp.save_freq:
                self._merge(self._unmerged())
                merged = True
        self._sync_candidates()
        return {"saved": saved, "merged": merged}

    def _unmerged(self) -> list[Memory]:
        if self.hparams.variant == "merge":
            return self.pending
        return [m for m in self.memories if m.kind == "shard"]

    def _save_shard(self) -> None:
        shard = self.side
        shard.kind = "shard"
        # WISE-Merge keeps saved shards aside until the merge; WISE-Retrieve can already retrieve them.
        (self.pending if self.hparams.variant == "merge" else self.memories).append(shard)
        self.side = self._fresh_side(self.shard_index + 1)
        self.masks = self._new_masks()

    def _merge(self, shards: list[Memory]) -> None:
        """TIES-merge stored shards [P Eq. 8]; later WISE-Merge merges keep 0.6 of the old memory."""
        if not shards:
            return
        hp = self.hparams
        base = {n: t.detach() for n, t in self.wrapper.main_weights().items()}
        k = len(shards)
        if hp.variant == "merge" and self.memories:
            old = self.memories[0]
            parts = shards + [old]
            weights = [(1.0 - hp.remerge_old_weight) / k] * k + [hp.remerge_old_weight]
        else:
            parts, weights = shards, [hp.merge_weight / k] * k
        merged = Memory({n: ties_merge(base[n], [p.weights[n] for p in parts], weights, hp.density, hp.merge_alg)
                         for n in base},
                        min_act=min(p.min_act for p in parts), shards=[s for p in parts for s in p.shards],
                        edits=sum(p.edits for p in parts), kind="merged")
        self._measure_calibration(merged)
        if hp.variant == "merge":
            self.memories = [merged]
            self.pending = []
        else:
            self.memories = [m for m in self.memories if all(m is not s for s in shards)] + [merged]
        self.merges += 1

    def finish(self) -> None:
        """End of the stream. WISE-Merge merges what is left once a shard was ever full, as upstream
        does before inference; below `save_freq` edits the side memory is used as it is (§8.4)."""
        if self.hparams.variant == "merge" and self.total_edits >= self.hparams.save_freq:
            if self.side.edits:
                self._save_shard()
            self._merge(self.pending)
        self._sync_candidates()

    # ---- inference ---------------------------------------------------------------------------
    @property
    def unedited(self) -> SwitchedOffLM:
        return SwitchedOffLM(self.model, self.tokenizer, lambda: self.wrapper.set_mode("main"))

    @torch.no_grad()
    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None) -> torch.Tensor:
        """`ScorableLM`: each row routed on its prompt tokens (never on the teacher-forced answer)."""
        route_mask = attention_mask.clone()
        if answer_lengths is not None:
            width = route_mask.shape[1]
            cols = torch.arange(width)[None, :]
            route_mask[cols >= width - answer_lengths.view(-1, 1)] = 0
        self.wrapper.route_mask = route_mask
        try:
            return causal_logits(self.model, input_ids, attention_mask, keep)
        finally:
            self.wrapper.route_mask = None

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, use_wise: bool = True) -> list[str]:
        """Greedy answers; each prompt's route is decided on the prompt and pinned while decoding."""
        ids, mask = prompt_batch(self.tokenizer, list(prompts))
        w = self.wrapper
        w.route_mask, w.pin, w.pinned = mask, True, None
        try:
            with contextlib.nullcontext() if use_wise else w.set_mode("main"):
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        finally:
            w.route_mask, w.pin, w.pinned = None, False, None
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, ids.shape[1]:]]

    @torch.no_grad()
    def routes(self, prompts: Sequence[str], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(route, Δ_act per candidate) for each prompt; -1 = main memory. Layers above are not run."""
        routes, gaps = [], []
        w = self.wrapper

        def probe(layer: WISELayer) -> None:
            raise StopForward
        for s in range(0, len(prompts), batch_size):
            ids, mask = prompt_batch(self.tokenizer, list(prompts[s:s + batch_size]))
            w.route_mask, w.probe, w.last_gaps = mask, probe, None
            try:
                self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), use_cache=False)
            except StopForward:
                pass
            finally:
                w.route_mask, w.probe = None, None
            routes.append(w.last_route.clone())
            m = len(w.candidates)
            gaps.append(w.last_gaps.clone() if w.last_gaps is not None else torch.zeros(ids.shape[0], m))
        return torch.cat(routes), torch.cat(gaps)

    def memory_of_edit(self) -> dict[str, int]:
        """Candidate index holding each edit (by fact id), for retrieval precision."""
        where: dict[int, int] = {}
        for j, (memory, _) in enumerate(self.wrapper.candidates):
            for s in memory.shards:
                where[s] = j
        return {e["id"]: where.get(e["shard"], -1) for e in self.edit_log}

    def remove(self) -> None:
        """Put the original module back: the LLM is exactly as before."""
        setattr(self.site.parent, self.site.attr, self.wrapper.inner)

    # ---- persistence -------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for j, m in enumerate(self.memories):
            out.update({f"memory{j}.{n}": t for n, t in m.weights.items()})
        for j, m in enumerate(self.pending):
            out.update({f"pending{j}.{n}": t for n, t in m.weights.items()})
        out.update({f"side.{n}": t for n, t in self.side.weights.items()})
        out.update({f"mask.{n}": t.to(torch.uint8) for n, t in self.masks.items()})
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    @staticmethod
    def _memory_info(m: Memory) -> dict[str, Any]:
        return {"min_act": m.min_act if math.isfinite(m.min_act) else None, "shards": m.shards, "edits": m.edits,
                "kind": m.kind, "calibration_acts": m.calibration_acts}

    def save(self, directory: str | Path, info: dict[str, Any] | None = None) -> Path:
        """`wise.safetensors` (memories, current side memory, masks) + `manifest.json` + `edits.jsonl`."""
        from safetensors.torch import save_file
        tensors = self.tensors()

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / TENSORS_FILE))
            with open(tmp / "edits.jsonl", "w", encoding="utf-8") as fh:
                for e in self.edit_log:
                    fh.write(json.dumps(e) + "\n")
            manifest = {"format_version": FORMAT_VERSION, "kind": "wise", "llm": self.llm_identity,
                        "layer": self.layer, "site": self.site.path, "site_kind": self.site.kind,
                        "value_matrices": self.wrapper.value_names, "hparams": dataclasses.asdict(self.hparams),
                        "prefixes": self.prefixes, "memories": [self._memory_info(m) for m in self.memories],
                        "pending": [self._memory_info(m) for m in self.pending], "side": self._memory_info(self.side),
                        "global_min_act": self.global_min_act if math.isfinite(self.global_min_act) else None,
                        "thresholds": [eps for _, eps in self.wrapper.candidates],
                        "calibration_texts": self.calibration_texts,
                        "total_edits": self.total_edits, "merges": self.merges,
                        "generator_state": self.generator.get_state().tolist(),
                        "tensors_sha256": tensors_fingerprint(tensors),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}
            (tmp / "manifest.json").write_text(json.dumps(sealed(manifest), indent=2, default=str), encoding="utf-8")
        return write_dir_atomically(Path(directory), write)

    @classmethod
    def load(cls, directory: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
             llm_name: str | None = None, llm_identity: dict | None = None) -> "WISE":
        """Attach saved side memories to `model`; refused if they were built for another LLM."""
        from safetensors.torch import load_file
        directory = Path(directory)
        identity = llm_identity or model_identity(model, llm_name or type(model).__name__)
        manifest = open_llm_artifact(directory, "wise", "WISE side memory", identity, "edit this LLM with stage=wise")
        if not (directory / TENSORS_FILE).is_file():
            raise ArtifactError(f"The WISE side memory at {directory} is incomplete: {TENSORS_FILE} is missing.")
        tensors = read_or_refuse("The WISE side memory's tensors", directory / TENSORS_FILE,
                                 lambda: load_file(str(directory / TENSORS_FILE)))
        if tensors_fingerprint(tensors) != manifest["tensors_sha256"]:
            raise ArtifactError(f"The tensors in {directory / TENSORS_FILE} do not match the hash in its manifest; "
                                "the side memory was modified after it was written.")
        wise = cls(model, tokenizer, manifest["layer"], hparams=WISEHParams.from_dict(manifest["hparams"]),
                   llm_identity=identity, prefixes=manifest["prefixes"])

        def memory(prefix: str, meta: dict) -> Memory:
            return Memory({n: tensors[f"{prefix}.{n}"] for n in wise.wrapper.value_names},
                          math.inf if meta["min_act"] is None else meta["min_act"], list(meta["shards"]),
                          meta["edits"], meta["kind"], list(meta.get("calibration_acts", [])))
        wise.memories = [memory(f"memory{j}", meta) for j, meta in enumerate(manifest["memories"])]
        wise.pending = [memory(f"pending{j}", meta) for j, meta in enumerate(manifest["pending"])]
        wise.side = memory("side", manifest["side"])
        wise.masks = {n: tensors[f"mask.{n}"].bool() for n in wise.wrapper.value_names}
        g = manifest["global_min_act"]
        wise.global_min_act = math.inf if g is None else g
        wise.total_edits, wise.merges = manifest["total_edits"], manifest["merges"]
        wise.calibration_texts = list(manifest.get("calibration_texts", []))
        wise.generator.set_state(torch.tensor(manifest["generator_state"], dtype=torch.uint8))
        path_edits = directory / "edits.jsonl"
        wise.edit_log = [json.loads(line) for line in path_edits.read_text(encoding="utf-8").splitlines()
                         if line.strip()] if path_edits.is_file() else []
        wise._sync_candidates()
        return wise
