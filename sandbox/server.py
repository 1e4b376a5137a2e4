"""Fork server that runs *inside* one bubblewrap sandbox (stdlib only; started as `python3 -I -S server.py`).

The host sends one JSON request per line on our stdin and reads one JSON result per line on our stdout.
Requests are of two kinds:
  plain  (sandbox.run) a program with stdin, run as `__main__` with its own stdin/stdout/stderr pipes;
  tests  (code rewards) a candidate program and a test spec: the resident trusted harness (`code_harness`,
         which holds the tests) calls into the candidate process (`code_spawn` callee mode, which holds only
         the candidate's code) through two pipes, and reports the tests passed on a socket only we hold.

Processes of a slot (all the slot's uid; all of ours are non-dumpable, so none can be ptraced or read):
  server: the namespace's pid 1 (bwrap --as-pid-1: no dumpable init, and signals from inside cannot kill it)
    +- zygote: forked at start-up, before any request was read
    |    +- per run: the program process (it reads its own request)
    +- resident harness: forked at start-up (again after a program killed or stopped it)
Program code is never forked from this process: our memory holds requests (tests, other runs' programs); the
zygote's holds none (see code_spawn). Common stdlib modules are imported and the heap frozen (gc.freeze)
before the helpers are forked, so forks stay cheap. After each run the program (its process group) is killed,
the zygote (which reports the program's wait status) and the harness are continued in case the program
stopped them, then every other process of this sandbox's pid namespace but us and the two helpers is
killed (so `setsid()` daemons die too; orphans are reparented to us, a child subreaper, and reaped), and the
run's directory, /tmp and /dev/shm are wiped. A harness that died, hung or missed its report is replaced
after the run. If the zygote died or fell out of step, the reply carries "restart": true and we exit, so the
host starts a fresh slot. In weak mode (no pid namespace) the sweep can only kill the program's process group.

Replies carry "infra": true when the run failed for a reason the program did not cause (setup failed before
any program code ran, the zygote could not spawn it, a broken test setup): code rewards mark such items as
failed rather than wrong. Anything that happens once program code runs is the program's doing.
"""
import ctypes
import gc
import importlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves our directory off sys.path

import code_codec as codec  # noqa: E402
import code_harness  # noqa: E402
import code_spawn  # noqa: E402

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
WIPE_DIRS = ("/tmp", "/dev/shm")
SPAWN_TIMEOUT_S = 10.0
HARNESS_MEMORY_MB = 2048  # address-space cap of the resident harness (it decodes what candidates return)
HARNESS_MAX_RUNS = 500    # then it is replaced by a fresh fork, bounding whatever trusted state accumulates
# imported before the zygote is forked: what solutions and tests commonly use, so no run pays for the import
# (typing alone costs ~5 ms); heavier modules stay out, as every module makes each fork a little dearer
PRELOAD = ("typing", "math", "re", "string", "collections", "itertools", "functools", "heapq", "bisect",
           "operator", "copy", "random")
WEAK = "--weak" in sys.argv  # no pid namespace: only the program's own process group can be swept


class SpawnError(Exception):
    """The zygote could not start a program process (infrastructure, not the program)."""


class _Zygote:
    pid = 0
    sock_a: socket.socket
    sock_b: socket.socket
    dead = False


class _Harness:
    pid = 0
    sock: socket.socket
    dead = False
    runs = 0


Z = _Zygote()
H = _Harness()


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


def start_zygote(keep_closed: list[int]) -> None:
    a_srv, a_zyg = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b_srv, b_zyg = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        for fd in keep_closed + [a_srv.fileno(), b_srv.fileno()]:
            os.close(fd)
        code_spawn.zygote_main(a_zyg, b_zyg)
    a_zyg.close()
    b_zyg.close()
    for s in (a_srv, b_srv):
        s.settimeout(SPAWN_TIMEOUT_S)
    Z.pid, Z.sock_a, Z.sock_b = pid, a_srv, b_srv


def start_harness() -> None:
    """Fork the resident trusted harness (code_harness.harness_loop); it keeps only its socket to us."""
    srv, hs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            null = os.open("/dev/null", os.O_RDWR)
            code_spawn._place_fds([null, null, null, hs.fileno()])  # closes the control channel and the rest
            mem = HARNESS_MEMORY_MB * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            code_harness.harness_loop(socket.socket(fileno=3))
        finally:
            os._exit(1)
    hs.close()
    srv.settimeout(SPAWN_TIMEOUT_S)
    H.pid, H.sock, H.dead, H.runs = pid, srv, False, 0


