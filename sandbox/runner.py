"""Host side of the code sandbox: slots of warm, isolated fork servers, and `run()`.

Isolation, in layers (see README "Sandbox"):
  1. bubblewrap: new user, pid, net, ipc, uts (and cgroup) namespaces; /usr and a few /etc files read-only;
     size-capped tmpfs for the working directory, /tmp and /dev/shm; nothing else of the host is visible;
     all capabilities dropped; environment built from scratch. The server is the namespace's pid 1
     (`--as-pid-1`): no dumpable bwrap init a program could ptrace, and signals from inside cannot kill it.
  2. an unprivileged host uid per slot when we are root (as root RLIMIT_NPROC is not enforced, and a uid per
     slot keeps one slot's fork bomb from starving another);
  3. rlimits per program (address space, CPU seconds, processes, file size, open files, no core dumps);
  4. wall-clock timeout and output caps enforced by the in-sandbox supervisor, and a host-side deadline that
     kills the whole sandbox (its pid namespace falls, so `setsid()` daemons die with it).
Each slot is one long-lived sandbox running `sandbox/server.py`; programs are forked from a warm, clean
interpreter inside it (the slot's zygote, see sandbox/code_spawn.py), which is how a run costs milliseconds
instead of a cold bwrap + Python start.

Two kinds of run: `run()` (a program with stdin, its stdout/stderr and exit status back: `ExecResult`) and
`run_tests()` (a candidate program called by a trusted test harness in another process of the same slot,
which never lets the candidate reach the tests: `TestsResult`, see sandbox/code_harness.py). Both results
carry `infra_error`, set only when the run failed for a reason the program did not cause (a slot that could
not start, a setup failure before any program code ran, a broken test setup).

Without bubblewrap there is only a weak mode (rlimits, own session, clean env, scratch dir; no namespaces),
used only when explicitly asked for (`allow_weak=True` or R1LAB_SANDBOX_ALLOW_WEAK=1), with a loud warning.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sandbox.caps import SandboxUnavailable, capabilities

log = logging.getLogger(__name__)
STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "sandbox_error")
BASE_UID = 61000          # slots run as host uids from BASE_UID up (when we are root), one uid per slot
UIDS_PER_PROCESS = 32     # each process takes its own block of uids, so sandboxes never share a uid
RESIDENT_PROCS = 4        # a slot's processes between runs: bwrap, the server (pid 1 inside), zygote, harness
SLOT_PROCS = RESIDENT_PROCS  # they count against the slot uid's RLIMIT_NPROC besides the program's own
# what runs inside the sandbox: the server and the modules it imports (stdlib only), bound read-only at /r1lab
SERVER_FILES = ("server.py", "code_spawn.py", "code_harness.py", "code_codec.py")
SERVER_SRC = Path(__file__).with_name("server.py")


@dataclass
class ExecResult:
    status: str            # one of STATUSES
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    infra_error: str | None = None  # the sandbox failed for a reason the program did not cause (see module doc)


@dataclass
class TestsResult:
    """A `run_tests` run. status: "ok" (the harness ran every test), "timeout" (the run as a whole ran past its
    deadline), "broken" (the harness or the server died under the program: it scores nothing), or
    "sandbox_error" (then infra_error says why, or the program killed its supervisor)."""
    status: str
    passed: int
    total: int
    outcomes: list[str]          # per test: "pass", "timeout", "fail: <exception>", "candidate gone: <why>"
    load_error: str | None       # the candidate's program raised while loading (what it defined stays usable)
    wall_s: float
    infra_error: str | None = None


@dataclass(frozen=True)
class Limits:
    max_output_bytes: int = 1 << 20     # per stream
    max_procs: int = 32                 # processes/threads the program may have
    max_file_mb: int = 64               # largest file it may write
    max_open_files: int = 128
    tmpfs_mb: int = 256                 # size of /work, /tmp and /dev/shm each


def _root_entries() -> list[str]:
    """bwrap args for /bin, /lib, /lib64, /sbin: symlinks on merged-/usr systems, read-only binds otherwise."""
    args: list[str] = []
    for name in ("bin", "lib", "lib64", "sbin", "lib32"):
        p = Path("/") / name
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            args += ["--ro-bind", str(p), str(p)]
    return args


def bwrap_argv(bwrap: str, python: str, server: str, limits: Limits) -> list[str]:
    size = str(limits.tmpfs_mb * 1024 * 1024)
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL",
            "--hostname", "sandbox", "--ro-bind", "/usr", "/usr", *_root_entries()]
    for etc in ("/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf"):
        argv += ["--ro-bind-try", etc, etc]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm",
             "--size", size, "--tmpfs", "/work", "--ro-bind", os.path.dirname(server), "/r1lab",
             "--chdir", "/work", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work",
             "--setenv", "LANG", "C.UTF-8", "--remount-ro", "/", "--", python, "-I", "-S", "/r1lab/server.py"]
    return argv


class _Launcher:
    """Spawns every sandbox from one long-lived thread: bwrap's --die-with-parent is tied to the *thread* that
    spawned it, so a sandbox started from a short-lived worker thread would die with that thread."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="r1lab-sandbox-launcher", daemon=True).start()

    def _loop(self) -> None:
        while True:
            argv, kwargs, fut = self._q.get()
            try:
                fut.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as e:
                fut.set_exception(e)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        fut: Future = Future()
        self._q.put((argv, kwargs, fut))
        return fut.result(timeout=60)


