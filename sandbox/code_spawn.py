"""The untrusted side of a sandbox slot: the clean zygote, and the processes that run model-written code.

Threat model. Everything model-written runs in a process forked from the *zygote*, a process the server forks
at start-up before it reads any request. The zygote forks each program process *before* any request data
exists in it: the fork happens on a bare 'F' byte, and the child itself then reads its request (its code and
limits, with its descriptors attached) from the request socket. So a program's address space holds the
interpreter, the pre-imported stdlib modules, this module and the codec, and its own request: no tests, no
expected values, no result nonce, no other run's code (the zygote's memory never held any).

    server --'F'--> zygote (sock A)        the zygote forks the program process, answers 'P' + pid, waits for
    server --request + fds--> child (B)    it and answers 'X' + wait status; it reads nothing else
    child: setup ('S' on its status pipe), then the program (plain) or the candidate's call loop (callee)

The server, the zygote and the harness are non-dumpable (PR_SET_DUMPABLE 0, inherited across fork), so a
program running as the same uid can neither ptrace them nor open their /proc/<pid>/mem, environ or fd/*.
What a program *can* do to them is send signals, and they ignore every signal that can be ignored; it can
stop the zygote (the server continues it after the run) or SIGKILL it (the slot is restarted, and the run
scores 0); see server.py for the harness and the server itself.
The program's orphans are reparented to the server (a child subreaper), which sweeps and reaps them.

Two kinds of program process:
  plain   stdin/stdout/stderr are pipes from the server; the program runs as `__main__` (sandbox.run)
  callee  stdin/stdout/stderr are /dev/null; the candidate's code is loaded once, then it serves calls from
          the trusted harness over two pipes (`code_codec` messages): {"fn", "args", "kwargs", "budget",
          "back"} in, {"ok": value, "back": {...}} / {"exc": [type, message]} / {"timeout": true} out.
          Each call runs under its own interval timer (the harness's remaining budget for the test); the
          harness keeps its own hard deadline in case the program disables the timer.
Setup (rlimits, session, environment) is done by our code in the program process; it reports success on a
status pipe ('S') before the first byte of program code runs, so a setup failure can never be faked by, or
blamed on, the program.
"""
from __future__ import annotations

import builtins
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import sys

import code_codec as codec

MSG = struct.Struct("!ci")   # zygote -> server: b"P" + pid, b"X" + wait status
# signals a program could send to the server or its helpers: ignored there, so that only SIGKILL (noticed
# before the next run uses the helper) and SIGSTOP (undone after each run) remain
_UNCAUGHT = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH}
HELPER_IGNORED = tuple(sig for sig in signal.valid_signals() if sig not in _UNCAUGHT)  # real-time ones too


def ignore_signals() -> None:
    """For the server, the zygote and the harness (which sets its own SIGALRM handler during a run)."""
    for sig in HELPER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)


def _default_signals() -> None:
    """What a program process starts with: the defaults of a fresh interpreter."""
    for sig in HELPER_IGNORED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


# ---- zygote ----------------------------------------------------------------------------------------------


def zygote_main(sock_a: socket.socket, sock_b: socket.socket) -> None:
    """Per 'F' byte from the server: fork a program process, report its pid, wait, report its status."""
    try:
        while True:
            if sock_a.recv(1) != b"F":
                break  # the server is gone (EOF) or confused: stop
            pid = os.fork()
            if pid == 0:
                sock_a.close()
                _program_process(sock_b)
            sock_a.sendall(MSG.pack(b"P", pid))
            _, status = os.waitpid(pid, 0)
            sock_a.sendall(MSG.pack(b"X", status))
    except BaseException:
        pass
    os._exit(0)


# ---- the program process ---------------------------------------------------------------------------------


