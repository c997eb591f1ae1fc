"""Stage I: writing facts into the memory encoder (L_inject, L_associate, L_exist).

Follows the official recipe where the paper is silent (spec §3, §8.2-8.4): inject masks the
subject or the object (50/50) plus 10% of the other tokens; associate feeds the pooled memory
of the question through a projector Q_M into a frozen copy M of the initial encoder, which must
fill in the masked object; exist is a 2-way classifier on the pooled memory.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mindbridge.encoder import MemoryEncoder, by_length, masked_lm_head, pool


def mlp(d_in: int, d_hidden: int, d_out: int, depth: int = 2, dropout: float = 0.0) -> nn.Sequential:
    """`depth` linear layers with ReLU (and dropout) between them; depth 1 is a linear map."""
    if depth < 1:
        raise ValueError("an MLP needs depth >= 1")
    dims = [d_in] + [d_hidden] * (depth - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor       # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor          # (B, L), -100 where not scored


def _char_span(text: str, needle: str) -> tuple[int, int] | None:
    at = text.lower().find(needle.lower()) if needle else -1
    return (at, at + len(needle)) if at >= 0 else None


def _overlaps(offset: tuple[int, int], span: tuple[int, int]) -> bool:
    return offset[1] > offset[0] and offset[0] < span[1] and offset[1] > span[0]


def inject_batch(tokenizer, facts: list[tuple[str, str, str]], rng: random.Random, max_length: int,
                 span_prob: float = 0.5, word_prob: float = 0.1) -> MaskedBatch:
    """Masked texts `prompt + " " + object + "."` for L_inject.

    `facts` are (subject, prompt, object). With `span_prob` the subject's tokens are masked,
    otherwise the object's; every other token is masked with `word_prob` on top.
    """
    texts, spans = [], []
    for subject, prompt, obj in facts:
        obj_span = (len(prompt) + 1, len(prompt) + 1 + len(obj))
        subj_span = _char_span(prompt, subject)
        spans.append(subj_span if subj_span is not None and rng.random() < span_prob else obj_span)
        texts.append(f"{prompt} {obj}.")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, labels = enc["input_ids"].clone(), torch.full_like(enc["input_ids"], -100)
    for b, span in enumerate(spans):
        for t, (off, special) in enumerate(zip(enc["offset_mapping"][b].tolist(),
                                               enc["special_tokens_mask"][b].tolist())):
            if special or enc["attention_mask"][b, t] == 0:
                continue
            if _overlaps(tuple(off), span) or rng.random() < word_prob:
                labels[b, t] = ids[b, t]
                ids[b, t] = tokenizer.mask_token_id
    return MaskedBatch(ids, enc["attention_mask"], labels)


def associate_batch(tokenizer, facts: list[tuple[str, str]], max_length: int) -> MaskedBatch:
    """Inputs for the frozen copy M: `[slot] [CLS] prompt object [SEP]` with the object masked.

    Position 0 is a placeholder whose embedding is replaced by Q_M(memory of the prompt).
    """
    texts = [f"{prompt} {obj}" for prompt, obj in facts]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length - 1,
                    return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, labels = enc["input_ids"].clone(), torch.full_like(enc["input_ids"], -100)
    for b, (prompt, _) in enumerate(facts):
        for t, (off, special) in enumerate(zip(enc["offset_mapping"][b].tolist(),
                                               enc["special_tokens_mask"][b].tolist())):
            if not special and enc["attention_mask"][b, t] == 1 and off[0] > len(prompt):
                labels[b, t] = ids[b, t]
                ids[b, t] = tokenizer.mask_token_id
    slot = torch.full((ids.shape[0], 1), tokenizer.pad_token_id, dtype=ids.dtype)
    ones = torch.ones((ids.shape[0], 1), dtype=enc["attention_mask"].dtype)
    return MaskedBatch(torch.cat([slot, ids], 1), torch.cat([ones, enc["attention_mask"]], 1),
                       torch.cat([torch.full_like(slot, -100), labels], 1))


def masked_lm_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (and token accuracy) of the head applied only at labelled positions."""
    sel = labels != -100
    if not sel.any():
        zero = hidden.sum() * 0.0
        return zero, zero.detach()
    logits = head(hidden[sel][None])[0]
    gold = labels[sel]
    return F.cross_entropy(logits.float(), gold), (logits.argmax(-1) == gold).float().mean()


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[1]), value=value)


