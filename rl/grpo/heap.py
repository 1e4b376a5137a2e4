"""Give a CPU trainer's freed heap memory back to the operating system before and during the backward.

Why: on CPU, tensors live in glibc's malloc. Tensors above the mmap threshold (dynamic, up to 32 MB) are mapped
and unmapped one by one, but the many smaller ones of a backward with gradient checkpointing (each layer's
recomputed activations, MLP intermediates, attention blocks, FSDP2's per-layer all-gather and reduce buffers)
come from the main heap, and a freed block stays resident while anything above it is still in use: the heap's
resident free space grows over the backward until the last FSDP unit's gradient reduce allocates its large
buffers beside it. Measured at Qwen2.5-0.5B's shape (24 layers, one 2,112-token row, two sequence-parallel
gloo ranks, steady state): `malloc_trim(0)` just before the root unit's reduce released 1.4-1.5 GB per step in
42-66 ms; before every unit's reduce (what this module does), the per-rank peak went from 7.0-7.5 GB to 5.2 GB,
for 50 trims costing 0.37 s in all over two 25 s steps. In the update at the 0.5B shape (launch/train_step.py,
two ranks, 962 tokens, glibc huge pages as Ray's actors get them): peak 8.10 -> 6.28-6.32 GB, update 17.0 s
without against 16.8-18.4 s with (this machine's noise).

The forward leaves the same kind of resident free space (with gradient checkpointing each layer keeps only its
input, allocated between that layer's transients): one trim between a micro-batch's forward and its backward
took a 16k-token step's peak (Qwen2.5-0.5B's width, 4 layers, one rank, first step) from 4,274 to 3,578 MB, in
the same step time (64-65 s).

What it implements: `release_free_heap()` (glibc's malloc_trim, a no-op where there is no glibc), called on every
CPU trainer by rl.grpo.reduce_scatter's FSDP2 comm hook whenever FSDP2 allocates a unit's gradient-reduce buffer
(its only public per-unit point in the backward), and by the trainer between each micro-batch's forward and
backward (rl/grpo/trainer_worker.py), when `trainer.release_heap` is true (the default). Not used on GPUs: there
the tensors are in the CUDA caching allocator. The cost: released pages are faulted in again when the memory is
reused. In launch/train_step.py it did not show (above); through Ray at the same shape (bench_real_shape.py,
glibc huge pages) the update took 20.6-22.0 s with it against 18.1 s without (one run each way or two: noisy,
but maybe 10-20%), so short-sequence throughput runs with memory to spare may turn it off.
Alternatives measured and not taken: a fixed `glibc.malloc.mmap_threshold` of 4 MB (every larger tensor mapped
and unmapped: peak about as low, steps 7-25% slower from page faults); keeping gradients allocated between
steps (`zero_grad(set_to_none=False)`: no change in the peak).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name or "libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to trim with
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS (glibc malloc_trim(0)); True when memory was released."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