def _place_fds(fds: list[int]) -> None:
    """Put fds[i] at descriptor i and close every other descriptor."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]
    for i, fd in enumerate(high):
        os.dup2(fd, i)
    os.closerange(len(fds), 65536)


def _limit(req: dict) -> None:
    mem = int(req["memory_mb"]) * 1024 * 1024
    cpu = int(req["timeout_s"]) + 1
    for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, int(req["fsize_mb"]) * 1024 * 1024),
                     (resource.RLIMIT_NOFILE, int(req["nofile"])), (resource.RLIMIT_NPROC, int(req["nproc"])),
                     (resource.RLIMIT_CORE, 0)):
        if val > 0 or res == resource.RLIMIT_CORE:  # nproc 0: not enforceable here (not root)
            resource.setrlimit(res, (val, val))


def _setup(req: dict) -> None:
    """Our part of the program process: session, rlimits, environment, interpreter state."""
    os.setsid()
    os.chdir(req["workdir"])
    _limit(req)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": req["workdir"], "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                       "PYTHONHASHSEED": "0"})
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = ["main.py"]
    sys.path[:] = [req["workdir"]] + [p for p in sys.path if p.startswith("/usr")]
    sys.modules.pop("__main__", None)
    _default_signals()


def _program_process(sock_b: socket.socket) -> None:
    """Runs in the forked program process; never returns. The last of the request's fds is the status pipe."""
    try:
        req, fds = codec.recv_with_fds(sock_b)
    except BaseException:
        os._exit(124)  # no status pipe to report on: the server times out waiting for 'S' (infrastructure)
    status_fd = fds[-1]
    try:
        if req["kind"] == "callee":  # stdio to /dev/null, channel at 3 (calls in) and 4 (replies out)
            null = os.open("/dev/null", os.O_RDWR)
            fds = [null, null, null] + fds
        _place_fds(fds)
        status_fd = len(fds) - 1
        _setup(req)
    except BaseException as e:
        try:
            os.write(status_fd, f"Esandbox setup failed: {type(e).__name__}: {e}".encode()[:1000])
        except BaseException:
            pass
        os._exit(125)
    os.write(status_fd, b"S")
    os.close(status_fd)
    if req["kind"] == "callee":
        _serve_calls(req, 3, 4)
    _run_main(req["code"])


def _run_main(code_text: str) -> None:
    """`python main.py` semantics in this process; never returns."""
    status = 0
    try:
        code = compile(code_text, "main.py", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": builtins, "__file__": "main.py"})
    except SystemExit as e:
        if e.code is None:
            status = 0
        elif isinstance(e.code, int):
            status = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:
        import traceback
        try:  # drop our own frame: the traceback starts in the program
            traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        except BaseException:
            pass
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(status)


# ---- the callee: serve calls from the trusted harness ----------------------------------------------------


class _CallTimeout(BaseException):
    pass


def _alarm(*_a) -> None:
    raise _CallTimeout()


def _send(fd: int, msg: dict) -> None:
    try:
        body = codec.dumps(msg)
        if len(body) > codec.MAX_MSG:
            body = codec.dumps({"exc": ["OverflowError", f"result of {len(body)} bytes is too large to return"]})
        codec.write_all(fd, codec.frame(body))
    except BaseException:
        os._exit(3)  # the harness is gone or the channel is broken: nothing left to do


def _call(ns: dict, msg: dict) -> dict:
    name = msg["fn"]
    fn = ns.get(name) if isinstance(name, str) else None
    if fn is None:
        return {"exc": ["NameError", f"name {name!r} is not defined by the solution"]}
    args = codec.decode(msg["args"])
    kwargs = codec.decode(msg["kwargs"])
    try:
        result = fn(*args, **kwargs)
        back = {str(i): codec.encode(args[i]) for i in msg["back"]}
        return {"ok": codec.encode(result), "back": back}
    except _CallTimeout:
        raise
    except BaseException as e:
        return {"exc": list(codec.describe_exception(e))}


def _serve_calls(req: dict, fd_in: int, fd_out: int) -> None:
    """Load the candidate's code, then answer calls until the harness closes the channel. Never returns."""
    signal.signal(signal.SIGALRM, _alarm)
    ns = {"__name__": "__main__", "__builtins__": builtins, "__file__": "main.py"}
    load_error = None
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, float(req["load_s"]))
            exec(compile(req["code"], "main.py", "exec"), ns)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _CallTimeout:
        load_error = "TimeoutError: loading the program took too long"
    except BaseException as e:  # like the legacy harness: what got defined before the error stays usable
        load_error = ": ".join(codec.describe_exception(e))
    _send(fd_out, {"ready": True, "load_error": load_error})
    calls = codec.FrameReader(fd_in, limit=1 << 30)
    while True:
        try:
            msg = json.loads(calls.read())
        except BaseException:
            os._exit(0)  # the harness closed the channel (or broke it): done
        reply = None
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, max(float(msg["budget"]), 0.001))
                reply = _call(ns, msg)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _CallTimeout:
            reply = {"timeout": True}
        except BaseException as e:  # an error of ours (malformed message) or one escaping the program
            reply = {"exc": list(codec.describe_exception(e))}
        _send(fd_out, reply)
