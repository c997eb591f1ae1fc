"""NeuralDB: edited facts as a gated key-value database on one FFN output projection.

Plain torch + transformers (no Lightning / Hydra / W&B). The LLM's weights are never changed:
the module at layer l* that writes the FFN's output into the residual stream is replaced by
`GatedFFNOut`, which returns the original output plus the residual r_j of the best-matching
stored key k_j when cos(k, k_j) > γ, independently at every token position (spec §3, Eq. 11-12).

* keys: the input of that module at the subject's last token, averaged over the bare prompt and
  a few model-generated prefixes (MEMIT's context templates, spec §3);
* residuals: a vector δ added to that module's output at the same token, optimised so the model
  predicts the new object (NLL + KL on "{subject} is a" + weight decay, clamped, early stop),
  in batches of facts, every fact against the unedited model;
* a database API: `add`, `delete`, `modify`, `save` / `load` (safetensors + JSON manifest,
  refused for another LLM), and γ calibrated from the edits and out-of-scope prompts.

Where δ is added. The spec adds δ to the decoder block's output and stores r = δ. For pre-norm
blocks (Llama, GPT-2, GPT-J, Mixtral, ...) the FFN output is added to the residual stream as
is, so adding δ there or at the block output is the same computation. Models with a norm after
the FFN (Gemma-2/3 `post_feedforward_layernorm`) break that identity, so δ is added exactly
where the gate adds r: at the output of the wrapped module. The clamp and weight decay still
use the norm of the block's output (the residual stream), as upstream.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mindbridge.artifacts import ArtifactError, open_llm_artifact, read_or_refuse, sealed
from mindbridge.atomic import write_dir_atomically
from mindbridge.lm import SwitchedOffLM, causal_logits, lm_head_only_at
from mindbridge.loading import model_identity, tensors_fingerprint
from mindbridge.facts import Fact, context_templates, facts_hash, generate_prefixes, subject_last_token
from mindbridge.ffn import StopForward, decoder_layers, hidden_size, key_dim, locate_ffn, out_dim
from mindbridge.tokenization import _left_pad, encode_target, position_ids_for, prompt_batch

FORMAT_VERSION = 1
PAPER_GAMMA = 0.65                  # [P Table 3]; used only when there is nothing to calibrate on
TENSORS_FILE = "database.safetensors"

def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def best_match(queries_hat: torch.Tensor, keys_hat: torch.Tensor,
               chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine and its key index for every query row, `(N,)` each, chunked over the keys.

    Inputs are L2-normalised. Chunks of `chunk_size` keys (default: about 2^24 similarities at
    a time) bound the memory, so 100,000 keys fit whatever the number of positions.
    """
    n, m = queries_hat.shape[0], keys_hat.shape[0]
    if m == 0:
        return queries_hat.new_full((n,), -math.inf), torch.zeros(n, dtype=torch.long, device=queries_hat.device)
    q = queries_hat.to(keys_hat.dtype)
    chunk = chunk_size or max(1024, (1 << 24) // max(1, n))
    best = torch.full((n,), -math.inf, device=q.device)
    index = torch.zeros(n, dtype=torch.long, device=q.device)
    for start in range(0, m, chunk):
        sim = (q @ keys_hat[start:start + chunk].T).float()
        b, j = sim.max(dim=1)
        better = b > best                              # strict: ties keep the earlier key (as argmax)
        best = torch.where(better, b, best)
        index = torch.where(better, j + start, index)
    return best, index


class GatedFFNOut(nn.Module):
    """`inner(x) + r_j · 1[cos(k, k_j) > γ]`, j = argmax_i cos(k, k_i), at every position.

    `k` is the module's input (the FFN intermediate activation, or the MoE block's input). The
    database lives in non-persistent buffers, so the LLM's `state_dict` stays the LLM's (its
    wrapped weights appear under `<name>.inner.*`). Positions that do not fire are returned
    untouched, so an empty database, γ > 1 or `enabled = False` give bit-identical outputs.

    Two hooks serve the editor: `probe(x)` sees the input (key capture; it may raise
    `StopForward` to end the forward pass early), and `inject = (rows, cols, vectors)` adds
    vectors at those positions (the δ being optimised).
    """

    def __init__(self, inner: nn.Module, key_dim: int, out_dim: int, gamma: float = PAPER_GAMMA,
                 key_dtype: torch.dtype = torch.float32, chunk_size: int | None = None):
        super().__init__()
        self.inner = inner
        param = next(inner.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        self.register_buffer("keys_hat", torch.zeros(0, key_dim, dtype=key_dtype), persistent=False)
        self.register_buffer("key_norms", torch.zeros(0), persistent=False)
        self.register_buffer("residuals", torch.zeros(0, out_dim, dtype=dtype), persistent=False)
        self.gamma = float(gamma)
        self.chunk_size = chunk_size
        self.enabled = True
        self.probe = None
        self.inject: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.positions_seen = 0
        self.positions_fired = 0

    @property
    def num_facts(self) -> int:
        return self.keys_hat.shape[0]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The unedited model inside this context."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fired, index, best) for key rows `(N, d1)`."""
        best, index = best_match(normalize_rows(keys.float()), self.keys_hat, self.chunk_size)
        return best > self.gamma, index, best

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.probe is not None:
            self.probe(x)
        out = self.inner(x, *args, **kwargs)
        value = out[0] if isinstance(out, tuple) else out
        if self.inject is not None:
            rows, cols, vectors = self.inject
            value = value.index_put((rows, cols), vectors.to(value.dtype), accumulate=True)
        elif self.enabled and self.num_facts and self.gamma <= 1.0:
            flat = x.reshape(-1, x.shape[-1])
            fired, index, _ = self.lookup(flat)
            self.positions_seen += flat.shape[0]
            if not bool(fired.any()):
                return out
            hit = fired.nonzero().squeeze(1)
            self.positions_fired += int(hit.numel())
            shape = value.shape
            value = value.reshape(-1, shape[-1]).index_add(0, hit, self.residuals[index[hit]].to(value.dtype))
            value = value.reshape(shape)
        else:
            return out
        return (value, *out[1:]) if isinstance(out, tuple) else value


# --------------------------------------------------------------------------- residual optimisation


@dataclass
class EditHParams:
    """Key / residual hyperparameters (spec §5; upstream MEMIT/AlphaEdit names in comments)."""

    steps: int = 25                    # v_num_grad_steps
    lr: float = 0.5                    # v_lr
    weight_decay: float = 0.5          # v_weight_decay
    clamp_norm_factor: float = 0.75    # clamp_norm_factor
    kl_factor: float = 0.0625          # kl_factor
    early_stop_loss: float = 0.05
    num_prefixes: int = 5              # context templates: "{}" + this many generated prefixes
    prefix_tokens: int = 10
    batch_size: int = 8                # facts optimised together
    kl_template: str = "{} is a"
    max_target_tokens: int = 32
    collision_cos: float = 0.95        # warn when two keys are this close (spec §8.6)
    bare_weight: float | None = None   # share of the bare prompt in the key (None: plain mean; `fact_keys`)
    rewordings: int = 0                # other wordings of the prompt per fact in the target NLL (`RewordingBank`)
    rewording_min_similarity: float = 0.5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditHParams":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def fact_keys(template_keys: torch.Tensor, bare_weight: float | None = None) -> torch.Tensor:
    """One key per fact from its keys in the context templates `(B, T, d1)`, template 0 the bare prompt.

    `bare_weight` None: the plain mean over the templates (the paper's Eq. 20). A number w: the
    direction w·unit(k_bare) + (1 − w)·unit(mean of the prefixed keys), at the plain mean's norm.
    The gate compares directions only; with the plain mean, a bare prompt whose subject opens
    the text (CounterFact's "Balige, which is located in") gets 1/6 of the say although its
    first tokens sit next to the attention sink and read unlike the prefixed ones, so its own
    edit prompt fell short of γ (SmolLM2 layer 5, CounterFact: 64% of edit prompts fired at
    the calibrated γ with the mean, 92% with w = 0.5).
    """
    mean = template_keys.mean(1)
    if bare_weight is None or template_keys.shape[1] < 2:
        return mean
    direction = (bare_weight * normalize_rows(template_keys[:, 0])
                 + (1.0 - bare_weight) * normalize_rows(template_keys[:, 1:].mean(1)))
    return normalize_rows(direction) * mean.norm(dim=-1, keepdim=True)


@dataclass
class _Row:
    fact: int          # index in the batch
    prefix: list[int]  # tokens before the subject's last token (their keys/values are cached)
    cont: list[int]    # subject's last token, rest of the prompt, target tokens
    target: list[int]  # empty for the KL row
    template: int      # context template index; KL_ROW, or REWORDED_ROW (NLL only, no key)


KL_ROW, REWORDED_ROW = -1, -2


class _PrefixKV:
    """Keys/values of the rows' prefixes under the frozen LM, computed once per batch of facts.

    Nothing before the subject's last token depends on δ, so each optimisation step only runs
    the rest of the row through the model (as `PromptKVStore`, but from token ids). Padded
    slots are zeros with mask 0.
    """

    def __init__(self, model: PreTrainedModel, rows: list[list[int]], pad_id: int, batch_size: int = 32):
        self.model = model
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * len(rows)
        todo = [i for i, r in enumerate(rows) if r]
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            ids, mask = _left_pad([rows[i] for i in idx], pad_id)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                            use_cache=True, logits_to_keep=1)
            layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            for b, i in enumerate(idx):
                n = len(rows[i])
                self.kv[i] = [(k[b, :, k.shape[2] - n:].clone(), v[b, :, v.shape[2] - n:].clone()) for k, v in layers]

    def batch(self, index: list[int]):
        """(DynamicCache or None, mask `(B, P)`) for these rows, left-padded."""
        from transformers import DynamicCache
        lengths = [0 if self.kv[i] is None else self.kv[i][0][0].shape[1] for i in index]
        width = max(lengths)
        mask = torch.zeros(len(index), width, dtype=torch.long)
        if width == 0:
            return None, mask
        for b, n in enumerate(lengths):
            mask[b, width - n:] = 1
        some = next(self.kv[i] for i in index if self.kv[i] is not None)
        cache = DynamicCache(config=self.model.config)
        for layer, (k0, v0) in enumerate(some):
            ks = k0.new_zeros(len(index), k0.shape[0], width, k0.shape[2])
            vs = v0.new_zeros(len(index), v0.shape[0], width, v0.shape[2])
            for b, i in enumerate(index):
                if self.kv[i] is not None:
                    ks[b, :, width - lengths[b]:] = self.kv[i][layer][0]
                    vs[b, :, width - lengths[b]:] = self.kv[i][layer][1]
            cache.update(ks, vs, layer)
        return cache, mask


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def row_logits(model: PreTrainedModel, pad_id: int, gate: GatedFFNOut, prefix_kv: _PrefixKV, rows: list[_Row],
               live: list[int], keep: int, vectors: torch.Tensor | None = None,
               where: dict[str, torch.Tensor] | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
    """Logits `(B, keep, V)` of the last `keep` positions of rows `live` (prefix from the cache).

    `vectors[b]` is added to the gated module's output at row b's subject's last token (the
    first token after its cached prefix); the gate itself is off. `where` receives the
    positions (`rows`, `cols`) for probes. `select` `(B, keep)` bool: only those positions'
    logits, `(N, V)` in row-major order. The LM head over the whole window (and the backward
    through its log-softmax) was two thirds of a residual step on a 49k-word vocabulary.
    """
    batch_rows = [rows[i] for i in live]
    cont_ids, cont_mask = _left_pad([r.cont for r in batch_rows], pad_id)
    cache, prefix_mask = prefix_kv.batch(live)
    full_mask = torch.cat([prefix_mask, cont_mask], dim=1)
    cols = torch.tensor([cont_ids.shape[1] - len(r.cont) for r in batch_rows])
    row_ix = torch.arange(len(batch_rows))
    if where is not None:
        where.update(rows=row_ix, cols=cols)
    gate.inject = None if vectors is None else (row_ix, cols, vectors)
    try:
        with gate.disabled(), lm_head_only_at(model, select) if select is not None else contextlib.nullcontext():
            logits = model(input_ids=cont_ids, attention_mask=full_mask,
                           position_ids=position_ids_for(full_mask)[:, prefix_mask.shape[1]:],
                           past_key_values=cache, use_cache=cache is not None, logits_to_keep=keep).logits.float()
        return logits if select is None else logits[0]
    finally:
        gate.inject = None


@dataclass
class BatchResult:
    keys: torch.Tensor            # (B, d1) mean over templates
    residuals: torch.Tensor       # (B, d2)
    cos_loo: torch.Tensor         # (B,) min over templates of cos(k_t, mean of the other templates' keys)
    cos_subject: torch.Tensor     # (B,) cos(k, key at the subject in "{subject} is a")
    final_loss: torch.Tensor      # (B,)
    final_nll: torch.Tensor       # (B,)
    steps: torch.Tensor           # (B,) gradient steps taken
    subject_found: torch.Tensor   # (B,) bool: found in every template of the edit prompt


def optimise_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gate: GatedFFNOut,
                   block: nn.Module, facts: Sequence[Fact], templates: Sequence[str],
                   hp: EditHParams, rewordings: Sequence[Sequence[str]] = ()) -> BatchResult:
    """Keys and residuals of a batch of facts, against the unedited model (gate off).

    One δ per fact, optimised together; a fact stops (and leaves the batch) once its loss is
    below `early_stop_loss`. The keys are read in the first step (δ does not change them).
    `rewordings[b]`: other texts asking fact b's relation about its subject; each adds a row
    to the target NLL (δ at its subject's last token, as the gate adds r there), not to the key.
    """
    rows: list[_Row] = []
    found = torch.ones(len(facts), dtype=torch.bool)
    for b, fact in enumerate(facts):
        target = encode_target(tokenizer, fact.target)[:hp.max_target_tokens]
        for t, template in enumerate(templates):
            text = template.replace("{}", fact.prompt)
            ids, s, ok = subject_last_token(tokenizer, text, fact.subject, start=template.index("{}"))
            found[b] &= ok
            rows.append(_Row(b, ids[:s], ids[s:] + target, target, t))
        for text in (rewordings[b] if b < len(rewordings) else ()):
            ids, s, ok = subject_last_token(tokenizer, text, fact.subject)
            if ok:
                rows.append(_Row(b, ids[:s], ids[s:] + target, target, REWORDED_ROW))
        ids, s, _ = subject_last_token(tokenizer, hp.kl_template.replace("{}", fact.subject), fact.subject)
        rows.append(_Row(b, ids[:s], ids[s:], [], KL_ROW))
    prefix_kv = _PrefixKV(model, [r.prefix for r in rows], tokenizer.pad_token_id)

    bsz, d1, d2 = len(facts), gate.keys_hat.shape[1], gate.residuals.shape[1]
    delta = torch.zeros(bsz, d2, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    done = torch.zeros(bsz, dtype=torch.bool)
    final_loss, final_nll = torch.zeros(bsz), torch.zeros(bsz)
    steps = torch.zeros(bsz, dtype=torch.long)
    template_keys = torch.zeros(bsz, len(templates), d1)
    subject_keys = torch.zeros(bsz, d1)
    h_norm = torch.ones(bsz)
    kl_init: torch.Tensor | None = None

    for step in range(hp.steps):
        live = [i for i, r in enumerate(rows) if not done[r.fact]]
        batch_rows = [rows[i] for i in live]
        fact_ix = torch.tensor([r.fact for r in batch_rows])
        tmax = max((len(r.target) for r in batch_rows), default=0)
        captured: dict[str, torch.Tensor] = {}
        hook = None
        if step == 0:                                   # keys and ‖h‖ at the subject, δ = 0
            def probe(x: torch.Tensor) -> None:
                captured["keys"] = x[captured["rows"], captured["cols"]].detach().float()

            def block_hook(module, args, output) -> None:
                captured["h"] = _first(output)[captured["rows"], captured["cols"]].detach().float()
            hook = block.register_forward_hook(block_hook)
            gate.probe = probe
        # Scored positions: those predicting each target token, and the KL row's last token.
        keep = tmax + 1
        select = torch.zeros(len(batch_rows), keep, dtype=torch.bool)
        for n, r in enumerate(batch_rows):
            if r.template == KL_ROW:
                select[n, keep - 1] = True
            else:
                select[n, keep - 1 - len(r.target):keep - 1] = True
        try:
            logits = row_logits(model, tokenizer.pad_token_id, gate, prefix_kv, rows, live, keep,
                                delta[fact_ix], captured, select)   # (N, V), row-major over `select`
        finally:
            gate.probe = None
            if hook is not None:
                hook.remove()

        pos_row = select.nonzero()[:, 0]                  # the row of each scored position
        is_kl = torch.tensor([r.template == KL_ROW for r in batch_rows])
        at_kl = is_kl[pos_row]
        logp = logits.log_softmax(-1)                      # (N, V), once for both losses
        # NLL of the target, averaged over its tokens, then over the fact's rows (templates, rewordings).
        targets = torch.tensor([t for r in batch_rows for t in r.target], dtype=torch.long)
        token_logp = logp[~at_kl].gather(-1, targets[:, None]).squeeze(-1)
        rw_rows = (~is_kl).nonzero().squeeze(1)
        lengths = torch.tensor([len(batch_rows[i].target) for i in rw_rows.tolist()]).clamp_min(1)
        nll_row = -torch.zeros(len(batch_rows)).index_add(0, pos_row[~at_kl], token_logp)[rw_rows] / lengths
        nll = torch.zeros(bsz).index_add(0, fact_ix[rw_rows], nll_row)
        nll = nll / torch.zeros(bsz).index_add(0, fact_ix[rw_rows], torch.ones(len(rw_rows))).clamp_min(1)
        # KL(P_edited || P_unedited) on "{subject} is a" (its first step has δ = 0: the reference).
        kl_rows = is_kl.nonzero().squeeze(1)
        kl_logp = logp[at_kl]
        kl_facts = fact_ix[kl_rows]
        if step == 0:
            kl_init = torch.zeros(bsz, kl_logp.shape[-1])
            kl_init[kl_facts] = kl_logp.detach()
            keys = captured["keys"]
            for n, r in enumerate(batch_rows):
                if r.template >= 0:
                    template_keys[r.fact, r.template] = keys[n]
                elif r.template == KL_ROW:
                    subject_keys[r.fact] = keys[n]
            bare = [n for n, r in enumerate(batch_rows) if r.template == 0]
            h_norm[fact_ix[bare]] = captured["h"][bare].norm(dim=-1).clamp_min(1e-6)
        kl = torch.zeros(bsz).index_add(
            0, kl_facts, (kl_logp.exp() * (kl_logp - kl_init[kl_facts])).sum(-1))
        decay = hp.weight_decay * delta.norm(dim=-1) / h_norm ** 2
        loss = nll + hp.kl_factor * kl + decay

        active = ~done
        steps[active] = step
        final_loss[active] = loss.detach()[active]
        final_nll[active] = nll.detach()[active]
        done |= active & (loss.detach() < hp.early_stop_loss)
        if step == hp.steps - 1 or bool(done.all()):
            break
        opt.zero_grad()
        loss[~done].sum().backward()
        frozen = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            delta[done] = frozen[done]                  # finished facts keep their δ (Adam momentum)
            limit = hp.clamp_norm_factor * h_norm
            norms = delta.norm(dim=-1).clamp_min(1e-12)
            delta.mul_((limit / norms).clamp(max=1.0)[:, None])

    keys = fact_keys(template_keys, hp.bare_weight)
    n_t = len(templates)
    if n_t > 1:
        others = (template_keys.sum(1, keepdim=True) - template_keys) / (n_t - 1)
        cos_loo = torch.cosine_similarity(template_keys, others, dim=-1).min(1).values
    else:
        cos_loo = torch.ones(bsz)
    cos_subject = torch.cosine_similarity(keys, subject_keys, dim=-1)
    return BatchResult(keys, delta.detach().clone(), cos_loo, cos_subject, final_loss, final_nll, steps, found)


# --------------------------------------------------------------------------- γ calibration


def quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.float(), q)) if x.numel() else float("nan")


