"""Evaluation harness: reference solutions, exact metrics on constructed files, malformed input."""
import itertools
import json
import random
from math import comb

import pytest

from data.benchmarks import load_benchmark
from data.loading import DataError
from rl.eval.harness import Sampling, evaluate, summary_table
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
    assert len(per_sample) == 500 and {"index", "answer", "status", "correct"} <= set(per_sample[0])
    assert saved["failed"] == 0 and {r["status"] for r in per_sample} <= {"correct", "wrong"}


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


# ------------------------------------------------------------------------------------------- failed samples
def test_golds_that_do_not_parse_are_failed_not_wrong(tmp_path):
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"problem": "p0", "answer": "2, 3"},
                                                   {"problem": "p1", "answer": "\\frac{"},
                                                   {"problem": "p2", "answer": "\\sqrt{"}])
    plan = {0: ["\\boxed{3} and \\boxed{2}", "\\boxed{3}"], 1: ["\\boxed{1/2}", "\\boxed{x^2}"],
            2: ["\\boxed{2}", "no answer"]}
    rows = [{"index": i, "completion": f"<think>x</think>{c}"} for i, cs in plan.items() for c in cs]
    res = evaluate(bench, completions_file=write_jsonl(tmp_path / "c.jsonl", rows), output=tmp_path / "r.json",
                   quiet=True)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["failed"] == res["failed"] == 3 and saved["num_samples"] == 6
    assert res["metrics"]["failed_frac"] == pytest.approx(3 / 6)
    assert res["metrics"]["pass@1"] == pytest.approx((1 / 2 + 0 + 0) / 3)  # failed counts as not correct
    assert res["grader"]["failed"] == 3
    assert [(e["index"], e["sample"]) for e in res["failed_examples"]] == [(1, 0), (1, 1), (2, 0)]
    per = [json.loads(x) for x in open(tmp_path / "r.samples.jsonl")]
    assert [r["status"] for r in per] == ["correct", "wrong", "failed", "failed", "failed", "wrong"]
    assert [r["correct"] for r in per] == [True, False, False, False, False, False]
    assert all("does not parse" in r["reason"] for r in per if r["status"] == "failed")
    assert all("reason" not in r for r in per if r["status"] != "failed")
    assert per[0]["answer"] == "3, 2"
    table = summary_table(res)
    assert "failed            3   of 6 samples" in table and "WARNING: 3 samples could not be graded" in table


def test_no_failed_samples_no_warning(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"index": 0, "completion": "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}"}])
    res = evaluate("math500", completions_file=f, limit=1, quiet=True)
    assert res["failed"] == 0 and res["metrics"]["failed_frac"] == 0.0
    assert "WARNING" not in summary_table(res) and "failed            0   of 1 samples" in summary_table(res)


def test_code_samples_the_sandbox_could_not_run_are_failed(monkeypatch):
    import rewards.code
    from data.benchmarks import Benchmark
    from rewards.outcome import Failed, ScoredBatch
    from rl.eval.harness import grade, summarize

    def fake_batch(comps, samples, all_or_nothing):
        assert all_or_nothing
        return ScoredBatch([Failed("sandbox unavailable: no bubblewrap"), 1.0, 0.0], {"weak_frac": 0.0})

    monkeypatch.setattr(rewards.code, "code_reward_batch", fake_batch)
    spec = Benchmark("fake_code", "code", 1)
    problems = [{"index": i, "problem": f"p{i}"} for i in range(3)]
    records = grade(spec, problems, {0: ["```python\nx=1\n```"], 1: ["b"], 2: ["c"]})
    assert [r["status"] for r in records] == ["failed", "correct", "wrong"]
    assert records[0]["reason"] == "sandbox unavailable: no bubblewrap" and records[0]["answer"] == "x=1\n"
    metrics, _ = summarize(spec, problems, records)
    assert metrics["pass@1"] == pytest.approx(1 / 3) and metrics["failed_frac"] == pytest.approx(1 / 3)


def test_aggregate_rejects_failed_samples_counted_correct():
    m = aggregate([[True, False], [False, False]], failed=[[False, True], [False, False]])
    assert m["pass@1"] == 0.25 and m["failed_frac"] == 0.25
    with pytest.raises(ValueError, match="problem 0: failed samples must be counted as not correct"):
        aggregate([[True]], failed=[[True]])


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
