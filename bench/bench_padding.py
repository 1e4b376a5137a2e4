"""Padding share of the trainer's micro-batches with R1-like, long-tailed response lengths: rows padded in the
order they come (before) vs sorted by length within the mini-batch (after, `rl.grpo.microbatch`), and packed
(`trainer.packing`: first-fit-decreasing bins of the budget, each one row with no padding but the tail up to a
multiple of the sequence-parallel size k; shown for k=1 and k=2 with the budget per rank, as the trainer does).

Lengths: log-normal response lengths (median ~1.5k tokens, a tail up to the 16k cap, as R1-style long reasoning
produces; the last rows: between 64 and 16k) plus a 200-token prompt; 512 rows per rank; budget 32k tokens per
micro-batch. Pure packing arithmetic, no model: the padding share is exactly the share of token positions the
forward/backward runs that are pad tokens.

  .venv/bin/python bench/bench_padding.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rl.grpo.microbatch import computed_tokens, micro_batches, padding_frac, plan_micro_batches  # noqa: E402


def lengths(n: int, median: float, sigma: float, cap: int, prompt: int, seed: int, low: int = 16) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    resp = torch.exp(torch.log(torch.tensor(median)) + sigma * torch.randn(n, generator=g)).clamp(low, cap)
    return [prompt + int(x) for x in resp]


def packed_frac(ls: list[int], budget: int, sp: int) -> tuple[float, int]:
    groups = plan_micro_batches(ls, budget, packing=True, sp=sp)
    real, run = computed_tokens(ls, groups, packing=True, sp=sp)
    return 1.0 - real / run, len(groups)


def main() -> None:
    print(f"{'setting':<50} {'before':>7} {'after':>7} {'packed':>7} {'packed k=2':>10} "
          f"{'micro-batches before/after/packed':>34}")
    worst = 0.0
    for median, sigma, budget, low in ((1500, 1.0, 32768, 16), (1500, 1.0, 65536, 16), (4000, 0.7, 32768, 16),
                                       (400, 1.2, 8192, 16), (1500, 1.2, 32768, 64), (3000, 1.5, 16384, 64)):
        before, after, packed, packed2, mb = [], [], [], [], []
        for seed in range(5):
            ls = lengths(512, median, sigma, 16384, 200, seed, low)
            a, b = micro_batches(ls, budget, by_length=False), micro_batches(ls, budget)
            before.append(padding_frac(ls, a))
            after.append(padding_frac(ls, b))
            pf, n_packed = packed_frac(ls, budget, 1)
            packed.append(pf)
            packed2.append(packed_frac(ls, budget, 2)[0])
            mb.append((len(a), len(b), n_packed))
        worst = max(worst, max(packed), max(packed2))
        name = f"median {median}, sigma {sigma}, {200 + low}-{200 + 16384}, budget {budget}"
        print(f"{name:<50} {sum(before) / 5:>7.1%} {sum(after) / 5:>7.1%} {sum(packed) / 5:>7.2%} "
              f"{sum(packed2) / 5:>10.3%} {sum(x[0] for x in mb) / 5:>18.0f} / {sum(x[1] for x in mb) / 5:.0f} / "
              f"{sum(x[2] for x in mb) / 5:.0f}")
    print(f"packed_padding_max={worst:.5f}")


if __name__ == "__main__":
    main()
