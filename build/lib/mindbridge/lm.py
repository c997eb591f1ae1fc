"""Calling a frozen causal LM with optional soft-prompt tokens in front of the text.

The model's own accessors (`get_input_embeddings`, `logits_to_keep`) are used so the same code
serves Llama, Gemma, GPT-2, GPT-J and MoE layouts without per-architecture branches.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mindbridge.tokenization import position_ids_for, prompt_batch


def causal_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  keep: int, memory: torch.Tensor | None = None, insert_at: torch.Tensor | None = None,
                  share_positions: bool = False) -> torch.Tensor:
    """Logits of the last `keep` positions, `(B, keep, V)`.

    `memory` `(B, P, d)` are soft tokens inserted into each (left-padded) row before the text
    index `insert_at[b]` (default: before the first real token, i.e. a prefix). The text keeps
    contiguous positions, so a padded row sees the same positions as the same row alone.
    `share_positions`: the memory tokens take the position of the text token before them and the
    text keeps its own positions, so the distances between text tokens are those of the plain LM.
    """
    embeds = model.get_input_embeddings()(input_ids)
    if memory is not None:
        if insert_at is None:
            insert_at = first_token_index(attention_mask)
        embeds, attention_mask = insert_tokens(embeds, attention_mask, memory.to(embeds.dtype), insert_at)
        positions = soft_token_positions(attention_mask, insert_at, memory.shape[1], share_positions)
    else:
        positions = position_ids_for(attention_mask)
    out = model(inputs_embeds=embeds, attention_mask=attention_mask,
                position_ids=positions, logits_to_keep=keep, use_cache=False)
    return out.logits


def read_hidden_states_contiguously(model: PreTrainedModel) -> PreTrainedModel:
    """Give the LM head a contiguous copy of the hidden states it scores.

    `logits_to_keep` slices the last positions out of the hidden states, a strided view, and
    `F.linear` on a strided 3-D input falls back to a batched product over a broadcast weight:
    1.07 s instead of 0.22 s for 32 rows on Gemma-3's 262k-word head, five times the cost of the
    18 layers before it. Installed once per model, at load time.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    return model


def has_native_bfloat16(device: torch.device | str) -> bool:
    """Whether `device` multiplies in bfloat16 in hardware. A CPU without AVX512-BF16 or AMX
    emulates it: on an AVX2 EPYC, Gemma-3's LM head (forward and backward, 40 rows) took 84 s in
    bfloat16 against 1.2 s in fp32, while an AVX512-BF16 CPU ran it twice as fast as fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch.cpu's feature probes (private, so looked up rather than assumed).
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def lm_head_dtype_choice(name: str | None) -> torch.dtype | str | None:
    """Parse `model.bridge.lm_head_dtype`: None (fp32), "auto", or a floating-point dtype name."""
    if name is None or str(name) in ("null", "none", "None"):
        return None
    if str(name) == "auto":
        return "auto"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"model.bridge.lm_head_dtype={name!r} is not a torch floating-point dtype; "
                         "use auto, bfloat16, float16 or null.")
    return dtype


def resolve_lm_head_dtype(choice: torch.dtype | str | None, device: torch.device | str) -> torch.dtype | None:
    """The dtype the student's LM head runs in on `device`; None keeps the weight's own.
    "auto" is bfloat16 only where the hardware has it natively."""
    if choice == "auto":
        return torch.bfloat16 if has_native_bfloat16(device) else None
    return choice


@contextlib.contextmanager
def lm_head_in(model: PreTrainedModel, weight: torch.Tensor | None, token_ids: torch.Tensor | None = None):
    """Inside this context the LM head multiplies by `weight` (a lower-precision copy of its
    own, e.g. bfloat16, or the rows of the tokens `token_ids` only) wherever gradients flow, and
    returns the input's dtype; with `token_ids` its logits are over those tokens, in that order.

    Frozen weights are cast again at every call under autocast (its cast cache holds only
    trainable leaves), so `trainer.precision=bf16-mixed` does not speed up a frozen LLM on the
    CPU; a copy made once does. Under `no_grad` (teachers, evaluation) the head is unchanged.
    `weight=None`: no change at all.
    """
    head = model.get_output_embeddings()
    if weight is None or head is None:
        yield
        return
    full, own = head.forward, "forward" in vars(head)
    bias = getattr(head, "bias", None)
    if bias is not None:
        bias = bias.detach() if token_ids is None else bias.detach()[token_ids.to(bias.device)]
        bias = bias.to(weight.dtype)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return full(hidden)
        return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).to(hidden.dtype)
    head.forward = forward
    try:
        yield
    finally:
        if own:
            head.forward = full
        else:
            del head.forward


@contextlib.contextmanager
def lm_head_only_at(model: PreTrainedModel, select: torch.Tensor):
    """Inside this context the LM head scores only the kept positions where `select` `(B, K)`
    is True, so the model returns logits `(1, N, V)` (rows in row-major order of `select`).

    Exact, since the head works position by position (final soft-capping included). With
    right-aligned answers of different lengths most kept positions are padding, and on a
    large vocabulary the head is most of a training step.
    """
    def gather(module, args):
        hidden = args[0]
        return (hidden[select.to(hidden.device)].unsqueeze(0), *args[1:])
    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def soft_token_positions(attention_mask: torch.Tensor, insert_at: torch.Tensor, num_tokens: int,
                         share_positions: bool) -> torch.Tensor:
    """Position ids of left-padded rows holding `num_tokens` soft tokens from `insert_at[b]`.

    By default the soft tokens take positions of their own, like text. Shared: each takes the
    position of the text token before it and the text keeps the positions it has without them
    (a memory after the prompt then leaves every prompt-to-answer distance as it was).
    """
    if not share_positions:
        return position_ids_for(attention_mask)
    j = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]
    at = insert_at.to(attention_mask.device)[:, None]
    return position_ids_for(attention_mask * ~((j >= at) & (j < at + num_tokens)))


def without_adapters(model) -> contextlib.AbstractContextManager:
    """A context in which a PEFT-wrapped LLM behaves exactly as its frozen base model.

    Adapters trained during bridging (`bridge.lora`) are injected into the base model's own
    layers, so the unedited reference must switch them off rather than call the base model.
    """
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def first_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each left-padded row's first real token."""
    return (attention_mask == 0).sum(dim=1)


