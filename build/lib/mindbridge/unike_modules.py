"""UniKE's two wrappers inside a decoder layer: latent in-context knowledge in self-attention and
extra key-value neurons in the FFN (specs/unike.md §2-4). Plain torch.

Both wrap the model's own modules, found by attribute name (one lookup for Llama, GPT-2, GPT-J
and OPT, the language model of BLIP-2), so `generate()` and every forward path go through them.
Edits are *owned*: every extra neuron and every memory entry inserted for an edit carries the
edit's id, and `UniKEState.active` says, per batch row, which edits that row may use. Holding
all edits and switching on one per row is the one-step protocol (edit, evaluate, reset) without
the reset; switching on all of them is the sequential protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from mindbridge.ffn import FFN_BLOCKS, OUT_PROJECTIONS, decoder_layers

ATTENTION_BLOCKS = ("self_attn", "attn", "attention")
FFN_IN_PROJECTIONS = ("gate_proj", "c_fc", "fc_in", "fc1", "w1", "dense_h_to_4h")
SEPARATE_QKV = ("q_proj", "k_proj", "v_proj")
FUSED_QKV = ("c_attn",)
ATTENTION_OUT = ("o_proj", "out_proj", "c_proj", "dense")
POOL_OWNER = -1                       # memory entries of the knowledge pool belong to no edit


@dataclass
class UniKEState:
    """Run-time switches and per-call context shared by every wrapper of one model."""

    intrinsic: bool = True            # extra FFN neurons on
    latent: bool = True               # latent in-context knowledge on
    adaptive_weight: bool = True      # knowledge weight from semantic similarity (else `fixed_weight`)
    fixed_weight: float = 0.5
    alpha_semantics: str = "prose"    # spec §8.1: "prose" w = Sim, "equation" w = 1 - Sim (Eq. 7 literally)
    top_k: int = 40
    beta: float = 1.0                 # strength of the truthful direction added to the new values
    answer_lengths: torch.Tensor | None = None   # (B,) teacher-forced answer tokens at the end of each row
    active: torch.Tensor | None = None           # (B, num_edits) bool; None: every edit on every row
    latent_rows: torch.Tensor | None = None      # (B,) bool: rows that may read the memory (None: all)
    recording: bool = False           # wrappers keep their inputs (hidden-state extraction)
    weights_seen: list[torch.Tensor] = field(default_factory=list)   # knowledge weights, when logging
    similarities_seen: list[torch.Tensor] = field(default_factory=list)   # semantic similarities s, when logging
    log_weights: bool = False
    batch_shape: tuple[int, int] = (0, 0)        # (B, T) of the current forward, set by the attention wrapper
    query_state: str = "last"         # the retrieval query / h_sem: "last" prompt token or "mean" over the prompt
    similarity: str = "mixture"       # s: "mixture" (Enc^Sem of the attention-averaged h_know, the paper),
                                      # "entry" (Enc^Sem of each retrieved entry, best), "retrieval" (best cosine)
    first_positions: torch.Tensor | None = None  # (B,) first real token of each left-padded row (None: 0)

    def allowed(self, owner: torch.Tensor, rows: int) -> torch.Tensor | None:
        """`(B, N)` which of N owned items each row may use (pool items always), or None for all."""
        if self.active is None:
            return None
        act = self.active.to(owner.device)
        if act.shape[0] != rows:
            raise ValueError(f"UniKEState.active has {act.shape[0]} rows for a batch of {rows}.")
        own = owner.clamp_min(0)
        if own.numel() and int(own.max()) >= act.shape[1]:
            act = torch.cat([act, act.new_zeros(rows, int(own.max()) + 1 - act.shape[1])], 1)
        ok = act[:, own]
        return ok | (owner == POOL_OWNER)[None, :]

    def query(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The query state `(B, d)` of `x` `(B, T, d)`: at each row's last prompt token `last`, or
        the mean over its prompt (from its first real token to `last`)."""
        rows = torch.arange(x.shape[0], device=x.device)
        if self.query_state == "last":
            return x[rows, last]
        first = torch.zeros_like(last) if self.first_positions is None else self.first_positions.to(last.device)
        j = torch.arange(x.shape[1], device=x.device)[None, :]
        inside = ((j >= first[:, None]) & (j <= last[:, None])).to(x.dtype)
        return (x * inside[..., None]).sum(1) / inside.sum(1, keepdim=True).clamp_min(1)

    def query_positions(self, batch: int, length: int, device) -> torch.Tensor:
        """Index of each row's last prompt token (teacher-forced answers sit at the end)."""
        if self.answer_lengths is None:
            return torch.full((batch,), length - 1, dtype=torch.long, device=device)
        return (length - 1 - self.answer_lengths.to(device).long()).clamp_min(0)