def calibrate_gamma(in_scope: torch.Tensor, out_of_scope: torch.Tensor, in_quantile: float = 0.1,
                    out_quantile: float = 0.99, position: float = 0.5,
                    relaxed_out_quantile: float | None = None) -> tuple[float, dict[str, Any]]:
    """γ between what in-scope prompts score against their own key and what unrelated prompts
    score against the best key (spec §8: calibrate per model instead of a fixed 0.65).

    `lo` = the `in_quantile` of the in-scope cosines, `hi` = the `out_quantile` of the
    out-of-scope best cosines. Separated (lo > hi): γ = hi + position·(lo − hi), the midpoint by
    default. Overlapping: if the `relaxed_out_quantile` of the out-of-scope cosines is below
    `lo` (only the last few percent of unrelated prompts reach the in-scope band), the midpoint
    at that quantile; otherwise γ = hi, because a gate that fires on unrelated text costs
    locality on every prompt while a missed paraphrase costs one edit. No out-of-scope data: 0.65
    (the paper's).
    """
    stats: dict[str, Any] = {
        "calib_in_q": quantile(in_scope, in_quantile), "calib_in_median": quantile(in_scope, 0.5),
        "calib_out_q": quantile(out_of_scope, out_quantile), "calib_out_median": quantile(out_of_scope, 0.5),
        "calib_out_max": float(out_of_scope.max()) if out_of_scope.numel() else float("nan"),
        "calib_in_quantile": in_quantile, "calib_out_quantile": out_quantile, "calib_position": position,
        "calib_relaxed_out_quantile": relaxed_out_quantile,
        "calib_num_in": int(in_scope.numel()), "calib_num_out": int(out_of_scope.numel()),
    }
    lo, hi = stats["calib_in_q"], stats["calib_out_q"]
    if not out_of_scope.numel() or not in_scope.numel():
        stats.update(calib_overlap=False, gamma_rule="paper_default_no_data")
        return PAPER_GAMMA, stats
    if lo > hi:
        stats.update(calib_overlap=False, gamma_rule="between")
        return hi + position * (lo - hi), stats
    stats.update(calib_overlap=True)
    if relaxed_out_quantile is not None:
        relaxed = quantile(out_of_scope, relaxed_out_quantile)
        stats["calib_relaxed_out_q"] = relaxed
        if lo > relaxed:
            stats.update(gamma_rule="between_relaxed")
            return relaxed + position * (lo - relaxed), stats
    stats.update(gamma_rule="out_of_scope_quantile")
    return hi, stats


