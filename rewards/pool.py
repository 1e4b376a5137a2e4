"""A process pool with hard per-item timeouts, for graders and reward plugins.

Why not `concurrent.futures` or `signal.alarm`: a hung sympy simplification or a plugin stuck in a loop cannot
be interrupted by a future's timeout, and `signal.alarm` only works in the main thread (peers' graders
silently score 0 when called from a trainer thread). Here each worker runs one item at a time and reports
each result as soon as it is done; when an item exceeds its deadline the worker's process group is killed
(SIGKILL), the item is recorded as a timeout, a fresh worker is started and the rest of the batch goes on.

Why not multiprocessing: its "spawn" method re-runs the caller's main module in every worker (an unguarded
script ran three times, and from stdin or `python -c` the workers died and every slow-path item silently
scored False); "fork" is unsafe next to threads, torch and Ray. Workers here are their own program,
`python -m rewards.grader_worker` (see that module for the protocol), with the project root on PYTHONPATH,
stdin from /dev/null, their own session, and a socket to the pool. Functions are shipped with cloudpickle, so
closures and functions defined in scripts work as plugins.

Three kinds of trouble, three answers:
  - an item that hangs: ItemResult "timeout" (worker killed and replaced);
  - a worker that dies while grading an item (crash, OOM kill): that item is an "error" naming the exit code
    and the worker's last output lines; the rest of the batch goes on in a replacement;
  - workers that cannot start (bad interpreter, broken install: MAX_START_FAILURES in a row) or that keep
    dying (MAX_DEATHS_IN_A_ROW deaths without a single answered item in between): `GraderUnavailable`, naming
    the command and the worker's output. Never a plain False.
`map` is thread-safe (calls are serialised) and bounded by a per-call deadline.
"""
from __future__ import annotations

import os
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import cloudpickle

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WARMUP = "rewards.math:warm_up"
MAX_START_FAILURES = 3
MAX_DEATHS_IN_A_ROW = 5
TAIL_BYTES = 4000


class GraderUnavailable(RuntimeError):
    """The pool cannot grade at all: its workers cannot start or keep dying. The message names the command
    and the worker's last output; nothing is scored when this is raised."""


@dataclass
class ItemResult:
    status: str            # "ok", "timeout" or "error"
    value: Any = None
    error: str | None = None
    latency_s: float = 0.0


def worker_python() -> str:
    """The interpreter that runs workers: $R1LAB_GRADER_PYTHON, else this interpreter."""
    return os.environ.get("R1LAB_GRADER_PYTHON") or sys.executable


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONSAFEPATH"] = "1"      # the caller's cwd must not shadow modules while the worker starts
    env["PYTHONUNBUFFERED"] = "1"    # a plugin's prints reach the output tail at once
    env["R1LAB_IN_GRADER_WORKER"] = "1"
    return env


class _Worker:
    """One worker process: its socket, the items sent to it, and a thread keeping the tail of its output."""

    def __init__(self, python: str, warmup: str | None) -> None:
        self.conn, child = Pipe(duplex=True)
        self.cmd = [python, "-m", "rewards.grader_worker", "--fd", str(child.fileno())]
        if warmup:
            self.cmd += ["--warmup", warmup]
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, pass_fds=(child.fileno(),), env=_worker_env(),
                                         start_new_session=True)
        except OSError as e:
            self.conn.close()
            raise GraderUnavailable(f"cannot start a grader worker: command {shlex.join(self.cmd)!r}: {e}") from e
        finally:
            child.close()
        self.ready = False
        self.spawned_at = time.perf_counter()
        self.queue: deque[int] = deque()   # items sent to this worker, not yet answered (front = running)
        self.started_at = 0.0              # when the front item started
        self._tail = bytearray()
        self._reader = threading.Thread(target=self._read_output, name="r1lab-grader-output", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self._tail += chunk
            del self._tail[:-TAIL_BYTES]

    def output_tail(self, lines: int = 15) -> str:
        """The last lines the worker wrote (after it exited: everything, up to TAIL_BYTES)."""
        if self.proc.poll() is not None:
            self._reader.join(timeout=2)
        text = bytes(self._tail).decode("utf-8", "replace").rstrip()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no output)"

    def exit_code(self) -> int | None:
        try:
            return self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (it leads its own session), then reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for w in list(workers):
        w.kill()


