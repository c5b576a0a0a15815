"""Cutting documents into fixed-length rows, and the batch layout handed to the model.

Convention (every source): each document is followed by one EOS token. A row holds `seq_len` tokens; `labels[t]` is
the target of input `t` (already shifted). The last real token of a document predicts EOS; the EOS itself has label
-100 because what follows it belongs to another document. A document cut by a row boundary continues in the next row
as a new segment (position ids restart at 0, since no state is carried across rows), and the last token before the
cut still predicts the next token of its document.

With packing, documents follow each other inside rows and `cu_seqlens` marks every segment; the padding that ends a
finite (validation) stream forms its own segment. Without packing, each row holds tokens of one document only,
padded with EOS (label -100), and `cu_seqlens` holds just the row boundaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hybridlm.loss import IGNORE_INDEX


@dataclass
class Row:
    input_ids: np.ndarray  # int64 [seq_len]
    labels: np.ndarray  # int64 [seq_len]
    position_ids: np.ndarray  # int64 [seq_len]
    segment_starts: list[int]  # offsets in the row where a segment begins; always starts with 0


def collate(rows: list[Row]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch; `cu_seqlens` (int32) indexes segments over the flattened [B*T] tokens."""
    seq_len = len(rows[0].input_ids)
    boundaries = [row_index * seq_len + start for row_index, row in enumerate(rows) for start in row.segment_starts]
    boundaries.append(len(rows) * seq_len)
    return {
        "input_ids": torch.from_numpy(np.stack([row.input_ids for row in rows])),
        "labels": torch.from_numpy(np.stack([row.labels for row in rows])),
        "position_ids": torch.from_numpy(np.stack([row.position_ids for row in rows])),
        "cu_seqlens": torch.tensor(boundaries, dtype=torch.int32),
    }


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Segment index [total] of each flattened token, e.g. cu_seqlens [0, 2, 5] -> [0, 0, 1, 1, 1]."""
    if cu_seqlens.ndim != 1 or len(cu_seqlens) < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must run from 0 to total={total}, got {cu_seqlens.tolist()}")
    lengths = torch.diff(cu_seqlens.long())
    if bool((lengths <= 0).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def count_rows(lengths: np.ndarray, seq_len: int, pack: bool) -> int:
    """Rows a finite stream of documents with these token counts fills (each document gets one EOS)."""
    with_eos = lengths.astype(np.int64) + 1
    if pack:
        return int(-(-with_eos.sum() // seq_len))
    return int((-(-with_eos // seq_len)).sum())


class PackedRows:
    """Rows cut from the documents visited in `order(epoch)`; the stream position is (epoch, cursor, offset).

    `documents` has `lengths` (token counts, no EOS) and `document(index)` (token ids, no EOS). An infinite stream
    moves on to `order(epoch + 1)` when an epoch's order runs out, possibly inside a row; a finite stream stops after
    epoch 0 and pads its last row. `skip_row` advances past a row using only the lengths (other ranks' rows).
    """

    def __init__(self, documents, order: Callable[[int], np.ndarray], *, seq_len: int, eos_token_id: int,
                 pack: bool, infinite: bool):
        self._documents = documents
        self._order_for_epoch = order
        self.seq_len = seq_len
        self.eos_token_id = eos_token_id
        self.pack = pack
        self.infinite = infinite
        self._set_position(epoch=0, cursor=0, offset=0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._set_position(int(state["epoch"]), int(state["cursor"]), int(state["offset"]))

    def _set_position(self, epoch: int, cursor: int, offset: int) -> None:
        self.epoch, self.cursor, self.offset = epoch, cursor, offset
        self._order = self._order_for_epoch(epoch)
        if self.infinite and len(self._order) == 0:
            raise ValueError("an infinite stream needs documents, but its order is empty")

    def _current_length(self) -> int | None:
        """Token count (with EOS) of the document at the cursor; None at the end of a finite stream."""
        if self.cursor == len(self._order):
            if not self.infinite:
                return None
            self._set_position(self.epoch + 1, 0, 0)
        return int(self._documents.lengths[self._order[self.cursor]]) + 1

    def skip_row(self) -> None:
        self._fill(None)

    def next_row(self) -> Row | None:
        """The next row, or None once a finite stream has no tokens left."""
        seq_len = self.seq_len
        row = Row(
            input_ids=np.full(seq_len, self.eos_token_id, dtype=np.int64),
            labels=np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
            position_ids=np.zeros(seq_len, dtype=np.int64),
            segment_starts=[],
        )
        filled = self._fill(row)
        if filled == 0:
            return None
        if filled < seq_len:
            if self.pack:
                row.segment_starts.append(filled)
                row.position_ids[filled:] = np.arange(seq_len - filled)
            else:
                row.position_ids[filled:] = np.arange(filled, seq_len)
        return row

    def _fill(self, row: Row | None) -> int:
        """Advance by one row, copying the tokens into `row` unless it is None; returns the tokens placed."""
        filled = 0
        while filled < self.seq_len:
            length = self._current_length()
            if length is None:
                break
            take = min(self.seq_len - filled, length - self.offset)
            end = self.offset + take
            if row is not None:
                # The piece of (document + EOS) from the offset up to one token past the row, for the last target.
                stop = min(end + 1, length)
                tokens = self._documents.document(int(self._order[self.cursor]))
                piece = np.asarray(tokens[self.offset : min(stop, length - 1)], dtype=np.int64)
                if stop == length:
                    piece = np.append(piece, self.eos_token_id)
                row.input_ids[filled : filled + take] = piece[:take]
                # Targets stay inside the document: its EOS (last entry) gets none.
                with_target = min(end, length - 1) - self.offset
                row.labels[filled : filled + with_target] = piece[1 : 1 + with_target]
                row.position_ids[filled : filled + take] = np.arange(take)
                row.segment_starts.append(filled)
            filled += take
            self.offset = end
            if self.offset == length:
                self.cursor += 1
                self.offset = 0
                if not self.pack:
                    break
        return filled