# --------------------------------------------------------------------------- the database


_STAT_FIELDS = ("cos_loo", "cos_subject", "final_loss", "final_nll", "steps", "subject_found")


class NeuralDB:
    """A gated key-value database of facts inside one LLM (a `ScorableLM` for the evaluator).

    Construction installs the gate at layer `layer` (empty: the model is unchanged). `add`,
    `delete` and `modify` edit the database; `save` / `NeuralDB.load` persist it.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int, *,
                 llm_name: str | None = None, llm_identity: dict | None = None, gamma: float | None = None,
                 hparams: EditHParams | None = None, prefixes: Sequence[str] | None = None,
                 key_dtype: torch.dtype = torch.float32, chunk_size: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.hparams = hparams or EditHParams()
        self.site = locate_ffn(model, layer)
        if isinstance(self.site.module, GatedFFNOut):
            raise ValueError(f"{self.site.path} already carries a NeuralDB; call .remove() on it first.")
        # Identity of the unedited LLM (before the wrapper renames its weights).
        self.llm_identity = llm_identity or model_identity(model, llm_name or type(model).__name__)
        inner = self.site.module
        width = hidden_size(model) if self.site.kind == "moe_block" else out_dim(inner)
        self.gate = GatedFFNOut(inner, key_dim(self.site, model), width,
                                PAPER_GAMMA if gamma is None else gamma, key_dtype, chunk_size)
        setattr(self.site.parent, self.site.attr, self.gate)
        self.block = decoder_layers(model)[1][self.site.layer]
        self.gamma_source = "config" if gamma is not None else "paper_default"
        self.calibration: dict[str, Any] = {}
        self._prefixes = list(prefixes) if prefixes is not None else None
        self.facts: list[Fact] = []
        self.stats = {k: torch.zeros(0) for k in _STAT_FIELDS}
        self.collisions = 0
        self.log: list[dict[str, Any]] = []

    # ---- properties ---------------------------------------------------------------------------
    @property
    def layer(self) -> int:
        return self.site.layer

    @property
    def gamma(self) -> float:
        return self.gate.gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        """Set γ by hand (`calibrate` sets it from data)."""
        self.gate.gamma = float(value)
        self.gamma_source = "config"

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.facts]

    def __len__(self) -> int:
        return len(self.facts)

    @property
    def nbytes(self) -> int:
        g = self.gate
        return sum(t.numel() * t.element_size() for t in (g.keys_hat, g.key_norms, g.residuals))

    @property
    def prefixes(self) -> list[str]:
        """The generated context prefixes: made once per model, kept with the database."""
        if self._prefixes is None:
            with self.gate.disabled():
                self._prefixes = generate_prefixes(self.model, self.tokenizer, self.hparams.num_prefixes,
                                                   self.hparams.prefix_tokens)
        return self._prefixes

    @property
    def templates(self) -> list[str]:
        return context_templates(self.prefixes)

    # ---- editing ------------------------------------------------------------------------------
    def _compute(self, facts: Sequence[Fact],
                 rewordings: Mapping[str, Sequence[str]] | None = None) -> dict[str, torch.Tensor]:
        """Keys, residuals and per-fact statistics, in batches of `hparams.batch_size` facts."""
        parts: list[BatchResult] = []
        templates = self.templates
        bs = max(1, self.hparams.batch_size)
        rewordings = rewordings or {}
        for s in range(0, len(facts), bs):
            batch = facts[s:s + bs]
            parts.append(optimise_batch(self.model, self.tokenizer, self.gate, self.block, batch,
                                        templates, self.hparams, [rewordings.get(f.id, ()) for f in batch]))
        out = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(BatchResult)}
        out["steps"] = out["steps"].float()
        out["subject_found"] = out["subject_found"].float()
        return out

    def _check_collisions(self, keys_hat: torch.Tensor, exclude: torch.Tensor | None = None) -> int:
        """Count new keys within `collision_cos` of a stored key or of each other (spec §8.6)."""
        stored = self.gate.keys_hat
        if exclude is not None and stored.shape[0]:
            stored = stored[~exclude]
        n = 0
        if stored.shape[0]:
            best, _ = best_match(keys_hat, stored, self.gate.chunk_size)
            n += int((best > self.hparams.collision_cos).sum())
        if keys_hat.shape[0] > 1:
            sim = (keys_hat.float() @ keys_hat.float().T).triu(1)
            n += int((sim > self.hparams.collision_cos).any(1).sum())
        if n:
            warnings.warn(f"NeuralDB: {n} new key(s) within cosine {self.hparams.collision_cos} of another key; "
                          "only the best match's residual is returned for them (same-subject facts).", stacklevel=3)
        return n

    def add(self, facts: Sequence[Fact], rewordings: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
        """Compute keys and residuals for new facts (unedited model) and append them.

        `rewordings[fact.id]`: other wordings of the fact's prompt for its residual's NLL
        (see `optimise_batch`); none by default.
        """
        facts = list(facts)
        if not facts:
            return {}
        known = set(self.ids)
        seen: set[str] = set()
        for f in facts:
            if f.id in known or f.id in seen:
                raise ValueError(f"fact id {f.id!r} is already in the database; use modify() to change it.")
            seen.add(f.id)
        start = time.perf_counter()
        res = self._compute(facts, rewordings)
        g = self.gate
        keys_hat = normalize_rows(res["keys"]).to(g.keys_hat.dtype)
        self.collisions += self._check_collisions(keys_hat)
        g.keys_hat = torch.cat([g.keys_hat, keys_hat])
        g.key_norms = torch.cat([g.key_norms, res["keys"].norm(dim=-1)])
        g.residuals = torch.cat([g.residuals, res["residuals"].to(g.residuals.dtype)])
        for k in _STAT_FIELDS:
            self.stats[k] = torch.cat([self.stats[k], res[k].float()])
        self.facts.extend(facts)
        report = {"facts": len(facts), "seconds": time.perf_counter() - start,
                  "final_loss": float(res["final_loss"].mean()), "final_nll": float(res["final_nll"].mean()),
                  "steps": float(res["steps"].mean()), "residual_norm": float(res["residuals"].norm(dim=-1).mean())}
        self.log.append(report)
        return report

    def _rows(self, ids: Sequence[str]) -> torch.Tensor:
        where = {fid: i for i, fid in enumerate(self.ids)}
        missing = [i for i in ids if i not in where]
        if missing:
            raise KeyError(f"fact id(s) not in the database: {', '.join(map(repr, missing[:5]))}")
        return torch.tensor([where[i] for i in ids], dtype=torch.long)

    def delete(self, ids: Sequence[str] | str) -> None:
        """Drop these facts (their rows): their prompts get the unedited answer back."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        drop = torch.zeros(len(self.facts), dtype=torch.bool)
        drop[self._rows(ids)] = True
        keep = ~drop
        g = self.gate
        g.keys_hat, g.key_norms, g.residuals = g.keys_hat[keep], g.key_norms[keep], g.residuals[keep]
        self.stats = {k: v[keep] for k, v in self.stats.items()}
        self.facts = [f for f, k in zip(self.facts, keep.tolist()) if k]

    def modify(self, facts: Sequence[Fact],
               rewordings: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
        """Replace stored facts (matched by id) with new content: key and residual recomputed."""
        facts = list(facts)
        if not facts:
            return {}
        rows = self._rows([f.id for f in facts])
        start = time.perf_counter()
        res = self._compute(facts, rewordings)
        g = self.gate
        keys_hat = normalize_rows(res["keys"]).to(g.keys_hat.dtype)
        exclude = torch.zeros(len(self.facts), dtype=torch.bool)
        exclude[rows] = True
        self.collisions += self._check_collisions(keys_hat, exclude)
        g.keys_hat[rows] = keys_hat
        g.key_norms[rows] = res["keys"].norm(dim=-1)
        g.residuals[rows] = res["residuals"].to(g.residuals.dtype)
        for k in _STAT_FIELDS:
            self.stats[k][rows] = res[k].float()
        for r, f in zip(rows.tolist(), facts):
            self.facts[r] = f
        return {"facts": len(facts), "seconds": time.perf_counter() - start,
                "final_loss": float(res["final_loss"].mean())}

    # ---- reading keys -------------------------------------------------------------------------
    @torch.no_grad()
    def prompt_keys(self, prompts: Sequence[str], batch_size: int = 32) -> list[torch.Tensor]:
        """The keys at every token of each prompt, `(T_i, d1)`; layers above l* are not run."""
        out: list[torch.Tensor] = []
        for s in range(0, len(prompts), batch_size):
            ids, mask = prompt_batch(self.tokenizer, list(prompts[s:s + batch_size]))
            captured: dict[str, torch.Tensor] = {}

            def probe(x: torch.Tensor) -> None:
                captured["x"] = x.detach().float()
                raise StopForward

            self.gate.probe = probe
            try:
                self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), use_cache=False)
            except StopForward:
                pass
            finally:
                self.gate.probe = None
            x = captured["x"]
            out.extend(x[b][mask[b].bool()] for b in range(ids.shape[0]))
        return out

    def match(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(best cosine, best fact index) for key rows."""
        return best_match(normalize_rows(keys), self.gate.keys_hat, self.gate.chunk_size)

    def calibrate(self, out_of_scope_prompts: Sequence[str], in_scope: str = "subject",
                  in_quantile: float = 0.1, out_quantile: float = 0.99, position: float = 0.5,
                  relaxed_out_quantile: float | None = None) -> dict[str, Any]:
        """Set γ from the stored facts and prompts that must not fire (never evaluation prompts).

        In-scope cosines (`in_scope`): "subject" = each key against the subject's key in
        "{subject} is a" (another context for the same subject: the closest thing to a
        paraphrase that is not an evaluation prompt); "templates" = each template's key against
        the mean of the others. Out-of-scope: the best cosine over every token of each prompt.
        """
        if in_scope not in ("subject", "templates"):
            raise ValueError(f"in_scope must be 'subject' or 'templates', got {in_scope!r}")
        inside = self.stats["cos_subject" if in_scope == "subject" else "cos_loo"]
        best = [self.match(k)[0].max() for k in self.prompt_keys(out_of_scope_prompts)] if len(self) else []
        outside = torch.stack(best) if best else torch.zeros(0)
        gamma, stats = calibrate_gamma(inside, outside, in_quantile, out_quantile, position, relaxed_out_quantile)
        self.gamma = gamma
        self.gamma_source = "calibrated"
        self.calibration = {**stats, "calib_in_scope": in_scope}
        return self.calibration

    def fire_rates(self, prompts: Sequence[str], owners: Sequence[int | None]) -> dict[str, float]:
        """Per prompt: does the gate fire anywhere, and does it fire with the owner's fact?

        `owners[i]` is the row of the fact prompt i belongs to (None: out of scope). Returns
        percentages: `any` (fires at some position), `own` (fires with its own fact),
        `other` (fires with another fact), `positions` (of all tokens).
        """
        fired_any = fired_own = fired_other = 0
        positions = fired_positions = 0
        for keys, owner in zip(self.prompt_keys(prompts), owners):
            best, index = self.match(keys)
            fired = best > self.gamma
            positions += fired.numel()
            fired_positions += int(fired.sum())
            fired_any += bool(fired.any())
            hits = set(index[fired].tolist())
            fired_own += owner is not None and owner in hits
            fired_other += bool(hits - {owner})
        n = max(1, len(prompts))
        return {"any": 100.0 * fired_any / n, "own": 100.0 * fired_own / n, "other": 100.0 * fired_other / n,
                "positions": 100.0 * fired_positions / max(1, positions)}

    # ---- using it -----------------------------------------------------------------------------
    @property
    def unedited(self) -> SwitchedOffLM:
        """The same LLM with the gate off, for the evaluator's reference."""
        return SwitchedOffLM(self.model, self.tokenizer, self.gate.disabled)

    @torch.no_grad()
    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None) -> torch.Tensor:
        """`ScorableLM`: logits of the LLM with the database on."""
        self.gate.enabled = True
        return causal_logits(self.model, input_ids, attention_mask, keep)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, use_db: bool = True) -> list[str]:
        ids, mask = prompt_batch(self.tokenizer, list(prompts))
        with contextlib.nullcontext() if use_db else self.gate.disabled():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, ids.shape[1]:]]

    def remove(self) -> None:
        """Put the original module back: the LLM is exactly as before."""
        setattr(self.site.parent, self.site.attr, self.gate.inner)

    # ---- persistence --------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        g = self.gate
        return {"keys_hat": g.keys_hat, "key_norms": g.key_norms, "residuals": g.residuals,
                **{f"stat_{k}": v for k, v in self.stats.items()}}

    def save(self, directory: str | Path, info: dict[str, Any] | None = None) -> Path:
        """`database.safetensors` + `facts.jsonl` + `manifest.json`, written atomically."""
        from safetensors.torch import save_file
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / TENSORS_FILE))
            with open(tmp / "facts.jsonl", "w", encoding="utf-8") as fh:
                for f in self.facts:
                    fh.write(json.dumps(dataclasses.asdict(f), ensure_ascii=False) + "\n")
            manifest = {"format_version": FORMAT_VERSION, "kind": "neuraldb", "llm": self.llm_identity,
                        "layer": self.layer, "site": self.site.path, "site_kind": self.site.kind,
                        "key_dim": int(self.gate.keys_hat.shape[1]), "residual_dim": int(self.gate.residuals.shape[1]),
                        "key_dtype": str(self.gate.keys_hat.dtype).removeprefix("torch."),
                        "gamma": self.gamma, "gamma_source": self.gamma_source, "calibration": self.calibration,
                        "hparams": dataclasses.asdict(self.hparams), "prefixes": self.prefixes,
                        "num_facts": len(self.facts), "facts_sha256": facts_hash(self.facts),
                        "tensors_sha256": tensors_fingerprint(tensors), "collisions": self.collisions,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}
            (tmp / "manifest.json").write_text(json.dumps(sealed(manifest), indent=2, default=str), encoding="utf-8")
        return write_dir_atomically(Path(directory), write)

    @classmethod
    def load(cls, directory: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
             llm_name: str | None = None, llm_identity: dict | None = None,
             chunk_size: int | None = None) -> "NeuralDB":
        """Attach a saved database to `model`; refused if it was built for another LLM."""
        from safetensors.torch import load_file
        directory = Path(directory)
        identity = llm_identity or model_identity(model, llm_name or type(model).__name__)
        manifest = open_llm_artifact(directory, "neuraldb", "NeuralDB", identity,
                                     "build a database for this LLM with stage=neuraldb")
        if not (directory / TENSORS_FILE).is_file() or not (directory / "facts.jsonl").is_file():
            raise ArtifactError(f"The NeuralDB at {directory} is incomplete: {TENSORS_FILE} or facts.jsonl is missing.")
        tensors = read_or_refuse("The NeuralDB's tensors", directory / TENSORS_FILE,
                                 lambda: load_file(str(directory / TENSORS_FILE)))
        if tensors_fingerprint(tensors) != manifest["tensors_sha256"]:
            raise ArtifactError(f"The tensors in {directory / TENSORS_FILE} do not match the hash in its manifest; "
                                "the database was modified after it was written.")
        facts = [Fact(**json.loads(line)) for line in
                 (directory / "facts.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
        if facts_hash(facts) != manifest["facts_sha256"]:
            raise ArtifactError(f"The facts in {directory / 'facts.jsonl'} do not match the hash in its manifest; "
                                "the database was modified after it was written.")
        db = cls(model, tokenizer, manifest["layer"], llm_identity=identity, gamma=manifest["gamma"],
                 hparams=EditHParams.from_dict(manifest["hparams"]), prefixes=manifest["prefixes"],
                 key_dtype=tensors["keys_hat"].dtype, chunk_size=chunk_size)
        g = db.gate
        g.keys_hat, g.key_norms = tensors["keys_hat"], tensors["key_norms"]
        g.residuals = tensors["residuals"].to(g.residuals.dtype)
        db.stats = {k: tensors[f"stat_{k}"] for k in _STAT_FIELDS}
        db.facts = facts
        db.gamma_source, db.calibration = manifest["gamma_source"], manifest.get("calibration", {})
        db.collisions = manifest.get("collisions", 0)
        return db
