"""The one LightningDataModule every method trains on.

It owns the edit/out-of-scope split (so every method edits the same facts and never sees an
evaluation prompt) and serves two streams, combined with `max_size_cycle`:

- `edit`: the edited records (shuffled each epoch),
- `out`: out-of-scope prompts from records that are not edited (cycled).

`connect(tokenizer)` makes batches carry LLM tensors as well as text: teacher-forced
`prompt + " " + target` for edits and left-padded prompts for out-of-scope rows. Without a
tokenizer (memory pretraining tokenises with its own encoder tokenizer) batches are text only.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from data.readers import BUNDLED_DEFAULTS, bundled_path, read_records
from data.records import EditRecord, IrrelevantRecord, content_hash
from data.splits import EditSplit, make_split, split_stats, split_with_edits


class _Indexed(Dataset):
    def __init__(self, items: Sequence):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return i, self.items[i]


class CyclingSampler(Sampler[int]):
    """`num_samples` indices per epoch from an endless sequence of seeded shuffles of `size` items.

    The out-of-scope stream is usually longer or shorter than the edit set; the edit set defines
    the epoch and this stream just keeps cycling, continuing where the last epoch stopped.
    `set_epoch(e)` (called by Lightning) jumps to where epoch `e` starts in that sequence, so a
    resumed run draws exactly what an uninterrupted one would.
    """

    def __init__(self, size: int, num_samples: int, seed: int):
        self.size, self.num_samples, self.seed = size, num_samples, seed
        self._round, self._order, self._pos = 0, [], 0

    def _shuffle(self, round_: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_)
        return torch.randperm(self.size, generator=gen).tolist()

    def set_epoch(self, epoch: int) -> None:
        start = epoch * self.num_samples
        self._round, self._pos = start // self.size + 1, start % self.size
        self._order = self._shuffle(self._round - 1)

    def _next(self) -> int:
        if self._pos >= len(self._order):
            self._order, self._pos, self._round = self._shuffle(self._round), 0, self._round + 1
        self._pos += 1
        return self._order[self._pos - 1]

    def __iter__(self):
        return iter([self._next() for _ in range(self.num_samples)])

    def __len__(self) -> int:
        return self.num_samples


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of items of similar length (fresh every epoch, seeded).

    Teacher-forced answers are padded to the longest one in the batch; grouping by length
    wastes less compute on padding. Items are shuffled, cut into windows of `window` batches,
    sorted by length inside a window, batched, and the batches shuffled again.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 8):
        self.lengths, self.batch_size, self.seed, self.window = list(lengths), batch_size, seed, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before every epoch: the shuffle depends on the epoch, not on how
        many epochs this object has seen (a resumed run makes a fresh one)."""
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: self.lengths[i])
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        return iter([batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torch.distributed)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RankShard(Sampler[list[int]]):
    """Split every batch of `batches` across the processes of a distributed run.

    Every rank draws the same global batches (same seeds) and keeps its stride of each, so a
    DDP run sees the same global batches, in the same order, and takes the same number of
    optimizer steps as one process (gradients are averaged over ranks). A batch smaller than
    the number of ranks is repeated to give every rank at least one row. Outside
    torch.distributed this passes the batches through unchanged.
    """

    def __init__(self, batches: Sampler[list[int]]):
        self.batches = batches
        # Lightning calls `set_epoch` on `loader.batch_sampler.sampler`: the epoch-seeded sampler
        # (a BatchSampler's index sampler, or the batch sampler itself).
        self.sampler = getattr(batches, "sampler", batches)

    def __iter__(self):
        rank, world = _rank_and_world()
        for batch in self.batches:
            batch = list(batch)
            if world > 1:
                batch = (batch * world)[:max(len(batch), world)][rank::world]
            yield batch

    def __len__(self) -> int:
        return len(self.batches)


class ResumableDataLoader(DataLoader):
    """A DataLoader that continues a resumed epoch exactly where the checkpoint left it.

    `position()` gives (epoch, batches of it already trained) from the trainer's progress, which
    Lightning restores from the checkpoint. When iteration starts, the epoch-seeded sampler is set
    to that epoch and the batches already trained are skipped, so a run killed mid-epoch and
    resumed draws the same batches as an uninterrupted one. It is read when the first batch is
    fetched, not from `set_epoch`: Lightning may fetch a batch before it calls `set_epoch`.
    """

    def __init__(self, *args, position=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict:
        # Recorded for inspection; resuming reads the trainer's restored progress instead.
        epoch, done = self.position() if self.position else (None, 0)
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        return self._batches()

    def _batches(self):
        epoch, done = self.position() if self.position else (None, 0)
        sampler = getattr(self.batch_sampler, "sampler", None)
        if epoch is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        skip = done if 0 < done < len(self) else 0
        yield from itertools.islice(super().__iter__(), skip, None)


class EditDataModule(L.LightningDataModule):
    def __init__(self, name: str = "zsre", path: str | None = None, pool_path: str | None = None,
                 num_edits: int = 200, seed: int = 0, order: str = "random",
                 out_of_scope_sources: Sequence[str] = ("prompt", "loc"), max_out_of_scope: int | None = None,
                 batch_size: int = 16, out_batch_size: int | None = None, num_workers: int = 0,
                 dedupe: bool = True, drop_empty_targets: bool = False):
        super().__init__()
        self.name, self.path, self.pool_path = name, path, pool_path
        self.num_edits, self.seed, self.order = num_edits, seed, order
        self.out_of_scope_sources, self.max_out_of_scope = tuple(out_of_scope_sources), max_out_of_scope
        self.batch_size, self.out_batch_size = batch_size, out_batch_size or batch_size
        self.num_workers, self.dedupe, self.drop_empty_targets = num_workers, dedupe, drop_empty_targets
        self.tokenizer = None
        self.max_prompt_tokens, self.max_target_tokens = 256, 32
        self.held_out_size = 0
        self.out_rows: list[int] | None = None
        self._split: EditSplit | None = None
        self._fixed_edits: tuple[EditRecord, ...] | None = None
        self._other_datasets: tuple[Sequence[EditRecord], ...] = ()

    # ---- the split ------------------------------------------------------------------------
    def resolved_path(self) -> Path:
        if self.path:
            # "bundled:zsre/knowedit_ZsRE-test-all.json" names a file shipped in data/bundled.
            if str(self.path).startswith("bundled:"):
                return bundled_path(str(self.path).removeprefix("bundled:"))
            return Path(self.path).expanduser()
        if self.name not in BUNDLED_DEFAULTS:
            raise ValueError(f"No bundled data named {self.name!r}; pass data.path=FILE or use one of "
                             f"{sorted(k for k in BUNDLED_DEFAULTS if not k.endswith('_pool'))}.")
        return bundled_path(BUNDLED_DEFAULTS[self.name])

    def _pool(self) -> list[EditRecord]:
        path = self.pool_path
        if path is None and not self.path and f"{self.name}_pool" in BUNDLED_DEFAULTS:
            path = bundled_path(BUNDLED_DEFAULTS[f"{self.name}_pool"])
        return read_records(path, self.name, dedupe=self.dedupe) if path else []

    def use_edits(self, edits: Sequence[EditRecord],
                  other_datasets: Sequence[Sequence[EditRecord]] = ()) -> None:
        """Edit exactly these records (e.g. the facts held by existing memories) instead of
        sampling `num_edits` of them. The out-of-scope stream comes from the data file and from
        each of `other_datasets` (records of the other files the edits came from)."""
        self._fixed_edits, self._other_datasets, self._split = tuple(edits), tuple(other_datasets), None

    def setup(self, stage: str | None = None) -> None:
        if self._split is None:
            records = read_records(self.resolved_path(), self.name, dedupe=self.dedupe,
                                   drop_empty_targets=self.drop_empty_targets)
            if self._fixed_edits is not None:
                self._split = split_with_edits(records, self._fixed_edits, self.seed, self.out_of_scope_sources,
                                               self.max_out_of_scope, pool=self._pool(),
                                               other_datasets=self._other_datasets)
            else:
                self._split = make_split(records, self.num_edits, self.seed, self.out_of_scope_sources,
                                         self.max_out_of_scope, self.order, pool=self._pool())

    @property
    def split(self) -> EditSplit:
        self.setup()
        return self._split  # type: ignore[return-value]

    @property
    def edits(self) -> tuple[EditRecord, ...]:
        return self.split.edits

    @property
    def out_of_scope(self) -> tuple[IrrelevantRecord, ...]:
        return self.split.out_of_scope

    def _held_out_indices(self) -> set[int]:
        if not self.held_out_size:
            return set()
        return set(random.Random(self.seed + 2).sample(range(len(self.out_of_scope)), self.held_out_size))

    @property
    def held_out_out_of_scope(self) -> tuple[IrrelevantRecord, ...]:
        """`held_out_size` out-of-scope records (a seeded sample) that the out-of-scope stream never
        yields: a method calibrates on them what training pushed down on the others."""
        held = self._held_out_indices()
        return tuple(r for i, r in enumerate(self.out_of_scope) if i in held)

    @property
    def training_out_of_scope(self) -> tuple[IrrelevantRecord, ...]:
        """The out-of-scope stream's records: all of them (or the `out_rows` given to `connect`)
        but the held-out ones."""
        held = self._held_out_indices()
        rows = range(len(self.out_of_scope)) if self.out_rows is None else self.out_rows
        return tuple(self.out_of_scope[i] for i in rows if i not in held)

    @property
    def paraphrase_pairs(self) -> tuple[tuple[str, str], ...]:
        """(question, rephrase) pairs of records that are neither edited nor about an edited subject."""
        return self.split.paraphrase_pairs

    def facts_hash(self) -> str:
        return content_hash(self.edits)

    def stats(self) -> dict:
        return {"dataset": self.name, "data_path": str(self.resolved_path()), **split_stats(self.split)}

    # ---- batches --------------------------------------------------------------------------
    def connect(self, tokenizer=None, max_prompt_tokens: int = 256, max_target_tokens: int = 32,
                batch_size: int | None = None, out_batch_size: int | None = None,
                held_out: int = 0, out_rows: Sequence[int] | None = None) -> None:
        """Attach the tokenizer of the model being trained (None: text-only batches); `held_out`
        out-of-scope records are kept out of the out-of-scope stream (`held_out_out_of_scope`);
        `out_rows`: the stream yields only these out-of-scope records (indices, in this order)."""
        if held_out and not 0 < held_out < len(self.out_of_scope):
            raise ValueError(f"Cannot hold out {held_out} of the {len(self.out_of_scope)} out-of-scope prompts; "
                             "lower the held-out count or add data.pool_path=FILE.")
        if out_rows is not None and (not len(out_rows) or not all(0 <= i < len(self.out_of_scope) for i in out_rows)):
            raise ValueError(f"out_rows must be a non-empty list of indices below {len(self.out_of_scope)}.")
        self.held_out_size = held_out
        self.out_rows = None if out_rows is None else list(out_rows)
        self.tokenizer = tokenizer
        self.max_prompt_tokens, self.max_target_tokens = max_prompt_tokens, max_target_tokens
        if batch_size:
            self.batch_size = batch_size
        if out_batch_size:
            self.out_batch_size = out_batch_size

    def _collate_edits(self, rows: list[tuple[int, EditRecord]]) -> dict:
        from mindbridge.tokenization import teacher_forced_batch
        batch = {"index": torch.tensor([i for i, _ in rows]), "prompt": [r.prompt for _, r in rows],
                 "target": [r.target_new for _, r in rows], "subject": [r.subject for _, r in rows]}
        if self.tokenizer is not None:
            batch["tf"] = teacher_forced_batch(self.tokenizer, batch["prompt"], batch["target"],
                                               self.max_prompt_tokens, self.max_target_tokens)
        return batch

    def _collate_out(self, rows: list[tuple[int, IrrelevantRecord]]) -> dict:
        from mindbridge.tokenization import answer_batch, prompt_batch
        batch = {"index": torch.tensor([i for i, _ in rows]), "prompt": [r.prompt for _, r in rows],
                 "answer": [r.answer for _, r in rows]}
        if self.tokenizer is not None:
            batch["input_ids"], batch["attention_mask"] = prompt_batch(self.tokenizer, batch["prompt"],
                                                                       self.max_prompt_tokens)
            batch["answer_ids"], batch["answer_mask"] = answer_batch(self.tokenizer, batch["answer"],
                                                                     self.max_target_tokens)
        return batch

    def _position(self) -> tuple[int | None, int]:
        """(epoch, batches of it done) while a trainer fits this datamodule, else (None, 0)."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return None, 0
        loop = trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def _loader(self, items: Sequence, batches: Sampler[list[int]], collate) -> DataLoader:
        # Its own generator: iterating a DataLoader must not draw from the global torch RNG, which
        # a resumed run restores from the checkpoint (dropout, noise).
        return ResumableDataLoader(_Indexed(items), batch_sampler=RankShard(batches), collate_fn=collate,
                                   num_workers=self.num_workers, position=self._position,
                                   generator=torch.Generator().manual_seed(self.seed))

    def edit_dataloader(self) -> DataLoader:
        """Edits in shuffled batches of similar target length (a length proxy: characters)."""
        sampler = LengthGroupedBatches([len(r.target_new) for r in self.edits], self.batch_size, self.seed)
        return self._loader(self.edits, sampler, self._collate_edits)

    def out_dataloader(self) -> DataLoader:
        if not self.out_of_scope:
            raise ValueError("The split has no out-of-scope prompts; every record was edited. "
                             "Lower data.num_edits or add data.pool_path=FILE.")
        records = self.training_out_of_scope
        steps = -(-len(self.edits) // self.batch_size)          # batches in one pass over the edits
        sampler = CyclingSampler(len(records), steps * self.out_batch_size, self.seed + 1)
        return self._loader(records, BatchSampler(sampler, self.out_batch_size, drop_last=False),
                            self._collate_out)

    def train_dataloader(self) -> CombinedLoader:
        # Both loaders yield the same number of batches: one epoch is one pass over the edits.
        return CombinedLoader({"edit": self.edit_dataloader(), "out": self.out_dataloader()}, mode="min_size")