def _replace_harness() -> None:
    """A harness that died, hung, or fell out of step (a program can kill or stop it) is replaced."""
    try:
        os.kill(H.pid, signal.SIGKILL)
        os.waitpid(H.pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    H.sock.close()
    start_harness()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise SpawnError("the zygote is gone")
        buf += chunk
    return buf


def _from_zygote(tag: bytes) -> int:
    got, val = code_spawn.MSG.unpack(_recv_exact(Z.sock_a, code_spawn.MSG.size))
    if got != tag:
        raise SpawnError(f"zygote protocol out of step (expected {tag!r}, got {got!r})")
    return val


def spawn(req: dict, fds: list[int]) -> int:
    """Start a program process through the zygote; returns its pid."""
    try:
        Z.sock_a.sendall(b"F")
        codec.send_with_fds(Z.sock_b, req, fds)
        return _from_zygote(b"P")
    except (OSError, struct.error, SpawnError) as e:
        Z.dead = True  # the zygote cannot be trusted to be in step any more: restart the slot after this reply
        raise SpawnError(f"could not spawn the program: {type(e).__name__}: {e}") from None


def _collect(pid: int) -> int | None:
    """The program's wait status, from the zygote (its parent); None (and a slot restart) if it cannot say."""
    try:
        os.kill(Z.pid, signal.SIGCONT)  # the program may have stopped it
        return _from_zygote(b"X")
    except (OSError, struct.error, SpawnError):
        Z.dead = True
        return None


def _await_setup(st_r: int, deadline: float) -> str | None:
    """None once the program process reported a finished setup ('S'); else why it failed."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([st_r], [], [], left)[0]:
            Z.dead = True  # its request may still sit in the socket: start afresh
            return "sandbox setup failed: the program process did not finish its setup in time"
        chunk = os.read(st_r, 4096)
        if chunk[:1] == b"S" and not data:
            return None
        if not chunk:
            return data[1:].decode(errors="replace") or "sandbox setup failed: the program process died in setup"
        data += chunk


def _kill_tree(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _sweep() -> None:
    """SIGKILL every process of this pid namespace except us (pid 1), the zygote and the harness."""
    _reap()
    if WEAK:
        return
    me = os.getpid()
    for _ in range(50):
        others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me, Z.pid, H.pid)]
        if not others:
            return
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.001)
        _reap()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == Z.pid:
            Z.dead = True
        if pid == H.pid:
            H.dead = True


def _continue_helpers() -> None:
    for helper, state in ((Z.pid, Z), (H.pid, H)):
        try:
            os.kill(helper, signal.SIGCONT)  # a program may have stopped it
        except ProcessLookupError:
            state.dead = True


def _finish(workdir: str, pid: int | None, collected: bool = False) -> int | None:
    """End a run: kill the program, collect its wait status from the zygote (unless `collected`), sweep
    everything else, continue the zygote and the harness (again once nothing of the program is left, in case
    its leftovers stopped them), replace a harness that died, misbehaved or served HARNESS_MAX_RUNS runs, and
    wipe the run's files. Returns the wait status (None if unknown)."""
    if pid is not None:
        _kill_tree(pid)
    _continue_helpers()
    wstatus = _collect(pid) if pid is not None and not collected and not Z.dead else None
    _sweep()
    _continue_helpers()
    if H.dead or H.runs >= HARNESS_MAX_RUNS:
        _replace_harness()
    shutil.rmtree(workdir, ignore_errors=True)
    if not WEAK:
        for d in WIPE_DIRS:
            _wipe(d)
    return wstatus


def _wipe(path: str) -> None:
    for name in os.listdir(path):
        p = os.path.join(path, name)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass


def _make_workdir(req: dict, n: int) -> str:
    workdir = os.path.join(os.getcwd() if WEAK else "/work", f"run{n}")
    os.mkdir(workdir, 0o700)
    for name, content in (req.get("files") or {}).items():
        path = os.path.normpath(os.path.join(workdir, name))
        if not path.startswith(workdir + "/"):
            raise ValueError(f"bad file name {name!r}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
    return workdir


def _spawn_req(req: dict, kind: str, workdir: str, **extra) -> dict:
    keys = ("code", "timeout_s", "memory_mb", "fsize_mb", "nofile", "nproc")
    return {"kind": kind, "workdir": workdir, **{k: req[k] for k in keys}, **extra}


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _infra(msg: str, **extra) -> dict:
    return {"status": "sandbox_error", "returncode": None, "stdout": "", "stderr": msg, "wall_s": 0.0,
            "infra": True, **extra}


def run_plain(req: dict, workdir: str) -> dict:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    st_r, st_w = os.pipe()
    t0 = time.monotonic()
    pid = None
    try:
        pid = spawn(_spawn_req(req, "plain", workdir), [in_r, out_w, err_w, st_w])
    except SpawnError as e:
        _finish(workdir, None)
        return _infra(str(e), retry=True)
    finally:
        _close(in_r, out_w, err_w, st_w)
        if pid is None:
            _close(in_w, out_r, err_r, st_r)
    setup_error = _await_setup(st_r, t0 + SPAWN_TIMEOUT_S)
    _close(st_r)
    if setup_error:
        _close(in_w, out_r, err_r)
        _finish(workdir, pid)
        return _infra(setup_error)
    result = _supervise(req, pid, t0, in_w, out_r, err_r)
    _finish(workdir, pid, collected=True)
    return result


def _supervise(req: dict, pid: int, t0: float, in_w: int, out_r: int, err_r: int) -> dict:
    """Feed stdin, collect capped output, enforce the deadline. Returns when the program has exited (output
    still held open by its leftover children is not waited for: the sweep kills them)."""
    limit = int(req["max_output"])
    deadline = t0 + float(req["timeout_s"])
    stdin_data = req.get("stdin", "").encode()
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = {out_r, err_r}
    try:
        pidfd = os.pidfd_open(pid)  # readable once it exits (it is the zygote's child, not ours)
    except ProcessLookupError:  # it exited and was reaped already
        pidfd = os.open("/dev/null", os.O_RDONLY)  # always readable: "exited"
    status, wstatus, exited = None, None, False
    if stdin_data:
        os.set_blocking(in_w, False)
    else:
        os.close(in_w)
        in_w = -1
    while not exited or open_fds:
        now = time.monotonic()
        if now >= deadline:
            status = "timeout"
            break
        wfds = [in_w] if in_w >= 0 else []
        # once the program exited, only drain what is already buffered (zero wait)
        wait_s = 0 if exited else deadline - now
        r, w, _ = select.select(list(open_fds) + ([] if exited else [pidfd]), wfds, [], wait_s)
        if pidfd in r:
            exited = True
            r.remove(pidfd)
        if w:
            try:
                k = os.write(in_w, stdin_data[:65536])
                stdin_data = stdin_data[k:]
            except BlockingIOError:
                pass
            except BrokenPipeError:  # the program closed its stdin: the rest is not wanted
                stdin_data = b""
            if not stdin_data:
                os.close(in_w)
                in_w = -1
        if exited and not r:
            break
        for fd in r:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
                continue
            bufs[fd] += chunk
            if len(bufs[fd]) > limit:
                status = "output_limit"
        if status:
            break
    if status:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    wstatus = _collect(pid)
    os.close(pidfd)
    _close(*([in_w] if in_w >= 0 else []), out_r, err_r)
    rc = os.waitstatus_to_exitcode(wstatus) if wstatus is not None else None
    stdout = bytes(bufs[out_r][:limit]).decode("utf-8", "replace")
    stderr = bytes(bufs[err_r][:limit]).decode("utf-8", "replace")
    if status is None:
        if rc is None:  # the zygote was killed or stopped under it: the program's doing
            status = "error"
        elif rc == 0:
            status = "ok"
        elif "MemoryError" in stderr[-2000:]:
            status = "memory"
        elif rc == -signal.SIGXCPU:
            status = "timeout"
        else:
            status = "error"
    return {"status": status, "returncode": rc, "stdout": stdout, "stderr": stderr,
            "wall_s": time.monotonic() - t0}


class _Lines:
    """Reads JSON lines from the harness's result pipe with deadlines."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.eof = fd, b"", False

    def next(self, deadline: float) -> dict | None:
        while b"\n" not in self.buf and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 1 << 20)
            self.eof = not chunk
            self.buf += chunk
            if len(self.buf) > 4 << 20:
                return None
        if b"\n" not in self.buf:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            return None


def _start_harness_run(spec: dict, deadline: float) -> tuple[dict | None, tuple[int, int], _Lines]:
    """Hand the run to the harness and wait for its setup report. A harness found dead here (killed after
    an earlier run) is replaced and tried once more: nothing of this run's program has run yet. Returns
    (report or None, the candidate's ends of the channel, the report reader)."""
    for attempt in range(2):
        call_r, call_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            codec.send_with_fds(H.sock, spec, [call_w, rep_r])
            sent = True
        except OSError:
            sent = False
        finally:
            _close(call_w, rep_r)
        lines = _Lines(H.sock.fileno())
        first = lines.next(deadline) if sent else None
        if first is not None or (sent and not lines.eof) or attempt:
            return first, (call_r, rep_w), lines
        _close(call_r, rep_w)
        _replace_harness()
    raise AssertionError("unreachable")


def run_tests(req: dict, workdir: str) -> dict:
    """The candidate (callee) against the resident trusted harness; see the module docstring."""
    t0 = time.monotonic()
    H.runs += 1
    first, (call_r, rep_w), lines = _start_harness_run(req["harness"], t0 + SPAWN_TIMEOUT_S)
    if first is None or "setup_error" in first:
        H.dead = H.dead or first is None
        _close(call_r, rep_w)
        _finish(workdir, None)
        why = first["setup_error"] if first else "the harness did not finish the test setup"
        return _infra(f"test setup failed: {why}", setup_error=why)
    st_r, st_w = os.pipe()
    spawn_req = _spawn_req(req, "callee", workdir, load_s=float(req["harness"]["per_test_s"]))
    try:
        pid = spawn(spawn_req, [call_r, rep_w, st_w])
    except SpawnError as e:
        H.dead = True  # it is waiting for a candidate that will not come
        _close(st_r)
        _finish(workdir, None)
        return _infra(str(e), retry=True)
    finally:
        _close(call_r, rep_w, st_w)
    setup_error = _await_setup(st_r, t0 + SPAWN_TIMEOUT_S)
    _close(st_r)
    if setup_error:
        H.dead = True
        _finish(workdir, pid)
        return _infra(setup_error)
    final = lines.next(t0 + float(req["timeout_s"]))
    H.dead = H.dead or final is None  # hung, killed or stopped under this run: replaced after it
    _finish(workdir, pid)
    n = len(req["harness"]["tests"])
    out = {"status": "ok", "passed": 0, "total": n, "outcomes": [], "load_error": None,
           "wall_s": time.monotonic() - t0}
    if final is None:
        out["status"] = "timeout" if not lines.eof else "broken"
    elif Z.dead:  # the program killed (or wedged) its zygote: tampering with its supervision scores nothing
        out.update(status="broken", outcomes=["the program killed its zygote"])
    else:
        out.update({k: final[k] for k in ("passed", "total", "outcomes", "load_error")})
    return out


def run_one(req: dict, n: int) -> dict:
    try:
        workdir = _make_workdir(req, n)
    except ValueError as e:
        return _infra(str(e))
    if req.get("kind", "plain") == "tests":
        return run_tests(req, workdir)
    return run_plain(req, workdir)


def main() -> None:
    ctl_in = os.fdopen(os.dup(0), "rb")
    ctl_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.set_inheritable(ctl_in.fileno(), False)
    os.set_inheritable(ctl_out.fileno(), False)
    _prctl(PR_SET_DUMPABLE, 0)         # inherited by the zygote, the harness and every program process
    _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of program processes become our children, to reap
    code_spawn.ignore_signals()        # inherited by the zygote and the harness
    for mod in PRELOAD:
        importlib.import_module(mod)
    gc.collect()
    gc.freeze()  # forks do not copy pages when a collection walks these objects
    start_zygote([ctl_in.fileno(), ctl_out.fileno()])
    start_harness()
    ctl_out.write(b'{"ready": true}\n')
    ctl_out.flush()
    n = 0
    for line in ctl_in:
        n += 1
        try:
            res = run_one(json.loads(line), n)
        except Exception as e:
            res = _infra(f"server: {type(e).__name__}: {e}")
            Z.dead = True
        if Z.dead:
            res["restart"] = True
        ctl_out.write(json.dumps(res).encode() + b"\n")
        ctl_out.flush()
        if Z.dead:
            break


if __name__ == "__main__":
    main()