class MemoryWriter(nn.Module):
    """E_m plus the training-only parts of stage I: the existence head H, the association
    projector Q_M and the frozen copy M. Only E_m is kept afterwards."""

    def __init__(self, encoder: MemoryEncoder, exist_hidden: int | None = None,
                 associate_hidden: int | None = None, dropout: float = 0.2, bucket_rows: int = 16):
        super().__init__()
        # Rows per forward pass of similar length (`encoder.by_length`): no work on padding.
        self.bucket_rows = bucket_rows
        d = encoder.hidden_size
        self.encoder = encoder
        self.exist_head = mlp(d, exist_hidden or d // 2, 2, depth=2)
        self.associate_projector = mlp(d, associate_hidden or 2 * d, d, depth=2, dropout=dropout)
        # M: a frozen copy of the encoder as it is now (after the head warm-up), never trained.
        self.frozen_copy = copy.deepcopy(encoder.mlm).requires_grad_(False).eval()
        self.frozen_head = masked_lm_head(self.frozen_copy)

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen_copy.eval()      # M never uses dropout: it is a fixed reader
        return self

    def losses(self, inject: MaskedBatch | None, associate: tuple[list[str], MaskedBatch] | None,
               exist: tuple[list[str], torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """One forward of E_m over all sub-batches (as the official code does), then each loss.

        The rows of every sub-batch run together, in groups of similar length cut to their
        longest row (`by_length`), so no work goes into padding. A prompt needed by both
        L_associate and L_exist (the in-scope half of the existence batch is usually the
        associate batch) is encoded once.
        """
        tok = self.encoder.tokenizer
        dev = next(self.encoder.parameters()).device
        pooled_texts = list(dict.fromkeys((associate[0] if associate else []) + (exist[0] if exist else [])))
        blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        if inject is not None:
            blocks.append((inject.input_ids, inject.attention_mask))
        if pooled_texts:
            enc = self.encoder.tokenize(pooled_texts)
            blocks.append((enc["input_ids"], enc["attention_mask"]))
        width = max(b[0].shape[1] for b in blocks)
        ids = torch.cat([_pad_to(b[0], width, tok.pad_token_id) for b in blocks]).to(dev)
        mask = torch.cat([_pad_to(b[1], width, 0) for b in blocks]).to(dev)
        hidden = by_length(lambda m, i: self.encoder.hidden(i, m), mask, ids, rows=self.bucket_rows)
        out: dict[str, torch.Tensor] = {}
        n_inject = 0
        if inject is not None:
            n_inject = len(inject.input_ids)
            labels = _pad_to(inject.labels, width, -100).to(dev)
            out["inject"], out["inject_acc"] = masked_lm_loss(self.encoder.head, hidden[:n_inject], labels)
        if pooled_texts:
            memory = pool(hidden[n_inject:], mask[n_inject:], self.encoder.pooling)
            row = {t: i for i, t in enumerate(pooled_texts)}
            if associate is not None:
                picked = memory[torch.tensor([row[t] for t in associate[0]], device=dev)]
                out["associate"], out["associate_acc"] = self._associate(picked, associate[1])
            if exist is not None:
                logits = self.exist_head(memory[torch.tensor([row[t] for t in exist[0]], device=dev)])
                labels = exist[1].to(dev)
                out["exist"] = F.cross_entropy(logits.float(), labels)
                out["exist_acc"] = (logits.argmax(-1) == labels).float().mean()
        return out

    def _associate(self, memory: torch.Tensor, batch: MaskedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        dev = memory.device
        ids = batch.input_ids.to(dev)
        embeds = self.frozen_copy.get_input_embeddings()(ids)
        slot = self.associate_projector(memory)[:, None].to(embeds.dtype)
        embeds = torch.cat([slot, embeds[:, 1:]], dim=1)
        hidden = by_length(lambda m, e: self.frozen_copy.base_model(inputs_embeds=e, attention_mask=m).last_hidden_state,
                           batch.attention_mask.to(dev), embeds, rows=self.bucket_rows)
        return masked_lm_loss(self.frozen_head, hidden, batch.labels.to(dev))


def fit_mlm_head(encoder: MemoryEncoder, texts: list[str], steps: int = 200, batch_size: int = 32,
                 lr: float = 1e-3, seed: int = 0, mask_prob: float = 0.15) -> float:
    """Fit the MLM head's transform on text that is not being edited, body frozen.

    Sentence-embedding checkpoints (all-MiniLM-L6-v2) ship without an MLM head; the decoder is
    tied to the embeddings but the transform starts random, and the frozen copy M used by
    L_associate needs a head that reads tokens. Hidden states are computed once (the body is
    frozen), so this costs a few seconds. Returns the final masked-token accuracy.
    """
    if not texts or steps <= 0:
        return float("nan")
    rng = torch.Generator().manual_seed(seed)
    tok = encoder.tokenizer
    dev = next(encoder.parameters()).device
    hid, lab = [], []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = encoder.tokenize(texts[i:i + 64])
            ids = enc["input_ids"].clone()
            special = torch.tensor([tok.get_special_tokens_mask(r, already_has_special_tokens=True)
                                    for r in ids.tolist()], dtype=torch.bool)
            pick = (torch.rand(ids.shape, generator=rng) < mask_prob) & ~special & (enc["attention_mask"] == 1)
            labels = torch.where(pick, ids, torch.full_like(ids, -100))
            ids[pick] = tok.mask_token_id
            h = encoder.hidden(ids.to(dev), enc["attention_mask"].to(dev))
            hid.append(h[pick.to(dev)])
            lab.append(labels[pick])
    hidden, labels = torch.cat(hid), torch.cat(lab).to(dev)
    params = [p for n, p in encoder.head.named_parameters() if "decoder.weight" not in n]
    was_trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    acc = float("nan")
    for _ in range(steps):
        idx = torch.randint(len(labels), (min(batch_size * 8, len(labels)),), generator=rng)
        logits = encoder.head(hidden[idx.to(dev)][None])[0]
        loss = F.cross_entropy(logits, labels[idx.to(dev)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = (logits.argmax(-1) == labels[idx.to(dev)]).float().mean().item()
    for p, flag in zip(params, was_trainable):
        p.grad = None
        p.requires_grad_(flag)
    return acc


@torch.no_grad()
def masked_recall(encoder: MemoryEncoder, facts: list[tuple[str, str, str]], span: str,
                  batch_size: int = 64) -> float:
    """How much of the facts the encoder has written: token accuracy of its MLM head on
    `prompt + " " + object + "."` with all of the object's (`span="object"`) or the subject's
    (`span="subject"`, facts whose prompt names the subject) tokens masked and nothing else, in
    eval mode (spec §9's sanity check)."""
    if span not in ("object", "subject"):
        raise ValueError(f"span must be 'object' or 'subject' (got {span!r})")
    if span == "subject":                   # only facts whose prompt names their subject
        facts = [f for f in facts if _char_span(f[1], f[0]) is not None]
    if not facts:
        return float("nan")
    was_training = encoder.training
    encoder.eval()
    dev = next(encoder.parameters()).device
    right = total = 0
    rng = random.Random(0)                  # unused: no random masking here
    for start in range(0, len(facts), batch_size):
        batch = inject_batch(encoder.tokenizer, facts[start:start + batch_size], rng, encoder.max_length,
                             span_prob=1.0 if span == "subject" else 0.0, word_prob=0.0)
        labels = batch.labels.to(dev)
        sel = labels != -100
        if not sel.any():
            continue
        hidden = encoder.hidden(batch.input_ids.to(dev), batch.attention_mask.to(dev))
        pred = encoder.head(hidden[sel][None])[0].argmax(-1)
        right += int((pred == labels[sel]).sum())
        total += int(sel.sum())
    encoder.train(was_training)
    return right / total if total else float("nan")