_uid_lock = threading.Lock()
_uids_used = 0


def _allocate_uid() -> int:
    """A host uid no other slot (of this or, barring pid-range collisions, another process) uses."""
    global _uids_used
    with _uid_lock:
        uid = BASE_UID + (os.getpid() % 1000) * UIDS_PER_PROCESS + _uids_used % UIDS_PER_PROCESS
        _uids_used += 1
        return uid


class _Slot:
    def __init__(self, index: int, sb: Sandbox) -> None:
        self.index, self.sb = index, sb
        self.uid = _allocate_uid() if sb.caps.is_root else None
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    def start(self) -> None:
        if self.sb.weak:
            argv = [self.sb.python, "-I", "-S", self.sb.server_path, "--weak"]
        else:
            argv = bwrap_argv(self.sb.caps.bwrap, self.sb.python, self.sb.server_path, self.sb.limits)
        kw: dict = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                        start_new_session=True, close_fds=True, env={"PATH": "/usr/bin:/bin"})
        if self.uid is not None:
            kw.update(user=self.uid, group=self.uid, extra_groups=[])
        if self.sb.weak:
            kw["cwd"] = self.sb.weak_dir(self)
        self.proc = self.sb.launcher.popen(argv, **kw)
        self.buf = b""
        hello = self._read_line(30.0)
        if hello is None or not json.loads(hello).get("ready"):
            self.kill()
            raise SandboxUnavailable(f"sandbox slot {self.index} did not start (argv: {' '.join(argv[:6])} ...)")

    def _read_line(self, timeout: float) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return None
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def request(self, req: dict, timeout: float) -> dict | None:
        """The server's reply, or None when it died or stopped answering while the program ran (the program's
        doing). Raises SandboxUnavailable when the slot cannot be (re)started."""
        data = json.dumps(req).encode() + b"\n"
        for attempt in range(2):
            if not self._send(data):  # it died before this request reached it: not the program's doing
                if attempt:
                    raise SandboxUnavailable(f"sandbox slot {self.index} died twice before taking a request")
                continue
            line = self._read_line(timeout)
            if line is None:
                self.kill()
                return None
            reply = json.loads(line)
            if reply.get("restart"):  # a program killed the slot's zygote: the next run gets a fresh slot
                self.kill()
            if not (reply.get("retry") and not attempt):  # retry: it failed before any of the program ran
                return reply
        return reply

    def _send(self, data: bytes) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            self.kill()
            return False

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # bwrap's session; the pid namespace falls with it
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        self.proc = None


