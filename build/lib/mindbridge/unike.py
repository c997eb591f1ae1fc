"""UniKE: intrinsic key-value neurons + latent in-context knowledge, disentangled (specs/unike.md).

Plain torch + transformers. `UniKE` attaches to layers of a causal LM (or the language model of
a vision-language model, with image features as a soft-token prefix): extra neurons in the FFN
of the intrinsic layers, a knowledge memory in the self-attention of the latent layers. It offers:

* `build_pool(triplets)`: the external knowledge memory M_ext = {(h_sem, h_pos)} per latent layer
  from (question, true answer, wrong answer) triples, plus h_neg for the encoders (spec §4 Offline A);
* `DisentanglingEncoders` (Enc^Sem, Enc^Tru, the two contrastive losses) and `set_encoders`,
  which fixes ζ and fits W_ζ by least squares (spec §4 Offline B, §8.8);
* `calibrate_weights(...)`: the adaptive knowledge weight's ramp, from records never evaluated;
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
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mindbridge.lm import causal_logits, first_token_index, insert_tokens, lm_head_only_at
from mindbridge.ffn import decoder_layers
from mindbridge.tokenization import encode_target, prompt_batch, teacher_forced_batch
from mindbridge.unike_modules import POOL_OWNER, UniKELayer, UniKEState, attach_layer, detach_layer, pad_tokens

ABLATIONS = {            # the paper's Table 4 rows: (intrinsic, latent, disentangle)
    "intrinsic": (True, False, False),
    "latent": (False, True, False),
    "both": (True, True, False),
    "full": (True, True, True),
}


# Which rows train the extra neurons when the latent path is on: the edit as the paper has it
# (latent knowledge active), with the latent path off (the neurons alone must hold the edit, as
# wherever w is 0), or both rows.
NEURON_TRAINING = ("with_latent", "without_latent", "both")


@dataclass
class UniKEHParams:
    """UniKE's hyperparameters (configs/model/unike.yaml documents each)."""

    num_layers: int = 4
    layers: list[int] | None = None
    latent_layers: list[int] | None = None
    knowledge_tokens: str = "last"
    query_state: str = "last"
    similarity: str = "mixture"
    max_knowledge_tokens: int = 8
    weight_calibration: str = "none"
    calibration_quantile: float = 0.95
    calibration_pairs: int = 64
    calibration_prompts: int = 200
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
    rewordings_per_edit: int = 0
    rewording_min_similarity: float = 0.5
    neuron_training: str = "with_latent"
    rewording_weight: float = 1.0
    upper_layers_only: bool = True
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
        if self.neuron_training not in NEURON_TRAINING:
            raise ValueError(f"neuron_training must be one of {', '.join(NEURON_TRAINING)}, not {self.neuron_training!r}.")
        if self.knowledge_tokens not in ("last", "answer"):
            raise ValueError(f"knowledge_tokens must be 'last' or 'answer', not {self.knowledge_tokens!r}.")
        if self.query_state not in ("last", "mean"):
            raise ValueError(f"query_state must be 'last' or 'mean', not {self.query_state!r}.")
        if self.similarity not in ("mixture", "entry", "retrieval"):
            raise ValueError(f"similarity must be 'mixture', 'entry' or 'retrieval', not {self.similarity!r}.")
        if self.weight_calibration not in ("none", "out_of_scope"):
            raise ValueError(f"weight_calibration must be 'none' or 'out_of_scope', not {self.weight_calibration!r}.")

    @classmethod
    def from_dict(cls, d: dict) -> "UniKEHParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Request:
    """One edit or knowledge triple; `prefix` `(P, d)` are soft tokens before the text (image
    features); `rewordings` are other wordings of an edit's prompt it is also trained on."""

    prompt: str
    target: str
    wrong: str | None = None
    prefix: torch.Tensor | None = None
    rewordings: tuple[str, ...] = ()


@dataclass
class KnowledgeStates:
    """Per wrapped layer, states of (question, answer) pairs under the unedited model (normed
    attention inputs, spec §8.5): h_sem `(B, d)` at the last question token, the knowledge states
    `(B, T, d)` of the answer (its first T tokens, or only the last one) with `mask` `(B, T)`,
    and their mean `(B, d)` (what the encoders and ζ read)."""

    h_sem: list[torch.Tensor]
    tokens: list[torch.Tensor]
    mask: torch.Tensor
    mean: list[torch.Tensor]


