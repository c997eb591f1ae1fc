"""Stage II as a LightningModule: train the projector P_m for one frozen LLM."""
from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

import torch

from lit_modules.common import TrainableOnlyCheckpoint, warmup_cosine
from mindbridge.bridge import MemoryAugmentedLM, MemoryProjector, TrainingVocabulary, add_lora, answer_loss, distill_kl
from mindbridge.encoder import MemoryEncoder
from mindbridge.lm import (PromptKVStore, causal_logits, continuation_logits, has_native_bfloat16, lm_head_dtype_choice,
                           lm_head_in, resolve_lm_head_dtype, without_adapters)
from mindbridge.tokenization import answer_batch, encode_answer_tokens, first_answer_tokens, teacher_forced_batch


def later_answer_positions(answer_mask: torch.Tensor) -> torch.Tensor:
    """The answer tokens `(B, T)` of right-aligned answers but each row's first one."""
    width, n = answer_mask.shape[1], answer_mask.sum(1)
    later = answer_mask.clone()
    later[torch.arange(len(answer_mask)), (width - n).clamp(max=width - 1)] = False
    return later & answer_mask


class MemoryBridgeModule(TrainableOnlyCheckpoint):
    """L_bridge = L_1 + λ_kl·KL, LLM and encoder frozen, only the projector trains.

    The encoder is frozen, so its features for every training prompt are computed once
    (`prepare`). The teacher's next-token logits on out-of-scope prompts do not change either.
    With the memory after the prompt (`position="suffix"`), the prompts' keys and values are
    constants too and are cached, so a step only runs the memory and answer tokens.
    """

    def __init__(self, llm, tokenizer, encoders: MemoryEncoder | Sequence[MemoryEncoder],
                 projectors: MemoryProjector | Sequence[MemoryProjector],
                 lambda_kl: float = 1.0, kl_temperature: float = 1.5, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_fraction: float = 0.1, feature_noise: float = 0.0,
                 paraphrase_jitter: float = 0.0, kl_answer_tokens: int = 0, prefix_prob: float = 0.0,
                 prefix_variants: int = 2, lm_head_dtype: str | None = None, train_vocab_top_k: int | None = None,
                 rewording_prob: float = 0.0, lora: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["llm", "tokenizer", "encoders", "projectors"])
        # Several memories (Multi-MindBridge, Eq. 7) train their projectors jointly: one soft
        # token block per memory, concatenated in order.
        encoders = [encoders] if isinstance(encoders, MemoryEncoder) else list(encoders)
        projectors = [projectors] if isinstance(projectors, MemoryProjector) else list(projectors)
        llm.requires_grad_(False)
        if lora:
            # Optional adapters inside the LLM, trained with the projector (off by default).
            llm = add_lora(llm, **lora)
        self.edited = MemoryAugmentedLM(llm, tokenizer, encoders, projectors)
        for encoder in encoders:
            encoder.requires_grad_(False)
        self._edit_features: list[torch.Tensor] | None = None
        self._out_features: list[torch.Tensor] | None = None
        self._displacements: list[torch.Tensor] = []
        self._teacher: dict[int, torch.Tensor] = {}
        self._answer_teachers: dict[int, torch.Tensor] = {}
        self._edit_kv: PromptKVStore | None = None
        self._out_kv: PromptKVStore | None = None
        # Edit prompt texts: the bare prompts, then `prefix_variants` prefixed copies of them
        # (copy v of edit i at v * n + i); features and cached prompts follow the same layout.
        self._edit_texts: list[str] = []
        self._prefix_probs = torch.zeros(0)      # per edit
        self._copies = 0                         # prefixed copies per edit prompt
        self._reworded = 0                       # rewording slots per edit prompt (after the copies)
        # A lower-precision copy of the frozen LM head's weight for the student (`lm_head_dtype`),
        # made on the training device at fit start ("auto" depends on that device).
        self._head_dtype_choice = lm_head_dtype_choice(lm_head_dtype)
        self._head_weight: torch.Tensor | None = None
        self.student_head_dtype: str | None = None           # what it resolved to, for bridge.json
        # The tokens the losses are computed over (`train_vocab_top_k`; None: all), from `prepare`.
        self.vocabulary: TrainingVocabulary | None = None

    def on_fit_start(self) -> None:
        dtype = resolve_lm_head_dtype(self._head_dtype_choice, self.device)
        if dtype == torch.bfloat16 and not has_native_bfloat16(self.device):
            warnings.warn(f"model.bridge.lm_head_dtype=bfloat16 on {self.device}, which has no native bfloat16: "
                          "its LM head will be far slower than in fp32 (use auto or null).", stacklevel=2)
        weight = self.edited.llm.get_output_embeddings().weight.detach()
        self.student_head_dtype = str(dtype or weight.dtype).removeprefix("torch.")
        if self.vocabulary is not None:
            weight = self.vocabulary.rows(weight)        # a copy: only the candidates' rows
        elif dtype is None:
            weight = None                                # the head as it is
        self._head_weight = None if weight is None else weight.to(dtype or weight.dtype)

    @property
    def projector(self) -> MemoryProjector:
        return self.edited.projectors[0]

    @property
    def projector_tokens(self) -> int:
        """Soft tokens per row (all memories together)."""
        return sum(p.config.num_tokens for p in self.edited.projectors)

    @property
    def encoder(self) -> MemoryEncoder:
        return self.edited.encoders[0]

    def trainable_prefixes(self) -> tuple[str, ...]:
        return ("edited.projectors.",)

    def train(self, mode: bool = True):
        super().train(mode)
        self.edited.llm.eval()        # frozen parts never use dropout
        for encoder in self.edited.encoders:
            encoder.eval()
        return self

    def prepare(self, edit_prompts: list[str], out_prompts: list[str], batch_size: int = 32,
                paraphrase_pairs: Sequence[tuple[str, str]] = (), prefixes: Sequence[str] = (),
                prefix_probs: Sequence[float] | None = None, edit_targets: Sequence[str] | None = None,
                old_targets: Sequence[str | None] = (), out_answers: Sequence[str | None] | None = None,
                rewordings: Sequence[Sequence[str]] | None = None) -> None:
        """Cache what does not change while the projector trains (call before `fit`).

        `paraphrase_pairs` are (question, rephrase) pairs of facts that are not edited; their
        memory displacements drive the paraphrase jitter (see `_features`). `prefixes` are the
        distractor texts of the prefix augmentation, `prefix_probs` its probability per edit
        (default: `prefix_prob` for every edit). With `train_vocab_top_k`, the edits' new and old
        targets and the out-of-scope answers (None: unknown) give the training vocabulary.
        """
        self._edit_features, self._out_features, self._displacements = [], [], []
        n = len(edit_prompts)
        probs = [self.hparams.prefix_prob] * n if prefix_probs is None else list(prefix_probs)
        if len(probs) != n:
            raise ValueError(f"{len(probs)} prefix probabilities for {n} edits")
        self._prefix_probs = torch.tensor(probs, dtype=torch.float)
        self._copies = self.hparams.prefix_variants if max(probs, default=0.0) > 0 else 0
        self._edit_texts = list(edit_prompts) + self._prefixed_copies(list(edit_prompts), list(prefixes))
        if rewordings is not None and self.hparams.rewording_prob > 0:
            if len(rewordings) != n:
                raise ValueError(f"{len(rewordings)} rewording lists for {n} edits")
            # A fixed number of slots per edit (its own prompt where it has fewer rewordings).
            self._reworded = max((len(r) for r in rewordings), default=0)
            self._edit_texts += [r[k] if k < len(r) else p for k in range(self._reworded)
                                 for p, r in zip(edit_prompts, rewordings)]
        edit_prompts = self._edit_texts
        use_pairs = self.hparams.paraphrase_jitter > 0 and len(paraphrase_pairs) > 0
        for encoder, projector in zip(self.edited.encoders, self.edited.projectors):
            edit, out = encoder.encode(edit_prompts, 4 * batch_size), encoder.encode(out_prompts, 4 * batch_size)
            projector.set_feature_statistics(torch.cat([edit, out]))
            self._edit_features.append(edit)
            self._out_features.append(out)
            if use_pairs:
                questions, rephrases = zip(*paraphrase_pairs)
                self._displacements.append(encoder.encode(list(rephrases), 4 * batch_size)
                                           - encoder.encode(list(questions), 4 * batch_size))
        # Cached prompt keys/values are constants only while nothing inside the LLM trains; a
        # memory before the prompt's last token leaves that token out of the cache.
        if self.edited.position in ("suffix", "before_last") and not self.hparams.lora:
            llm, tok = self.edited.llm, self.edited.tokenizer
            hold = int(self.edited.position == "before_last")
            self._edit_kv = PromptKVStore(llm, tok, edit_prompts, batch_size, hold_back=hold)
            if self.hparams.lambda_kl > 0:
                self._out_kv = PromptKVStore(llm, tok, out_prompts, batch_size, keep_logits=True, hold_back=hold)
        if self.hparams.train_vocab_top_k:
            self.vocabulary = self._training_vocabulary(list(edit_prompts[:n]), out_prompts, edit_targets,
                                                        old_targets, out_answers)

    def _training_vocabulary(self, edit_prompts: list[str], out_prompts: list[str], edit_targets, old_targets,
                             out_answers) -> TrainingVocabulary:
        """The candidates at every position L_1 and the KL score: the edits' answer positions and,
        out of scope, the positions that predict the first `kl_answer_tokens` answer tokens (at
        least the one after the prompt)."""
        if edit_targets is None or len(edit_targets) != len(edit_prompts):
            raise ValueError("model.bridge.train_vocab_top_k needs the edit targets (one per edit prompt)")
        n_out = max(1, self.hparams.kl_answer_tokens)
        # With one scored position per prompt (the one after it) the answers add no positions.
        answers = list(out_answers) if out_answers is not None and n_out > 1 else [None] * len(out_prompts)
        llm, tok, k = self.edited.llm, self.edited.tokenizer, int(self.hparams.train_vocab_top_k)
        edits = TrainingVocabulary.from_unedited_model(llm, tok, edit_prompts, list(edit_targets), k,
                                                       extra_answers=[*edit_targets, *old_targets])
        known = [a for a in (out_answers or ()) if a]
        if self._out_kv is None:
            outs = TrainingVocabulary.from_unedited_model(llm, tok, out_prompts, answers, k, max_answer_tokens=n_out,
                                                          extra_answers=known)
            return TrainingVocabulary(torch.cat([edits.ids, outs.ids]), edits.vocab_size)
        # With cached prompts the KL's teachers are computed here, once (training reuses them),
        # and the candidates are their top-k.
        tops = [t.topk(min(k, t.shape[-1]), dim=-1).indices.flatten() for t in self._all_out_of_scope_teachers(answers)]
        found = [edits.ids, *tops, *(torch.tensor(encode_answer_tokens(tok, a), dtype=torch.long) for a in known)]
        return TrainingVocabulary(torch.cat(found), edits.vocab_size)

    def _all_out_of_scope_teachers(self, answers: list[str | None], batch_size: int = 32):
        """Every teacher row the KL will read, per batch of out-of-scope prompts: the logits after
        each prompt, and at its later answer positions (computed now and kept for training)."""
        store, n_tokens = self._out_kv, self.hparams.kl_answer_tokens
        embed = self.edited.llm.get_input_embeddings()
        for start in range(0, len(store), batch_size):
            index = list(range(start, min(start + batch_size, len(store))))
            yield store.teacher_logits(index)
            if n_tokens < 1:
                continue
            ids, amask = first_answer_tokens(*answer_batch(self.edited.tokenizer, [answers[i] for i in index]),
                                             n_tokens)
            if amask.any():
                lead = embed(store.held_back(index).to(embed.weight.device)).detach()
                yield from self._answer_teacher(torch.tensor(index), ids, amask, later_answer_positions(amask), lead)

    def _prefixed_copies(self, prompts: list[str], prefixes: list[str]) -> list[str]:
        """`self._copies` copies of every prompt, each behind a random distractor prefix.

        Prefix augmentation in Stage II (the official code does it for CounterFact, whose
        paraphrases open with an unrelated sentence): with its edit's prefix probability a
        training row reads one of these copies, in the encoder and in the LLM alike. A fixed
        number of copies keeps every prompt cacheable.
        """
        if self._copies < 1:
            return []
        if not prefixes:
            raise ValueError("model.bridge.prefix_prob > 0 needs distractor prefixes; the split has no "
                             "out-of-scope records to take them from.")
        draw = random.Random(0)
        return [f"{draw.choice(prefixes)} {p}" for _ in range(self._copies) for p in prompts]

    def _edit_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of the edit tables for a batch of edits: while training, with the edit's prefix
        probability a random prefixed copy instead of the bare prompt, else with `rewording_prob`
        one of its rewordings."""
        if not self.training or self._copies + self._reworded < 1:
            return index
        n = len(self._prefix_probs)
        slot = torch.zeros(len(index), dtype=torch.long)
        if self._copies:
            use = torch.rand(len(index)) < self._prefix_probs[index.cpu()]
            slot = use.long() * torch.randint(1, self._copies + 1, (len(index),))
        if self._reworded:
            use = (slot == 0) & (torch.rand(len(index)) < self.hparams.rewording_prob)
            slot = torch.where(use, self._copies + torch.randint(1, self._reworded + 1, (len(index),)), slot)
        return index + slot.to(index.device) * n

    def _teacher_logits(self, index: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        missing = [k for k, i in enumerate(index.tolist()) if i not in self._teacher]
        if missing:
            with torch.no_grad(), without_adapters(self.edited.llm):
                fresh = causal_logits(self.edited.llm, input_ids[missing], mask[missing], keep=1)[:, -1]
            for k, row in zip(missing, fresh):
                # bf16 halves the cache; the KL is computed in fp32 from these logits.
                self._teacher[int(index[k])] = row.to(torch.bfloat16)
        return torch.stack([self._teacher[int(i)] for i in index.tolist()]).float()

    def _features(self, tables: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """Cached memory vectors (one tensor per memory), jittered while training.

        Paraphrases are never trained on (they are evaluation prompts); their memory vectors
        sit near, not on, the edit prompt's. Gaussian noise of `feature_noise` standard
        deviations per dimension (in the projector's standardised units) teaches the projector
        to answer the same way in that neighbourhood; with probability `paraphrase_jitter` a row
        also moves by the displacement (rephrase minus question) of a random non-edited fact.
        """
        feats = [table[index] for table in tables]
        if not self.training:
            return feats
        if self.hparams.feature_noise > 0:
            feats = [f + self.hparams.feature_noise * proj.feature_scale * torch.randn_like(f)
                     for f, proj in zip(feats, self.edited.projectors)]
        if self._displacements:
            # How a rewording moves a memory vector, borrowed from a random non-edited fact: the
            # projector learns to answer the same along the directions paraphrases actually take.
            rows = torch.rand(len(index)) < self.hparams.paraphrase_jitter
            pick = torch.randint(len(self._displacements[0]), (len(index),))
            feats = [f + rows[:, None].to(f.dtype) * d[pick].to(f.device) for f, d in zip(feats, self._displacements)]
        return feats

    def _answer_logits(self, edit: dict) -> torch.Tensor:
        """Logits `(N, V)` at the N positions that predict an answer token (`tf.target_mask`,
        row-major). The LM head runs on those positions only: padding is never scored."""
        tf, index = edit["tf"], self._edit_rows(edit["index"])
        features = self._features(self._edit_features, index)
        if self._edit_kv is None:
            if index is not edit["index"]:
                # Same targets; the prompts may have gained a prefix.
                tf = teacher_forced_batch(self.edited.tokenizer, [self._edit_texts[i] for i in index.tolist()],
                                          edit["target"])
            return self.edited.logits(None, tf.input_ids, tf.attention_mask, tf.keep, tf.target_mask.sum(1),
                                      features=features)[:, :-1][tf.target_mask]
        memory = self._with_held_back(self._edit_kv, index, self.edited.memory_tokens(features=features))
        cache, mask = self._edit_kv.batch(index.tolist())
        # Position P-1+t of the continuation predicts answer token t.
        none = tf.target_mask.new_zeros
        select = torch.cat([none(len(index), memory.shape[1] - 1), tf.target_mask, none(len(index), 1)], dim=1)
        return continuation_logits(self.edited.llm, cache, mask, memory, tf.target_ids, tf.target_mask,
                                   share_positions=self.edited.share_positions, select=select)

    def _with_held_back(self, store: PromptKVStore, index: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The soft tokens followed by the prompts' held-back last tokens (position before_last):
        to the cached continuation they are one block that goes between prompt and answer."""
        held = store.held_back(index.tolist())
        if not held.shape[1]:
            return memory
        embed = self.edited.llm.get_input_embeddings()
        return torch.cat([memory, embed(held.to(memory.device)).to(memory.dtype)], dim=1)

    def _out_of_scope_logits(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher, student) next-token logits `(N, V)` on out-of-scope prompts.

        By default one pair per prompt, after its last token (the official code). With
        `kl_answer_tokens` = n > 0 also one pair per token among the first n of the prompt's
        known answer, teacher-forced: the memory must leave the exchange alone, not only its first
        answer token.
        """
        index = out["index"]
        features = self._features(self._out_features, index)
        n_tokens = self.hparams.kl_answer_tokens
        on_answer = n_tokens > 0 and out.get("answer_mask") is not None and out["answer_mask"].any()
        if on_answer:
            out = {**out, **dict(zip(("answer_ids", "answer_mask"),
                                     first_answer_tokens(out["answer_ids"], out["answer_mask"], n_tokens)))}
        if self._out_kv is None:
            teacher = self._teacher_logits(index, out["input_ids"], out["attention_mask"])
            student = self.edited.logits(None, out["input_ids"], out["attention_mask"], 1, features=features)[:, -1]
            if not on_answer:
                return teacher, student
            t_ans, s_ans = self._answer_pairs_full(out, features)
            return torch.cat([teacher, t_ans]), torch.cat([student, s_ans])
        memory = self._with_held_back(self._out_kv, index, self.edited.memory_tokens(features=features))
        teacher_last = self._out_kv.teacher_logits(index.tolist())
        cache, mask = self._out_kv.batch(index.tolist())
        if not on_answer:
            return teacher_last, continuation_logits(self.edited.llm, cache, mask, memory,
                                                          share_positions=self.edited.share_positions)[:, -1]
        ids, amask = out["answer_ids"], out["answer_mask"]
        width, plen, n = ids.shape[1], memory.shape[1], amask.sum(1)
        rows = torch.arange(len(ids))
        # Row b's last memory token (index P-1+T-n_b) predicts its first answer token; answer
        # position t > first is predicted at P-1+t (as in `continuation_logits`). The LM head runs
        # at those positions only, in row-major order: per row, first then the later ones.
        later = later_answer_positions(amask)
        select = torch.zeros(len(ids), plen + width, dtype=torch.bool, device=later.device)
        select[:, plen - 1:-1] = later
        select[rows, plen - 1 + width - n] = True
        student = continuation_logits(self.edited.llm, cache, mask, memory, ids, amask,
                                      share_positions=self.edited.share_positions, select=select)
        # Reorder to [first of every row; later positions row-major], the teacher's layout.
        starts = torch.cumsum(later.sum(1) + 1, 0) - later.sum(1) - 1
        is_first = torch.zeros(len(student), dtype=torch.bool, device=student.device)
        is_first[starts.to(student.device)] = True
        student = torch.cat([student[is_first], student[~is_first]])
        lead = memory[:, self.projector_tokens:].detach()
        teacher = torch.cat([teacher_last, *self._answer_teacher(index, ids, amask, later, lead)])
        return teacher, student

    def _answer_teacher(self, index: torch.Tensor, ids: torch.Tensor, amask: torch.Tensor, later: torch.Tensor,
                        lead: torch.Tensor) -> list[torch.Tensor]:
        """The unedited LLM's logits at each row's later answer positions (`later`), one
        `(k_b, V)` tensor per row: computed once per out-of-scope prompt, they never change."""
        keys = index.tolist()
        missing = [k for k, i in enumerate(keys) if i not in self._answer_teachers]
        if missing:
            m = torch.tensor(missing)
            held = lead.shape[1]
            # The LLM alone: the held-back prompt tokens (if any), then the answer after the
            # cache; position held+t-1 predicts answer token t.
            select = torch.zeros(len(missing), held + ids.shape[1], dtype=torch.bool, device=later.device)
            select[:, held:-1] = later[m, 1:]
            counts = later[m].sum(1).tolist()
            # No later answer positions: nothing to run (but rows of the full width, for the cat).
            fresh = lead.new_zeros(0, self.edited.llm.get_output_embeddings().weight.shape[0])
            if any(counts):
                cache, mask = self._out_kv.batch([keys[k] for k in missing])
                with torch.no_grad():
                    fresh = continuation_logits(self.edited.llm, cache, mask, lead[m], ids[m], amask[m], select=select)
            for k, chunk in zip(missing, fresh.split(counts)):
                self._answer_teachers[keys[k]] = chunk.to(torch.bfloat16)
        return [self._answer_teachers[i].float() for i in keys]

    def _answer_pairs_full(self, out: dict, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer-token pairs of `_out_of_scope_logits` by full forward passes (no cached
        prompts: the memory goes before the prompt, or adapters train inside the LLM)."""
        rows = out["answer_mask"].any(1).nonzero()[:, 0]
        tf = teacher_forced_batch(self.edited.tokenizer, [out["prompt"][r] for r in rows],
                                  [out["answer"][r] for r in rows], max_target_tokens=self.hparams.kl_answer_tokens)
        student = self.edited.logits(None, tf.input_ids, tf.attention_mask, tf.keep, tf.target_mask.sum(1),
                                     features=[f[rows] for f in features])[:, :-1]
        with torch.no_grad(), without_adapters(self.edited.llm):
            teacher = causal_logits(self.edited.llm, tf.input_ids, tf.attention_mask, tf.keep)[:, :-1]
        # The first answer position is the one after the prompt, already scored.
        later = tf.target_mask.clone()
        later[torch.arange(len(rows)), tf.target_mask.float().argmax(1)] = False
        return teacher[later].float(), student[later]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._edit_features is None:
            raise RuntimeError("call prepare() before training the bridge")
        edit, out = batch["edit"], batch["out"]
        vocab = self.vocabulary
        with lm_head_in(self.edited.llm, self._head_weight, None if vocab is None else vocab.ids):
            l1, acc = answer_loss(self._answer_logits(edit), edit["tf"], vocab)
            if self.hparams.lambda_kl > 0:
                teacher, student = self._out_of_scope_logits(out)
                if vocab is not None:
                    teacher = vocab.restrict(teacher)      # the teachers ran without gradients: full vocabulary
        loss = l1
        bs = len(edit["prompt"])
        if self.hparams.lambda_kl > 0:
            kl = distill_kl(teacher, student, self.hparams.kl_temperature)
            loss = loss + self.hparams.lambda_kl * kl
            self.log("train/kl", kl, on_step=False, on_epoch=True, batch_size=bs, prog_bar=True)
        self.log("train/answer_nll", l1, on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/answer_acc", acc, on_step=False, on_epoch=True, batch_size=bs, prog_bar=True)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        total, _ = self.epoch_steps()
        sched = warmup_cosine(opt, total, int(self.hparams.warmup_fraction * total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
