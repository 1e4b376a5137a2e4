"""The trusted test harness: runs a problem's tests against a candidate it can reach only through proxies.

Process. One resident harness per sandbox slot, forked by the server at start-up (and again if a program
killed it), serves one run at a time: the server sends the run's spec (setup, tests, names to bind) with the
two channel descriptors attached; each run gets a fresh namespace. A resident process rather than a fork per
run halves the process work of a tests run; what it shares between runs is only trusted state (modules that
trusted test code imported or changed; the recursion limit and the decimal context are reset after each run,
and the server replaces the harness after a few hundred runs). Like the server and the zygote it ignores
every signal that can be ignored, so a program can only SIGKILL it (its run then scores 0, the server forks a
new harness) or SIGSTOP it (its run times out; the server continues the harness after every run).

Threat model. This process holds the tests (and, for HumanEval, the problem's prompt with its helper
functions); the candidate's code runs in another process (`code_spawn`, callee mode) that never saw them.
The names the tests use for the candidate (HumanEval's `candidate` and the entry point, MBPP's function
names) are bound here to `Proxy` objects: calling one sends the encoded arguments to the candidate and
returns its answer decoded into plain builtin values (`code_codec`). So every comparison, helper call
(`poly`, `math.isclose`, `check` itself) and assertion runs on this side, on objects the candidate did not
make, with builtins and modules the candidate cannot patch. The candidate cannot read this process's memory
(non-dumpable, other process) nor write to its result pipe (not among its descriptors).

Time. Each test has `per_test_s`: an interval timer stops trusted code that runs past it (never in the
middle of channel I/O, which would desynchronise the channel), and every call carries the test's remaining
budget, which the candidate enforces with its own timer. A reply later than the budget fails the test; no
reply within the budget plus GRACE_S means the candidate ignored its timer (or died): the channel is dropped,
the candidate is killed by the server's sweep, and the remaining tests fail. Exceptions raised by the
candidate come back as the builtin exception of the same name (an `Exception` subclass other than
StopIteration), else as `CandidateError`; timeouts and a lost candidate are BaseExceptions so that a test's
`except Exception` does not swallow them.

Report (one JSON line each, on the socket to the server): {"setup_ok": true} or {"setup_error": msg} once the
trusted setup ran (the server spawns the candidate only after it), then {"passed", "total", "outcomes",
"load_error"}.
"""
from __future__ import annotations

import builtins
import importlib
import json
import os
import signal
import sys
import time

import code_codec as codec

GRACE_S = 0.5
_MUTABLE = (list, dict, set, bytearray)


class TestTimeout(BaseException):
    """The test ran past its time budget."""


class CandidateGone(BaseException):
    """The candidate process died, closed its channel, broke the protocol or ignored its timer."""


class Channel:
    def __init__(self, fd_call: int, fd_reply: int) -> None:
        self.fd_call, self.fd_reply = fd_call, fd_reply
        self.replies = codec.FrameReader(fd_reply)
        os.set_blocking(fd_call, False)
        os.set_blocking(fd_reply, False)
        self.gone: str | None = None
        self.deadline = 0.0          # the current test's deadline
        self.in_io = False
        self.expired = False

    def lose(self, why: str) -> None:
        """No more calls: the remaining tests fail (the server kills the candidate after the run)."""
        self.gone = why

    def wait_ready(self, load_s: float) -> str | None:
        """The candidate's load report; its load error (or None). Raises CandidateGone."""
        self.in_io = True  # an alarm (sent by the candidate) waits until the read is over
        try:
            msg = json.loads(self.replies.read(time.monotonic() + load_s + GRACE_S))
        except (EOFError, TimeoutError, codec.ProtocolError, ValueError) as e:
            self.lose(f"the candidate did not load ({type(e).__name__}: {e})")
            raise CandidateGone(self.gone) from None
        finally:
            self.in_io = False
        if type(msg) is not dict or msg.get("ready") is not True:
            self.lose("the candidate broke the protocol while loading")
            raise CandidateGone(self.gone)
        err = msg.get("load_error")
        return str(err)[:300] if err is not None else None

    def call(self, name: str, args: tuple, kwargs: dict):
        if self.gone:
            raise CandidateGone(self.gone)
        budget = self.deadline - time.monotonic()
        if budget <= 0:
            raise TestTimeout()
        back = [i for i, a in enumerate(args) if type(a) in _MUTABLE]
        body = codec.dumps({"fn": name, "args": codec.encode(list(args)), "kwargs": codec.encode(dict(kwargs)),
                            "budget": budget, "back": back})
        self.in_io = True
        try:
            hard = self.deadline + GRACE_S
            codec.write_all(self.fd_call, codec.frame(body), hard)
            data = self.replies.read(hard)
        except (EOFError, TimeoutError, OSError, codec.ProtocolError) as e:
            self.lose(f"candidate lost during a call to {name}: {type(e).__name__}: {e}")
            raise CandidateGone(self.gone) from None
        finally:
            self.in_io = False
        if self.expired or time.monotonic() > self.deadline:
            raise TestTimeout()
        return self._answer(codec.loads(data), args, back)

    def _answer(self, reply, args: tuple, back: list[int]):
        if type(reply) is not dict:
            raise codec.ProtocolError("reply is not a JSON object")
        if reply.get("timeout") is True:
            raise TestTimeout()
        if "exc" in reply:
            exc = reply["exc"]
            name, msg = (exc[0], exc[1]) if type(exc) is list and len(exc) == 2 else ("?", "")
            raise codec.exception_from(name, msg)
        if "ok" not in reply:
            raise codec.ProtocolError("reply has neither 'ok', 'exc' nor 'timeout'")
        value = codec.decode(reply["ok"])
        mutated = reply.get("back") or {}
        if type(mutated) is not dict:
            raise codec.ProtocolError("malformed 'back' in a reply")
        for key, enc in mutated.items():
            i = int(key) if key.isdigit() else -1
            if i not in back:
                raise codec.ProtocolError(f"copy-back for argument {key!r} that was not asked for")
            _copy_back(args[i], codec.decode(enc))
        return value


