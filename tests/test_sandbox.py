"""Adversarial sandbox suite: each case asserts containment and a prompt return."""
import os
import socket
import subprocess
import textwrap
import threading
import time

import pytest

from sandbox import Sandbox, capabilities
from sandbox.runner import RESIDENT_PROCS

pytestmark = pytest.mark.skipif(not capabilities().strong, reason=f"no bubblewrap: {capabilities().bwrap_error}")


@pytest.fixture(scope="module")
def sb():
    s = Sandbox(slots=1, memory_mb=512)
    yield s
    s.close()


def run(sb, code, **kw):
    t0 = time.monotonic()
    res = sb.run(textwrap.dedent(code), **kw)
    return res, time.monotonic() - t0


def slot_processes(uid: int) -> int:
    """Host processes running as a slot's uid (the slot itself: bwrap, the server, the zygote and the test
    harness, RESIDENT_PROCS in all)."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid_ = next(line for line in f if line.startswith("Uid:")).split()[1]
        except (OSError, StopIteration):
            continue
        n += int(uid_) == uid
    return n


def assert_healthy(sb):
    res = sb.run("print(6*7)")
    assert res.status == "ok" and res.stdout == "42\n", res
    if capabilities().is_root:
        uid = sb._slots[0].uid
        deadline = time.monotonic() + 3  # a killed slot's processes take a moment to be reaped
        while slot_processes(uid) != RESIDENT_PROCS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slot_processes(uid) == RESIDENT_PROCS, "something outlived its run"


def test_basic_run_and_files(sb):
    res, _ = run(sb, "import os; print(os.getcwd().startswith('/work/'), open('in.txt').read())",
                 files={"in.txt": "hello"})
    assert res.status == "ok" and res.stdout == "True hello\n" and res.returncode == 0
    res, _ = run(sb, "print(input()[::-1])", stdin="abc\n")
    assert res.stdout == "cba\n"
    res, _ = run(sb, "import sys; sys.exit(3)")
    assert res.status == "error" and res.returncode == 3


def test_fork_bomb(sb):
    res, wall = run(sb, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, timeout_s=2)
    assert res.status == "timeout" and wall < 8
    assert_healthy(sb)


def test_memory_bomb(sb):
    res, wall = run(sb, "x = bytearray(8 * 1024**3)", timeout_s=5)
    assert res.status == "memory" and wall < 3


def test_slowly_growing_memory(sb):
    res, wall = run(sb, """
        import time
        hoard = []
        while True:
            hoard.append(bytearray(32 * 1024**2))
            time.sleep(0.02)
        """, timeout_s=10, memory_mb=256)
    assert res.status == "memory" and wall < 5


def test_cpu_loop(sb):
    res, wall = run(sb, "while True: pass", timeout_s=1)
    assert res.status == "timeout" and 0.9 < wall < 4


def test_long_sleep(sb):
    res, wall = run(sb, "import time; time.sleep(3600)", timeout_s=1)
    assert res.status == "timeout" and wall < 4
    assert_healthy(sb)


def test_deep_recursion(sb):
    res, wall = run(sb, """
        import sys
        sys.setrecursionlimit(10**8)
        def f(n):
            return f(n + 1) + 1
        f(0)
        """, timeout_s=5)
    # CPython 3.11 keeps Python frames on the heap: this ends in a crash, a MemoryError or the timeout
    assert res.status in ("error", "memory", "timeout") and wall < 9
    assert_healthy(sb)


def test_output_flood(sb):
    res, wall = run(sb, "while True: print('x' * 10000)", timeout_s=10)
    assert res.status == "output_limit" and wall < 5
    assert len(res.stdout) <= sb.limits.max_output_bytes


def test_tcp_to_host_loopback_is_blocked(sb):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    got = []
    t = threading.Thread(target=lambda: got.append(_accept(server)))
    t.start()
    res, _ = run(sb, f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2)
            print("CONNECTED")
        except OSError as e:
            print("blocked", e)
        """, timeout_s=5)
    t.join()
    server.close()
    assert "blocked" in res.stdout and got == [None]


def _accept(server):
    try:
        conn, _ = server.accept()
        conn.close()
        return "connection"
    except OSError:
        return None


