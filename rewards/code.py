"""Code rewards: run the program a completion contains against tests, inside the sandbox, ungameably.

Program extraction: the last fenced ```python block after the last </think> (else the last fenced block,
else the whole answer text). Test styles, read from the sample:
  tests       list of assert statements (MBPP's `test_list` too), optionally `test_imports` / `test_setup`;
              HumanEval's `test` (a `check(candidate)` function) with `entry_point` becomes one test
  io_tests    list of {"input": str, "output": str}: the program reads stdin, its stdout must match (trailing
              whitespace per line ignored); each case is a separate sandboxed run
Reward: fraction of tests passed, or all-or-nothing (`sample["all_or_nothing"]` or `all_or_nothing=True`).

Threat model: the policy is optimised against this reward, so any way for a program to score without being
right becomes the policy's behaviour. The strong (converted) form, used wherever the tests allow it (see
rewards/code_tests.py), runs the tests in a trusted harness process and the candidate's code in another
process that never sees the tests, the expected values or any secret; the candidate is reached only through
proxies that carry plain data (sandbox/code_codec.py), and every comparison runs on the trusted side. So a
forged `__eq__`, a redefined `check` or prompt helper, patched builtins or modules, frame/gc/memory walking,
forged output lines, early exits, killing the supervisor, and endless or huge answers all score 0 there.
io_tests are strong too: the expected output never enters the sandbox.

The legacy (weak) form, kept for tests that cannot be converted (or whose converted form fails the reference
solution while the legacy one passes), runs program and tests in ONE process (the template below). It still
catches early exits and a closed stdout (only a result line carrying a per-run nonce, read from stdin before
the program's code ran, counts). It does NOT protect against: objects with a forged `__eq__` (or int/str/list
subclasses), redefining `check`, test helpers or builtins, monkeypatching the modules the tests use, or
reading the nonce from the interpreter (frames, gc) and printing a forged result line. (Its process is forked
from the slot's clean zygote, so what it can read is its own tests, not other runs'.) Items graded this way
are counted in the `weak_frac` metric; a training set should keep it near zero.

Outcome contract (rewards/outcome.py): per item a float, or `Failed(reason)` when the infrastructure failed
(no sandbox, a slot that cannot start, a setup failure before the program ran, a broken test setup, a
reference run that could not be completed). Whatever the program's own behaviour does to its run (killing
its supervisor, exceeding limits, hanging) is a wrong answer, 0.0, never Failed: otherwise a policy could
learn to dodge negative advantages by crashing the sandbox. Returns a `ScoredBatch` with metrics
`weak_frac` (share of items graded in the legacy form), `failed_frac` and `validations` (reference runs
made in this batch to choose a problem's form).
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.code_tests import STRONG, WEAK, FormCache, TestPlan, decide, default_form_cache, plan_for
from rewards.extract import answer_region
from rewards.outcome import Failed, ScoredBatch
from rewards.registry import register

VALIDATION_TIME_FACTOR = 4  # reference runs (choosing a problem's form) get this many times the per-test time
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


def harness_program(program: str, setup: str, tests: Sequence[str], per_test_s: float) -> str:
    """The legacy (weak) form: setup, program and tests in one process."""
    return HARNESS.format(setup=setup, program=program, tests=list(tests), per_test_s=float(per_test_s),
                          n=len(tests))


# ---- jobs and their results -------------------------------------------------------------------------------

def _strong_job(program: str, plan: TestPlan, per_test_s: float) -> dict:
    return {"code": program, "per_test_s": per_test_s, **plan.strong}


def _legacy_job(program: str, plan: TestPlan, per_test_s: float) -> tuple[dict, str]:
    nonce = secrets.token_hex(16)
    return {"code": harness_program(program, plan.legacy_setup, plan.legacy_tests, per_test_s),
            "stdin": nonce + "\n", "timeout_s": per_test_s * len(plan.legacy_tests) + 5.0}, nonce


def _strong_score(res) -> tuple[int, int] | Failed:
    if res.infra_error:
        return Failed(f"code sandbox: {res.infra_error}")
    return (res.passed, res.total) if res.status == "ok" else (0, res.total)


def _legacy_score(res, nonce: str, n: int) -> tuple[int, int] | Failed:
    """Tests passed, counted only from the harness's nonce line."""
    if res.infra_error:
        return Failed(f"code sandbox: {res.infra_error}")
    if res.status not in ("ok", "error"):
        return (0, n)
    for line in reversed(res.stdout.splitlines()):
        parts = line.split()
        if len(parts) == 2 and parts[0] == nonce:
            passed, total = parts[1].split("/")
            return (int(passed), n) if int(total) == n else (0, n)
    return (0, n)


