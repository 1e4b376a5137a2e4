"""FSDP2's reduce-scatter on gloo as reduces to each chunk's owner (rl/grpo/reduce_scatter.py): the same values
as torch's reduce-scatter, on two gloo ranks; and the trainer installs it on every FSDP unit. Its heap trim
(rl/heap.py) gives freed memory back."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rl.ports import free_port


def _rank(rank: int, port: int, out: str) -> None:
    from rl.grpo.reduce_scatter import ReduceByOwner

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    comm, res = ReduceByOwner(), {}
    for dtype in (torch.float32, torch.bfloat16):
        for op_name in ("SUM", "AVG"):
            for n in (1, 7, 4099):
                op = getattr(dist.ReduceOp, op_name)
                x = torch.randn(2 * n, generator=torch.Generator().manual_seed(100 * rank + n)).to(dtype)
                want = torch.empty(n, dtype=dtype)
                dist.reduce_scatter_tensor(want, x.clone(), op=dist.ReduceOp.SUM)
                if op_name == "AVG":
                    want.div_(2)
                got = comm.allocate((n,), dtype=dtype, device=torch.device("cpu"))
                comm(got, x.clone(), dist.group.WORLD, op)
                res[f"{dtype}-{op_name}-{n}"] = float((got.float() - want.float()).abs().max())
    try:
        comm(torch.empty(3), torch.empty(5), dist.group.WORLD, dist.ReduceOp.SUM)
    except ValueError as e:
        res["size_error"] = str(e)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_reduce_by_owner_equals_reduce_scatter_on_two_gloo_ranks(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "not 2 x 3" in res.pop("size_error")
        assert res and all(v == 0.0 for v in res.values()), res   # two-term sums: bitwise equal


def test_reduce_by_owner_refuses_other_ops():
    from rl.grpo.reduce_scatter import ReduceByOwner

    class G:
        def size(self):
            return 2

        def rank(self):
            return 0

    with pytest.raises(ValueError, match="SUM or AVG"):
        ReduceByOwner()(torch.empty(2), torch.empty(4), G(), dist.ReduceOp.MAX)


def test_release_free_heap_returns_freed_blocks_to_the_os():
    """Blocks below every mmap threshold (64 KB) come from the heap; freed under a block still in use they stay
    resident until release_free_heap (glibc malloc_trim) gives them back."""
    import ctypes

    from rl.heap import _malloc_trim, release_free_heap

    if _malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim with")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [libc.malloc(64 << 10) for _ in range(3200)]   # 200 MB
    for b in blocks:
        ctypes.memset(b, 1, 64 << 10)
    keep = libc.malloc(64 << 10)                              # in use above them: no automatic trim
    for b in blocks:
        libc.free(b)
    before = rss_mb()
    release_free_heap()
    after = rss_mb()
    libc.free(keep)
    assert before - after > 150, (before, after)


def test_reduce_by_owner_trims_the_heap_before_allocating(monkeypatch):
    import rl.grpo.reduce_scatter as rs

    calls = []
    monkeypatch.setattr(rs, "release_free_heap", lambda: calls.append(1) or True)
    t = rs.ReduceByOwner(trim_heap=True).allocate((5,), dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == (5,) and calls == [1]
    rs.ReduceByOwner().allocate((5,), dtype=torch.float32, device=torch.device("cpu"))
    assert calls == [1]


def test_keep_freed_heap_serves_a_step_again_without_page_faults():
    """rl.heap.keep_freed_heap (trainer.release_heap=false), in a fresh process: a "step" allocates, fills
    and frees five 80 MB tensors (above glibc's largest adaptive mmap threshold, 32 MiB). Under glibc's defaults
    each is mapped afresh and every step faults all its pages in again; with the heap kept the heap grows for a few
    steps (torch's aligned allocations leave holes a same-sized tensor does not fit at first: 3-5 steps in six runs
    here) and then serves every step from pages it kept (a step that needed no new memory leaves the heap as it
    found it, so the next one repeats it). 12 steps, the last one measured. That trimming is off (trim=NEVER_TRIM,
    not the engine's 2 GiB - 1) mattered in the trainer, where a step frees more than 2 GiB at the heap's top
    (rl/heap.py); too large to test here."""
    from conftest import heap_fault_probe

    code = """
import resource, sys, torch
from rl.heap import keep_freed_heap
print(keep_freed_heap() if sys.argv[1] == "keep" else "default")
def step():
    ts = [torch.empty(20_000_000) for _ in range(5)]
    for t in ts:
        t.fill_(1.0)
for _ in range(11):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    out = heap_fault_probe(code, ("default", "keep"))
    pages = 5 * 80_000_000 // 4096
    assert out["keep"][0] == "applied" and int(out["default"][1]) >= 0.9 * pages, out
    assert int(out["keep"][1]) < 0.05 * pages, out
