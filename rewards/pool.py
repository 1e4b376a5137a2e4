"""A process pool with hard per-item timeouts, for graders and reward plugins.

Why not `concurrent.futures` or `signal.alarm`: a hung sympy simplification or a plugin stuck in a loop cannot
be interrupted by a future's timeout, and `signal.alarm` only works in the main thread (peers' graders
silently score 0 when called from a trainer thread). Here each worker runs one item at a time and reports
each result as soon as it is done; when an item exceeds its deadline the worker process is killed
(SIGKILL), the item is recorded as a timeout, a fresh worker is started and the rest of the batch goes on.

Workers are started with the "spawn" method: safe next to threads, torch and Ray. Functions are shipped with
cloudpickle, so closures and functions defined in scripts work as plugins.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import cloudpickle

OK, TIMEOUT, ERROR = "ok", "timeout", "error"


@dataclass
class ItemResult:
    status: str            # "ok", "timeout" or "error"
    value: Any = None
    error: str | None = None
    latency_s: float = 0.0


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive (fn_bytes, [(idx, args), ...]); send (idx, status, value, error, dt) per item."""
    os.environ["R1LAB_IN_GRADER_WORKER"] = "1"  # graders called inside a worker run unbounded (we are the bound)
    fns: dict[bytes, Callable] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn_bytes, items = msg
        fn = fns.get(fn_bytes)
        if fn is None:
            fn = fns[fn_bytes] = cloudpickle.loads(fn_bytes)
        for idx, args in items:
            t0 = time.perf_counter()
            try:
                value, status, err = fn(*args), OK, None
            except BaseException as e:  # a plugin's failure is data, not a crash of the pool
                value, status = None, ERROR
                err = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_tb(e.__traceback__)[-3:])
            try:
                conn.send((idx, status, value, err, time.perf_counter() - t0))
            except Exception as e:  # unpicklable return value
                conn.send((idx, ERROR, None, f"result not picklable: {e}", time.perf_counter() - t0))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="r1lab-grader")
        self.proc.start()
        child.close()
        self.queue: deque[int] = deque()   # items sent to this worker, not yet answered (front = running)
        self.started_at = 0.0              # when the front item started

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        finally:
            self.conn.close()


class HardTimeoutPool:
    """`map(fn, args_list, timeout_s)` -> list[ItemResult], with every item bounded by `timeout_s`."""

    def __init__(self, num_workers: int | None = None, chunk_size: int = 32) -> None:
        self.num_workers = max(1, num_workers or min(4, os.cpu_count() or 1))
        self.chunk_size = chunk_size
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0

    def _ensure_workers(self) -> None:
        self._workers = [w for w in self._workers if w.proc.is_alive()]
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx))

    def map(self, fn: Callable, args_list: Sequence[tuple], timeout_s: float,
            deadline_s: float | None = None) -> list[ItemResult]:
        """Run fn(*args) for each args tuple; each item gets `timeout_s`, the whole call at most `deadline_s`
        (items not finished by then are timeouts). Thread-safe (calls are serialised)."""
        with self._lock:
            deadline = time.perf_counter() + deadline_s if deadline_s is not None else float("inf")
            return self._map(cloudpickle.dumps(fn), list(args_list), timeout_s, deadline)

    def _map(self, fn_bytes: bytes, args_list: list[tuple], timeout_s: float, deadline: float) -> list[ItemResult]:
        results: list[ItemResult | None] = [None] * len(args_list)
        pending = deque(range(len(args_list)))
        self._ensure_workers()
        # small chunks when the batch is small, so work spreads over all workers
        chunk = max(1, min(self.chunk_size, -(-len(args_list) // (2 * self.num_workers))))
        while pending or any(w.queue for w in self._workers):
            now = time.perf_counter()
            for w in self._workers:
                if not w.queue and pending:
                    ids = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    w.queue.extend(ids)
                    w.started_at = now
                    w.conn.send((fn_bytes, [(i, args_list[i]) for i in ids]))
            busy = [w for w in self._workers if w.queue]
            if time.perf_counter() >= deadline:
                self._expire(busy, results, pending, timeout_s)
                break
            next_deadline = min(min(w.started_at + timeout_s for w in busy), deadline)
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                         timeout=max(0.0, next_deadline - time.perf_counter()))
            for w in busy:
                if w.conn in ready or w.proc.sentinel in ready:
                    self._drain(w, results, pending)
            now = time.perf_counter()
            for w in list(self._workers):
                if w.queue and now - w.started_at >= timeout_s:
                    stuck = w.queue.popleft()
                    results[stuck] = ItemResult(TIMEOUT, error=f"no result within {timeout_s:.3g}s; worker killed",
                                                latency_s=now - w.started_at)
                    self._replace(w, pending)
        return results  # type: ignore[return-value]

    def _expire(self, busy: list[_Worker], results: list, pending: deque, timeout_s: float) -> None:
        """The call's deadline passed: every unfinished item is a timeout; busy workers are replaced."""
        for w in busy:
            self._drain(w, results, pending)
        for w in [w for w in self._workers if w.queue]:
            self._replace(w, pending)
        for i, r in enumerate(results):
            if r is None:
                results[i] = ItemResult(TIMEOUT, error="batch deadline passed before this item finished")
        pending.clear()

    def _drain(self, w: _Worker, results: list, pending: deque) -> None:
        """Collect every result the worker has sent; handle a worker that died mid-item."""
        try:
            while w.conn.poll():
                idx, status, value, err, dt = w.conn.recv()
                results[idx] = ItemResult(status, value, err, dt)
                if w.queue and w.queue[0] == idx:
                    w.queue.popleft()
                w.started_at = time.perf_counter()
        except (EOFError, OSError):
            pass
        if w.queue and not w.proc.is_alive():
            dead = w.queue.popleft()
            results[dead] = ItemResult(ERROR, error=f"grader worker died (exit code {w.proc.exitcode})")
            self._replace(w, pending)

    def _replace(self, w: _Worker, pending: deque) -> None:
        """Kill `w`, give its unstarted items back, start a fresh worker."""
        pending.extendleft(reversed(w.queue))
        w.queue.clear()
        w.kill()
        self._workers.remove(w)
        self._workers.append(_Worker(self._ctx))
        self.restarts += 1

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
                w.proc.join(timeout=1)
                if w.proc.is_alive():
                    w.kill()
            self._workers = []

    def __enter__(self) -> HardTimeoutPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
