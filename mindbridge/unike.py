"""UniKE: intrinsic key-value neurons + latent in-context knowledge, disentangled (specs/unike.md).

Plain torch + transformers. `UniKE` attaches to the last layers of a causal LM (or the language
model of a vision-language model, with image features as a soft-token prefix) and offers:

* `build_pool(triplets)`: the external knowledge memory M_ext = {(h_sem, h_pos)} per layer from
  (question, true answer, wrong answer) triples, plus h_neg for the encoders (spec §4 Offline A);
* `DisentanglingEncoders` (Enc^Sem, Enc^Tru, the two contrastive losses) and `set_encoders`,
  which fixes ζ and fits W_ζ by least squares (spec §4 Offline B, §8.8);
* `edit(requests)`: inserts the edits into M_ext and trains 10 new neurons per layer per edit
  with T-Patcher's losses (edit NLL, activation on the edit, silence on memory queries), a batch
  of edits at a time, each row using only its own edit's neurons and memory entries;
* the `ScorableLM` interface for the shared evaluator, with `active_edits(...)` selecting which
  edits are switched on (one edit: the one-step protocol; all: sequential).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mindbridge.lm import causal_logits, first_token_index, insert_tokens
from mindbridge.neuraldb import decoder_layers
from mindbridge.tokenization import encode_target, position_ids_for, prompt_batch, teacher_forced_batch
from mindbridge.unike_modules import POOL_OWNER, UniKELayer, UniKEState, attach_layer, detach_layer

ABLATIONS = {            # the paper's Table 4 rows: (intrinsic, latent, disentangle)
    "intrinsic": (True, False, False),
    "latent": (False, True, False),
    "both": (True, True, False),
    "full": (True, True, True),
}


@dataclass
class UniKEHParams:
    """UniKE's hyperparameters (configs/model/unike.yaml documents each)."""

    num_layers: int = 4
    layers: list[int] | None = None
    neurons_per_edit: int = 10
    top_k: int = 40
    mode: str = "full"
    insert_edit_into_memory: bool = True
    fixed_weight: float = 0.5
    alpha_semantics: str = "prose"
    beta: float = 1.0
    activation: str = "relu"
    steps: int = 100
    lr: float = 0.01
    value_lr: float = 0.1
    c_act: float = 1.0
    c_mem: float = 5.0
    margin_act: float = 0.0
    margin_edit_mem: float = 3.0
    margin_mem: float = -3.0
    top_act: int = 5
    top_mem: int = 1000
    memory_fire_tolerance: float = 0.01
    batch_size: int = 8
    max_target_tokens: int = 32
    memory_prompts: int = 200
    encoder_dim: int = 256
    temperature: float = 0.1

    def __post_init__(self):
        if self.mode not in ABLATIONS:
            raise ValueError(f"Unknown UniKE mode {self.mode!r}; choose from {', '.join(ABLATIONS)}.")
        if self.alpha_semantics not in ("prose", "equation"):
            raise ValueError(f"alpha_semantics must be 'prose' or 'equation', not {self.alpha_semantics!r}.")

    @classmethod
    def from_dict(cls, d: dict) -> "UniKEHParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Request:
    """One edit or knowledge triple; `prefix` `(P, d)` are soft tokens before the text (image features)."""

    prompt: str
    target: str
    wrong: str | None = None
    prefix: torch.Tensor | None = None


@dataclass
class KnowledgePool:
    """Per edited layer: h_sem, h_pos, h_neg `(N, d)` (normed attention inputs, spec §8.5)."""

    h_sem: list[torch.Tensor]
    h_pos: list[torch.Tensor]
    h_neg: list[torch.Tensor]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.h_sem[0].shape[0] if self.h_sem else 0


# --------------------------------------------------------------------------- disentangling


class SemanticEncoder(nn.Module):
    """Enc^Sem: R^d -> R^d, a residual 2-layer GELU MLP, so its output is comparable to raw states."""

    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, h):
        return h + self.net(h)


