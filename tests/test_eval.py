"""Evaluation harness: reference solutions, exact metrics on constructed files, malformed input."""
import itertools
import json
import random
from math import comb

import pytest

from data.benchmarks import load_benchmark
from data.loading import DataError
from rl.eval.harness import Sampling, evaluate
from rl.eval.metrics import aggregate, majority_correct, pass_at_k


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------- metrics vs reference
def slow_pass_at_k(verdicts, k):
    """Obvious reference: the fraction of k-subsets of the samples containing a correct one."""
    subsets = list(itertools.combinations(range(len(verdicts)), k))
    return sum(any(verdicts[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 10)
        v = [rng.random() < 0.3 for _ in range(n)]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(v), k) == pytest.approx(slow_pass_at_k(v, k))
            assert pass_at_k(n, sum(v), k) == pytest.approx(1 - comb(n - sum(v), k) / comb(n, k))


def test_majority_vote_groups_equivalent_answers():
    eq = lambda a, b: a.replace(" ", "") == b.replace(" ", "")  # noqa: E731
    # two wrong answers that are the same value outvote one right answer
    assert not majority_correct(["1/2", "7", "7 "], [True, False, False], eq)
    # correct answers in different forms count together
    assert majority_correct(["\\frac12", "0.5", "7"], [True, True, False], eq)
    assert not majority_correct([None, None], [False, False], eq)
    assert majority_correct(["3", "4"], [True, False], eq)  # tie: first seen wins


# ------------------------------------------------------------------------------------------- reference solutions
def test_math500_reference_solutions(tmp_path):
    rows = [json.loads(x) for x in open("data/benchmarks/math500.jsonl")]
    f = write_jsonl(tmp_path / "c.jsonl", [{"index": i, "completion": r["solution"]} for i, r in enumerate(rows)])
    res = evaluate("math500", completions_file=f, output=tmp_path / "r.json", quiet=True)
    assert res["num_problems"] == 500 and res["metrics"]["pass@1"] >= 0.994
    assert set(res["breakdown"]["by_level"]) == {"1", "2", "3", "4", "5"}
    saved = json.loads((tmp_path / "r.json").read_text())
    for key in ("benchmark", "num_problems", "samples_per_problem", "metrics", "sampling", "model"):
        assert key in saved
    per_sample = [json.loads(x) for x in open(tmp_path / "r.samples.jsonl")]
    assert len(per_sample) == 500 and {"index", "answer", "correct"} <= set(per_sample[0])


def test_gsm8k_reference_solutions(tmp_path):
    # GSM8K's references end in "#### N"; written as an R1 answer that line becomes \boxed{N}
    rows = [json.loads(x) for x in open("data/benchmarks/gsm8k_test.jsonl")]
    comps = []
    for i, r in enumerate(rows):
        body, final = r["solution"].rsplit("####", 1)
        comps.append({"index": i, "completion": f"{body}\\boxed{{{final.strip()}}}"})
    res = evaluate("gsm8k", completions_file=write_jsonl(tmp_path / "g.jsonl", comps), quiet=True)
    assert res["metrics"]["pass@1"] >= 0.99


def test_humaneval_canonical_solutions(tmp_path):
    _, problems = load_benchmark("humaneval")
    comps = [{"index": p["index"], "completion": f"```python\n{p['prompt']}{p['canonical_solution']}```"}
             for p in problems]
    res = evaluate("humaneval", completions_file=write_jsonl(tmp_path / "h.jsonl", comps), quiet=True)
    assert res["num_problems"] == 164 and res["metrics"]["pass@1"] == 1.0


# ------------------------------------------------------------------------------------------- constructed mixes
def test_known_mix_gives_exact_metrics(tmp_path):
    _, problems = load_benchmark("aime24")
    golds = {p["index"]: p["answer"] for p in problems[:3]}
    # problem 0: 2 of 4 right; problem 1: 0 of 4 (three agree on a wrong 5); problem 2: 4 of 4 (zero-padded forms)
    plan = {0: [golds[0], "1", golds[0], "2"], 1: ["5", "5", "5", "6"], 2: [golds[2]] * 3 + [golds[2].zfill(3)]}
    rows = [{"index": i, "completion": f"<think>x</think>\\boxed{{{a}}}"} for i, ans in plan.items() for a in ans]
    res = evaluate("aime24", completions_file=write_jsonl(tmp_path / "mix.jsonl", rows), quiet=True)
    m = res["metrics"]
    c = [2, 0, 4]
    assert res["samples_per_problem"] == 4 and res["num_problems"] == 3
    assert m["pass@1"] == pytest.approx((2 / 4 + 0 + 1) / 3)
    assert m["pass@2"] == pytest.approx(sum(1 - comb(4 - x, 2) / comb(4, 2) for x in c) / 3)
    assert m["pass@4"] == pytest.approx((1 + 0 + 1) / 3)
    # maj@2: p0 [right, "1"] tie -> first (right); p1 wrong; p2 right
    assert m["maj@2"] == pytest.approx(2 / 3)
    # maj@4: p0 right (2 vs 1 vs 1); p1 "5" x3 wrong; p2 right
    assert m["maj@4"] == pytest.approx(2 / 3)
    assert m["pass@1_ci95_low"] <= m["pass@1"] <= m["pass@1_ci95_high"]


def test_aggregate_handles_single_sample():
    m = aggregate([[True], [False], [True], [True]])
    assert m["pass@1"] == 0.75 and "pass@2" not in m


# ------------------------------------------------------------------------------------------- malformed input
@pytest.mark.parametrize("content,message", [
    ('{"index": 0, "completion": "a"}\n{"index": 1, "completion": \n', r"line 2: invalid JSON"),
    ('{"index": 0, "completion": "a"}\n{"index": 99999, "completion": "b"}\n', r"line 2: index 99999 is not"),
    ('{"index": 0}\n', r"line 1: missing field 'completion'"),
    ('{"completion": "x"}\n', r"line 1: missing field 'index'"),
    ('{"index": "3", "completion": "x"}\n', r"line 1: 'index' must be an integer"),
])
def test_malformed_completions_name_the_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        evaluate("math500", completions_file=str(f), quiet=True)


def test_cli_runs(tmp_path):
    from launch.eval import main

    f = write_jsonl(tmp_path / "c.jsonl", [{"index": 0, "completion": "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}"}])
    assert main(["--benchmark", "math500", "--completions", f, "--output", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["metrics"]["pass@1"] == 1.0


@pytest.mark.vllm
def test_generation_through_vllm(vllm_engine, tiny, tmp_path):
    from rl.rollout.vllm_engine import reload_weights

    reload_weights(vllm_engine, str(tiny.qwen2))
    res = evaluate("math500", llm=vllm_engine, sampling=Sampling(n=2, max_tokens=16), limit=3,
                   output=tmp_path / "g.json", quiet=True)
    assert res["num_problems"] == 3 and res["samples_per_problem"] == 2
    assert 0.0 <= res["metrics"]["pass@1"] <= 1.0 and "pass@2" in res["metrics"] and "maj@2" in res["metrics"]
    assert len(open(tmp_path / "g.samples.jsonl").readlines()) == 6
