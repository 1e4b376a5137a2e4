"""A CPU trainer's glibc heap: given back to the operating system during the backward (`trainer.release_heap`,
the default: the lowest peak), or kept for reuse (`release_heap=false`: the fastest update).

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

The other policy, `keep_freed_heap` (release_heap=false). Where the update's time went at Qwen2.5-0.5B's shape
(one FSDP2 rank of two threads, 17 rows padded to 113 tokens, 1,874 real; /proc/self/stat's minor faults around
each phase, and `perf`): under glibc's defaults steps 2 and 3 took 0.6-1.1M page faults in the forward and
1.3-1.4M in the backward (8-10 GB of pages zeroed by the kernel; `clear_page_erms` was perf's top symbol, 21% of
a run's cycles even with the thresholds raised but trimming on), because every tensor above 32 MiB (FSDP2's
gathered layers and fp32 gradient reduces, the root unit's 545 MB embedding gradient, the gradients zero_grad
frees, the log-prob chunks) is mapped afresh and unmapped on free; forward 5.5 s, backward 10.5 s, where the same
model in plain bf16 without FSDP2 took 2.2 / 4.9 s. With the mmap threshold at its largest (2 GiB - 1) and
trimming off (M_TRIM_THRESHOLD -1: with 2 GiB - 1 the gradients zero_grad frees, >2 GiB at the heap's top, were
trimmed and each layer's reduce still faulted 29k pages), the faults stop after two or three steps (torch's
aligned allocations leave holes a same-sized tensor does not fit at first) and the update went 16.6 -> ~9 s
(forward 2.2 s, backward ~6.5 s), for a peak of 15.0 GB instead of 11.9 GB (the heap keeps its high-water mark).
Set once, at the end of the worker's start-up, for its whole process; `TrainerWorker.shutdown` puts glibc's
thresholds back near their defaults (a worker built in its caller's process: tests, tools).

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


def keep_freed_heap() -> str:
    """The opposite policy (`trainer.release_heap=false`): serve every tensor below 2 GiB that the main thread
    allocates (the update's) from the heap and never trim it, so the update's recurring buffers (FSDP2's per-unit
    gathers and gradient reduces, the fp32 gradients freed by zero_grad, the log-prob chunks) are reused from one
    step to the next instead of mapped and first-touched again. Returns rl.rollout.engine_heap's verdict
    ("applied" or "skipped: why")."""
    from rl.rollout.engine_heap import MAX_THRESHOLD, NEVER_TRIM, keep_step_buffers

    return keep_step_buffers(MAX_THRESHOLD, trim=NEVER_TRIM)