def default_slots(memory_mb: int) -> int:
    """Concurrency bounded by cores and by memory (each program may use memory_mb)."""
    cores = os.cpu_count() or 1
    try:
        avail_mb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (ValueError, OSError):
        avail_mb = 4096
    return max(1, min(2 * cores, avail_mb // max(1, 2 * memory_mb)))


class Sandbox:
    """A pool of sandbox slots. `run()` is thread-safe; at most `slots` programs run at once."""

    def __init__(self, slots: int | None = None, *, memory_mb: int = 1024, allow_weak: bool | None = None,
                 limits: Limits | None = None) -> None:
        self.caps = capabilities()
        if allow_weak is None:
            allow_weak = os.environ.get("R1LAB_SANDBOX_ALLOW_WEAK") == "1"
        self.weak = not self.caps.strong
        if self.weak and not allow_weak:
            raise SandboxUnavailable(
                f"no isolated sandbox on this machine: {self.caps.bwrap_error or 'no world-readable python3'}. "
                "Install bubblewrap, or opt into the WEAK mode (no namespaces) with allow_weak=True or "
                "R1LAB_SANDBOX_ALLOW_WEAK=1.")
        if self.weak:
            msg = ("r1lab sandbox is running in WEAK mode: programs are NOT isolated from the host's files or "
                   "network (rlimits, timeouts and a scratch directory only). Never use it for untrusted code.")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
        self.python = self.caps.python or "/usr/bin/python3"
        self.limits = limits or Limits()
        self.memory_mb = memory_mb
        # the server's files must be readable by the unprivileged slot uid: copy them to a world-readable place
        self._dir = tempfile.mkdtemp(prefix="r1lab-sandbox-")
        os.chmod(self._dir, 0o755)
        code_dir = os.path.join(self._dir, "server")
        os.mkdir(code_dir, 0o755)
        for name in SERVER_FILES:
            shutil.copyfile(SERVER_SRC.with_name(name), os.path.join(code_dir, name))
            os.chmod(os.path.join(code_dir, name), 0o644)
        self.server_path = os.path.join(code_dir, "server.py")
        self.launcher = _Launcher()
        n = slots or default_slots(memory_mb)
        self._free: queue.Queue[_Slot] = queue.Queue()
        self._slots = [_Slot(i, self) for i in range(n)]
        for s in self._slots:
            self._free.put(s)
        self.num_slots = n
        self._closed = False

    def weak_dir(self, slot: _Slot) -> str:
        d = os.path.join(self._dir, f"weak{slot.index}")
        os.makedirs(d, mode=0o700, exist_ok=True)
        if slot.uid is not None:
            os.chown(d, slot.uid, slot.uid)
        return d

    def _limits_req(self, timeout_s: float, memory_mb: int | None) -> dict:
        if self._closed:
            raise RuntimeError("sandbox is closed")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        return {"timeout_s": timeout_s, "memory_mb": memory_mb or self.memory_mb,
                "max_output": self.limits.max_output_bytes,
                "nproc": self.limits.max_procs + SLOT_PROCS if self.caps.is_root else 0,
                "fsize_mb": self.limits.max_file_mb, "nofile": self.limits.max_open_files}

    def _request(self, req: dict, timeout_s: float) -> tuple[dict | None, str | None]:
        """(the server's reply or None if the program killed its supervisor, infra error of a slot start)."""
        slot = self._free.get()
        try:
            return slot.request(req, timeout=timeout_s + 10.0), None
        except SandboxUnavailable as e:
            return None, str(e)
        finally:
            self._free.put(slot)

    def run(self, code: str, *, stdin: str = "", timeout_s: float = 10.0, memory_mb: int | None = None,
            files: Mapping[str, str] | None = None) -> ExecResult:
        req = {"code": code, "stdin": stdin, "files": dict(files or {}), **self._limits_req(timeout_s, memory_mb)}
        t0 = time.monotonic()
        res, infra = self._request(req, timeout_s)
        if infra is not None:
            return ExecResult("sandbox_error", None, "", infra, time.monotonic() - t0, infra)
        if res is None:
            return ExecResult("sandbox_error", None, "", "sandbox supervisor died or stopped answering "
                              "(the program may have killed it); the slot was restarted", time.monotonic() - t0)
        return ExecResult(res["status"], res.get("returncode"), res.get("stdout", ""), res.get("stderr", ""),
                          float(res.get("wall_s", time.monotonic() - t0)),
                          (res.get("stderr") or "sandbox error") if res.get("infra") else None)

    def run_tests(self, code: str, *, tests: Sequence[str], bind: Mapping[str, str], setup: str = "",
                  modules: Sequence[str] = (), per_test_s: float = 5.0, timeout_s: float | None = None,
                  memory_mb: int | None = None) -> TestsResult:
        """Run `tests` (Python statements, each one test) in a trusted harness in which each name of `bind`
        calls the candidate program's function of the mapped name (in another process, returning plain data);
        `setup` (trusted code: imports, helper functions, HumanEval's check) runs first, `modules` are imported
        under their names. The candidate's code never shares a process with the tests."""
        tests = list(tests)
        if timeout_s is None:
            timeout_s = per_test_s * (len(tests) + 1) + 5.0
        harness = {"setup": setup, "tests": tests, "bind": dict(bind), "modules": list(modules),
                   "per_test_s": float(per_test_s)}
        req = {"kind": "tests", "code": code, "harness": harness, **self._limits_req(timeout_s, memory_mb)}
        t0 = time.monotonic()
        res, infra = self._request(req, timeout_s)
        if infra is not None or res is None:
            return TestsResult("sandbox_error", 0, len(tests), [], None, time.monotonic() - t0, infra)
        if res.get("infra"):
            return TestsResult("sandbox_error", 0, len(tests), [], None, float(res.get("wall_s", 0.0)),
                               res.get("stderr") or "sandbox error")
        return TestsResult(res["status"], int(res["passed"]), int(res["total"]), list(res["outcomes"]),
                           res.get("load_error"), float(res["wall_s"]))

    def run_many(self, programs: Sequence[Mapping], max_workers: int | None = None) -> list[ExecResult]:
        """Run many programs concurrently: each item holds `run`'s keyword arguments (`code`, `stdin`, ...)."""
        with ThreadPoolExecutor(max_workers or self.num_slots) as ex:
            return list(ex.map(lambda p: self.run(**p), programs))

    def run_jobs(self, jobs: Sequence[Mapping], max_workers: int | None = None) -> list[ExecResult | TestsResult]:
        """Run `run` jobs and `run_tests` jobs (those with a `tests` key) concurrently, results in order."""
        def one(job: Mapping):
            return self.run_tests(**job) if "tests" in job else self.run(**job)
        with ThreadPoolExecutor(max_workers or self.num_slots) as ex:
            return list(ex.map(one, jobs))

    def close(self) -> None:
        self._closed = True
        for s in self._slots:
            s.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DEFAULT: Sandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def default_sandbox() -> Sandbox:
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Sandbox()
        return _DEFAULT


def run(code: str, *, stdin: str = "", timeout_s: float = 10.0, memory_mb: int = 1024,
        files: Mapping[str, str] | None = None) -> ExecResult:
    """Run a Python program in the process-wide sandbox pool (created on first use). Thread-safe."""
    return default_sandbox().run(code, stdin=stdin, timeout_s=timeout_s, memory_mb=memory_mb, files=files)
