"""Stage II: the projector P_m that lets a frozen LLM read a memory through soft tokens.

F*(s, r) = F(P_m(E_m(s, r)) ⊕ (s, r)): the memory tokens are always inserted in front of the
prompt (no router); L_1 teaches P_m to make F say the edited object for in-scope prompts and
λ_kl·KL keeps F's own prediction on out-of-scope prompts.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from mindbridge.encoder import MemoryEncoder
from mindbridge.gate import MemoryGate
from mindbridge.lm import (causal_logits, first_token_index, insert_tokens, lm_head_only_at, soft_token_positions,
                           without_adapters)
from mindbridge.pretraining import mlp
from mindbridge.tokenization import TeacherForcedBatch, encode_answer_tokens, prompt_batch, teacher_forced_batch


MEMORY_POSITIONS = ("prefix", "suffix", "before_last")


class MemoryProjectorConfig(PretrainedConfig):
    model_type = "mindbridge_projector"

    def __init__(self, encoder_dim: int = 384, llm_dim: int = 576, hidden_dim: int | None = None,
                 depth: int = 2, num_tokens: int = 1, dropout: float = 0.2, position: str = "prefix",
                 zero_init_output: bool = False, gated: bool = False, gate_hidden: int | None = None,
                 share_positions: bool = False, **kwargs):
        super().__init__(**kwargs)
        if position not in MEMORY_POSITIONS:
            raise ValueError(f"memory position must be one of {', '.join(MEMORY_POSITIONS)} (got {position!r})")
        if share_positions and position == "before_last":
            raise ValueError("share_positions works with the prefix and suffix positions; turn it off for before_last")
        # prefix: before the prompt (the paper); suffix: between the prompt and the answer;
        # before_last: before the prompt's last token, which then reads the memory and answers.
        self.position = position
        # The memory tokens take the position id of the text token before them, so the LLM's
        # text keeps its own positions (and relative distances) with the memory inserted.
        self.share_positions = share_positions
        # Start every memory at one shared vector (the output bias) so the KL term first learns
        # a token the LLM ignores, and the edits then learn their departures from it.
        self.zero_init_output = zero_init_output
        # Mix each memory with a learned null token by a gate read off the same memory vector.
        self.gated = gated
        self.gate_hidden = gate_hidden or encoder_dim // 2
        self.encoder_dim, self.llm_dim, self.depth = encoder_dim, llm_dim, depth
        self.hidden_dim = hidden_dim or 2 * encoder_dim
        self.num_tokens, self.dropout = num_tokens, dropout


class MemoryProjector(PreTrainedModel):
    """P_m: memory vector `(B, d_enc)` → `num_tokens` soft tokens `(B, num_tokens, d_llm)`."""

    config_class = MemoryProjectorConfig
    base_model_prefix = "projector"

    def __init__(self, config: MemoryProjectorConfig):
        super().__init__(config)
        self.net = mlp(config.encoder_dim, config.hidden_dim, config.llm_dim * config.num_tokens,
                       depth=config.depth, dropout=config.dropout)
        # Memory vectors of one encoder share a large common component (every question looks
        # alike to it); standardising with statistics of the training features makes the
        # differences between facts visible to the MLP from the first step.
        if config.gated:
            # g(c) in (0, 1) from the raw memory vector, shaped like the existence head H of
            # stage I so it can start from H; the null token starts at zero (a key and value
            # of zero: nearly nothing to attend to).
            self.gate = mlp(config.encoder_dim, config.gate_hidden, 1, depth=2)
            self.null_tokens = nn.Parameter(torch.zeros(config.num_tokens, config.llm_dim))
        self.register_buffer("feature_mean", torch.zeros(config.encoder_dim))
        self.register_buffer("feature_scale", torch.ones(config.encoder_dim))
        self.post_init()
        if config.zero_init_output:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    @torch.no_grad()
    def set_feature_statistics(self, features: torch.Tensor) -> None:
        """Fix the input standardisation from the memory vectors the projector trains on."""
        self.feature_mean.copy_(features.mean(0))
        self.feature_scale.copy_(features.std(0).clamp(min=1e-4))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=5 ** 0.5)
            if module.bias is not None:
                bound = 1 / module.in_features ** 0.5
                nn.init.uniform_(module.bias, -bound, bound)

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        out = self.net((memory - self.feature_mean) / self.feature_scale).view(memory.shape[0], self.config.num_tokens, self.config.llm_dim)
        if not self.config.gated:
            return out
        # Out-of-scope memories only need to reach the null token (what the KL term asks for),
        # so L_1 can move the in-scope ones freely instead of fighting the KL term for them.
        g = self.gate_values(memory)[:, None, None]
        return g * out + (1 - g) * self.null_tokens

    def gate_values(self, memory: torch.Tensor) -> torch.Tensor:
        """The gate g(c) `(B,)` of a gated projector (1 = the memory's own token)."""
        return torch.sigmoid(self.gate(memory)[:, 0])

    @torch.no_grad()
    def init_gate_from_exist_head(self, head: dict[str, torch.Tensor]) -> None:
        """Start the gate as Stage I's existence head H: g(c) = P_H(in-scope | c).

        H is a 2-way classifier Linear-ReLU-Linear; the sigmoid of its logit difference is its
        in-scope probability, so the gate's last layer is the difference of H's two rows.
        """
        first, last = self.gate[0], self.gate[-1]
        layers = sorted({int(k.split(".")[0]) for k in head})     # the two Linear layers of `mlp`
        if len(layers) != 2:
            raise ValueError(f"expected an existence head with two linear layers, got {len(layers)}")
        w1, b1, w2, b2 = (head[f"{i}.{n}"] for i in layers for n in ("weight", "bias"))
        if w1.shape != first.weight.shape:
            raise ValueError(f"the existence head has shape {tuple(w1.shape)} but the gate expects "
                             f"{tuple(first.weight.shape)}")
        first.weight.copy_(w1)
        first.bias.copy_(b1)
        last.weight.copy_((w2[1] - w2[0])[None])
        last.bias.copy_((b2[1] - b2[0])[None])


class TrainingVocabulary:
    """The tokens the student is scored over while a projector trains: a candidate list.

    On a large vocabulary the LM head's product (forward and backward) and the softmax over it
    are much of a bridge step: Gemma-3's head has 262k words, and its forward and backward for 96
    rows took 1.06 s on one thread with AVX2 kernels, against 0.08 s over 20k of its rows. The
    projector moves the LLM's answers among the tokens the LLM
    already weighs in these contexts, towards the edit targets, so L_1 and the KL are computed
    over those tokens only (renormalised there): every edit target, old answer and known
    out-of-scope answer token, and the unedited LLM's top-k at every position the losses score
    (`from_unedited_model`). The vocabulary for very large output layers of Jean et al. (2015)
    works the same way. The evaluator always scores the whole vocabulary.
    """

    def __init__(self, token_ids: torch.Tensor, vocab_size: int):
        self.ids = torch.unique(token_ids.long().flatten())          # sorted
        if self.ids.numel() and (self.ids[0] < 0 or self.ids[-1] >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size}); got {self.ids[0]}..{self.ids[-1]}")
        self.vocab_size = vocab_size
        self._position = torch.full((vocab_size,), -1, dtype=torch.long)
        self._position[self.ids] = torch.arange(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of an output layer's weight `(V, d)` (or bias `(V,)`) for these tokens."""
        return weight.index_select(0, self.ids.to(weight.device))

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits `(..., V)` → `(..., len(self))`, in the same token order."""
        return logits.index_select(-1, self.ids.to(logits.device))

    def positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Where each token id sits in the restricted logits; every id must be a candidate."""
        found = self._position.to(token_ids.device)[token_ids]
        if (found < 0).any():
            missing = sorted(set(token_ids[found < 0].tolist()))[:5]
            raise ValueError(f"token ids {missing} are not in the training vocabulary")
        return found

    @classmethod
    @torch.no_grad()
    def from_unedited_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                            answers: Sequence[str | None], top_k: int, max_answer_tokens: int = 32,
                            extra_answers: Sequence[str | None] = (), batch_size: int = 16) -> "TrainingVocabulary":
        """Candidates from the frozen LLM: for each (prompt, answer) its top-k next tokens after
        the prompt and after each answer token but the last (teacher-forced, at most
        `max_answer_tokens`), the answer tokens themselves and the tokens of `extra_answers`."""
        head = model.get_output_embeddings()
        vocab_size, k = head.weight.shape[0], min(top_k, head.weight.shape[0])
        found = [encode_answer_tokens(tokenizer, a) for a in extra_answers]
        pairs = list(zip(prompts, answers, strict=True))
        with_answer = [(p, a) for p, a in pairs if a and a.strip()]
        bare = [p for p, a in pairs if not (a and a.strip())]
        with without_adapters(model):
            for start in range(0, len(with_answer), batch_size):
                chunk = with_answer[start:start + batch_size]
                tf = teacher_forced_batch(tokenizer, [p for p, _ in chunk], [a for _, a in chunk],
                                          max_target_tokens=max_answer_tokens)
                # Kept position t predicts answer token t (right-aligned, as in `answer_loss`).
                select = torch.cat([tf.target_mask, tf.target_mask.new_zeros(len(chunk), 1)], dim=1)
                with lm_head_only_at(model, select):
                    logits = causal_logits(model, tf.input_ids, tf.attention_mask, keep=select.shape[1])[0]
                found += [logits.topk(k, dim=-1).indices.flatten().cpu(), tf.target_ids[tf.target_mask]]
            for start in range(0, len(bare), batch_size):
                ids, mask = prompt_batch(tokenizer, bare[start:start + batch_size])
                logits = causal_logits(model, ids, mask, keep=1)[:, -1]
                found.append(logits.topk(k, dim=-1).indices.flatten().cpu())
        return cls(torch.cat([torch.as_tensor(f, dtype=torch.long) for f in found] or [torch.zeros(0)]), vocab_size)