def insert_tokens(embeds: torch.Tensor, attention_mask: torch.Tensor, tokens: torch.Tensor,
                  insert_at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert `tokens` `(B, P, d)` into each row before index `insert_at[b]`.

    Rows are left-padded and stay so: `(B, L + P, d)`, tokens before `insert_at` keep their
    index, tokens after it move right by P.
    """
    bsz, length, dim = embeds.shape
    plen = tokens.shape[1]
    at = insert_at.to(embeds.device)[:, None]
    new_pos = torch.arange(length + plen, device=embeds.device).expand(bsz, -1)
    is_new = (new_pos >= at) & (new_pos < at + plen)
    src = torch.where(new_pos < at, new_pos, new_pos - plen).clamp(0, length - 1)
    old = embeds.gather(1, src[..., None].expand(-1, -1, dim))
    new = tokens.gather(1, (new_pos - at).clamp(0, plen - 1)[..., None].expand(-1, -1, dim))
    out = torch.where(is_new[..., None], new, old)
    mask = torch.where(is_new, torch.ones_like(src), attention_mask.gather(1, src))
    return out, mask.to(attention_mask.dtype)


class ScorableLM(Protocol):
    """What the shared evaluator needs from any edited (or unedited) model."""

    tokenizer: PreTrainedTokenizerBase

    def logits(self, prompts: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor,
               keep: int, answer_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `(B, keep, V)` of the last `keep` positions. `prompts` is the prompt text only
        (never the target), for methods that condition on it; `answer_lengths[b]` says how many
        tokens at the end of row b are the teacher-forced answer (None: rows are prompts only)."""


class PlainLM:
    """An unedited causal LM behind the `ScorableLM` interface."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None):
        with without_adapters(self.model):
            return causal_logits(self.model, input_ids, attention_mask, keep)


class SwitchedOffLM(PlainLM):
    """The unedited model: an LLM that carries an edit, scored with the edit switched off.

    `switch_off()` returns a context manager inside which the LLM computes its original function
    (NeuralDB's gate disabled, WISE's router pinned to the main memory).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 switch_off: Callable[[], ContextManager]):
        super().__init__(model, tokenizer)
        self.switch_off = switch_off

    @torch.no_grad()
    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None):
        with self.switch_off():
            return super().logits(prompts, input_ids, attention_mask, keep, answer_lengths)