def _first(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


# --------------------------------------------------------------------------- latent in-context knowledge


class LatentKnowledgeAttention(nn.Module):
    """Self-attention plus attention over retrieved knowledge states (spec §3 Eq. 2/7-9, §8.5-8.6).

    `x` (the module's input) is the normed pre-attention state. A memory entry is a question state
    h_sem `(d,)` and its knowledge states h_pos `(T, d)`: the states of the answer tokens after the
    question (or only the last one, the spec's single h_pos; `UniKEHParams.knowledge_tokens`). At
    the last prompt token the top-K entries by cosine between x and h_sem are retrieved; every
    position from there on attends (no causal mask, no rotary: memory keys are position-free) to
    their h_pos through the layer's own W_q, W_k, W_v, W_o, giving h_know; the output is
    (1 - w) h_input + w h_know. The retrieval and w are reused for later positions and for cached
    decoding steps, so a teacher-forced target never leaks into them. Cosines are taken after
    subtracting the pool's mean state (`center`): raw hidden states share a large common direction
    that makes every cosine high. Layers with `uses_memory=False` only record their input.
    """

    def __init__(self, inner: nn.Module, state: UniKEState, num_heads: int, num_kv_heads: int,
                 uses_memory: bool = True):
        super().__init__()
        self.inner, self.state, self.uses_memory = inner, state, uses_memory
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        d = self._hidden_dim()
        self.register_buffer("h_sem", torch.zeros(0, d), persistent=False)
        self.register_buffer("h_pos", torch.zeros(0, 1, d), persistent=False)
        self.register_buffer("pos_mask", torch.zeros(0, 1, dtype=torch.bool), persistent=False)
        self.register_buffer("owner", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("center", torch.zeros(d), persistent=False)
        # w = clamp((s - low) / (high - low), 0, 1) of the semantic similarity s; (0, 1) is the
        # paper's clamp(s, 0, 1), `UniKE.calibrate_weights` sets them from out-of-scope prompts.
        self.weight_low, self.weight_high = 0.0, 1.0
        self.enc_sem: nn.Module | None = None
        self.recorded: torch.Tensor | None = None
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (H, valid, w)

    def _hidden_dim(self) -> int:
        if _first(self.inner, SEPARATE_QKV[:1]):
            return int(self.inner.q_proj.weight.shape[1])
        fused = self.inner.c_attn                       # transformers Conv1D: weight (in, out)
        return int(fused.weight.shape[0])

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's own query, key and value projections of `h` (no rotary)."""
        if _first(self.inner, SEPARATE_QKV[:1]):
            return self.inner.q_proj(h), self.inner.k_proj(h), self.inner.v_proj(h)
        found = _first(self.inner, FUSED_QKV)
        if found is None:
            raise ValueError(f"UniKE cannot find the query/key/value projections of {type(self.inner).__name__}.")
        q, k, v = found[1](h).chunk(3, dim=-1)
        return q, k, v

    def project_out(self, h: torch.Tensor) -> torch.Tensor:
        found = _first(self.inner, ATTENTION_OUT)
        if found is None:
            raise ValueError(f"UniKE cannot find the output projection of {type(self.inner).__name__}.")
        return found[1](h)

    def add_entries(self, h_sem: torch.Tensor, h_pos: torch.Tensor, owner: torch.Tensor,
                    pos_mask: torch.Tensor | None = None) -> None:
        """Entries `h_sem` `(n, d)`, `h_pos` `(n, T, d)` (or `(n, d)`: one state each), `pos_mask`
        `(n, T)` which of the T states are real, `owner` `(n,)` (an edit id or POOL_OWNER)."""
        if h_pos.dim() == 2:
            h_pos = h_pos[:, None]
        if pos_mask is None:
            pos_mask = torch.ones(h_pos.shape[:2], dtype=torch.bool)
        width = max(self.h_pos.shape[1], h_pos.shape[1])
        self.h_pos = torch.cat([pad_tokens(self.h_pos, width), pad_tokens(h_pos.to(self.h_pos), width)])
        self.pos_mask = torch.cat([pad_tokens(self.pos_mask, width), pad_tokens(pos_mask.to(self.pos_mask), width)])
        self.h_sem = torch.cat([self.h_sem, h_sem.to(self.h_sem)])
        self.owner = torch.cat([self.owner, owner.to(self.owner)])

    def keep_entries(self, keep: torch.Tensor) -> None:
        self.h_sem, self.h_pos, self.pos_mask, self.owner = (self.h_sem[keep], self.h_pos[keep], self.pos_mask[keep],
                                                             self.owner[keep])

    def drop_edit_entries(self) -> None:
        self.keep_entries(self.owner == POOL_OWNER)

    def retrieve(self, query: torch.Tensor, allowed: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k memory rows by centred cosine: `(indices (B, k'), cosines (B, k'))`."""
        q = F.normalize(query.float() - self.center, dim=-1)
        keys = F.normalize(self.h_sem.float() - self.center, dim=-1)
        sims = q @ keys.T
        if allowed is not None:
            sims = sims.masked_fill(~allowed, float("-inf"))
        k = min(k, sims.shape[1])
        top, idx = sims.topk(k, dim=-1)
        return idx, top

    def knowledge(self, idx: torch.Tensor, sims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The retrieved entries' states `(B, K*T, d)` and which are real `(B, K*T)`."""
        bsz = idx.shape[0]
        know = self.h_pos[idx].reshape(bsz, -1, self.h_pos.shape[-1])
        valid = (self.pos_mask[idx] & torch.isfinite(sims)[..., None]).reshape(bsz, -1)
        return know, valid

    def latent_attention(self, x: torch.Tensor, know: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_know `(B, T, d)` and the head-averaged attention of the last position `(B, K)`.

        `know` `(B, K, d)` retrieved states, `valid` `(B, K)` which of them are real entries.
        """
        bsz, length, _ = x.shape
        q, _, _ = self.project_qkv(x)
        _, k, v = self.project_qkv(know.to(x.dtype))
        dh = q.shape[-1] // self.num_heads
        q = q.view(bsz, length, self.num_heads, dh).transpose(1, 2)              # (B, H, T, dh)
        k = k.view(bsz, -1, self.num_kv_heads, dh).transpose(1, 2)
        v = v.view(bsz, -1, self.num_kv_heads, dh).transpose(1, 2)
        if self.num_kv_heads != self.num_heads:                                 # GQA
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / dh ** 0.5                          # (B, H, T, K)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = scores.softmax(-1).nan_to_num(0.0)                               # a row with nothing valid: 0
        out = (attn @ v).transpose(1, 2).reshape(bsz, length, -1)
        return self.project_out(out), attn[:, :, -1].mean(1)

    def semantic_similarity(self, query: torch.Tensor, know: torch.Tensor, attn_last: torch.Tensor,
                            sims: torch.Tensor | None = None) -> torch.Tensor:
        """s `(B,)`, by `UniKEState.similarity`: "mixture" (the paper) cos(Enc^Sem(h̄_know), x_query)
        (spec §8.2), h̄_know being the retrieved states averaged by the latent attention (Enc^Sem is
        trained to map knowledge states onto their question state h_sem, L2, so the comparison is
        made in the pre-attention state space); "entry": the same per retrieved entry, the best;
        "retrieval": the best retrieval cosine `sims` (query vs stored question states)."""
        st = self.state
        if st.similarity == "retrieval":           # no encoder: the best retrieval cosine
            return sims[:, 0].float()
        if st.similarity == "entry":               # Enc^Sem of each retrieved entry's mean state, the best one
            bsz, k = sims.shape
            tokens = know.float().view(bsz, k, -1, know.shape[-1])
            real = tokens.ne(0).any(-1, keepdim=True).float()                  # padded states are zeros
            mean_state = (tokens * real).sum(2) / real.sum(2).clamp_min(1)
            z = self.enc_sem(mean_state - self.center)
            s = F.cosine_similarity(z, (query.float() - self.center)[:, None], dim=-1)
            return s.masked_fill(~torch.isfinite(sims), -1.0).max(1).values
        mixed = (attn_last[..., None] * know.float()).sum(1)
        z = self.enc_sem(mixed - self.center)
        return F.cosine_similarity(z, query.float() - self.center, dim=-1)

    def knowledge_weight(self, query: torch.Tensor, know: torch.Tensor, attn_last: torch.Tensor,
                         sims: torch.Tensor | None = None) -> torch.Tensor:
        """w `(B,)`: how much of h_know enters (spec §8.1-8.2): the fixed weight, or adaptive from
        the semantic similarity s, w = clamp((s - low) / (high - low), 0, 1)."""
        st = self.state
        if not st.adaptive_weight or self.enc_sem is None:
            return torch.full((query.shape[0],), float(st.fixed_weight), device=query.device)
        s = self.semantic_similarity(query, know, attn_last, sims)
        if st.log_weights:
            st.similarities_seen.append(s.detach().cpu())
        span = max(self.weight_high - self.weight_low, 1e-6)
        w = ((s - self.weight_low) / span).clamp(0, 1)
        return w if st.alpha_semantics == "prose" else 1 - w

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        out = self.inner(*args, **kwargs)
        st = self.state
        st.batch_shape = (x.shape[0], x.shape[1])
        if st.recording:
            self.recorded = x.detach()
        if not st.latent or not self.uses_memory or self.h_sem.shape[0] == 0:
            return out
        h_in = out[0] if isinstance(out, tuple) else out
        bsz, length, _ = x.shape
        if length == 1 and self._cached is not None and self._cached[0].shape[0] == bsz:
            know, valid, w = self._cached                                      # a cached decoding step
            start = torch.zeros(bsz, dtype=torch.long, device=x.device)
        else:
            start = st.query_positions(bsz, length, x.device)
            last = x[torch.arange(bsz, device=x.device), start]
            query = st.query(x, start)
            idx, sims = self.retrieve(query, st.allowed(self.owner, bsz), st.top_k)
            know, valid = self.knowledge(idx, sims)
            _, attn_last = self.latent_attention(last[:, None], know, valid)
            w = self.knowledge_weight(query, know, attn_last, sims)
            w = torch.where(valid.any(1), w, torch.zeros_like(w))
            if st.latent_rows is not None:
                w = w * st.latent_rows.to(w)
            self._cached = (know, valid, w)
            if st.log_weights:
                st.weights_seen.append(w.detach().cpu())
        h_know, _ = self.latent_attention(x, know, valid)
        wt = w.to(h_in.dtype)[:, None, None]
        after = torch.arange(length, device=x.device)[None, :] >= start[:, None]   # last prompt token onwards
        mixed = torch.where(after[..., None], (1 - wt) * h_in + wt * h_know.to(h_in.dtype), h_in)
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed


def pad_tokens(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` `(n, T, ...)` padded with zeros (False) to `(n, width, ...)`."""
    if t.shape[1] >= width:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], *t.shape[2:])], 1)


