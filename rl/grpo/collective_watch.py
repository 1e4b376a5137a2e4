"""Collectives that cannot hang forever, and an error that names the rank that did not arrive.

The trainer group is created with `trainer.collective_timeout_s` (`dist.init_process_group(timeout=...)`): gloo
raises in a waiting rank after that long. Its message ("Timed out waiting 1800000ms for recv operation") says
nothing about who is late, and in a ring collective the rank that times out need not be next to the one that
stalled. So every rank checks in: at each point where all ranks must meet (each collective method of the
trainer worker, each micro-batch, each bucket of a weight push or export) it writes `[count, label, time,
state]` to its own key in the process group's store (one key per rank, overwritten: the store does not grow).
Ranks pass the same points in the same order, so when a collective fails in rank r at check-in `count`:
  - ranks whose count is lower never reached that point: they did not arrive;
  - ranks at the same count that are still "running" either stalled inside that stretch (a hung kernel, a
    stuck file system, a sleeping process) or are still waiting in the collective themselves; r marks itself
    "failed" and waits a short grace (10% of the timeout, 1 to 60 s) for waiting peers to time out too; those
    that do not are named as well;
  - ranks that are ahead, or failed at the same point, arrived.
`CollectiveTimeout` carries `stalled` (the ranks that did not arrive), `rank` and `point`; its message names them,
where each was last seen and how long ago. A rank that arrives late, after the others gave up, gets one with
`stalled` empty. The run then stops like for a dead worker (the driver names the last intact checkpoint); the
restart path catches this class.

NCCL: the same timeout arms NCCL's watchdog, which by default aborts the process instead of raising, so the
check-ins are not read there and the driver reports a dead worker (naming needs TORCH_NCCL_BLOCKING_WAIT=1).
"""
from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

KEY = "r1lab/checkin/{rank}"
_FAILURE_MARKERS = ("timed out", "connection closed by peer", "connection reset by peer", "broken pipe")


class CollectiveTimeout(RuntimeError):
    """A collective of the trainer group timed out or failed; `stalled` are the ranks that did not arrive."""

    def __init__(self, message: str, *, rank: int, stalled: list[int], point: str) -> None:
        super().__init__(message)
        self.rank, self.stalled, self.point = rank, stalled, point

    def __reduce__(self):   # keyword-only fields: Ray pickles it from the trainer to the driver
        return _rebuild, (str(self), self.rank, self.stalled, self.point)


def _rebuild(message: str, rank: int, stalled: list[int], point: str) -> CollectiveTimeout:
    return CollectiveTimeout(message, rank=rank, stalled=stalled, point=point)


