"""Batches for distributed training: one global row stream, split across ranks.

All ranks walk the same stream of rows (documents in a seeded per-epoch permutation, cut into rows). A global batch
is `world_size * micro_batch_size` consecutive rows; rank r takes rows [r*B, (r+1)*B) of it and skips the others
cheaply (skipping reads only document lengths). So ranks see disjoint data, and the position after each global
batch is the same on every rank. The position does not depend on the world size, but a training checkpoint does
(ZeRO shards and RNG states per rank): hybridlm.checkpoint.resume resumes only with the world size that saved it.

Memory: each rank keeps the length of every document (uint32) and the current epoch's permutation (int32 below
2^31 documents) in RAM, 8 bytes per document: 0.8 GB per rank, 6.4 GB per 8-rank node, for 100 M documents. The
tokens and document offsets stay memory-mapped. Beyond that, shuffle shards rather than documents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from hybridlm.data.packing import collate


def epoch_order(num_items: int, *, seed: int, shuffle: bool) -> Callable[[int], np.ndarray]:
    """The item order of each epoch: a fresh seeded permutation per epoch, or the stored order."""

    def order(epoch: int) -> np.ndarray:
        # int32 where it fits: half the RAM of the default int64, and the same permutation (shuffle depends on the
        # length only).
        items = np.arange(num_items, dtype=np.int32 if num_items <= np.iinfo(np.int32).max else np.int64)
        if shuffle:
            np.random.default_rng([seed, epoch]).shuffle(items)
        return items

    return order


class _RankSlice:
    def __init__(self, rows, micro_batch_size: int, rank: int, world_size: int):
        self.rows = rows
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        """Consume one global batch and return this rank's part of it."""
        size = self.micro_batch_size
        for _ in range(self.rank * size):
            self.rows.skip_row()
        mine = [self.rows.next_row() for _ in range(size)]
        for _ in range((self.world_size - self.rank - 1) * size):
            self.rows.skip_row()
        return collate(mine)


class TrainIterator(_RankSlice):
    """Infinite, deterministic, exactly resumable iterator of this rank's training batches."""

    def __init__(self, rows, *, micro_batch_size: int, rank: int, world_size: int, seed: int, data_fingerprint: str):
        super().__init__(rows, micro_batch_size, rank, world_size)
        self.seed = seed
        self.data_fingerprint = data_fingerprint
        self.global_rows = 0  # rows consumed by all ranks together, for logging (tokens = rows * seq_len)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.next_batch()
        self.global_rows += self.world_size * self.micro_batch_size
        return batch

    def state_dict(self) -> dict:
        return {
            **self.rows.state_dict(),
            "global_rows": self.global_rows,
            "seed": self.seed,
            "data_fingerprint": self.data_fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "data_fingerprint"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume the data loader: its state has {name}={state[name]!r} but this run has "
                    f"{getattr(self, name)!r}; resume with the same data config and seed, or start a new run"
                )
        self.rows.load_state_dict(state)
        self.global_rows = int(state["global_rows"])


class ValidationBatches:
    """Callable giving a fresh iterator over this rank's validation batches, identical on every call.

    The rows of the finite validation stream are dealt out global batch by global batch, and a last incomplete
    global batch is dropped so that ranks stay in step: `num_batches` in all. `max_batches` of them are taken evenly
    spaced over the whole split (documents are stored in source order, so the first few batches would cover only
    the first few documents); the batches in between are skipped cheaply.
    """

    def __init__(self, make_rows: Callable[[], object], num_rows: int, *, micro_batch_size: int, rank: int,
                 world_size: int):
        self._make_rows = make_rows
        self._slice = (micro_batch_size, rank, world_size)
        self.num_batches = num_rows // (micro_batch_size * world_size)

    def indices(self, max_batches: int | None = None) -> list[int]:
        """Which of the `num_batches` batches `max_batches` selects (all when None or larger)."""
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches={max_batches} must be >= 1 (or None for the whole split)")
        if max_batches is None or max_batches >= self.num_batches:
            return list(range(self.num_batches))
        return [round(i * (self.num_batches - 1) / max(max_batches - 1, 1)) for i in range(max_batches)]

    def __call__(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        chosen = self.indices(max_batches)
        ranked = _RankSlice(self._make_rows(), *self._slice)

        def batches() -> Iterator[dict[str, torch.Tensor]]:
            position = 0
            for index in chosen:
                for _ in range((index - position) * ranked.micro_batch_size * ranked.world_size):
                    ranked.rows.skip_row()
                yield ranked.next_batch()
                position = index + 1

        return batches()
