"""The memory-modality encoder E_m: a BERT-family masked LM whose pooled output is the memory.

The MLM head is only used while writing facts (L_inject, and inside the frozen copy M for
L_associate); reading a memory uses the pooled last hidden state.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """`cls`: the first token (the paper's choice); `mean`: masked mean over tokens (how
    sentence-transformer checkpoints such as all-MiniLM-L6-v2 were trained)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        m = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    raise ValueError(f"unknown pooling {mode!r}; use 'cls' or 'mean'")


def masked_lm_head(model: PreTrainedModel) -> nn.Module:
    """The module mapping hidden states to vocabulary logits, looked up on the model itself.

    Calling it only on the positions that carry a label avoids projecting every token onto a
    30k vocabulary, which is most of the encoder's cost on short prompts.
    """
    for name in ("cls", "lm_head"):               # BERT family, RoBERTa family
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    if hasattr(model, "vocab_projector"):         # DistilBERT keeps its head as loose modules
        return nn.Sequential(model.vocab_transform, nn.GELU(), model.vocab_layer_norm, model.vocab_projector)
    raise TypeError(f"{type(model).__name__} has no masked-LM head this project knows how to find")


def by_length(forward, attention_mask: torch.Tensor, *inputs: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """`forward(mask, *inputs)` -> hidden states `(B, L, d)` of right-padded rows, run on groups of
    `rows` rows of similar length, each cut to its longest row: no work on the padding columns.

    Exact for an encoder whose real tokens never attend to padding (BERT-family with the
    attention mask): every real position gets what one pass over the whole batch gives it, up
    to float rounding. Padding positions are not to be read (those past a group's longest row
    are zeros).
    """
    lengths = attention_mask.sum(1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None] < lengths[:, None]):
        return forward(attention_mask, *inputs)         # not right-padded: one pass as it is
    order = torch.argsort(lengths, stable=True)
    out = None
    for start in range(0, len(order), rows):
        group = order[start:start + rows]
        width = max(int(lengths[group].max()), 1)
        hidden = forward(attention_mask[group, :width], *(x[group, :width] for x in inputs))
        if out is None:
            out = hidden.new_zeros(len(order), attention_mask.shape[1], hidden.shape[-1])
        out = out.index_copy(0, group.to(out.device),
                             torch.nn.functional.pad(hidden, (0, 0, 0, attention_mask.shape[1] - width)))
    return out


class MemoryEncoder(nn.Module):
    """E_m with its tokenizer and pooling: text in, one memory vector per text out."""

    def __init__(self, mlm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pooling: str = "cls",
                 max_length: int = 128):
        super().__init__()
        self.mlm, self.tokenizer, self.pooling, self.max_length = mlm, tokenizer, pooling, max_length
        self.head = masked_lm_head(mlm)

    @property
    def hidden_size(self) -> int:
        return self.mlm.config.hidden_size

    @property
    def body(self) -> PreTrainedModel:
        return self.mlm.base_model

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def hidden(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        return self.body(input_ids=input_ids, attention_mask=attention_mask,
                         inputs_embeds=inputs_embeds).last_hidden_state

    def features(self, texts: list[str]) -> torch.Tensor:
        """Pooled memory vectors `(B, d)` for raw texts (gradients flow if enabled)."""
        enc = self.tokenize(texts)
        dev = next(self.parameters()).device
        h = self.hidden(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        return pool(h, enc["attention_mask"].to(dev), self.pooling)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """Batched, gradient-free features for caching (the encoder is frozen in stage II)."""
        was_training = self.training
        self.eval()
        chunks = [self.features(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.hidden_size)