@dataclass
class KnowledgePool:
    """Per wrapped layer: h_sem, h_pos, h_neg `(N, d)` (h_pos, h_neg: the mean knowledge state),
    and the knowledge states `tokens` `(N, T, d)` / `token_mask` `(N, T)` M_ext holds."""

    h_sem: list[torch.Tensor]
    h_pos: list[torch.Tensor]
    h_neg: list[torch.Tensor]
    tokens: list[torch.Tensor] = field(default_factory=list)
    token_mask: torch.Tensor | None = None
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
    """UniKE on decoder layers of `model` (a causal LM): extra neurons in the FFN of the intrinsic
    layers (`layers`, default the last `num_layers`), latent knowledge in the self-attention of
    the latent layers (`latent_layers`, default the same ones, as in the paper)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, hparams: UniKEHParams):
        self.model, self.tokenizer, self.hp = model, tokenizer, hparams
        self.state = UniKEState(fixed_weight=hparams.fixed_weight, alpha_semantics=hparams.alpha_semantics,
                                top_k=hparams.top_k, query_state=hparams.query_state, similarity=hparams.similarity)
        self.set_mode(hparams.mode)
        n = len(decoder_layers(model)[1])
        intrinsic = _layer_list(hparams.layers, n) if hparams.layers is not None else \
            list(range(max(0, n - hparams.num_layers), n))
        bad = [i for i in intrinsic if not 0 <= i < n]
        if bad:
            raise ValueError(f"UniKE model.layers {bad} are out of range: {type(model).__name__} has {n} layers.")
        latent = intrinsic if hparams.latent_layers is None else _layer_list(hparams.latent_layers, n)
        if any(not 0 <= i < n for i in latent):
            # A model too shallow for the configured band (e.g. 2-layer test models): the paper's choice.
            warnings.warn(f"UniKE latent_layers {list(hparams.latent_layers)} do not exist in a {n}-layer "
                          f"{type(model).__name__}; the latent path uses the intrinsic layers {intrinsic}.")
            latent = intrinsic
        self.layers: list[UniKELayer] = []
        try:
            for i in sorted(set(intrinsic) | set(latent)):
                self.layers.append(attach_layer(model, i, self.state, hparams.activation, latent=i in latent,
                                                intrinsic=i in intrinsic))
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

    @property
    def ffn_layers(self) -> list[UniKELayer]:
        """The intrinsic layers (extra neurons)."""
        return [layer for layer in self.layers if layer.ffn is not None]

    @property
    def latent_layers(self) -> list[UniKELayer]:
        """The layers whose self-attention reads the knowledge memory."""
        return [layer for layer in self.layers if layer.latent]

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
                   answer_lengths: torch.Tensor | None = None, active: torch.Tensor | None | str = "keep",
                   latent_rows: torch.Tensor | None = None):
        st = self.state
        saved = (st.intrinsic, st.latent, st.recording, st.answer_lengths, st.active, st.latent_rows)
        st.intrinsic = st.intrinsic if intrinsic is None else intrinsic
        st.latent = st.latent if latent is None else latent
        st.recording, st.answer_lengths, st.latent_rows = recording, answer_lengths, latent_rows
        if not isinstance(active, str):
            st.active = active
        self._reset_caches()
        try:
            yield st
        finally:
            st.intrinsic, st.latent, st.recording, st.answer_lengths, st.active, st.latent_rows = saved
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
        # The prefix goes before each row's first token, which stays where the prompt starts.
        self.state.first_positions = first_token_index(attention_mask)
        try:
            return causal_logits(self.model, input_ids, attention_mask, keep, memory=prefix)
        finally:
            self.state.first_positions = None

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
    def knowledge_states(self, requests: Sequence[Request], answers: Sequence[str]) -> KnowledgeStates:
        """The states of `prompt + answer` on every wrapped layer, from the unedited model."""
        tf = teacher_forced_batch(self.tokenizer, [r.prompt for r in requests], list(answers),
                                  max_target_tokens=self.hp.max_target_tokens)
        ans = tf.target_mask.sum(1)
        with self.configured(intrinsic=False, latent=False, recording=True):
            self._forward(tf.input_ids, tf.attention_mask, 1, self._prefix_batch(requests))
        rows = torch.arange(len(requests))
        if self.hp.knowledge_tokens == "last":
            count = torch.ones_like(ans)
        else:
            count = ans.clamp(max=self.hp.max_knowledge_tokens)
        width = int(count.max())
        j = torch.arange(width)[None, :]
        mask = j < count[:, None]                                            # (B, T)
        sem, tokens, mean = [], [], []
        starts = first_token_index(tf.attention_mask)
        for layer in self.layers:
            x = layer.attention.recorded.float()
            length = x.shape[1]
            first = length - ans if self.hp.knowledge_tokens == "answer" else torch.full_like(ans, length - 1)
            at = (first[:, None] + j).clamp(max=length - 1)
            tok = x[rows[:, None], at] * mask[..., None]
            self.state.first_positions = starts
            try:
                sem.append(self.state.query(x, length - 1 - ans))
            finally:
                self.state.first_positions = None
            tokens.append(tok)
            mean.append(tok.sum(1) / count[:, None])
        return KnowledgeStates(sem, tokens, mask, mean)

    # ---- Offline A: the knowledge pool --------------------------------------------------------
    def build_pool(self, triples: Sequence[Request], batch_size: int = 32) -> KnowledgePool:
        """M_ext from (question, true answer, wrong answer) triples; h_neg kept for the encoders."""
        triples = [t for t in triples if t.wrong]
        if not triples:
            raise ValueError("UniKE's knowledge pool is empty: no (question, true, wrong answer) triple was found.")
        layers = range(len(self.layers))
        sem, pos, neg, tokens, masks = [[] for _ in layers], [[] for _ in layers], [[] for _ in layers], \
            [[] for _ in layers], []
        for start in range(0, len(triples), batch_size):
            chunk = triples[start:start + batch_size]
            p = self.knowledge_states(chunk, [t.target for t in chunk])
            n = self.knowledge_states(chunk, [t.wrong for t in chunk])
            masks.append(p.mask)
            for i in layers:
                sem[i].append(p.h_sem[i]), pos[i].append(p.mean[i]), neg[i].append(n.mean[i])
                tokens[i].append(p.tokens[i])
        width = max(m.shape[1] for m in masks)
        pool = KnowledgePool([torch.cat(x) for x in sem], [torch.cat(x) for x in pos], [torch.cat(x) for x in neg],
                             [torch.cat([pad_tokens(t, width) for t in x]) for x in tokens],
                             torch.cat([pad_tokens(m, width) for m in masks]))
        for i, layer in enumerate(self.layers):
            att = layer.attention
            att.keep_entries(att.owner[:0])
            att.center = pool.h_sem[i].mean(0)
            if layer.latent:
                att.add_entries(pool.h_sem[i], pool.tokens[i], torch.full((len(pool),), POOL_OWNER), pool.token_mask)
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
            if layer.ffn is not None:
                layer.ffn.zeta = zeta[i]
        return {"zeta_norm_mean": float(zeta.norm(dim=-1).mean()), "wzeta_r2_mean": float(r2.mean())}

    # ---- calibration of the knowledge weight -------------------------------------------------
    @torch.no_grad()
    def similarities(self, requests: Sequence[Request], owners: Sequence[int], batch_size: int = 32) -> torch.Tensor:
        """The semantic similarity s `(latent layers, N)` of each prompt (its query state), with
        only the edit `owners[i]` (and the pool) visible to prompt i. Prompts with an image prefix
        go one by one."""
        st = self.state
        out = torch.zeros(len(self.latent_layers), len(requests))
        order = list(range(len(requests)))
        plain = [i for i in order if requests[i].prefix is None]
        chunks = [plain[k:k + batch_size] for k in range(0, len(plain), batch_size)]
        chunks += [[i] for i in order if requests[i].prefix is not None]
        for chunk in chunks:
            own = [owners[i] for i in chunk]
            ids, mask = prompt_batch(self.tokenizer, [requests[i].prompt for i in chunk])
            active = torch.zeros(len(chunk), max(own) + 1, dtype=torch.bool)
            active[torch.arange(len(chunk)), torch.tensor(own)] = True
            st.similarities_seen, st.log_weights = [], True
            try:
                with self.configured(intrinsic=False, latent=True, active=active):
                    self._forward(ids, mask, 1, self._prefix_batch([requests[i] for i in chunk]))
            finally:
                st.log_weights = False
            out[:, chunk] = torch.stack(st.similarities_seen)
        return out

    @torch.no_grad()
    def calibrate_weights(self, pseudo_edits: Sequence[Request], rewordings: Sequence[Request],
                          unrelated: Sequence[Request]) -> dict[str, float]:
        """Set every latent layer's knowledge-weight ramp from records that are never evaluated.

        `pseudo_edits[i]` is inserted into M_ext like an edit; `rewordings[i]` is another wording
        of its prompt. low = the `calibration_quantile` of s over the `unrelated` prompts (each
        with one pseudo-edit on, as a locality prompt has its record's edit on), high = the median
        s of the rewordings with their own pseudo-edit on; w = clamp((s - low) / (high - low), 0, 1).
        """
        if not self.state.adaptive_weight or self.encoders is None or not pseudo_edits or not unrelated:
            return {}
        base = self.num_edits
        owners = torch.arange(base, base + len(pseudo_edits))
        self.insert_knowledge(pseudo_edits, owners)
        try:
            pos = self.similarities(rewordings, owners.tolist())
            neg = self.similarities(unrelated, [base + i % len(pseudo_edits) for i in range(len(unrelated))])
        finally:
            for layer in self.latent_layers:
                att = layer.attention
                att.keep_entries((att.owner < base) | (att.owner == POOL_OWNER))
        info: dict[str, float] = {}
        lows, highs, on_pos, on_neg = [], [], [], []
        for k, layer in enumerate(self.latent_layers):
            low = float(torch.quantile(neg[k], self.hp.calibration_quantile))
            high = max(float(pos[k].median()), low + 1e-3)
            layer.attention.weight_low, layer.attention.weight_high = low, high
            lows.append(low), highs.append(high)
            on_pos.append(float((pos[k] > low).float().mean())), on_neg.append(float((neg[k] > low).float().mean()))
        info.update(calibration_low_mean=sum(lows) / len(lows), calibration_high_mean=sum(highs) / len(highs),
                    calibration_rewordings_on_pct=100.0 * sum(on_pos) / len(on_pos),
                    calibration_unrelated_on_pct=100.0 * sum(on_neg) / len(on_neg),
                    calibration_pairs=len(pseudo_edits), calibration_prompts=len(unrelated))
        return info

    # ---- memory queries for the intrinsic loss ----------------------------------------------
    @torch.no_grad()
    def set_memory_queries(self, requests: Sequence[Request], batch_size: int = 32) -> int:
        """FFN inputs at every token of unrelated prompts (T-Patcher's memory), unedited model.
        Prompts with and without an image prefix are batched separately."""
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.ffn_layers]
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
                for i, layer in enumerate(self.ffn_layers):
                    per_layer[i].append(layer.ffn.queries()[mask.bool()].float())
        self.memory_queries = [torch.cat(x) for x in per_layer] if requests else []
        return int(self.memory_queries[0].shape[0]) if self.memory_queries else 0

    # ---- Online: editing --------------------------------------------------------------------
    def insert_knowledge(self, requests: Sequence[Request], owners: torch.Tensor) -> None:
        """Each edit's own (h_sem, h_pos) into M_ext of the latent layers (spec §8.4)."""
        states = self.knowledge_states(requests, [r.target for r in requests])
        for i, layer in enumerate(self.layers):
            if layer.latent:
                layer.attention.add_entries(states.h_sem[i], states.tokens[i], owners, states.mask)

    def clear_edits(self) -> None:
        """Forget every edit (neurons and memory entries); the pool and encoders stay."""
        for layer in self.layers:
            if layer.ffn is not None:
                layer.ffn.clear()
            layer.attention.drop_edit_entries()
        self.num_edits = 0

    def edit(self, requests: Sequence[Request], sequential: bool = False) -> dict[str, float]:
        """Write a batch of edits; returns their training report.

        Every edit is trained on its prompt and on its `rewordings` (rows of their own, using only
        that edit's neurons and memory entries). One-step (default): every row sees only its own
        edit. Sequential: every row also sees all earlier edits (they stay on for later inputs).
        """
        hp, bsz = self.hp, len(requests)
        ids = torch.arange(self.num_edits, self.num_edits + bsz)
        self.num_edits += bsz
        # Rows: the edit prompts first (row b = edit b), then every edit's rewordings, then (with
        # neuron_training=both) the edit prompts again with the latent path off, so the neurons
        # alone hold the edit wherever the knowledge weight is 0.
        rows = [(b, r.prompt) for b, r in enumerate(requests)]
        rows += [(b, p) for b, r in enumerate(requests) for p in r.rewordings]
        alone = hp.neuron_training == "both" and self.state.latent and self.state.intrinsic
        if alone:
            rows += [(b, r.prompt) for b, r in enumerate(requests)]
        row_edit = torch.tensor([b for b, _ in rows])
        latent_rows = torch.arange(len(rows)) < len(rows) - (bsz if alone else 0)
        if hp.neuron_training == "without_latent" and self.state.intrinsic:
            latent_rows = torch.zeros(len(rows), dtype=torch.bool)
        reworded = torch.arange(len(rows)) >= bsz
        if alone:
            reworded &= latent_rows
        tf = teacher_forced_batch(self.tokenizer, [p for _, p in rows], [requests[b].target for b, _ in rows],
                                  max_target_tokens=hp.max_target_tokens)
        ans = tf.target_mask.sum(1)
        prefix = self._prefix_batch([requests[b] for b, _ in rows])
        if self.state.latent and hp.insert_edit_into_memory:
            self.insert_knowledge(requests, ids)
        active = torch.zeros(len(rows), self.num_edits, dtype=torch.bool)
        active[torch.arange(len(rows)), ids[row_edit]] = True
        if sequential:
            active[:, :int(ids[0])] = True
        report = {"steps": 0.0, "final_nll": float("nan"), "edit_correct_pct": float("nan"),
                  "rewording_correct_pct": float("nan"), "seconds": 0.0, "memory_fire_pct": float("nan")}
        start = time.perf_counter()
        # The layers below the first intrinsic one hold nothing trainable: their output is computed once.
        upper_input = self._grow(tf, ans, prefix, active, latent_rows, ids, grow=self.state.intrinsic)
        select = torch.cat([tf.target_mask, torch.zeros_like(tf.target_mask[:, :1])], 1)

        def forward():
            self._reset_caches()
            with self._from_upper_input(upper_input), lm_head_only_at(self.model, select):
                logits = self._forward(tf.input_ids, tf.attention_mask, tf.keep, prefix)
            nll, correct = _target_nll(logits[0], tf)
            report.update(final_nll=float(nll[:bsz].mean().detach()),
                          edit_correct_pct=100.0 * float(correct[:bsz].float().mean()),
                          rewording_correct_pct=100.0 * float(correct[reworded].float().mean())
                          if reworded.any() else float("nan"))
            return nll, correct

        if not self.state.intrinsic:
            with self.configured(answer_lengths=ans, active=active, latent_rows=latent_rows), torch.no_grad():
                forward()
            return report
        params = [p for layer in self.ffn_layers for p in (layer.ffn.new_keys, layer.ffn.new_bias)]
        values = [layer.ffn.new_values for layer in self.ffn_layers]
        opt = torch.optim.Adam([{"params": params, "lr": hp.lr}, {"params": values, "lr": hp.value_lr}])
        # Rewording rows weigh `rewording_weight` in total per edit, the prompt row 1.
        per_row = torch.ones(len(rows))
        if reworded.any():
            counts = torch.bincount(row_edit[reworded], minlength=bsz).clamp_min(1)
            per_row[reworded] = hp.rewording_weight / counts[row_edit[reworded]]
        with torch.enable_grad(), self.configured(answer_lengths=ans, active=active, latent_rows=latent_rows):
            for step in range(hp.steps):
                nll, correct = forward()
                report["steps"] = float(step)
                self._mem_fired = []
                neuron_loss = sum(self._neuron_loss(layer, i, tf.target_mask, row_edit, per_row, bsz)
                                  for i, layer in enumerate(self.ffn_layers))
                loss = (per_row * nll).sum() + neuron_loss
                mem_fire = max(self._mem_fired, default=0.0)
                report["memory_fire_pct"] = 100.0 * mem_fire
                # Done when every row predicts its target and the new neurons are (nearly) silent
                # on the memory.
                if bool(correct.all()) and mem_fire <= hp.memory_fire_tolerance:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                report["steps"] = float(hp.steps)
        for layer in self.ffn_layers:
            layer.ffn.freeze_new()
        report["seconds"] = time.perf_counter() - start
        return report

    @torch.no_grad()
    def _grow(self, tf, ans, prefix, active, latent_rows, ids, grow: bool = True) -> torch.Tensor:
        """n_e new neurons per edit per layer, key i = q/‖q‖² at the i-th-from-last prompt token
        of the edit's prompt (rows 0..B-1); returns the input of the first intrinsic layer."""
        with self.configured(answer_lengths=ans, active=active, latent_rows=latent_rows), \
                self._upper_input() as upper:
            self._forward(tf.input_ids, tf.attention_mask, 1, prefix)
        if not grow:
            return upper["hidden"]
        n_e, bsz = self.hp.neurons_per_edit, len(ids)
        length = tf.input_ids.shape[1] + (0 if prefix is None else prefix.shape[1])
        prompt_len = (tf.attention_mask.sum(1) - ans)[:bsz]         # real prompt tokens (BOS included)
        last = length - 1 - ans[:bsz]
        offsets = torch.arange(n_e)[None, :] % prompt_len[:, None]  # wrap around short prompts
        pos = last[:, None] - offsets                               # (B, n_e)
        for layer in self.ffn_layers:
            q = layer.ffn.queries().float()[torch.arange(bsz)[:, None], pos]      # (B, n_e, d)
            keys = (q / (q.norm(dim=-1, keepdim=True) ** 2).clamp_min(1e-6)).reshape(bsz * n_e, -1).T
            layer.ffn.grow(keys, ids.repeat_interleave(n_e))
        return upper["hidden"]

    @property
    def _first_trainable(self) -> int:
        """The first layer with trainable parts (extra neurons); nothing below it changes in training."""
        return min((layer.index for layer in self.ffn_layers), default=min(self.layer_indices))

    @contextlib.contextmanager
    def _upper_input(self):
        """Keep the input of the first intrinsic layer during the forwards inside this context."""
        _, layers = decoder_layers(self.model)
        box: dict = {}

        def keep(module, args, kwargs):
            box["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
        handle = layers[self._first_trainable].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield box
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _from_upper_input(self, hidden: torch.Tensor | None):
        """Run only the decoder layers from the first intrinsic one on, fed `hidden` (from
        `_upper_input` on the same batch, same switches): exact, since nothing below it trains.
        `hp.upper_layers_only=False` (or hidden None) runs the whole model instead."""
        if hidden is None or not self.hp.upper_layers_only:
            yield
            return
        path, layers = decoder_layers(self.model)
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model

        def feed(module, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        first = self._first_trainable
        handle = layers[first].register_forward_pre_hook(feed, with_kwargs=True)
        setattr(parent, attr, nn.ModuleList(list(layers)[first:]))
        try:
            yield
        finally:
            setattr(parent, attr, layers)
            handle.remove()

    def _neuron_loss(self, layer: UniKELayer, i: int, target_mask: torch.Tensor, row_edit: torch.Tensor,
                     per_row: torch.Tensor, bsz: int) -> torch.Tensor:
        """T-Patcher's activation and memory losses for the new neurons of this layer (spec §3).
        Activation: every row's own neurons at the positions predicting its target; memory: the
        edit prompts' mean activation against the memory queries."""
        hp, ffn = self.hp, layer.ffn
        n_e, rows = hp.neurons_per_edit, len(row_edit)
        pre = ffn.new_pre.view(rows, -1, bsz, n_e)[torch.arange(rows), :, row_edit]          # (R, T, n_e) own
        pre = pre[:, -target_mask.shape[1] - 1:-1]            # the positions whose logits predict the target
        m = target_mask[..., None].expand_as(pre)
        a_e = pre.masked_fill(~m, float("inf"))
        act = torch.exp(hp.margin_act - a_e).masked_fill(~m, 0.0)
        act = act.flatten(1).topk(min(hp.top_act, act[0].numel()), dim=1).values.mean(1)
        a_e_mean = ((pre * m).sum(1) / m.sum(1).clamp_min(1))[:bsz]                          # (B, n_e)
        loss = hp.c_act * (per_row * act).sum()
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
        return sum(layer.ffn.keys.numel() + layer.ffn.bias.numel() + layer.ffn.values.numel()
                   for layer in self.ffn_layers)

    @torch.no_grad()
    def probe(self, requests: Sequence[Request], owners: Sequence[int | None]) -> dict[str, float]:
        """Mean knowledge weight w (and the share of prompts with w > 0.05) and extra-neuron firing
        at the last prompt token, with each prompt's own edit switched on (None: no edit)."""
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
                for layer in self.ffn_layers:
                    keys, bias, _, own = layer.ffn.parts()
                    pre = layer.ffn.queries()[0, -1].float() @ keys[:, own == owner] + bias[own == owner]
                    q_fire.append((pre > 0).float().mean())
                fired.append(torch.stack(q_fire).mean())
        w = torch.stack(weights) if weights else None
        return {"w_mean": 100.0 * float(w.mean()) if w is not None else float("nan"),
                "w_on_pct": 100.0 * float((w > 0.05).float().mean()) if w is not None else float("nan"),
                "fire_pct": 100.0 * float(torch.stack(fired).mean()) if fired else float("nan")}

    @torch.no_grad()
    def retrieval_recall(self, requests: Sequence[Request], owners: Sequence[int]) -> float:
        """% of prompts whose own edit's memory entry is among the top-K retrieved (last latent layer)."""
        if not requests or not self.state.latent:
            return float("nan")
        att = self.latent_layers[-1].attention
        hits = 0
        for req, owner in zip(requests, owners):
            ids, mask = prompt_batch(self.tokenizer, [req.prompt])
            with self.configured(intrinsic=False, latent=False, recording=True):
                self._forward(ids, mask, 1, None if req.prefix is None else req.prefix[None])
            self.state.first_positions = first_token_index(mask)
            try:
                query = self.state.query(att.recorded, torch.tensor([att.recorded.shape[1] - 1]))
            finally:
                self.state.first_positions = None
            idx, _ = att.retrieve(query, None, self.hp.top_k)
            hits += int((att.owner[idx[0]] == owner).any())
        return 100.0 * hits / len(requests)

    def describe(self) -> dict:
        return {"unike_layers": ",".join(str(layer.index) for layer in self.ffn_layers),
                "unike_latent_layers": ",".join(str(layer.index) for layer in self.latent_layers),
                "unike_mode": self.hp.mode,
                **{f"unike_{k}": v for k, v in asdict(self.hp).items() if isinstance(v, (int, float, str, bool))}}


class _Unedited:
    """The same model with UniKE switched off (the evaluator's reference)."""

    def __init__(self, unike: UniKE):
        self.unike, self.tokenizer = unike, unike.tokenizer

    @torch.no_grad()
    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None, prefix=None):
        with self.unike.configured(intrinsic=False, latent=False):
            return self.unike._forward(input_ids, attention_mask, keep, prefix)


def _layer_list(layers: Sequence[int], n: int) -> list[int]:
    """Layer indices; negative ones count from the top (-1 = the last of `n` layers)."""
    return [int(i) + n if int(i) < 0 else int(i) for i in layers]


def _target_nll(logits: torch.Tensor, tf) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean target NLL and whether every target token is the argmax, from the logits of
    the target-predicting positions only, `(N, V)` in row-major order of `tf.target_mask`."""
    m = tf.target_mask
    logp = logits.float().log_softmax(-1)
    gold = tf.target_ids[m]
    tok_nll = -logp.gather(-1, gold[:, None]).squeeze(-1)
    hit = (logp.argmax(-1) == gold).float()
    row = torch.arange(m.shape[0])[:, None].expand_as(m)[m]
    count = m.sum(1).clamp_min(1)
    nll = torch.zeros(m.shape[0]).index_add(0, row, tok_nll) / count
    correct = torch.zeros(m.shape[0]).index_add(0, row, hit) == count
    return nll, correct


@torch.no_grad()
def greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_new_tokens: Sequence[int], batch_size: int = 32) -> list[str]:
    """The model's own greedy continuation of each prompt (the wrong answers of the pool, spec §9),
    decoded with the KV cache (`generate`)."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n = max(max_new_tokens[start:start + batch_size])
        ids, mask = prompt_batch(tokenizer, chunk)
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
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
