"""The grader pool: hard timeouts, a worker killed mid-batch, workers that cannot start or keep dying, and the
worker's environment (no stdin, the project importable from anywhere, the caller's sys.path)."""
import os
import signal
import stat
import sys
import threading
import time

import pytest

import rewards.math as rmath
from rewards.math import FAILED, GradingFailed, grade_batch, verify
from rewards.pool import ERROR, OK, TIMEOUT, GraderUnavailable, HardTimeoutPool

BOMB = "\\boxed{(x+1)^{99999}-(x+2)^{99998}}"  # sympy works on this for minutes


def sleepy(seconds):
    time.sleep(seconds)
    return seconds


def dies(_):
    os._exit(7)


def environment():
    return sys.stdin.read(), os.environ.get("R1LAB_IN_GRADER_WORKER"), os.getcwd(), list(sys.path)


@pytest.fixture
def pool():
    p = HardTimeoutPool(num_workers=1)
    yield p
    p.close()


def test_killed_worker_mid_batch_fails_that_item_only(pool):
    comps = [BOMB, "\\boxed{x^2+2x+1}", "\\boxed{\\sqrt{8}}", "\\boxed{(x+2)^2}", "\\boxed{3}"]
    golds = ["(x+1)^{99999}", "(x+1)^2", "2\\sqrt{2}", "(x+1)^2", "3"]
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("v", grade_batch(comps, golds, timeout_s=120, pool=pool)))
    t.start()
    deadline = time.time() + 30
    while not pool.busy_pids() and time.time() < deadline:
        time.sleep(0.05)
    (victim,) = pool.busy_pids()
    time.sleep(0.5)  # the bomb is running
    os.kill(victim, signal.SIGKILL)
    t.join(timeout=60)
    assert not t.is_alive()
    verdicts = out["v"]
    assert verdicts[0].status == FAILED and "died" in verdicts[0].reason and "-9" in verdicts[0].reason
    assert [v.status for v in verdicts[1:]] == ["correct", "correct", "wrong", "correct"]
    assert victim not in pool.worker_pids() and pool.restarts == 1
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)  # the killed worker was reaped, not left as a zombie
    again = grade_batch(["\\boxed{\\frac{\\sqrt{3}}{2}}"], ["\\frac{1}{2}\\sqrt{3}"], pool=pool)
    assert again[0].correct


def test_hard_timeout_and_batch_deadline():
    pool = HardTimeoutPool(num_workers=1, warmup=None)  # no grading here: skip importing sympy on restarts
    t0 = time.perf_counter()
    res = pool.map(sleepy, [(0.01,), (30,), (0.02,)], timeout_s=1.0)
    assert [r.status for r in res] == [OK, TIMEOUT, OK] and res[2].value == 0.02
    assert time.perf_counter() - t0 < 10
    t0 = time.perf_counter()
    res = pool.map(sleepy, [(0.6,)] * 6, timeout_s=5.0, deadline_s=1.5)
    assert time.perf_counter() - t0 < 6
    assert res[0].status == OK and res[-1].status == TIMEOUT and "deadline" in res[-1].error
    assert pool.map(sleepy, [(0.01,)], timeout_s=5)[0].value == 0.01
    assert pool.restarts == 2
    pool.close()


def test_worker_environment(pool, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the caller's cwd is not the repo: the worker still imports the project
    ((stdin, flag, cwd, path),) = [r.value for r in pool.map(environment, [()], timeout_s=30)]
    assert stdin == "" and flag == "1" and cwd == str(tmp_path)
    assert path[:len(sys.path)] == [str(tmp_path) if p == "" else p for p in sys.path]


def test_calls_from_several_threads():
    p = HardTimeoutPool(num_workers=2, warmup=None)
    try:
        outs: dict = {}

        def run(k):
            outs[k] = [r.value for r in p.map(sleepy, [(0.01 * k,)] * 5, timeout_s=30)]

        threads = [threading.Thread(target=run, args=(k,)) for k in (1, 2, 3)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert outs == {k: [0.01 * k] * 5 for k in (1, 2, 3)}
    finally:
        p.close()


def _broken_interpreter(tmp_path, message="no module named rewards", code=7):
    script = tmp_path / "broken-python"
    script.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize("kind", ["missing", "exits", "warmup"])
def test_worker_that_cannot_start_raises_quickly(tmp_path, kind):
    python, warmup = {"missing": (str(tmp_path / "no-such-python"), "rewards.math:warm_up"),
                      "exits": (_broken_interpreter(tmp_path), "rewards.math:warm_up"),
                      "warmup": (sys.executable, "no_such_module_r1lab:warm")}[kind]
    p = HardTimeoutPool(num_workers=2, python=python, warmup=warmup)
    t0 = time.perf_counter()
    with pytest.raises(GraderUnavailable) as e:
        grade_batch([BOMB.replace("99999", "2")], ["x"], pool=p)
    assert time.perf_counter() - t0 < 20
    msg = str(e.value)
    assert python in msg  # names the command
    detail = {"missing": "No such file", "exits": "no module named rewards",
              "warmup": "No module named 'no_such_module_r1lab'"}[kind]
    assert detail in msg, msg
    assert p.worker_pids() == []
    p.close()


def test_broken_interpreter_setting_reaches_verify(tmp_path, monkeypatch):
    """Through the process-wide pool and the bool API: an error that names the command, never a False."""
    monkeypatch.setenv("R1LAB_GRADER_PYTHON", _broken_interpreter(tmp_path, "python is broken", 3))
    monkeypatch.setattr(rmath, "_POOL", None)
    t0 = time.perf_counter()
    with pytest.raises(GraderUnavailable, match=r"(?s)cannot start.*broken-python.*python is broken"):
        verify("\\boxed{x^2+2x+1}", "(x+1)^2")
    assert time.perf_counter() - t0 < 20
    assert not isinstance(GraderUnavailable("x"), GradingFailed)  # an outage is not one failed item


def test_workers_that_keep_dying_raise():
    p = HardTimeoutPool(num_workers=1, warmup=None)
    try:
        res = p.map(dies, [(i,) for i in range(3)], timeout_s=30)
        assert [r.status for r in res] == [ERROR] * 3 and "exit code 7" in res[0].error
        assert p.map(sleepy, [(0.01,)], timeout_s=30)[0].status == OK  # an answered item resets the count
        with pytest.raises(GraderUnavailable, match="keep dying: 5 deaths in a row"):
            p.map(dies, [(i,) for i in range(10)], timeout_s=30)
        assert p.map(sleepy, [(0.01,)], timeout_s=30)[0].value == 0.01  # and the pool starts afresh
    finally:
        p.close()