def _norm_output(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip().splitlines())


def _io_score(results, cases) -> tuple[int, int] | Failed:
    for r in results:
        if r.infra_error:
            return Failed(f"code sandbox: {r.infra_error}")
    passed = sum(r.status == "ok" and _norm_output(r.stdout) == _norm_output(c["output"])
                 for r, c in zip(results, cases))
    return (passed, len(cases))


@dataclass
class _Batch:
    """Jobs of one sandbox round, each with the callback that reads its result."""
    jobs: list[dict] = field(default_factory=list)
    readers: list = field(default_factory=list)

    def add(self, job: dict, reader) -> None:
        self.jobs.append(job)
        self.readers.append(reader)

    def run(self, sb) -> None:
        if not self.jobs:
            return
        for res, reader in zip(sb.run_jobs(self.jobs), self.readers):
            reader(res)


@dataclass
class _Pending:
    """A problem whose form is not known yet: its reference's results in each form, and its items."""
    plan: TestPlan
    items: list[tuple[int, str]] = field(default_factory=list)
    strong_ref: Any = None
    legacy_ref: Any = None


class _Grader:
    """Decides each problem's form, then grades. Round 1 grades every item whose form is known (cached,
    io_tests, no reference, not convertible) and runs the reference of each new problem in the converted form;
    round 2 runs, for the new problems whose reference failed converted tests, the reference in the legacy
    form; the new problems' items are graded in the last round, in their decided form (so an item never runs
    beside its own problem's reference). Reference runs get VALIDATION_TIME_FACTOR times the per-test time:
    they check that the conversion keeps the tests' meaning, and a slow reference on a busy machine must not
    be cached as "not convertible"."""

    def __init__(self, sb, forms: FormCache, per_test_s: float) -> None:
        self.sb, self.forms, self.per_test_s = sb, forms, per_test_s
        self.ref_per_test_s = per_test_s * VALIDATION_TIME_FACTOR
        self.validations = 0

    def grade(self, programs: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> tuple[list, list]:
        self.scores: list = [None] * len(programs)
        self.forms_used: list = [None] * len(programs)
        first, pending = _Batch(), {}
        for i, (program, sample) in enumerate(zip(programs, samples)):
            if sample.get("io_tests"):
                self._add_io(first, i, program, list(sample["io_tests"]))
                continue
            plan = plan_for(sample)
            if plan.strong is None:
                self._add(first, i, program, plan, WEAK)
                continue
            decision = self.forms.get(plan.key) if plan.reference is not None else {"form": STRONG}
            if decision is not None:
                self._add(first, i, program, plan, decision["form"])
                continue
            if plan.key not in pending:
                pend = pending[plan.key] = _Pending(plan)
                self.validations += 1
                first.add(_strong_job(plan.reference, plan, self.ref_per_test_s),
                          lambda r, p=pend: setattr(p, "strong_ref", _strong_score(r)))
            pending[plan.key].items.append((i, program))
        first.run(self.sb)
        second = _Batch()
        for pend in pending.values():
            if not isinstance(pend.strong_ref, Failed) and decide(pend.strong_ref, None) is None:
                job, nonce = _legacy_job(pend.plan.reference, pend.plan, self.ref_per_test_s)
                n = len(pend.plan.legacy_tests)
                second.add(job, lambda r, p=pend, nonce=nonce, n=n:
                           setattr(p, "legacy_ref", _legacy_score(r, nonce, n)))
                self.validations += 1
        second.run(self.sb)
        last = _Batch()
        for pend in pending.values():
            self._grade_decided(last, pend)
        last.run(self.sb)
        return self.scores, self.forms_used

    def _grade_decided(self, batch: _Batch, pend: _Pending) -> None:
        """Cache the problem's form and queue its items in it (or fail them if it could not be decided)."""
        for ref, what in ((pend.strong_ref, "converted"), (pend.legacy_ref, "legacy")):
            if isinstance(ref, Failed):
                for i, _ in pend.items:
                    self.scores[i] = Failed(f"could not validate the {what} tests on the reference solution "
                                            f"({ref.reason})")
                return
        decision = decide(pend.strong_ref, pend.legacy_ref)
        self.forms.put(pend.plan.key, decision)
        for i, program in pend.items:
            self._add(batch, i, program, pend.plan, decision["form"])

    def _add_io(self, batch: _Batch, i: int, program: str, cases: list) -> None:
        self.forms_used[i] = "io"
        got: list = [None] * len(cases)

        def reader(k):
            def read(res):
                got[k] = res
                if all(g is not None for g in got):
                    self.scores[i] = _io_score(got, cases)
            return read
        for k, case in enumerate(cases):
            batch.add({"code": program, "stdin": case["input"], "timeout_s": self.per_test_s}, reader(k))
        if not cases:
            self.scores[i] = (0, 0)

    def _add(self, batch: _Batch, i: int, program: str, plan: TestPlan, form: str) -> None:
        """Grade item i in `form`."""
        def put(score):
            self.scores[i], self.forms_used[i] = score, form
        if form == STRONG:
            batch.add(_strong_job(program, plan, self.per_test_s), lambda r: put(_strong_score(r)))
        else:
            job, nonce = _legacy_job(program, plan, self.per_test_s)
            n = len(plan.legacy_tests)
            batch.add(job, lambda r: put(_legacy_score(r, nonce, n)))


def code_reward_batch(completions: Sequence[str], samples: Sequence[Mapping[str, Any]], *,
                      per_test_s: float = 5.0, all_or_nothing: bool | None = None, sandbox=None,
                      forms: FormCache | None = None) -> ScoredBatch:
    """Rewards for a batch (floats, or Failed for items the infrastructure could not grade); every program of
    the batch runs concurrently in the sandbox pool."""
    from sandbox import SandboxUnavailable, default_sandbox

    if len(completions) != len(samples):
        raise ValueError(f"code reward: {len(completions)} completions but {len(samples)} samples")
    programs = [extract_program(c) for c in completions]
    for s in samples:  # a sample without tests is a caller error: raise before anything runs
        if not s.get("io_tests"):
            plan_for(s)
    try:
        sb = sandbox or default_sandbox()
    except SandboxUnavailable as e:
        fail = Failed(f"no code sandbox: {e}")
        return ScoredBatch([fail] * len(programs), {"weak_frac": 0.0, "failed_frac": float(bool(programs)),
                                                    "validations": 0.0})
    grader = _Grader(sb, forms or default_form_cache(), per_test_s)
    scores, forms_used = grader.grade(programs, samples)
    values: list = []
    for score, s in zip(scores, samples):
        if isinstance(score, Failed):
            values.append(score)
            continue
        passed, total = score
        aon = s.get("all_or_nothing", False) if all_or_nothing is None else all_or_nothing
        frac = passed / total if total else 0.0
        values.append(float(frac == 1.0) if aon else frac)
    n = max(1, len(values))
    metrics = {"weak_frac": sum(f == WEAK for f in forms_used) / n,
               "failed_frac": sum(isinstance(v, Failed) for v in values) / n,
               "validations": float(grader.validations)}
    return ScoredBatch(values, metrics)


@register("code", batched=True, trusted=True)
def code(completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> ScoredBatch:
    """Registry entry: fraction of tests passed (all-or-nothing when a sample sets `all_or_nothing`)."""
    return code_reward_batch(completions, samples)