class DisentanglingEncoders(nn.Module):
    """Enc^Sem and Enc^Tru of every edited layer and the two contrastive losses (spec Eq. 4-5)."""

    def __init__(self, num_layers: int, d: int, d_t: int = 256, temperature: float = 0.1):
        super().__init__()
        self.sem = nn.ModuleList(SemanticEncoder(d) for _ in range(num_layers))
        self.tru = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d_t))
                                 for _ in range(num_layers))
        self.temperature = temperature

    def truth_loss(self, layer: int, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
        """L1: in the truthfulness space, a state's positives are the states with its truth label."""
        z = F.normalize(self.tru[layer](torch.cat([h_pos, h_neg])), dim=-1)
        n = h_pos.shape[0]
        sims = (z @ z.T) / self.temperature
        sims = sims.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        label = torch.cat([torch.ones(n), torch.zeros(n)]).to(z.device)
        same = (label[:, None] == label[None, :]) & ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
        return (sims.logsumexp(1) - sims.masked_fill(~same, float("-inf")).logsumexp(1)).mean()

    def semantic_loss(self, layer: int, h_sem: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
        """L2: the question state h_sem is the anchor; its own pos and neg encodings are the positives."""
        a = F.normalize(h_sem, dim=-1)
        s = F.normalize(self.sem[layer](torch.cat([h_pos, h_neg])), dim=-1)
        n = h_sem.shape[0]
        sims = (a @ s.T) / self.temperature                                      # (n, 2n)
        own = torch.cat([torch.eye(n, dtype=torch.bool), torch.eye(n, dtype=torch.bool)], 1).to(a.device)
        return (sims.logsumexp(1) - sims.masked_fill(~own, float("-inf")).logsumexp(1)).mean()

    def loss(self, h_sem: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """Summed over layers; inputs `(layers, B, d)`, already centred by the pool mean."""
        l1 = sum(self.truth_loss(i, h_pos[i], h_neg[i]) for i in range(len(self.tru)))
        l2 = sum(self.semantic_loss(i, h_sem[i], h_pos[i], h_neg[i]) for i in range(len(self.sem)))
        return {"loss": l1 + l2, "truth_loss": l1, "semantic_loss": l2}

    @torch.no_grad()
    def truthful_directions(self, h_pos: torch.Tensor, h_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ζ′ = W_ζ ζ per layer `(layers, d)` and the least-squares fit's R² `(layers,)` (spec §8.8).

        ζ = mean Enc^Tru(h_pos) - mean Enc^Tru(h_neg); W_ζ solves W_ζ ΔEnc^Tru ≈ Δh over the pool.
        """
        out, r2 = [], []
        for i, tru in enumerate(self.tru):
            zp, zn = tru(h_pos[i]), tru(h_neg[i])
            zeta = zp.mean(0) - zn.mean(0)
            dz, dh = (zp - zn).double(), (h_pos[i] - h_neg[i]).double()
            w = torch.linalg.lstsq(dz, dh, driver="gelsd").solution                # (d_t, d)
            resid = ((dz @ w - dh) ** 2).sum()
            r2.append(float(1 - resid / (dh ** 2).sum().clamp_min(1e-12)))      # uncentred: no intercept
            out.append((zeta.double() @ w).float())
        return torch.stack(out), torch.tensor(r2)


# --------------------------------------------------------------------------- the editor


class UniKE:
    """UniKE on the last `num_layers` decoder layers of `model` (a causal LM)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, hparams: UniKEHParams):
        self.model, self.tokenizer, self.hp = model, tokenizer, hparams
        self.state = UniKEState(fixed_weight=hparams.fixed_weight, alpha_semantics=hparams.alpha_semantics,
                                top_k=hparams.top_k)
        self.set_mode(hparams.mode)
        n = len(decoder_layers(model)[1])
        idx = list(hparams.layers) if hparams.layers is not None else list(range(max(0, n - hparams.num_layers), n))
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"UniKE layers {bad} are out of range: {type(model).__name__} has {n} layers.")
        self.layers: list[UniKELayer] = []
        try:
            for i in idx:
                self.layers.append(attach_layer(model, i, self.state, hparams.activation))
        except Exception:
            self.remove()
            raise
        self.num_edits = 0
        self.memory_queries: list[torch.Tensor] = []
        self.encoders: DisentanglingEncoders | None = None
        self.unedited = _Unedited(self)

    # ---- switches -------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        """One of the ablation rows (`ABLATIONS`): which mechanisms run and whether disentangled."""
        if mode not in ABLATIONS:
            raise ValueError(f"Unknown UniKE mode {mode!r}; choose from {', '.join(ABLATIONS)}.")
        self.hp.mode = mode
        intrinsic, latent, disentangle = ABLATIONS[mode]
        st = self.state
        st.intrinsic, st.latent, st.adaptive_weight = intrinsic, latent, disentangle
        st.beta = self.hp.beta if disentangle else 0.0
        self.disentangle = disentangle

    @property
    def layer_indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def remove(self) -> None:
        """Put the model's own modules back (later jobs get the unedited LLM)."""
        for layer in reversed(self.layers):
            detach_layer(layer)
        self.layers = []

    def _reset_caches(self) -> None:
        for layer in self.layers:
            layer.attention._cached = None

    @contextlib.contextmanager
    def configured(self, intrinsic: bool | None = None, latent: bool | None = None, recording: bool = False,
                   answer_lengths: torch.Tensor | None = None, active: torch.Tensor | None | str = "keep"):
        st = self.state
        saved = (st.intrinsic, st.latent, st.recording, st.answer_lengths, st.active)
        st.intrinsic = st.intrinsic if intrinsic is None else intrinsic
        st.latent = st.latent if latent is None else latent
        st.recording, st.answer_lengths = recording, answer_lengths
        if not isinstance(active, str):
            st.active = active
        self._reset_caches()
        try:
            yield st
        finally:
            st.intrinsic, st.latent, st.recording, st.answer_lengths, st.active = saved
            self._reset_caches()

    @contextlib.contextmanager
    def active_edits(self, edit_ids: Sequence[int] | None):
        """Rows may use only these edits (None: all edits, the sequential protocol)."""
        st = self.state
        saved = st.active
        st.active = None if edit_ids is None else torch.zeros(1, max(1, self.num_edits), dtype=torch.bool)
        if edit_ids is not None:
            st.active[0, list(edit_ids)] = True
        self._single_row_active = edit_ids is not None
        try:
            yield
        finally:
            st.active, self._single_row_active = saved, False

    _single_row_active = False
    _mem_fired: list[float] = []

    # ---- forward passes -------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, keep, prefix=None):
        return causal_logits(self.model, input_ids, attention_mask, keep, memory=prefix)

    @torch.no_grad()
    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None, prefix=None):
        """ScorableLM: logits with the active edits (one `active_edits` row is broadcast to the batch)."""
        st = self.state
        active = st.active
        if active is not None and self._single_row_active:
            active = active.expand(input_ids.shape[0], -1)
        with self.configured(answer_lengths=answer_lengths, active=active):
            return self._forward(input_ids, attention_mask, keep, prefix)

    def _prefix_batch(self, requests: Sequence[Request]) -> torch.Tensor | None:
        have = [r.prefix is not None for r in requests]
        if not any(have):
            return None
        if not all(have):
            raise ValueError("A UniKE batch mixes requests with and without an image prefix.")
        return torch.stack([r.prefix for r in requests])

    @torch.no_grad()
    def hidden_states(self, requests: Sequence[Request], answers: Sequence[str]) -> tuple[list, list]:
        """Per layer `(B, d)`: the normed attention input at the last prompt token and at the last
        answer token, from the unedited model."""
        tf = teacher_forced_batch(self.tokenizer, [r.prompt for r in requests], list(answers),
                                  max_target_tokens=self.hp.max_target_tokens)
        ans = tf.target_mask.sum(1)
        with self.configured(intrinsic=False, latent=False, recording=True):
            self._forward(tf.input_ids, tf.attention_mask, 1, self._prefix_batch(requests))
        rows = torch.arange(len(requests))
        sem, pos = [], []
        for layer in self.layers:
            x = layer.attention.recorded
            p = x.shape[1] - 1 - ans
            sem.append(x[rows, p].float())
            pos.append(x[rows, -1].float())
        return sem, pos

    # ---- Offline A: the knowledge pool --------------------------------------------------------
    def build_pool(self, triples: Sequence[Request], batch_size: int = 32) -> KnowledgePool:
        """M_ext from (question, true answer, wrong answer) triples; h_neg kept for the encoders."""
        triples = [t for t in triples if t.wrong]
        if not triples:
            raise ValueError("UniKE's knowledge pool is empty: no (question, true, wrong answer) triple was found.")
        sem, pos, neg = ([[] for _ in self.layers] for _ in range(3))
        for start in range(0, len(triples), batch_size):
            chunk = triples[start:start + batch_size]
            s, p = self.hidden_states(chunk, [t.target for t in chunk])
            _, n = self.hidden_states(chunk, [t.wrong for t in chunk])
            for i in range(len(self.layers)):
                sem[i].append(s[i]), pos[i].append(p[i]), neg[i].append(n[i])
        pool = KnowledgePool([torch.cat(x) for x in sem], [torch.cat(x) for x in pos], [torch.cat(x) for x in neg])
        for i, layer in enumerate(self.layers):
            att = layer.attention
            att.h_sem, att.h_pos = att.h_sem[:0], att.h_pos[:0]
            att.owner = att.owner[:0]
            att.center = pool.h_sem[i].mean(0)
            att.add_entries(pool.h_sem[i], pool.h_pos[i], torch.full((len(pool),), POOL_OWNER))
        pool.stats = {"pool_size": len(pool)}
        return pool

    def centred(self, pool: KnowledgePool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pool's states minus each layer's mean, `(layers, N, d)` each."""
        c = torch.stack([layer.attention.center for layer in self.layers])[:, None]
        return torch.stack(pool.h_sem) - c, torch.stack(pool.h_pos) - c, torch.stack(pool.h_neg) - c

    def new_encoders(self) -> DisentanglingEncoders:
        d = int(self.model.get_input_embeddings().weight.shape[1])
        return DisentanglingEncoders(len(self.layers), d, self.hp.encoder_dim, self.hp.temperature)

    @torch.no_grad()
    def set_encoders(self, encoders: DisentanglingEncoders, pool: KnowledgePool) -> dict[str, float]:
        """Install trained encoders: Enc^Sem sets w, ζ′ goes into every layer's new values."""
        encoders = encoders.eval().requires_grad_(False)
        self.encoders = encoders
        _, pos, neg = self.centred(pool)
        zeta, r2 = encoders.truthful_directions(pos, neg)
        for i, layer in enumerate(self.layers):
            layer.attention.enc_sem = encoders.sem[i]
            layer.ffn.zeta = zeta[i]
        return {"zeta_norm_mean": float(zeta.norm(dim=-1).mean()), "wzeta_r2_mean": float(r2.mean())}

    # ---- memory queries for the intrinsic loss ----------------------------------------------
    @torch.no_grad()
    def set_memory_queries(self, requests: Sequence[Request], batch_size: int = 32) -> int:
        """FFN inputs at every token of unrelated prompts (T-Patcher's memory), unedited model.
        Prompts with and without an image prefix are batched separately."""
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.layers]
        groups = [[r for r in requests if r.prefix is None], [r for r in requests if r.prefix is not None]]
        for group in groups:
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                ids, mask = prompt_batch(self.tokenizer, [r.prompt for r in chunk])
                prefix = self._prefix_batch(chunk)
                with self.configured(intrinsic=False, latent=False):
                    self._forward(ids, mask, 1, prefix)
                if prefix is not None:      # the prefix goes before each row's first token, as in causal_logits
                    _, mask = insert_tokens(mask[..., None].float(), mask, prefix[..., :1], first_token_index(mask))
                for i, layer in enumerate(self.layers):
                    per_layer[i].append(layer.ffn.queries()[mask.bool()].float())
        self.memory_queries = [torch.cat(x) for x in per_layer] if requests else []
        return int(self.memory_queries[0].shape[0]) if self.memory_queries else 0

    # ---- Online: editing --------------------------------------------------------------------
    def clear_edits(self) -> None:
        """Forget every edit (neurons and memory entries); the pool and encoders stay."""
        for layer in self.layers:
            layer.ffn.clear()
            layer.attention.drop_edit_entries()
        self.num_edits = 0

    def edit(self, requests: Sequence[Request], sequential: bool = False) -> dict[str, float]:
        """Write a batch of edits; returns their training report.

        One-step (default): every row sees only its own edit while training. Sequential: every
        row also sees all earlier edits (they stay switched on for all later inputs).
        """
        hp, bsz = self.hp, len(requests)
        ids = torch.arange(self.num_edits, self.num_edits + bsz)
        self.num_edits += bsz
        tf = teacher_forced_batch(self.tokenizer, [r.prompt for r in requests], [r.target for r in requests],
                                  max_target_tokens=hp.max_target_tokens)
        ans = tf.target_mask.sum(1)
        prefix = self._prefix_batch(requests)
        if self.state.latent and hp.insert_edit_into_memory:
            sem, pos = self.hidden_states(requests, [r.target for r in requests])
            for i, layer in enumerate(self.layers):
                layer.attention.add_entries(sem[i], pos[i], ids)
        active = torch.zeros(bsz, self.num_edits, dtype=torch.bool)
        active[torch.arange(bsz), ids] = True
        if sequential:
            active[:, :int(ids[0])] = True
        report = {"steps": 0.0, "final_nll": float("nan"), "edit_correct_pct": float("nan"), "seconds": 0.0,
                  "memory_fire_pct": float("nan")}
        start = time.perf_counter()
        if not self.state.intrinsic:
            with self.configured(answer_lengths=ans, active=active), torch.no_grad():
                logits = self._forward(tf.input_ids, tf.attention_mask, tf.keep, prefix)
            nll, correct = _edit_nll(logits, tf)
            report.update(final_nll=float(nll.mean()), edit_correct_pct=100.0 * float(correct.float().mean()))
            return report
        self._grow(tf, ans, prefix, active, ids)
        params = [p for layer in self.layers for p in (layer.ffn.new_keys, layer.ffn.new_bias)]
        values = [layer.ffn.new_values for layer in self.layers]
        opt = torch.optim.Adam([{"params": params, "lr": hp.lr}, {"params": values, "lr": hp.value_lr}])
        p_edit = _edit_positions(tf)
        with torch.enable_grad(), self.configured(answer_lengths=ans, active=active):
            for step in range(hp.steps):
                self._reset_caches()
                logits = self._forward(tf.input_ids, tf.attention_mask, tf.keep, prefix)
                nll, correct = _edit_nll(logits, tf)
                report.update(steps=float(step), final_nll=float(nll.mean().detach()),
                              edit_correct_pct=100.0 * float(correct.float().mean()))
                self._mem_fired = []
                loss = nll.sum() + sum(self._neuron_loss(layer, i, p_edit, bsz) for i, layer in enumerate(self.layers))
                mem_fire = max(self._mem_fired, default=0.0)
                report["memory_fire_pct"] = 100.0 * mem_fire
                # Done when the edit is fixed and the new neurons are (nearly) silent on the memory.
                if bool(correct.all()) and mem_fire <= hp.memory_fire_tolerance:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                report["steps"] = float(hp.steps)
        for layer in self.layers:
            layer.ffn.freeze_new()
        report["seconds"] = time.perf_counter() - start
        return report

    @torch.no_grad()
    def _grow(self, tf, ans, prefix, active, ids) -> None:
        """n_e new neurons per edit per layer, key i = q/‖q‖² at the i-th-from-last prompt token."""
        with self.configured(answer_lengths=ans, active=active):
            self._forward(tf.input_ids, tf.attention_mask, 1, prefix)
        n_e, bsz = self.hp.neurons_per_edit, len(ids)
        length = tf.input_ids.shape[1] + (0 if prefix is None else prefix.shape[1])
        prompt_len = tf.attention_mask.sum(1) - ans                 # real prompt tokens (BOS included)
        last = length - 1 - ans
        offsets = torch.arange(n_e)[None, :] % prompt_len[:, None]  # wrap around short prompts
        pos = last[:, None] - offsets                               # (B, n_e)
        for layer in self.layers:
            q = layer.ffn.queries().float()[torch.arange(bsz)[:, None], pos]      # (B, n_e, d)
            keys = (q / (q.norm(dim=-1, keepdim=True) ** 2).clamp_min(1e-6)).reshape(bsz * n_e, -1).T
            layer.ffn.grow(keys, ids.repeat_interleave(n_e))

    def _neuron_loss(self, layer: UniKELayer, i: int, p_edit: torch.Tensor, bsz: int) -> torch.Tensor:
        """T-Patcher's activation and memory losses for the new neurons of this layer (spec §3)."""
        hp, ffn = self.hp, layer.ffn
        n_e = hp.neurons_per_edit
        pre = ffn.new_pre.view(bsz, -1, bsz, n_e)[torch.arange(bsz), :, torch.arange(bsz)]   # (B, T, n_e) own
        pre = pre[:, -p_edit.shape[1] - 1:-1]                 # the positions whose logits predict the target
        m = p_edit[..., None].expand_as(pre)
        a_e = pre.masked_fill(~m, float("inf"))
        act = torch.exp(hp.margin_act - a_e).masked_fill(~m, 0.0)
        act = act.flatten(1).topk(min(hp.top_act, act[0].numel()), dim=1).values.mean(1)
        a_e_mean = (pre * m).sum(1) / m.sum(1).clamp_min(1)                                    # (B, n_e)
        loss = hp.c_act * act.sum()
        if self.memory_queries:
            a_m = (self.memory_queries[i] @ ffn.new_keys + ffn.new_bias).view(-1, bsz, n_e)   # (M, B, n_e)
            k = min(hp.top_mem, a_m.shape[0])
            above = torch.exp(a_m - a_e_mean[None] + hp.margin_edit_mem).topk(k, dim=0).values.mean(0)
            off = torch.exp(a_m - hp.margin_mem).topk(k, dim=0).values.mean(0)
            loss = loss + hp.c_mem * (above.mean(1).sum() + off.mean(1).sum())
            self._mem_fired.append(float((a_m.detach() > 0).float().mean()))
        return loss

    # ---- diagnostics -----------------------------------------------------------------------
    @property
    def added_params(self) -> int:
        return sum(layer.ffn.keys.numel() + layer.ffn.bias.numel() + layer.ffn.values.numel() for layer in self.layers)

    @torch.no_grad()
    def probe(self, requests: Sequence[Request], owners: Sequence[int | None]) -> dict[str, float]:
        """Mean knowledge weight w and extra-neuron firing at the last prompt token, with each
        prompt's own edit switched on (None: no edit, as for an unrelated prompt)."""
        weights, fired = [], []
        st = self.state
        for req, owner in zip(requests, owners):
            ids, mask = prompt_batch(self.tokenizer, [req.prompt])
            st.weights_seen, st.log_weights = [], True
            with self.active_edits([] if owner is None else [owner]):
                self.logits([req.prompt], ids, mask, 1,
                            prefix=None if req.prefix is None else req.prefix[None])
            st.log_weights = False
            if st.weights_seen:
                weights.append(torch.cat(st.weights_seen).mean())
            if owner is not None and self.state.intrinsic:
                q_fire = []
                for layer in self.layers:
                    keys, bias, _, own = layer.ffn.parts()
                    pre = layer.ffn.queries()[0, -1].float() @ keys[:, own == owner] + bias[own == owner]
                    q_fire.append((pre > 0).float().mean())
                fired.append(torch.stack(q_fire).mean())
        return {"w_mean": 100.0 * float(torch.stack(weights).mean()) if weights else float("nan"),
                "fire_pct": 100.0 * float(torch.stack(fired).mean()) if fired else float("nan")}

    @torch.no_grad()
    def retrieval_recall(self, requests: Sequence[Request], owners: Sequence[int]) -> float:
        """% of prompts whose own edit's memory entry is among the top-K retrieved (last edited layer)."""
        if not requests or not self.state.latent:
            return float("nan")
        att = self.layers[-1].attention
        hits = 0
        for req, owner in zip(requests, owners):
            ids, mask = prompt_batch(self.tokenizer, [req.prompt])
            with self.configured(intrinsic=False, latent=False, recording=True):
                self._forward(ids, mask, 1, None if req.prefix is None else req.prefix[None])
            idx, _ = att.retrieve(att.recorded[:, -1], None, self.hp.top_k)
            hits += int((att.owner[idx[0]] == owner).any())
        return 100.0 * hits / len(requests)

    def describe(self) -> dict:
        return {"unike_layers": ",".join(map(str, self.layer_indices)), "unike_mode": self.hp.mode,
                **{f"unike_{k}": v for k, v in asdict(self.hp).items() if isinstance(v, (int, float, str, bool))}}


class _Unedited:
    """The same model with UniKE switched off (the evaluator's reference)."""

    def __init__(self, unike: UniKE):
        self.unike, self.tokenizer = unike, unike.tokenizer

    @torch.no_grad()
    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None, prefix=None):
        with self.unike.configured(intrinsic=False, latent=False):
            return self.unike._forward(input_ids, attention_mask, keep, prefix)