def _caller_sys_path() -> list[str]:
    cwd = os.getcwd()
    return [cwd if p == "" else p for p in sys.path]


class HardTimeoutPool:
    """`map(fn, args_list, timeout_s)` -> list[ItemResult], with every item bounded by `timeout_s`.

    python: interpreter for the workers (default `worker_python()`); warmup: `module:function` each worker calls
    before taking work (default: import the math grader and sympy, so the first item's time is its own);
    start_timeout_s: how long a worker may take to report ready."""

    def __init__(self, num_workers: int | None = None, chunk_size: int = 32, *, python: str | None = None,
                 warmup: str | None = DEFAULT_WARMUP, start_timeout_s: float | None = None) -> None:
        self.num_workers = max(1, num_workers or min(4, os.cpu_count() or 1))
        self.chunk_size = chunk_size
        self.python = python or worker_python()
        self.warmup = warmup
        self.start_timeout_s = start_timeout_s or float(os.environ.get("R1LAB_GRADER_START_TIMEOUT_S", "60"))
        self._workers: list[_Worker] = []   # mutated in place: the finalizer holds this list
        self._lock = threading.Lock()
        self.restarts = 0
        self._start_failures = 0            # in a row, reset when a worker reports ready
        self._deaths = 0                    # in a row, reset when any item is answered
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def busy_pids(self) -> list[int]:
        """Pids of the workers running an item right now."""
        return [w.proc.pid for w in list(self._workers) if w.queue]

    def _spawn(self) -> None:
        self._workers.append(_Worker(self.python, self.warmup))

    def _ensure_workers(self) -> None:
        for w in [w for w in self._workers if w.proc.poll() is not None and not w.queue]:
            w.kill()
            self._workers.remove(w)
        while len(self._workers) < self.num_workers:
            self._spawn()

    def map(self, fn: Callable, args_list: Sequence[tuple], timeout_s: float,
            deadline_s: float | None = None) -> list[ItemResult]:
        """Run fn(*args) for each args tuple; each item gets `timeout_s`, the whole call at most `deadline_s`
        (items not finished by then are timeouts). Thread-safe (calls are serialised). Raises
        GraderUnavailable when workers cannot start or keep dying."""
        with self._lock:
            deadline = time.perf_counter() + deadline_s if deadline_s is not None else float("inf")
            try:
                return self._map(cloudpickle.dumps(fn), list(args_list), timeout_s, deadline)
            except BaseException:
                _kill_all(self._workers)   # items may be in flight: never let a later call read their answers
                self._workers.clear()
                raise

    def _map(self, fn_bytes: bytes, args_list: list[tuple], timeout_s: float, deadline: float) -> list[ItemResult]:
        results: list[ItemResult | None] = [None] * len(args_list)
        pending = deque(range(len(args_list)))
        path = _caller_sys_path()
        self._ensure_workers()
        # small chunks when the batch is small, so work spreads over all workers
        chunk = max(1, min(self.chunk_size, -(-len(args_list) // (2 * self.num_workers))))
        while pending or any(w.queue for w in self._workers):
            now = time.perf_counter()
            for w in list(self._workers):
                if w.ready and not w.queue and pending:
                    ids = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    w.queue.extend(ids)
                    w.started_at = now
                    msg = pickle.dumps((path, fn_bytes, ids, cloudpickle.dumps([args_list[i] for i in ids])))
                    try:
                        w.conn.send_bytes(msg)
                    except OSError:  # it died while idle: nothing of ours ran there
                        self._replace(w, pending)
            if now >= deadline:
                self._expire(results, pending)
                break
            watched = [w for w in self._workers if w.queue or not w.ready]
            wake = min([deadline] + [w.started_at + timeout_s for w in watched if w.queue]
                       + [w.spawned_at + self.start_timeout_s for w in watched if not w.ready])
            ready = wait([w.conn for w in watched], timeout=max(0.0, wake - time.perf_counter()))
            for w in watched:
                if w.conn in ready:
                    self._drain(w, results, pending)
            self._enforce_timeouts(results, pending, timeout_s)
        return results  # type: ignore[return-value]

    def _enforce_timeouts(self, results: list, pending: deque, timeout_s: float) -> None:
        now = time.perf_counter()
        for w in list(self._workers):
            if w.queue and now - w.started_at >= timeout_s:
                stuck = w.queue.popleft()
                results[stuck] = ItemResult(TIMEOUT, error=f"no result within {timeout_s:.3g}s; worker killed",
                                            latency_s=now - w.started_at)
                self._replace(w, pending)
            elif not w.ready and now - w.spawned_at >= self.start_timeout_s:
                self._start_failed(w, pending, f"not ready within {self.start_timeout_s:.3g}s")

    def _expire(self, results: list, pending: deque) -> None:
        """The call's deadline passed: every unfinished item is a timeout; busy workers are replaced."""
        for w in [w for w in self._workers if w.queue]:
            self._drain(w, results, pending)
        for w in [w for w in self._workers if w.queue]:
            self._replace(w, pending)
        for i, r in enumerate(results):
            if r is None:
                results[i] = ItemResult(TIMEOUT, error="batch deadline passed before this item finished")
        pending.clear()

    def _drain(self, w: _Worker, results: list, pending: deque) -> None:
        """Collect every message the worker has sent; handle a worker that died or never became ready."""
        gone = False
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if not w.ready:
                    w.ready, self._start_failures = True, 0
                    continue
                idx, status, value, err, dt = msg
                results[idx] = ItemResult(status, value, err, dt)
                if w.queue and w.queue[0] == idx:
                    w.queue.popleft()
                w.started_at = time.perf_counter()
                self._deaths = 0
        except (EOFError, OSError):
            gone = True
        if not (gone or w.proc.poll() is not None) or w not in self._workers:
            return
        if not w.ready:
            self._start_failed(w, pending, f"exited with code {w.exit_code()} before it was ready")
        elif w.queue:
            dead = w.queue.popleft()
            code = w.exit_code()
            results[dead] = ItemResult(ERROR, error=f"grader worker {w.proc.pid} died (exit code {code}) while "
                                                    f"running this item; its last output:\n{w.output_tail(5)}")
            self._deaths += 1
            if self._deaths >= MAX_DEATHS_IN_A_ROW:
                raise GraderUnavailable(f"grader workers keep dying: {self._deaths} deaths in a row without an "
                                        f"answered item (last exit code {code}); command {shlex.join(w.cmd)!r}; "
                                        f"last output:\n{w.output_tail()}")
            self._replace(w, pending)
        else:  # died while idle
            self._replace(w, pending)

    def _start_failed(self, w: _Worker, pending: deque, why: str) -> None:
        self._start_failures += 1
        if self._start_failures >= MAX_START_FAILURES:
            w.kill()
            raise GraderUnavailable(f"grader workers cannot start: {self._start_failures} in a row, the last one "
                                    f"{why}; command {shlex.join(w.cmd)!r}; its output:\n{w.output_tail()}")
        self._replace(w, pending)

    def _replace(self, w: _Worker, pending: deque) -> None:
        """Kill `w`, give its unstarted items back, start a fresh worker."""
        pending.extendleft(reversed(w.queue))
        w.queue.clear()
        w.kill()
        self._workers.remove(w)
        self._spawn()
        self.restarts += 1

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                try:
                    w.conn.send_bytes(b"")
                except OSError:
                    pass
            for w in self._workers:
                try:
                    w.proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
                w.kill()
            self._workers.clear()

    def __enter__(self) -> HardTimeoutPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
