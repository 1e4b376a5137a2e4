"""Which of PyTorch's SDPA kernels a CPU training micro-batch runs: math below 192 tokens, flash from there.

On CPU PyTorch picks its flash kernel whenever it can. Its backward splits the queries into blocks of 32 rows
below 192 tokens (64 from 192, 256 from 768) and pays a fixed cost per block of every (row, head), ~0.06 ms: at
113 tokens its backward is ten times its forward. The math kernel (the scores as one [rows, heads, L, L] tensor,
softmax, two batched GEMMs) has no such cost but grows with L^2 in time and memory. Measured here (bf16,
Qwen2.5-0.5B's attention: 14 query heads over 2 KV heads, head dim 64, a causal float mask as transformers passes
it, forward + backward, 2 threads, best of 3 after 2 warm-ups):

| rows x tokens | 17 x 64 | 17 x 113 | 12 x 144 | 12 x 160 | 10 x 192 | 8 x 256 | 4 x 512 | 1 x 2,048 |
|---|---|---|---|---|---|---|---|---|
| flash, ms | 25.6 | 57.0 | 48.9 | 49.9 | 30.2 | 33.5 | 50.1 | 163.7 |
| math, ms | 13.7 | 29.1 | 28.5 | 38.8 | 41.7 | 71.6 | 158.3 | 699.1 |

So a micro-batch of padded rows shorter than `trainer.math_attention_below` (192 by default: where flash's
blocks grow) computes attention with the math kernel, forward and backward (the backward's recomputation under
gradient checkpointing included: transformers checkpoints with use_reentrant=False, which needs the same kernel
again), unless what the math kernel keeps for the backward exceeds `MATH_BUDGET` (1 GiB): ~8 bytes per element of
[rows, heads, L, L] (fp32 probabilities and more), in every layer without gradient checkpointing (17 rows x 14
heads x 113^2 tokens: 24 MB a layer, 0.58 GB over 24 layers; 42 x 191^2, a full 8,192-token micro-batch: 164 MB a
layer against flash's 14 MB, so flash). Longer rows, packed rows (one long row with a block-diagonal layout) and
GPUs keep PyTorch's choice. The old-log-prob pass takes the same kernel by the same rule (its forward is slower
in math, 14 ms against 4-5 ms a layer, but the update's first forward then computes what it computed: the
importance ratio starts at 1 up to the micro-batches' composition). At the 0.5B shape's update (17 rows of 113
tokens) flash's backward was 1.0 s of ~8 s.
"""
from __future__ import annotations

import contextlib

import torch

MATH_BUDGET = 1 << 30        # bytes the math kernel may keep for a backward, over the layers that keep it
MATH_BYTES_PER_SCORE = 8     # measured: fp32 probabilities and what autograd keeps beside them


def training_sdpa(length: int, device: torch.device, below: int, rows: int = 1, heads: int = 1,
                  layers_held: int = 1) -> contextlib.AbstractContextManager:
    """The context a micro-batch of `rows` rows padded to `length` tokens runs in: SDPA's math kernel on CPU when
    0 < length < below and rows x heads x length^2 x 8 bytes x `layers_held` (the layers whose attention is kept
    for the backward at once: all of them without gradient checkpointing, one with it or without a backward) fits
    MATH_BUDGET; else nothing changed. One context per use (enter it around the forward and, again, around the
    backward)."""
    held = rows * heads * length * length * MATH_BYTES_PER_SCORE * max(1, layers_held)
    if device.type != "cpu" or not 0 < length < below or held > MATH_BUDGET:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