class PromptKVStore:
    """Keys and values of fixed prompts under a frozen LM, computed once and re-batched.

    When soft tokens go between a prompt and its answer, nothing in the prompt depends on them,
    so the prompt's keys/values (and the unedited next-token logits, the out-of-scope teacher)
    are constants. Training then only runs the memory and answer tokens through the LM, which
    is several times cheaper than a full forward and backward per step.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                 batch_size: int = 32, keep_logits: bool = False, logits_dtype: torch.dtype = torch.bfloat16,
                 hold_back: int = 0):
        """`hold_back`: leave each prompt's last tokens out of the cache (their ids are kept in
        `held`), for soft tokens that go before them; `keep_logits` still keeps the logits after
        the whole prompt."""
        self.model = model
        n = len(prompts)
        self.keys: list[list[torch.Tensor]] = [None] * n   # per prompt: per layer (kv_heads, len, head_dim)
        self.values: list[list[torch.Tensor]] = [None] * n
        self.last_logits: list[torch.Tensor] = [None] * n if keep_logits else []
        self.held: list[torch.Tensor] = [None] * n          # per prompt: its last `hold_back` token ids
        # Batches of similar length: a third of the tokens was padding in prompt order.
        lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
        order = sorted(range(n), key=lengths.__getitem__)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            ids, mask = prompt_batch(tokenizer, [prompts[i] for i in rows])
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                            use_cache=True, logits_to_keep=1)
            layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            width = ids.shape[1]
            for b, i in enumerate(rows):
                real = int(mask[b].sum())
                if real <= hold_back:
                    raise ValueError(f"The prompt {prompts[i]!r} has {real} token(s); a memory placed before "
                                     f"its last {hold_back} token(s) needs a longer prompt.")
                # Causal attention: the keys/values of the first real - hold_back tokens do not
                # depend on the tokens after them, so they are sliced from the full pass.
                end = width - hold_back
                self.keys[i] = [k[b, :, width - real:end].clone() for k, _ in layers]
                self.values[i] = [v[b, :, width - real:end].clone() for _, v in layers]
                self.held[i] = ids[b, end:].clone()
                if keep_logits:
                    self.last_logits[i] = out.logits[b, -1].to(logits_dtype)

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, index: list[int]):
        """A left-padded `DynamicCache` for these prompts and its attention mask `(B, L)`."""
        from transformers import DynamicCache
        lengths = [self.keys[i][0].shape[1] for i in index]
        width = max(lengths)
        mask = torch.zeros(len(index), width, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, width - n:] = 1
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(self.keys[index[0]])):
            k0, v0 = self.keys[index[0]][layer], self.values[index[0]][layer]
            # Values may be narrower than keys (DeepSeek-V2/V3's latent attention).
            ks = k0.new_zeros(len(index), k0.shape[0], width, k0.shape[2])
            vs = v0.new_zeros(len(index), v0.shape[0], width, v0.shape[2])
            for b, i in enumerate(index):
                ks[b, :, width - lengths[b]:] = self.keys[i][layer]
                vs[b, :, width - lengths[b]:] = self.values[i][layer]
            cache.update(ks, vs, layer)
        return cache, mask

    def teacher_logits(self, index: list[int]) -> torch.Tensor:
        return torch.stack([self.last_logits[i] for i in index]).float()

    def held_back(self, index: list[int]) -> torch.Tensor:
        """The held-back last token ids of these prompts `(B, hold_back)`."""
        return torch.stack([self.held[i] for i in index])


def continuation_logits(model: PreTrainedModel, cache, prompt_mask: torch.Tensor, memory: torch.Tensor,
                        answer_ids: torch.Tensor | None = None, answer_mask: torch.Tensor | None = None,
                        share_positions: bool = False, select: torch.Tensor | None = None) -> torch.Tensor:
    """Logits `(B, P + T, V)` for `[memory; answer]` appended to cached prompts.

    `answer_ids`/`answer_mask` `(B, T)` are right-aligned answer tokens (as in
    `TeacherForcedBatch`); each row's memory sits right before its own answer, so
    `logits[:, P - 1:-1]` line up with `answer_ids`. With no memory (P = 0) this is the plain
    LM reading the answers after the cached prompts. Identical to running the whole sequence
    (`causal_logits` with the memory inserted after the prompt) up to float rounding.
    `select` `(B, P + T)` bool: only those positions' logits, `(N, V)` in row-major order.
    """
    bsz, plen, dim = memory.shape
    dev = memory.device
    embed = model.get_input_embeddings()
    memory = memory.to(embed.weight.dtype)
    if answer_ids is None:
        answer_ids = torch.zeros(bsz, 0, dtype=torch.long, device=dev)
        answer_mask = torch.zeros(bsz, 0, dtype=torch.bool, device=dev)
    width = answer_ids.shape[1]
    ans = answer_mask.sum(1).to(dev)
    j = torch.arange(width + plen, device=dev).expand(bsz, -1)
    at = (width - ans)[:, None]                          # where row b's memory starts
    is_mem = (j >= at) & (j < at + plen)
    shifted = torch.cat([memory.new_zeros(bsz, plen, dim), embed(answer_ids.to(dev))], dim=1)  # j -> answer j-P
    seg = torch.where((j >= at + plen)[..., None], shifted, 0.0)
    if plen:
        mem = memory.gather(1, (j - at).clamp(0, plen - 1)[..., None].expand(-1, -1, dim))
        seg = torch.where(is_mem[..., None], mem, seg)
    full_mask = torch.cat([prompt_mask.to(dev), (j >= at).to(prompt_mask.dtype)], dim=1)
    positions = soft_token_positions(full_mask, prompt_mask.shape[1] + at[:, 0], plen, share_positions)
    with lm_head_only_at(model, select) if select is not None else contextlib.nullcontext():
        logits = model(inputs_embeds=seg, attention_mask=full_mask, position_ids=positions[:, prompt_mask.shape[1]:],
                       past_key_values=cache, use_cache=True, logits_to_keep=width + plen).logits
    return logits if select is None else logits[0]
