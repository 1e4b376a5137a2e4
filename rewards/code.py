"""Code rewards: run the program a completion contains against tests, inside the sandbox.

Program extraction: the last fenced ```python block after the last </think> (else the last fenced block,
else the whole answer text). Two test styles, read from the sample:
  tests       list of assert statements (MBPP's `test_list` too), optionally `test_imports` / `test_setup` code run first;
              HumanEval's `test` (a `check(candidate)` function) with `entry_point` becomes one test
  io_tests    list of {"input": str, "output": str}: the program reads stdin, its stdout must match (trailing
              whitespace per line ignored); each case is a separate sandboxed run
Reward: fraction of tests passed, or all-or-nothing (`sample["all_or_nothing"]` or `code_reward(..., all_or_nothing=
True)`). Each assert test has its own time limit (an interval timer inside the sandboxed program, whose main
thread is ours), and the run as a whole the sum plus a margin.

A program could try to fake success by exiting early with status 0 (before the tests run) or by closing
stdout: the harness only counts a result line that carries a per-run random nonce it read from stdin before the
program's code ran, so both attempts score 0. (The nonce stays in the harness's memory; a program that walks
the interpreter's objects to find it is out of scope.)
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.extract import answer_region
from rewards.registry import register

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)

HARNESS = """\
import signal as _sig, sys as _sys
_NONCE = _sys.stdin.readline().strip()
class _TestTimeout(BaseException):
    pass
def _alarm(*_a):
    raise _TestTimeout()
_sig.signal(_sig.SIGALRM, _alarm)
_ns = {{"__name__": "__main__"}}
try:
    exec(compile({setup!r}, "setup.py", "exec"), _ns)
    exec(compile({program!r}, "solution.py", "exec"), _ns)
except BaseException as _e:
    print("solution failed to load:", type(_e).__name__, _e, file=_sys.stderr)
_passed = 0
for _i, _t in enumerate({tests!r}):
    try:
        _sig.setitimer(_sig.ITIMER_REAL, {per_test_s!r})
        exec(compile(_t, "test_%d.py" % _i, "exec"), _ns)
        _sig.setitimer(_sig.ITIMER_REAL, 0)
        _passed += 1
    except BaseException as _e:
        _sig.setitimer(_sig.ITIMER_REAL, 0)
        print("test", _i, "failed:", type(_e).__name__, str(_e)[:200], file=_sys.stderr)
_sys.__stdout__.write("\\n%s %d/%d\\n" % (_NONCE, _passed, {n}))
_sys.__stdout__.flush()
"""


def extract_program(completion: str) -> str:
    """The code to run: last ```python block, else last fenced block, else the answer text."""
    text = answer_region(completion)
    blocks = _FENCE.findall(text)
    py = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
    if py:
        return py[-1]
    if blocks:
        return blocks[-1][1]
    return text.strip()


def _tests_of(sample: Mapping[str, Any]) -> tuple[str, list[str]]:
    setup = "\n".join(sample.get("test_imports") or [])
    if sample.get("test_setup"):
        setup += "\n" + sample["test_setup"]
    tests = sample.get("tests") or sample.get("test_list")  # MBPP calls them test_list
    if tests:
        return setup, list(tests)
    if sample.get("test") and sample.get("entry_point"):  # HumanEval
        return setup + "\n" + sample["test"], [f"check({sample['entry_point']})"]
    raise KeyError("code reward: the sample has neither 'tests'/'test_list' (asserts), 'test'+'entry_point' (HumanEval) "
                   f"nor 'io_tests'; fields: {sorted(sample)}")


def harness_program(program: str, setup: str, tests: Sequence[str], per_test_s: float) -> str:
    return HARNESS.format(setup=setup, program=program, tests=list(tests), per_test_s=float(per_test_s),
                          n=len(tests))


def _assert_requests(program: str, sample: Mapping[str, Any], per_test_s: float) -> tuple[list[dict], Any]:
    setup, tests = _tests_of(sample)
    nonce = secrets.token_hex(16)
    req = {"code": harness_program(program, setup, tests, per_test_s), "stdin": nonce + "\n",
           "timeout_s": per_test_s * len(tests) + 5.0}
    return [req], (nonce, len(tests))


def _parse_assert_result(res, nonce: str, n: int) -> int:
    """Tests passed, counted only from the harness's nonce line."""
    if res.status not in ("ok", "error"):
        return 0
    for line in reversed(res.stdout.splitlines()):
        parts = line.split()
        if len(parts) == 2 and parts[0] == nonce:
            passed, total = parts[1].split("/")
            return int(passed) if int(total) == n else 0
    return 0


def _norm_output(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip().splitlines())


def code_reward_batch(completions: Sequence[str], samples: Sequence[Mapping[str, Any]], *,
                      per_test_s: float = 5.0, all_or_nothing: bool | None = None, sandbox=None) -> list[float]:
    """Rewards for a batch; every program of the batch runs concurrently in the sandbox pool."""
    from sandbox import default_sandbox

    sb = sandbox or default_sandbox()
    requests: list[dict] = []
    plans: list[tuple[str, int, int, Any]] = []  # (kind, first request index, count, check data)
    for c, s in zip(completions, samples):
        program = extract_program(c)
        if s.get("io_tests"):
            cases = list(s["io_tests"])
            plans.append(("io", len(requests), len(cases), [case["output"] for case in cases]))
            requests += [{"code": program, "stdin": case["input"], "timeout_s": per_test_s} for case in cases]
        else:
            reqs, data = _assert_requests(program, s, per_test_s)
            plans.append(("assert", len(requests), 1, data))
            requests += reqs
    results = sb.run_many(requests)
    rewards = []
    for (kind, start, count, data), s in zip(plans, samples):
        if kind == "io":
            outs = results[start:start + count]
            passed = sum(r.status == "ok" and _norm_output(r.stdout) == _norm_output(exp) for r, exp in zip(outs, data))
            total = count
        else:
            nonce, total = data
            passed = _parse_assert_result(results[start], nonce, total)
        aon = s.get("all_or_nothing", False) if all_or_nothing is None else all_or_nothing
        frac = passed / total if total else 0.0
        rewards.append(float(frac == 1.0) if aon else frac)
    return rewards


@register("code", batched=True, trusted=True)
def code(completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[float]:
    """Registry entry: fraction of tests passed (all-or-nothing when a sample sets `all_or_nothing`)."""
    return code_reward_batch(completions, samples)
