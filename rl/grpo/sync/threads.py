"""CPU threads during a weight sync, when the trainer ranks and the engines of one node run at the same time.

The synchronous loop never generates and trains at once, so on a CPU node each side is given every core
(`rollout.threads=0`, `trainer.threads`). A weight sync is the exception: the trainer ranks cast and write bucket
k + 1 while the engines load bucket k. With both at their full thread counts the node runs more threads than it
has cores, and GNU OpenMP's idle threads spin-wait after every parallel region (GOMP_SPINCOUNT) on the cores the
other process needs. `sync.threads` (0 = auto, the default) gives every process of a transfer on a CPU run an
equal share of its node's cores among the transfer's processes on that node, for the transfer only (`share`),
and puts its thread count back afterwards (`torch_threads`); a count is only ever lowered.

Measured at Qwen2.5-0.5B's shape on a 2-core node (one FSDP2 rank of 2 threads writing 942 MB through the
shared-memory transport in 256 MB buckets, one vLLM CPU engine of 2 threads loading; 8 syncs, median of the last
6): both sides at 2 threads 1.25 s (0.56-0.60 s of it the trainer's cast, which alone takes 0.22 s); one thread
each during the sync 0.99 s; with the engine's heap kept as well (`rl.heap`, reloads without page faults)
**0.78 s** (0.76-0.81 s, no outliers). `OMP_WAIT_POLICY=PASSIVE` for the whole run instead: 0.95 s
for the sync, but the update took 13.1 s instead of 9.5 s and generation 6.2 s instead of 5.6 s (every parallel
region waits for its threads to wake). Auto leaves GPU runs alone (the cast and the load run on the devices); an
explicit `sync.threads=n` caps every transfer's processes at n threads wherever they run. The share is equal:
a process that uses fewer threads than its share (`trainer.threads=1`) leaves the rest of it idle, and an engine
still generating during a replacement engine's transfer (rl.grpo.recovery) is not counted.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator, Sequence

import torch


def share(participants: int, cores: int | None = None) -> int:
    """Threads each of `participants` processes running at once may use on a node of `cores` cores (default:
    the cores this process may run on): an equal share, at least 1."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, cores // max(1, participants))


def sync_threads(setting: int, participants: int) -> int:
    """At most how many threads a transfer's process uses: `setting` (sync.threads) when > 0; for 0 (auto), its
    node's share of cores among `participants` (0 participants: not a CPU run, nothing changes); -1: nothing
    changes. Returns 0 for "leave the thread count alone"."""
    if setting > 0:
        return setting
    if setting < 0 or participants <= 0:
        return 0
    return share(participants)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with at most `n` torch threads (n <= 0, or not fewer than now: unchanged), then restore the
    count. Calls `torch._C.set_num_threads`, because vLLM's CPU worker replaces `torch.set_num_threads` with a
    no-op in its process (the engine's process: in-process engines share it). Yields the count in effect."""
    before = torch.get_num_threads()
    if n <= 0 or n >= before:
        yield before
        return
    torch._C.set_num_threads(n)
    try:
        yield n
    finally:
        torch._C.set_num_threads(before)


def participants(cpu: bool, trainer_nodes: Sequence[str], rollout_nodes: Sequence[str], readers: Sequence[int]
                 ) -> tuple[list[int], dict[int, int]]:
    """For one transfer: how many of its processes run on each trainer rank's node and each reading engine's
    node (every trainer rank takes part, the engines `readers` load). All 0 unless the run is on CPU (`cpu`:
    neither trainers nor engines have GPUs), which is when `sync_threads` shares the cores."""
    if not cpu:
        return [0] * len(trainer_nodes), {j: 0 for j in readers}
    count = Counter(trainer_nodes) + Counter(rollout_nodes[j] for j in readers)
    return [count[n] for n in trainer_nodes], {j: count[rollout_nodes[j]] for j in readers}
