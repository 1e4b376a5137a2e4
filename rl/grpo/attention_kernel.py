"""Which of PyTorch's SDPA kernels a CPU training micro-batch runs: math below 192 tokens, flash from there.

On CPU PyTorch picks its flash kernel whenever it can. Its backward splits the queries into blocks of 32 rows
below 192 tokens (64 from 192, 256 from 768) and pays a fixed cost per block of every (row, head): at short
lengths the backward costs ~0.23-0.30 ms per (row, head) whatever the length, ten times its forward. The math
kernel (the scores as one [rows, heads, L, L] tensor, softmax, two batched GEMMs) has no such cost but grows with
L^2 in time and memory. Measured here (bf16, Qwen2.5-0.5B's attention: 14 query heads over 2 KV heads, head dim
64, a causal float mask as transformers passes it, forward + backward, 2 threads; /tmp/s32/sdpa2.py, sdpa3.py):

| rows x tokens | 17 x 64 | 17 x 113 | 12 x 144 | 12 x 160 | 10 x 192 | 8 x 256 | 4 x 512 | 1 x 2,048 |
|---|---|---|---|---|---|---|---|---|
| flash, ms | 25.6 | 57.0 | 48.9 | 49.9 | 30.2 | 33.5 | 50.1 | 163.7 |
| math, ms | 13.7 | 29.1 | 28.5 | 38.8 | 41.7 | 71.6 | 158.3 | 699.1 |

So a micro-batch of padded rows shorter than `trainer.math_attention_below` (192 by default: where flash's
blocks grow) computes attention with the math kernel, forward and backward (the backward's recomputation under
gradient checkpointing included); longer rows, packed rows (one long row with a block-diagonal layout) and GPUs
keep PyTorch's choice. At the 0.5B shape's update (17 rows of 113 tokens) flash's backward was 1.0 s of ~8 s.
The old-log-prob pass (no backward) keeps flash: its forward is the faster one (4-5 ms against math's 14 ms).
"""
from __future__ import annotations

import contextlib

import torch


def training_sdpa(length: int, device: torch.device, below: int) -> contextlib.AbstractContextManager:
    """The context a micro-batch of rows padded to `length` tokens trains in: SDPA's math kernel on CPU when
    0 < length < below, else nothing changed. One context per use (enter it around the forward and, again, around
    the backward)."""
    if device.type != "cpu" or not 0 < length < below:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
