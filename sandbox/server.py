"""Fork server that runs *inside* one bubblewrap sandbox (stdlib only; started as `python3 -I -S server.py`).

The host sends one JSON request per line on our stdin and reads one JSON result per line on our stdout.
Per request we fork a child that gets a fresh private working directory, rlimits, a clean environment and
its own stdin/stdout/stderr pipes, and runs the code in this already-warm interpreter (no exec: that is
what makes ~hundreds of runs/s possible). After each run every other process in this sandbox's pid namespace
is killed (so `setsid()` daemons die too) and the run's directory, /tmp and /dev/shm are wiped.
This process makes itself non-dumpable so code running as the same uid cannot ptrace it or read its memory.
"""
import builtins
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import sys
import time

PR_SET_DUMPABLE = 4
WIPE_DIRS = ("/tmp", "/dev/shm")


WEAK = "--weak" in sys.argv  # no pid namespace: only the program's own process group can be swept


def _sweep(pgid: int) -> None:
    """SIGKILL every process of this pid namespace except bwrap's init (pid 1) and us."""
    if WEAK:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _reap()
        return
    me = os.getpid()
    for _ in range(50):
        others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me)]
        if not others:
            return
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _reap()
        time.sleep(0.001)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


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


def _child(req: dict, workdir: str, fds: tuple[int, int, int]) -> None:
    """Runs in the forked child; never returns."""
    try:
        os.setsid()
        os.chdir(workdir)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        os.closerange(3, 65536)
        mem = int(req["memory_mb"]) * 1024 * 1024
        cpu = int(req["timeout_s"]) + 1
        for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, int(req["fsize_mb"]) * 1024 * 1024),
                         (resource.RLIMIT_NOFILE, int(req["nofile"])), (resource.RLIMIT_NPROC, int(req["nproc"])),
                         (resource.RLIMIT_CORE, 0)):
            if val > 0 or res == resource.RLIMIT_CORE:  # nproc 0: not enforceable here (not root)
                resource.setrlimit(res, (val, val))
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                           "PYTHONHASHSEED": "0"})
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        sys.argv = ["main.py"]
        sys.path[:] = [workdir] + [p for p in sys.path if p.startswith("/usr")]
        for m in [m for m in sys.modules if m == "__main__"]:
            del sys.modules[m]
        code = compile(req["code"], "main.py", "exec")
    except BaseException as e:  # setup failure: report it as a sandbox problem
        os.write(2, f"sandbox setup failed: {type(e).__name__}: {e}\n".encode())
        os._exit(125)
    status = 0
    try:
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


def run_one(req: dict, n: int) -> dict:
    workdir = os.path.join(os.getcwd() if WEAK else "/work", f"run{n}")
    os.mkdir(workdir, 0o700)
    for name, content in (req.get("files") or {}).items():
        path = os.path.normpath(os.path.join(workdir, name))
        if not path.startswith(workdir + "/"):
            return {"status": "sandbox_error", "returncode": None, "stdout": "", "stderr": f"bad file name {name!r}",
                    "wall_s": 0.0}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        _child(req, workdir, (in_r, out_w, err_w))
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    result = _supervise(req, pid, t0, in_w, out_r, err_r)
    _sweep(pid)
    shutil.rmtree(workdir, ignore_errors=True)
    if not WEAK:
        for d in WIPE_DIRS:
            _wipe(d)
    return result


def _supervise(req: dict, pid: int, t0: float, in_w: int, out_r: int, err_r: int) -> dict:
    """Feed stdin, collect capped output, enforce the deadline. Returns when the program has exited (output
    still held open by its leftover children is not waited for: the sweep kills them)."""
    limit = int(req["max_output"])
    deadline = t0 + float(req["timeout_s"])
    stdin_data = req.get("stdin", "").encode()
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = {out_r, err_r}
    pidfd = os.pidfd_open(pid)
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
    _, wstatus = os.waitpid(pid, 0)
    os.close(pidfd)
    if in_w >= 0:
        os.close(in_w)
    for fd in (out_r, err_r):
        os.close(fd)
    rc = os.waitstatus_to_exitcode(wstatus)
    stdout = bytes(bufs[out_r][:limit]).decode("utf-8", "replace")
    stderr = bytes(bufs[err_r][:limit]).decode("utf-8", "replace")
    if status is None:
        if rc == 0:
            status = "ok"
        elif "MemoryError" in stderr[-2000:]:
            status = "memory"
        elif rc == -signal.SIGXCPU:
            status = "timeout"
        elif rc == 125 and stderr.startswith("sandbox setup failed"):
            status = "sandbox_error"
        else:
            status = "error"
    return {"status": status, "returncode": rc, "stdout": stdout, "stderr": stderr,
            "wall_s": time.monotonic() - t0}


def main() -> None:
    ctl_in = os.fdopen(os.dup(0), "rb")
    ctl_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.set_inheritable(ctl_in.fileno(), False)
    os.set_inheritable(ctl_out.fileno(), False)
    try:
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except Exception:
        pass
    ctl_out.write(b'{"ready": true}\n')
    ctl_out.flush()
    n = 0
    for line in ctl_in:
        n += 1
        try:
            res = run_one(json.loads(line), n)
        except Exception as e:
            res = {"status": "sandbox_error", "returncode": None, "stdout": "",
                   "stderr": f"server: {type(e).__name__}: {e}", "wall_s": 0.0}
        ctl_out.write(json.dumps(res).encode() + b"\n")
        ctl_out.flush()


if __name__ == "__main__":
    main()