def _edit_positions(tf) -> torch.Tensor:
    """`(B, T)` bool: the positions whose logits predict the target (last prompt token onwards)."""
    return tf.target_mask


def _edit_nll(logits: torch.Tensor, tf) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean target NLL and whether every target token is the argmax."""
    pred = logits[:, :-1].float()
    logp = pred.log_softmax(-1).gather(-1, tf.target_ids[..., None]).squeeze(-1)
    m = tf.target_mask
    nll = -(logp * m).sum(1) / m.sum(1)
    correct = ((pred.argmax(-1) == tf.target_ids) | ~m).all(1)
    return nll, correct


@torch.no_grad()
def greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_new_tokens: Sequence[int], batch_size: int = 32) -> list[str]:
    """The model's own greedy continuation of each prompt (the wrong answers of the pool, spec §9)."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = max(max_new_tokens[start:start + batch_size])
        ids, mask = prompt_batch(tokenizer, chunk)
        gen = []
        for _ in range(n):                    # a plain greedy loop: the same code path as scoring
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                           logits_to_keep=1, use_cache=False).logits[:, -1]
            nxt = logits.argmax(-1)
            gen.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        tokens = torch.stack(gen, 1)
        for b, k in enumerate(max_new_tokens[start:start + batch_size]):
            out.append(tokenizer.decode(tokens[b, :k], skip_special_tokens=True).strip())
    return out


