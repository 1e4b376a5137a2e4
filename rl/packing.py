"""Packed sequences: several sequences in one row, position ids that restart per sequence, attention that never
looks across sequences, and the same loss as padding them one per row.

A padded batch spends compute on pad tokens (one sequence per row, every row as long as the longest); a packed
batch puts several sequences in each row of at most `capacity` tokens, chosen first-fit-decreasing, so rows are
nearly full. transformers (>= 4.5x) reads packed rows from `position_ids` when no 2-D attention mask is passed:
`masking_utils.find_packed_sequence_indices` turns each restart of the positions into a sequence boundary and
builds a block-diagonal causal mask (SDPA, eager and flex attention; flash attention gets cu_seqlens), so a
token attends only to earlier tokens of its own sequence. Packing is per batch: the sequences of one batch
are exactly the ones padding would have put in it (same sampler, same loss normaliser), only their layout
changes. Unlike packing a whole dataset into a stream, no sequence is cut and batch composition is unchanged.

`first_fit_decreasing(lengths, capacity)` plans the rows; `pack_examples` lays out input ids, labels and
position ids; `PackedLMCollator` does both for a Trainer (the SFT stage's `train.packing`).

The GRPO trainer (`trainer.packing`) packs each micro-batch into ONE row (`PackedLayout`): the micro-batch's
sequences back to back, padded only up to a multiple of the sequence-parallel size, so nothing but that tail is
padding. `PackedLayout.pack` / `unpack` move any per-token tensor ([rows, positions, ...]: token ids, masks,
log-probs, MoE routing ids [rows, positions, layers, k]) between the padded [B, L] layout of the batch and the
packed [1, T] row, so the loss, its normalisers and the metrics are computed on the [B, L] layout as before;
`unpack` is differentiable. `cu_seqlens` are the sequence boundaries in the row (flash-attention's varlen
format; the tail pad is a sequence of its own).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of sequence indices, each row's total length <= capacity (a longer sequence gets a row of its own),
    longest sequences placed first, each into the first row with room. O(n x rows)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def packed_position_ids(lengths: Sequence[int]) -> torch.Tensor:
    """[sum(lengths)] positions restarting at 0 at each sequence."""
    return torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)


def pack_examples(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], capacity: int, pad_id: int
                  ) -> dict[str, torch.Tensor]:
    """Sequences (token ids and their labels, IGNORE where there is no loss) -> input_ids, labels, position_ids
    [rows, width]. The first token of each sequence gets label IGNORE (no earlier token of its own sequence
    predicts it, as in a padded row); pads get IGNORE and positions 0, 1, ... of a sequence of their own."""
    rows = first_fit_decreasing([len(x) for x in ids], capacity)
    width = max(sum(len(ids[i]) for i in row) for row in rows) if rows else 0
    out_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    out_lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    out_pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(ids[i])
            out_ids[r, at:at + n] = torch.as_tensor(ids[i], dtype=torch.long)
            out_lab[r, at:at + n] = torch.as_tensor(labels[i], dtype=torch.long)
            out_lab[r, at] = IGNORE
            out_pos[r, at:at + n] = torch.arange(n)
            at += n
        out_pos[r, at:] = torch.arange(width - at)
    return {"input_ids": out_ids, "labels": out_lab, "position_ids": out_pos}


@dataclass
class PackedLMCollator:
    """Collator for (TRL / transformers) Trainers: a batch of tokenized examples (`input_ids`, and `labels` with
    -100 where there is no loss, as TRL's dataset preparation builds them) -> packed rows of at most `capacity`
    tokens and no attention mask, so the model reads the sequence boundaries from `position_ids`."""
    pad_token_id: int
    capacity: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(e["input_ids"])[:self.capacity] for e in examples]
        labels = [list(e.get("labels", e["input_ids"]))[:self.capacity] for e in examples]
        return pack_examples(ids, labels, self.capacity, self.pad_token_id)


def padding_share(lengths: Sequence[int], capacity: int) -> tuple[float, float]:
    """(padded share of one-per-row padding to the longest, padded share of packing) for these lengths."""
    if not lengths:
        return 0.0, 0.0
    real = sum(lengths)
    rows = first_fit_decreasing(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    return 1 - real / (len(lengths) * max(lengths)), 1 - real / (len(rows) * width)


@dataclass(frozen=True)
class PackedLayout:
    """Where the tokens of n sequences (rows of a padded [n, L] batch, each `lengths[i]` real tokens from
    position 0) sit in one packed row of `width` tokens: sequence i at [offsets[i], offsets[i] + lengths[i]),
    in the given order, then a pad tail up to `width` (a multiple of `multiple`)."""
    lengths: tuple[int, ...]
    width: int

    @classmethod
    def of(cls, lengths: Sequence[int], multiple: int = 1) -> PackedLayout:
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a packed row needs sequences of >= 1 token, got lengths {list(lengths)[:8]}")
        total = sum(lengths)
        return cls(lengths, -(-total // multiple) * multiple)

    @property
    def real(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def segments(self) -> list[int]:
        """Lengths of the row's segments: the sequences, then the pad tail when there is one."""
        tail = self.width - self.real
        return list(self.lengths) + ([tail] if tail else [])

    def cu_seqlens(self, device=None) -> torch.Tensor:
        """int32 [segments + 1]: 0, then the end of each segment (flash-attention's `cu_seqlens`)."""
        return torch.tensor([0] + list(torch.tensor(self.segments).cumsum(0).tolist()), dtype=torch.int32,
                            device=device)

    def position_ids(self, device=None) -> torch.Tensor:
        """[1, width] positions restarting at 0 at each segment (the pad tail counts from 0 too)."""
        return packed_position_ids(self.segments).to(device)[None]

    def _index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths))
        cols = packed_position_ids(self.lengths)
        return rows.to(device), cols.to(device)

    def pack(self, x: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """x [n, >= max_len, ...] (row i's first lengths[i] positions are real) -> [1, width, ...], `fill` in the
        pad tail."""
        if x.shape[0] != len(self.lengths) or x.shape[1] < self.max_len:
            raise ValueError(f"pack: expected [{len(self.lengths)}, >= {self.max_len}, ...], got {tuple(x.shape)}")
        rows, cols = self._index(x.device)
        out = x.new_full((1, self.width) + tuple(x.shape[2:]), fill)
        out[0, :self.real] = x[rows, cols]
        return out

    def unpack(self, y: torch.Tensor, length: int | None = None, fill: float | int = 0) -> torch.Tensor:
        """y [1, width, ...] -> [n, length (default max_len), ...], `fill` past each sequence's end;
        differentiable in y."""
        if y.shape[:2] != (1, self.width):
            raise ValueError(f"unpack: expected [1, {self.width}, ...], got {tuple(y.shape)}")
        rows, cols = self._index(y.device)
        out = y.new_full((len(self.lengths), length or self.max_len) + tuple(y.shape[2:]), fill)
        return out.index_put((rows, cols), y[0, :self.real])
