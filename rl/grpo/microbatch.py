"""Splitting a rank's rows into forward/backward micro-batches under a token budget, with little padding.

Rows are padded to the longest row of their micro-batch, so which rows share a micro-batch decides how much
compute goes to padding. With R1-like, long-tailed response lengths, packing rows in random order lets one long
response set the padded length of a whole micro-batch; sorting the rows by length first (within a mini-batch,
so the mini-batch and hence the gradient are unchanged: every normaliser is global) puts rows of similar length
together. `bench/bench_padding.py` measures both on log-normal lengths.
"""
from __future__ import annotations

from collections.abc import Sequence


def micro_batches(lengths: Sequence[int], max_tokens: int, *, by_length: bool = True) -> list[list[int]]:
    """Indices into `lengths`, grouped so that (longest row) x (rows) <= max_tokens per group (a row longer
    than the budget gets a group of its own). by_length: longest rows first; else in the given order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if by_length else list(range(len(lengths)))
    groups: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    return groups


def padded_tokens(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(real tokens, tokens after padding each group to its longest row)."""
    real = sum(lengths[i] for g in groups for i in g)
    padded = sum(max(lengths[i] for i in g) * len(g) for g in groups if g)
    return real, padded


def padding_frac(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> float:
    real, padded = padded_tokens(lengths, groups)
    return 1.0 - real / padded if padded else 0.0


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, packing: bool, sp: int = 1) -> list[list[int]]:
    """The trainer's micro-batches. Padded (packing False): `micro_batches`, (longest row) x (rows) <= max_tokens.
    Packed: first-fit-decreasing bins of at most max_tokens x sp real tokens, each packed into one row, so that
    each of the sp ranks of a sequence-parallel group holds at most max_tokens of them (verl multiplies
    ppo_max_token_len_per_gpu by the Ulysses size the same way); a longer sequence gets a bin of its own."""
    if not packing:
        return micro_batches(lengths, max_tokens)
    from rl.packing import first_fit_decreasing

    return first_fit_decreasing(lengths, max_tokens * sp)


def computed_tokens(lengths: Sequence[int], groups: Sequence[Sequence[int]], packing: bool, sp: int = 1
                    ) -> tuple[int, int]:
    """(real tokens, tokens the forward runs): padded rows, or packed rows padded to a multiple of sp."""
    if not packing:
        return padded_tokens(lengths, groups)
    real = sum(lengths[i] for g in groups for i in g)
    return real, sum(-(-sum(lengths[i] for i in g) // sp) * sp for g in groups if g)
