"""Stage II: the projector P_m that lets a frozen LLM read a memory through soft tokens.

F*(s, r) = F(P_m(E_m(s, r)) ⊕ (s, r)): the memory tokens are always inserted in front of the
prompt (no router); L_1 teaches P_m to make F say the edited object for in-scope prompts and
λ_kl·KL keeps F's own prediction on out-of-scope prompts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from mindbridge.encoder import MemoryEncoder
from mindbridge.lm import causal_logits, first_token_index, insert_tokens
from mindbridge.pretraining import mlp
from mindbridge.tokenization import TeacherForcedBatch, prompt_batch


class MemoryProjectorConfig(PretrainedConfig):
    model_type = "mindbridge_projector"

    def __init__(self, encoder_dim: int = 384, llm_dim: int = 576, hidden_dim: int | None = None,
                 depth: int = 2, num_tokens: int = 1, dropout: float = 0.2, position: str = "prefix",
                 zero_init_output: bool = False, **kwargs):
        super().__init__(**kwargs)
        if position not in ("prefix", "suffix"):
            raise ValueError(f"memory position must be 'prefix' or 'suffix' (got {position!r})")
        # prefix: before the prompt (the paper); suffix: between the prompt and the answer.
        self.position = position
        # Start every memory at one shared vector (the output bias) so the KL term first learns
        # a token the LLM ignores, and the edits then learn their departures from it.
        self.zero_init_output = zero_init_output
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
        out = self.net((memory - self.feature_mean) / self.feature_scale)
        return out.view(memory.shape[0], self.config.num_tokens, self.config.llm_dim)


def answer_loss(logits: torch.Tensor, batch: TeacherForcedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """L_1: mean NLL of the target tokens (and their teacher-forced token accuracy)."""
    pred = logits[:, :-1].float()
    nll = F.cross_entropy(pred.transpose(1, 2), batch.target_ids, reduction="none")
    mask = batch.target_mask.float()
    loss = (nll * mask).sum() / mask.sum()
    acc = ((pred.argmax(-1) == batch.target_ids).float() * mask).sum() / mask.sum()
    return loss, acc


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
    """

    def __init__(self, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 encoders: Sequence[MemoryEncoder], projectors: Sequence[MemoryProjector]):
        super().__init__()
        if len(encoders) != len(projectors) or not encoders:
            raise ValueError("one projector per memory encoder is needed")
        self.llm, self.tokenizer = llm, tokenizer
        self.encoders = nn.ModuleList(encoders)
        self.projectors = nn.ModuleList(projectors)

    def memory_tokens(self, prompts: list[str] | None = None,
                      features: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Soft tokens `(B, P, d)`; pass cached `features` (one tensor per encoder) to skip E_m."""
        if features is None:
            features = [enc.encode(prompts) for enc in self.encoders]
        dev = self.llm.get_input_embeddings().weight.device
        return torch.cat([proj(f.to(dev)) for proj, f in zip(self.projectors, features)], dim=1)

    @property
    def position(self) -> str:
        return self.projectors[0].config.position

    def insert_at(self, attention_mask: torch.Tensor, answer_lengths: torch.Tensor | None) -> torch.Tensor:
        """Where the memory goes in each left-padded row: before the prompt, or right after it
        (i.e. before the `answer_lengths[b]` teacher-forced answer tokens at the row's end)."""
        if self.position == "prefix":
            return first_token_index(attention_mask)
        tail = answer_lengths if answer_lengths is not None else torch.zeros(len(attention_mask), dtype=torch.long)
        return attention_mask.shape[1] - tail.to(attention_mask.device)

    def logits(self, prompts, input_ids, attention_mask, keep, answer_lengths=None, features=None):
        """`ScorableLM` interface: logits of the last `keep` positions with the memory inserted."""
        dev = self.llm.get_input_embeddings().weight.device
        memory = self.memory_tokens(prompts, features)
        mask = attention_mask.to(dev)
        return causal_logits(self.llm, input_ids.to(dev), mask, keep, memory, self.insert_at(mask, answer_lengths))

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 16, use_memory: bool = True,
                 **generate_kwargs) -> list[str]:
        """Greedy generation (by default) with the memory tokens in front of each prompt."""
        ids, mask = prompt_batch(self.tokenizer, prompts)
        dev = self.llm.get_input_embeddings().weight.device
        ids, mask = ids.to(dev), mask.to(dev)
        embeds = self.llm.get_input_embeddings()(ids)
        if use_memory:
            embeds, mask = insert_tokens(embeds, mask, self.memory_tokens(prompts).to(embeds.dtype),
                                         self.insert_at(mask, None))
        generate_kwargs.setdefault("do_sample", False)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


