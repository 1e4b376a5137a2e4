"""The grader pool's worker program: `python -m rewards.grader_worker --fd N [--warmup module:function]`.

`rewards.pool.HardTimeoutPool` starts each worker as a program of its own (a plain subprocess, never a fork or
a multiprocessing spawn of the caller), so the caller's `__main__` is never imported again: graders work the
same from a guarded script, an unguarded one, `python -c`, `python - <<EOF` and notebooks. Functions arrive
pickled with cloudpickle, which ships functions defined in `__main__` by value and imports the others by
name, with the caller's `sys.path` (sent with every chunk) in front of the worker's own.

Protocol on the inherited socket `fd` (multiprocessing.connection framing):
  worker -> pool  ("ready", pid) once warmed up; then (idx, status, value, error, seconds) per item, in order
  pool -> worker  pickle bytes of (sys_path, fn_bytes, indices, args_bytes) per chunk, where fn_bytes and
                  args_bytes are cloudpickle bytes of the function and of [args, ...]; b"" asks it to exit
stdin is /dev/null and stdout/stderr go to a pipe the pool reads (its tail goes into error messages). A
failing warm-up exits with status 3 and a traceback on stderr. The worker also exits when the pool closes the
socket or when its parent process is gone (a watchdog thread), so a killed trainer leaves no workers behind.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

OK, ERROR = "ok", "error"
WARMUP_FAILED_EXIT = 3


def _watch_parent(parent_pid: int, every_s: float = 0.5) -> None:
    """Exit as soon as the process that started us is gone (we would be an orphan holding CPU)."""
    def loop() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent_pid:
                os._exit(0)
    threading.Thread(target=loop, name="r1lab-grader-parent-watch", daemon=True).start()


def _use_sys_path(caller_path: list[str]) -> None:
    """The caller's sys.path first (its plugins import as they do there), then the worker's own entries."""
    if sys.path[:len(caller_path)] != caller_path:
        own = [p for p in sys.path if p not in caller_path]
        sys.path[:] = list(caller_path) + own


def _run_items(conn: Connection, fn: Callable, items: list) -> None:
    for idx, args in items:
        t0 = time.perf_counter()
        try:
            value, status, err = fn(*args), OK, None
        except BaseException as e:  # a plugin's failure is data, not a crash of the worker
            value, status = None, ERROR
            err = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_tb(e.__traceback__)[-3:])
        try:
            conn.send((idx, status, value, err, time.perf_counter() - t0))
        except Exception as e:  # unpicklable return value
            conn.send((idx, ERROR, None, f"result not picklable: {type(e).__name__}: {e}", time.perf_counter() - t0))


def serve(conn: Connection) -> None:
    """Answer chunks until the pool says stop (b"") or closes the socket."""
    import cloudpickle

    fns: dict[bytes, Callable] = {}
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not msg:
            return
        caller_path, fn_bytes, indices, args_bytes = pickle.loads(msg)
        _use_sys_path(caller_path)
        try:
            fn = fns.get(fn_bytes)
            if fn is None:
                fn = fns[fn_bytes] = cloudpickle.loads(fn_bytes)
            args_list = cloudpickle.loads(args_bytes)
        except BaseException as e:  # e.g. the plugin's module cannot be imported here: every item says so
            err = f"cannot load the function or its arguments in the grader worker: {type(e).__name__}: {e}"
            for idx in indices:
                conn.send((idx, ERROR, None, err, 0.0))
            continue
        _run_items(conn, fn, list(zip(indices, args_list)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="r1lab grader pool worker (started by rewards.pool)")
    ap.add_argument("--fd", type=int, required=True, help="inherited socket to the pool")
    ap.add_argument("--warmup", help="module:function to call once before reporting ready")
    args = ap.parse_args(argv)
    os.environ["R1LAB_IN_GRADER_WORKER"] = "1"  # graders called in here run unbounded: the pool is the bound
    os.set_inheritable(args.fd, False)  # a program a plugin starts must not keep our socket open
    conn = Connection(args.fd)
    _watch_parent(os.getppid())
    if args.warmup:
        module, _, attr = args.warmup.partition(":")
        try:
            getattr(importlib.import_module(module), attr)()
        except BaseException:
            traceback.print_exc()
            print(f"r1lab grader worker: warm-up {args.warmup!r} failed", file=sys.stderr, flush=True)
            return WARMUP_FAILED_EXIT
    conn.send(("ready", os.getpid()))
    serve(conn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