def pool_triples(model, tokenizer, pairs: Sequence[tuple[str, str]], max_tokens: int = 8) -> tuple[list[Request], dict]:
    """(question, true answer) pairs → triples with the model's own wrong greedy answer; pairs the
    model already answers right are dropped (they carry no hallucination to contrast)."""
    lens = [min(max_tokens, len(encode_target(tokenizer, a))) for _, a in pairs]
    wrong = greedy_answers(model, tokenizer, [q for q, _ in pairs], lens)
    def differs(w: str, a: str) -> bool:
        w, a = w.strip().casefold(), a.strip().casefold()
        return bool(w) and not a.startswith(w) and not w.startswith(a)
    triples = [Request(q, a, w) for (q, a), w in zip(pairs, wrong) if differs(w, a)]
    return triples, {"pool_candidates": len(pairs), "pool_model_right": len(pairs) - len(triples)}


def mean_metrics(rows: Sequence[dict]) -> dict:
    """Average per-record evaluator outputs (NaN-aware), recomputing `avg`."""
    out: dict = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if key == "num_scored_prompts":
            out[key] = int(sum(vals))
        elif vals and len(vals) == len(rows):
            finite = [v for v in vals if not math.isnan(v)]
            out[key] = sum(finite) / len(finite) if finite else float("nan")
        else:
            out[key] = rows[0][key]
    if all(k in out for k in ("rel", "gen", "loc")):
        out["avg"] = (out["rel"] + out["gen"] + out["loc"]) / 3
    return out