def is_collective_failure(e: BaseException) -> bool:
    """A timed-out or broken collective: torch's DistError, or the plain RuntimeError gloo raises with a
    timeout / closed-connection message (subclasses such as a weight-sync error are someone else's failure)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return type(e) is RuntimeError and any(m in str(e).lower() for m in _FAILURE_MARKERS)


def grace_s(timeout_s: float) -> float:
    return min(60.0, max(1.0, 0.1 * timeout_s))


class CheckIn:
    """This rank's check-ins in the group's store; `section` turns a failed collective into CollectiveTimeout."""
    store_wait_s = 10.0   # diagnose: how long past the grace an unanswered store read is waited for

    def __init__(self, store, rank: int, world: int, timeout_s: float, grace: float | None = None) -> None:
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s
        self.grace = grace_s(timeout_s) if grace is None else grace
        self.count, self.label = 0, "start"
        self._write("running")

    @classmethod
    def for_default_group(cls, rank: int, world: int, timeout_s: float) -> CheckIn:
        import torch.distributed.distributed_c10d as c10d

        return cls(c10d._get_default_store(), rank, world, timeout_s)

    def _write(self, state: str) -> None:
        self.store.set(KEY.format(rank=self.rank), json.dumps([self.count, self.label, time.time(), state]))

    def read(self, rank: int) -> list | None:
        """[count, label, unix time, state] of a rank, None if it never checked in."""
        key = KEY.format(rank=rank)
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def mark(self, label: str) -> None:
        """A point every rank passes, in the same order."""
        self.count += 1
        self.label = label
        try:
            self._write("running")
        except Exception as e:   # the store's host (trainer rank 0, or torchrun's agent) is gone
            raise CollectiveTimeout(f"trainer rank {self.rank}: cannot check in at '{label}': the process group's "
                                    f"store is unreachable ({e}); its host process is probably dead",
                                    rank=self.rank, stalled=[], point=label) from e

    @contextmanager
    def section(self, label: str) -> Iterator[None]:
        self.mark(label)
        try:
            yield
        except Exception as e:
            if not is_collective_failure(e):
                raise
            raise self.diagnose(e) from e

    def diagnose(self, error: BaseException) -> CollectiveTimeout:
        """Mark this rank failed, wait up to the grace for peers that may be waiting too, name the others.
        The store lives in trainer rank 0's process: when that process is the one that stalled (stopped, hung in
        a kernel), a read may never return, so the reads run in a thread that is given up on after the grace
        plus 10 s (found by bench/chaos.py: a SIGSTOPped rank 0 left rank 1 blocked in the store forever)."""
        import threading

        box: dict[str, CollectiveTimeout] = {}
        reader = threading.Thread(target=lambda: box.update(out=self._diagnose(error)), daemon=True,
                                  name="r1lab-checkin-diagnose")
        reader.start()
        reader.join(self.grace + self.store_wait_s)
        if "out" in box:
            return box["out"]
        return CollectiveTimeout(f"{self._head(error)}: the group's store (in trainer rank 0's process) did not "
                                 f"answer within {self.grace + self.store_wait_s:g} s, so rank 0 is the one that "
                                 "stalled",
                                 rank=self.rank, stalled=[0] if self.rank != 0 else [], point=self.label)

    def _diagnose(self, error: BaseException) -> CollectiveTimeout:
        seen: dict[int, list | None] = {}
        try:
            self._write("failed")
            deadline = time.monotonic() + self.grace
            while True:
                seen = {r: self.read(r) for r in range(self.world) if r != self.rank}
                unsure = [r for r, s in seen.items() if s is not None and s[0] == self.count and s[3] == "running"]
                if not unsure or time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        except Exception as e:   # the store lives in rank 0's process: it may be gone too
            return CollectiveTimeout(self._head(error) + f"; could not read the other ranks' check-ins ({e})",
                                     rank=self.rank, stalled=[], point=self.label)
        stalled = sorted(r for r, s in seen.items() if s is None or s[0] < self.count
                         or (s[0] == self.count and s[3] == "running"))
        now = time.time()
        if stalled:
            who = "; ".join(f"rank {r} " + ("never checked in" if seen[r] is None else
                                            f"last seen at '{seen[r][1]}' {now - seen[r][2]:.1f} s ago")
                            for r in stalled)
            verdict = f"trainer rank(s) {stalled} did not arrive ({who})"
        else:
            gave_up = sorted(r for r, s in seen.items() if s[0] == self.count and s[3] == "failed")
            verdict = (f"every rank reached it; rank(s) {gave_up} gave up waiting first" if gave_up else
                       "every rank reached it")
        return CollectiveTimeout(f"{self._head(error)}: {verdict}", rank=self.rank, stalled=stalled,
                                 point=self.label)

    def _head(self, error: BaseException) -> str:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        return (f"trainer rank {self.rank}: a collective at '{self.label}' failed (trainer.collective_timeout_s="
                f"{self.timeout_s:g}; {first})")


def collective(label: str) -> Callable:
    """Method decorator: run the method as a check-in section of `self.checkin` (when the worker has one)."""
    def deco(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(self, *args: Any, **kwargs: Any) -> Any:
            checkin = getattr(self, "checkin", None)
            if checkin is None:
                return method(self, *args, **kwargs)
            with checkin.section(label):
                return method(self, *args, **kwargs)
        return wrapper
    return deco