# --------------------------------------------------------------------------- extra FFN neurons


class InputTap(nn.Module):
    """Pass-through around the FFN's first projection that keeps its input q (the normed FFN input)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.last: torch.Tensor | None = None

    def forward(self, x, *args, **kwargs):
        self.last = x
        return self.inner(x, *args, **kwargs)


class ExtraNeuronsFFN(nn.Module):
    """The FFN output plus act(q W_K^extra + b) (W_V^extra + β ζ′) (spec Eq. 3/6).

    Wraps the FFN's output projection; q comes from the `InputTap` on its first projection.
    Frozen neurons of earlier edits are buffers; the neurons of the edits being trained are
    parameters (`new_*`) until `freeze_new()`. Inactive rows' neurons output exactly zero.
    """

    def __init__(self, inner: nn.Module, tap: InputTap, state: UniKEState, hidden: int, activation: str):
        super().__init__()
        self.inner, self.tap, self.state = inner, tap, state
        self.act = nn.ReLU() if activation == "relu" else ACT2FN[activation]
        self.register_buffer("keys", torch.zeros(hidden, 0), persistent=False)
        self.register_buffer("bias", torch.zeros(0), persistent=False)
        self.register_buffer("values", torch.zeros(0, hidden), persistent=False)
        self.register_buffer("owner", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("zeta", torch.zeros(hidden), persistent=False)   # ζ′ = W_ζ ζ of this layer
        self.new_keys: nn.Parameter | None = None
        self.new_bias: nn.Parameter | None = None
        self.new_values: nn.Parameter | None = None
        self.new_owner: torch.Tensor | None = None
        self.new_pre: torch.Tensor | None = None      # pre-activations of the new neurons, last forward

    @property
    def num_neurons(self) -> int:
        return self.keys.shape[1] + (0 if self.new_keys is None else self.new_keys.shape[1])

    def grow(self, keys: torch.Tensor, owner: torch.Tensor) -> None:
        """New trainable neurons: keys `(d, n)`, bias 0, values 0 (spec §8.7)."""
        self.new_keys = nn.Parameter(keys.clone().float())
        self.new_bias = nn.Parameter(torch.zeros(keys.shape[1]))
        self.new_values = nn.Parameter(torch.zeros(keys.shape[1], keys.shape[0]))
        self.new_owner = owner

    def freeze_new(self) -> None:
        if self.new_keys is None:
            return
        self.keys = torch.cat([self.keys, self.new_keys.detach()], 1)
        self.bias = torch.cat([self.bias, self.new_bias.detach()])
        self.values = torch.cat([self.values, self.new_values.detach()])
        self.owner = torch.cat([self.owner, self.new_owner.to(self.owner)])
        self.new_keys = self.new_bias = self.new_values = self.new_owner = self.new_pre = None

    def clear(self) -> None:
        self.freeze_new()
        d = self.keys.shape[0]
        self.keys, self.bias = self.keys.new_zeros(d, 0), self.bias.new_zeros(0)
        self.values, self.owner = self.values.new_zeros(0, d), self.owner.new_zeros(0)

    def queries(self) -> torch.Tensor:
        """The FFN input q of the last forward as `(B, T, d)` (OPT flattens it to `(B*T, d)`)."""
        q = self.tap.last
        return q.view(*self.state.batch_shape, q.shape[-1]) if q.dim() == 2 else q

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.new_keys is None:
            return self.keys, self.bias, self.values, self.owner
        return (torch.cat([self.keys, self.new_keys], 1), torch.cat([self.bias, self.new_bias]),
                torch.cat([self.values, self.new_values]), torch.cat([self.owner, self.new_owner.to(self.owner)]))

    def forward(self, h, *args, **kwargs):
        out = self.inner(h, *args, **kwargs)
        st = self.state
        if not st.intrinsic or self.num_neurons == 0:
            return out
        q = self.queries()
        keys, bias, values, owner = self.parts()
        pre = q.float() @ keys + bias                                         # (B, T, N)
        if self.new_keys is not None:
            self.new_pre = pre[..., self.keys.shape[1]:]
        fire = self.act(pre)
        allowed = st.allowed(owner, q.shape[0])
        if allowed is not None:
            fire = fire * allowed[:, None, :].to(fire.dtype)
        return out + (fire @ (values + st.beta * self.zeta)).to(out.dtype).view(out.shape)


# --------------------------------------------------------------------------- attaching


@dataclass
class UniKELayer:
    """One wrapped decoder layer: its attention always (it records the states the pool and the
    retrieval read; it attends to the memory only on latent layers), its FFN on intrinsic layers."""

    index: int
    attention: LatentKnowledgeAttention
    ffn: ExtraNeuronsFFN | None
    restore: list[tuple[nn.Module, str, nn.Module]]      # (parent, attribute, original module)

    @property
    def latent(self) -> bool:
        return self.attention.uses_memory


def _heads(config) -> tuple[int, int]:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if heads is None:
        raise ValueError(f"UniKE cannot read the number of attention heads from {type(config).__name__}.")
    kv = getattr(config, "num_key_value_heads", None) or heads
    return int(heads), int(kv)


def _activation_name(config) -> str:
    for key in ("hidden_act", "activation_function"):
        if getattr(config, key, None):
            return str(getattr(config, key))
    raise ValueError(f"UniKE cannot read the FFN activation from {type(config).__name__}; use activation=relu.")


def attach_layer(model: nn.Module, index: int, state: UniKEState, activation: str, latent: bool = True,
                 intrinsic: bool = True) -> UniKELayer:
    """Wrap self-attention (and, on an intrinsic layer, the FFN) of decoder layer `index`
    (found by attribute name). `latent`: the attention reads the knowledge memory."""
    _, layers = decoder_layers(model)
    block = layers[index]
    found = _first(block, ATTENTION_BLOCKS)
    if found is None:
        raise ValueError(f"UniKE cannot find the self-attention of {type(block).__name__} "
                         f"(looked for {', '.join(ATTENTION_BLOCKS)}).")
    attn_name, attn = found
    heads, kv = _heads(model.config)
    wrapped = LatentKnowledgeAttention(attn, state, heads, kv, uses_memory=latent)
    setattr(block, attn_name, wrapped)
    restore = [(block, attn_name, attn)]
    if not intrinsic:
        return UniKELayer(index, wrapped, None, restore)
    # The FFN lives in a sub-module (Llama `mlp`) or directly in the block (OPT `fc1`/`fc2`).
    container = next((getattr(block, n) for n in FFN_BLOCKS if isinstance(getattr(block, n, None), nn.Module)), block)
    fin, fout = _first(container, FFN_IN_PROJECTIONS), _first(container, OUT_PROJECTIONS)
    if fin is None or fout is None:
        setattr(block, attn_name, attn)
        raise ValueError(f"UniKE cannot find the FFN projections of {type(block).__name__} (looked for "
                         f"{', '.join(FFN_IN_PROJECTIONS)} and {', '.join(OUT_PROJECTIONS)}); "
                         "mixture-of-experts FFNs are not supported.")
    act = activation if activation == "relu" else _activation_name(model.config) if activation == "model" else activation
    hidden = int(model.get_input_embeddings().weight.shape[1])
    tap = InputTap(fin[1])
    ffn = ExtraNeuronsFFN(fout[1], tap, state, hidden, act)
    setattr(container, fin[0], tap)
    setattr(container, fout[0], ffn)
    return UniKELayer(index, wrapped, ffn, restore + [(container, fin[0], fin[1]), (container, fout[0], fout[1])])


def detach_layer(layer: UniKELayer) -> None:
    for parent, name, original in layer.restore:
        setattr(parent, name, original)