def _copy_back(orig, new) -> None:
    """Mirror the candidate's in-place changes of a mutable argument."""
    if type(new) is not type(orig):
        raise codec.ProtocolError(f"argument changed type from {type(orig).__name__} to {type(new).__name__}")
    if type(orig) in (list, bytearray):
        orig[:] = new
    else:
        orig.clear()
        orig.update(new)


class Proxy:
    """Stands for one of the candidate's functions; calling it returns plain data."""
    __slots__ = ("_chan", "_name")

    def __init__(self, chan: Channel, name: str) -> None:
        self._chan, self._name = chan, name

    def __call__(self, *args, **kwargs):
        return self._chan.call(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<candidate function {self._name}>"


def _emit(sock, obj: dict) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def _outcome(e: BaseException | None) -> str:
    if e is None:
        return "pass"
    if isinstance(e, TestTimeout):
        return "timeout"
    if isinstance(e, CandidateGone):
        return f"candidate gone: {str(e)[:200]}"
    try:
        return f"fail: {type(e).__name__}: {str(e)[:200]}"
    except BaseException:
        return f"fail: {type(e).__name__}"


def _prepare(spec: dict, chan: Channel) -> tuple[dict, list]:
    """Run the trusted setup, import modules, bind proxies, compile the tests. Raises on a broken setup."""
    ns = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(spec["setup"], "setup.py", "exec"), ns)
    for mod in spec.get("modules", []):
        ns[mod] = importlib.import_module(mod)
    for trusted_name, cand_name in spec["bind"].items():
        ns[trusted_name] = Proxy(chan, cand_name)
    tests = [compile(t, f"test_{i}.py", "exec") for i, t in enumerate(spec["tests"])]
    return ns, tests


def harness_loop(sock) -> None:
    """The resident harness: one run per message from the server until it closes the socket. Never returns."""
    recursion_limit = sys.getrecursionlimit()
    while True:
        try:
            spec, fds = codec.recv_with_fds(sock)
        except BaseException:
            os._exit(0)  # the server is gone
        try:
            run_spec(spec, fds[0], fds[1], sock)
        except BaseException:
            os._exit(1)  # the server notices the missing report, fails the run and forks a new harness
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        sys.setrecursionlimit(recursion_limit)
        if "decimal" in sys.modules:
            sys.modules["decimal"].setcontext(sys.modules["decimal"].Context())


def _run_tests(chan: Channel, ns: dict, tests: list, per_test_s: float) -> list[str]:
    outcomes = []
    for code in tests:
        chan.deadline, chan.expired = time.monotonic() + per_test_s, False
        err = None
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, per_test_s)
                if chan.gone:
                    raise CandidateGone(chan.gone)
                exec(code, ns)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as e:
            err = e
        outcomes.append(_outcome(err))
    return outcomes


def run_spec(spec: dict, fd_call: int, fd_reply: int, sock) -> None:
    """One run: trusted setup, wait for the candidate, the tests; reports on `sock`."""
    chan = Channel(fd_call, fd_reply)
    try:
        ns, tests = _prepare(spec, chan)
    except BaseException as e:
        _emit(sock, {"setup_error": f"{type(e).__name__}: {str(e)[:300]}"})
        return
    _emit(sock, {"setup_ok": True})
    per_test_s = float(spec["per_test_s"])

    def on_alarm(*_a) -> None:
        if chan.in_io:
            chan.expired = True  # raised once the channel I/O is complete
        else:
            raise TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    load_error = None
    try:
        load_error = chan.wait_ready(per_test_s)
    except CandidateGone:
        pass
    outcomes = _run_tests(chan, ns, tests, per_test_s)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    _emit(sock, {"passed": outcomes.count("pass"), "total": len(outcomes), "outcomes": outcomes,
                 "load_error": load_error})