def test_host_paths_are_invisible_and_read_only(sb, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    res, _ = run(sb, f"""
        import os
        for p in ["{secret}", "/root/.bashrc", "/etc/shadow", "{os.getcwd()}/README.md", "/etc/passwd"]:
            try:
                print("READ:", p, open(p).read()[:20])
            except OSError as e:
                print("denied", p, type(e).__name__)
        for p in ["/usr/bin/evil", "/etc/evil", "{tmp_path}/evil", "/evil"]:
            try:
                open(p, "w").write("x")
                print("WROTE", p)
            except OSError as e:
                print("denied", p, type(e).__name__)
        """)
    assert res.status == "ok"
    assert "READ:" not in res.stdout and "WROTE" not in res.stdout and "TOP-SECRET" not in res.stdout
    assert not (tmp_path / "evil").exists() and not os.path.exists("/usr/bin/evil")


def test_host_environment_is_not_leaked(sb, monkeypatch):
    monkeypatch.setenv("R1LAB_TEST_SECRET", "hunter2")
    res, _ = run(sb, "import os; print(dict(os.environ))")
    assert res.status == "ok" and "hunter2" not in res.stdout and "R1LAB" not in res.stdout
    assert set(eval(res.stdout)) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONHASHSEED", "PWD", "LC_CTYPE"}


def test_cannot_signal_host_processes(sb):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        res, _ = run(sb, f"""
            import os, signal
            for target in ({victim.pid}, {os.getpid()}, 1):
                try:
                    os.kill(target, signal.SIGKILL)
                    print("sent", target)
                except OSError as e:
                    print("denied", target, type(e).__name__)
            print(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
            """)
        assert victim.poll() is None, "a host process was killed from inside the sandbox"
        assert res.status == "ok"
        pids = eval(res.stdout.strip().splitlines()[-1])
        # inside: the server (pid 1), the zygote, the harness and the program itself
        assert len(pids) <= RESIDENT_PROCS, f"more than the sandbox's own processes are visible: {pids}"
    finally:
        victim.kill()


def test_killing_everything_it_can_see(sb):
    # kill(-1) reaches every process of the sandbox, our supervisor included: the run fails, the host
    # side notices, restarts the slot and carries on.
    res, wall = run(sb, "import os, signal; os.kill(-1, signal.SIGKILL); import time; time.sleep(5)", timeout_s=3)
    assert res.status in ("sandbox_error", "timeout", "error") and wall < 15
    assert_healthy(sb)


def test_setsid_daemon_is_killed(sb):
    res, _ = run(sb, """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    with open("/tmp/daemon-was-here", "a") as f:
                        f.write("x")
                    time.sleep(0.05)
            os._exit(0)
        print("parent done")
        """)
    assert res.status == "ok"
    time.sleep(0.3)
    res, _ = run(sb, "import os; print(os.listdir('/tmp'), [p for p in os.listdir('/proc') if p.isdigit()])")
    listing = eval(res.stdout.split("]")[0] + "]")
    assert listing == [], "the daemon survived its run (or /tmp was not wiped)"
    assert_healthy(sb)


def test_rm_rf_home(sb, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("alive")
    res, _ = run(sb, f"import os; print(os.system('rm -rf ~ / {tmp_path} 2>/dev/null; echo done'))")
    assert canary.read_text() == "alive"
    assert os.path.exists(os.path.expanduser("~"))
    assert_healthy(sb)


def test_closing_the_result_channel(sb):
    res, _ = run(sb, "import os; print('partial'); os.close(1); os.close(2); print('lost')")
    assert res.stdout in ("", "partial\n") and res.status in ("ok", "error")
    res, _ = run(sb, "import os, sys; r, w = os.pipe(); os.dup2(w, 1); print('redirected'); sys.exit(0)")
    assert "redirected" not in res.stdout
    assert_healthy(sb)


def test_supervisor_memory_is_protected(sb):
    res, _ = run(sb, """
        import os
        me = os.getpid()
        for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != me]:
            try:
                open(f"/proc/{pid}/mem", "rb").read(1)
                print("OPENED", pid)
            except OSError as e:
                print("denied", pid, type(e).__name__)
        """)
    assert "OPENED" not in res.stdout


def test_runs_do_not_see_each_other(sb):
    run(sb, "open('/tmp/left-behind', 'w').write('x'); open('mine.txt', 'w').write('x')")
    res, _ = run(sb, "import os; print(os.path.exists('/tmp/left-behind'), os.listdir('.'), os.listdir('/work'))")
    assert res.stdout.startswith("False [] ")


def test_bad_file_names_are_refused(sb):
    res = sb.run("print(1)", files={"../../escape.txt": "x"})
    assert res.status == "sandbox_error"


def test_parallel_runs_are_thread_safe():
    with Sandbox(slots=2) as s:
        progs = [{"code": f"print({i} * 2)"} for i in range(200)]
        out = s.run_many(progs, max_workers=8)
    assert [r.stdout for r in out] == [f"{2 * i}\n" for i in range(200)]