def answer_loss(logits: torch.Tensor, batch: TeacherForcedBatch,
                vocabulary: TrainingVocabulary | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L_1: mean NLL of the target tokens (and their teacher-forced token accuracy).

    `logits` `(B, T + 1, V)` laid out like `batch`, or `(N, V)`: only the N positions that
    predict a target token (`batch.target_mask` in row-major order). With a `vocabulary` the
    logits are over its tokens only (`(…, len(vocabulary))`).
    """
    targets = batch.target_ids[batch.target_mask]
    if vocabulary is not None:
        targets = vocabulary.positions(targets)
    pred = (logits if logits.dim() == 2 else logits[:, :-1][batch.target_mask]).float()
    return F.cross_entropy(pred, targets), (pred.argmax(-1) == targets).float().mean()


def distill_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.5) -> torch.Tensor:
    """KL(P_F || P_F*) at one position per row, softened by T and rescaled by T² (spec §3)."""
    t = temperature
    teacher = F.softmax(teacher_logits.float() / t, dim=-1).clamp(1e-8, 1 - 1e-7)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean") * t * t


class MemoryAugmentedLM(nn.Module):
    """A frozen causal LM reading one or more memories through their projectors.

    With several (encoder, projector) pairs the soft tokens are concatenated in order
    (Multi-MindBridge, Eq. 7). The encoders always see the prompt text only.

    A memory with a gate (`mindbridge.gate.MemoryGate`) adds its tokens only to the prompts it
    holds a fact for; a prompt that no memory opens for runs through the LLM alone, and its
    logits are those of the unedited LLM on the same batch, bit for bit. `gates=None` (or a None
    entry) reads that memory for every prompt, as the paper does.
    """

    def __init__(self, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 encoders: Sequence[MemoryEncoder], projectors: Sequence[MemoryProjector],
                 gates: Sequence[MemoryGate | None] | None = None):
        super().__init__()
        if len(encoders) != len(projectors) or not encoders:
            raise ValueError("one projector per memory encoder is needed")
        gates = list(gates) if gates is not None else [None] * len(encoders)
        if len(gates) != len(encoders):
            raise ValueError("one gate (or None) per memory encoder is needed")
        self.llm, self.tokenizer = llm, tokenizer
        self.encoders = nn.ModuleList(encoders)
        self.projectors = nn.ModuleList(projectors)
        self.gates = gates

    @property
    def gated(self) -> bool:
        return any(g is not None for g in self.gates)

    def memory_features(self, prompts: list[str]) -> list[torch.Tensor]:
        """The memory vectors of `prompts`, one `(B, d)` tensor per memory."""
        return [enc.encode(prompts) for enc in self.encoders]

    def memory_tokens(self, prompts: list[str] | None = None,
                      features: Sequence[torch.Tensor] | None = None,
                      memories: Sequence[int] | None = None) -> torch.Tensor:
        """Soft tokens `(B, P, d)`; pass cached `features` (one tensor per encoder) to skip E_m.
        `memories`: the indices of the memories whose token blocks to include (default: all)."""
        if features is None:
            features = self.memory_features(prompts)
        dev = self.llm.get_input_embeddings().weight.device
        chosen = range(len(self.projectors)) if memories is None else memories
        return torch.cat([self.projectors[i](features[i].to(dev)) for i in chosen], dim=1)

    @torch.no_grad()
    def open_gates(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """`(M, B)` bool: which memory is read for which prompt (all True without gates)."""
        rows = len(features[0])
        return torch.stack([torch.ones(rows, dtype=torch.bool) if g is None else g.is_open(f).cpu()
                            for g, f in zip(self.gates, features)])

    def _row_groups(self, features: Sequence[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """Rows grouped by the memories open for them: [(memory indices, row indices), ...]."""
        opened = self.open_gates(features)
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, column in enumerate(opened.T.tolist()):
            groups.setdefault(tuple(i for i, o in enumerate(column) if o), []).append(row)
        return [(memories, torch.tensor(rows)) for memories, rows in groups.items()]

    @property
    def position(self) -> str:
        return self.projectors[0].config.position

    @property
    def share_positions(self) -> bool:
        return self.projectors[0].config.share_positions

    def insert_at(self, attention_mask: torch.Tensor, answer_lengths: torch.Tensor | None) -> torch.Tensor:
        """Where the memory goes in each left-padded row: before the prompt, right after it (i.e.
        before the `answer_lengths[b]` teacher-forced answer tokens at the row's end), or before
        the prompt's last token."""
        if self.position == "prefix":
            return first_token_index(attention_mask)
        tail = answer_lengths if answer_lengths is not None else torch.zeros(len(attention_mask), dtype=torch.long)
        at = attention_mask.shape[1] - tail.to(attention_mask.device)
        return at - 1 if self.position == "before_last" else at

    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None, features=None):
        """`ScorableLM` interface: logits of the last `keep` positions with the memory inserted
        (only the memories whose gates open for a row; none: the unedited LLM's logits)."""
        dev = self.llm.get_input_embeddings().weight.device
        if features is None:
            features = self.memory_features(prompts)
        mask = attention_mask.to(dev)
        if not self.gated:
            return self._read(input_ids.to(dev), mask, keep, answer_lengths, features, None)
        groups = self._row_groups(features)
        out = None
        if any(not memories for memories, _ in groups):
            # The unedited LLM on the whole batch, exactly as it scores this batch on its own: a
            # sub-batch would change the kernels' blocking and the last bits of the logits.
            with without_adapters(self.llm):
                out = causal_logits(self.llm, input_ids.to(dev), mask, keep)
        for memories, rows in groups:
            if not memories:
                continue
            part = self._read(input_ids[rows].to(dev), mask[rows.to(dev)], keep,
                              None if answer_lengths is None else answer_lengths[rows],
                              [f[rows.to(f.device)] for f in features], memories)
            if out is None:
                out = part.new_empty((len(input_ids), *part.shape[1:]))
            out[rows.to(dev)] = part
        return out

    def _read(self, input_ids, mask, keep, answer_lengths, features, memories):
        memory = self.memory_tokens(features=features, memories=memories)
        return causal_logits(self.llm, input_ids, mask, keep, memory, self.insert_at(mask, answer_lengths),
                             share_positions=self.share_positions)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 16, use_memory: bool = True,
                 **generate_kwargs) -> list[str]:
        """Greedy generation (by default) with the memory tokens after (or before) each prompt.

        With gates, a prompt that no memory opens for is answered by the unedited LLM."""
        if not prompts:
            return []
        if not use_memory:
            return self._generate(prompts, None, None, max_new_tokens, generate_kwargs)
        features = self.memory_features(prompts)
        if not self.gated:
            return self._generate(prompts, features, None, max_new_tokens, generate_kwargs)
        answers: list[str] = [""] * len(prompts)
        for memories, rows in self._row_groups(features):
            picked = [prompts[i] for i in rows.tolist()]
            part = self._generate(picked, [f[rows.to(f.device)] for f in features] if memories else None,
                                  memories, max_new_tokens, generate_kwargs)
            for i, text in zip(rows.tolist(), part):
                answers[i] = text
        return answers

    def _generate(self, prompts, features, memories, max_new_tokens, generate_kwargs) -> list[str]:
        """Greedy answers with the given memories' tokens (`features` None: no memory at all)."""
        kwargs = dict(generate_kwargs)
        ids, mask = prompt_batch(self.tokenizer, prompts)
        dev = self.llm.get_input_embeddings().weight.device
        ids, mask = ids.to(dev), mask.to(dev)
        embeds = self.llm.get_input_embeddings()(ids)
        if features is not None:
            memory = self.memory_tokens(features=features, memories=memories).to(embeds.dtype)
            at = self.insert_at(mask, None)
            embeds, mask = insert_tokens(embeds, mask, memory, at)
            if self.share_positions:     # generation continues from the last given position
                kwargs["position_ids"] = soft_token_positions(mask, at, memory.shape[1], True)
        kwargs.setdefault("do_sample", False)
        with contextlib.nullcontext() if features is not None else without_adapters(self.llm):
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]



def add_lora(llm: PreTrainedModel, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: Sequence[str] | None = None):
    """Wrap a frozen LLM with trainable LoRA adapters (peft), as multimodal LLMs do in their
    second stage. `target_modules=None` takes peft's default projections for the model type."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=list(target_modules) if target_modules else None)
    return get_peft_model(llm, config)


def lora_state(llm) -> dict[str, torch.Tensor]:
    """The adapter weights of a PEFT-wrapped LLM (what a bridge saves besides its projector)."""
    from peft import get_peft_model_state_dict
    return get_peft_model_state_dict(llm)


def attach_lora(llm: PreTrainedModel, directory) -> PreTrainedModel:
    """Load saved bridge adapters into `llm` (in place, as peft does); frozen for inference."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(llm, str(directory), is_trainable=False)
    return model.eval()
