"""Padding share of the trainer's micro-batches with R1-like, long-tailed response lengths: rows packed in the
order they come (before) vs sorted by length within the mini-batch (after, `rl.grpo.microbatch`).

Lengths: log-normal response lengths (median ~1.5k tokens, a tail up to the 16k cap, as R1-style long reasoning
produces) plus a 200-token prompt; 512 rows per rank; budget 32k tokens per micro-batch. Pure packing
arithmetic, no model: the padding share is exactly the share of forward/backward compute spent on pad tokens.

  .venv/bin/python bench/bench_padding.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rl.grpo.microbatch import micro_batches, padding_frac  # noqa: E402


def lengths(n: int, median: float, sigma: float, cap: int, prompt: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    resp = torch.exp(torch.log(torch.tensor(median)) + sigma * torch.randn(n, generator=g)).clamp(16, cap)
    return [prompt + int(x) for x in resp]


def main() -> None:
    print(f"{'setting':<38} {'before':>8} {'after':>8} {'micro-batches before/after':>28}")
    for median, sigma, budget in ((1500, 1.0, 32768), (1500, 1.0, 65536), (4000, 0.7, 32768), (400, 1.2, 8192)):
        before, after, mb = [], [], []
        for seed in range(5):
            ls = lengths(512, median, sigma, 16384, 200, seed)
            a, b = micro_batches(ls, budget, by_length=False), micro_batches(ls, budget)
            before.append(padding_frac(ls, a))
            after.append(padding_frac(ls, b))
            mb.append((len(a), len(b)))
        name = f"median {median}, sigma {sigma}, budget {budget}"
        print(f"{name:<38} {sum(before) / 5:>8.1%} {sum(after) / 5:>8.1%} "
              f"{sum(x for x, _ in mb) / 5:>14.0f} / {sum(y for _, y in mb) / 5:<.0f}")


if __name__ == "__main__":
    main()
