"""Grading throughput on this machine (goal: >= 500 typical completions/s on 2 cores).

Workloads (each completion unique, so the verdict cache does not help):
  typical   R1-style completions (a few hundred characters of reasoning, then a boxed answer) for MATH500
            problems: 40% the gold answer as written, 20% an equivalent rewrite of a numeric answer
            (\\dfrac, decimals, thousands separators, units), 40% a wrong answer (another problem's);
  slow      answers that only math-verify can decide (sets reordered, expanded polynomials, radicals), the
            grader's worst realistic case;
  synthetic GRPO on the tiny tasks: integer answers, half right.
Run: .venv/bin/python bench/bench_grader.py [--n 4000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.scorer import RewardScorer  # noqa: E402

REASONING = ("<think>\nLet me work through this carefully. First I restate the problem, then I set up the "
             "equation and simplify step by step, checking each algebraic manipulation. {i}\n</think>\n")


def typical(n: int, rows: list[dict], rng: random.Random) -> tuple[list[str], list[dict]]:
    comps, samples = [], []
    for i in range(n):
        r = rows[rng.randrange(len(rows))]
        u = rng.random()
        ans = r["answer"]
        if u < 0.4:
            pred = ans
        elif u < 0.6 and ans.lstrip("-").isdigit():
            pred = rng.choice([f"{ans}.0", f"{int(ans):,}", f"{ans}\\text{{ cm}}", f"\\dfrac{{{2 * int(ans)}}}{{2}}"])
        else:
            pred = rows[rng.randrange(len(rows))]["answer"]
        comps.append(REASONING.format(i=i) + f"The answer is $\\boxed{{{pred}}}$.")
        samples.append({"answer": ans})
    return comps, samples


def slow(n: int, rng: random.Random) -> tuple[list[str], list[dict]]:
    forms = [("\\{{{a},{b}\\}}", "\\{{{b},{a}\\}}"), ("x^2+{s}x+{p}", "(x+{a})(x+{b})"),
             ("{a}\\sqrt{{2}}", "\\sqrt{{{c}}}"), ("\\frac{{{a}}}{{\\sqrt{{{b}}}}}", "\\frac{{{a}\\sqrt{{{b}}}}}{{{b}}}")]
    comps, samples = [], []
    for i in range(n):
        a, b = rng.randint(1, 30), rng.randint(31, 60)
        p, g = rng.choice(forms)
        fmt = dict(a=a, b=b, s=a + b, p=a * b, c=2 * a * a)
        comps.append(REASONING.format(i=i) + f"$\\boxed{{{p.format(**fmt)}}}$")
        samples.append({"answer": g.format(**fmt)})
    return comps, samples


def synthetic(n: int, rng: random.Random) -> tuple[list[str], list[dict]]:
    comps, samples = [], []
    for i in range(n):
        x = rng.randint(10, 999)
        comps.append(f"<think>\n{x - 7}+7={x}\n</think>\n\\boxed{{{x if rng.random() < 0.5 else x + 1}}}")
        samples.append({"answer": str(x), "uid": i})
    return comps, samples


def run(name: str, comps: list[str], samples: list[dict]) -> dict:
    scorer = RewardScorer(["accuracy", "format"], [1.0, 0.1], timeout_s=5.0, batch_timeout_s=600)
    scorer.score(comps[:64], samples[:64])  # start the pool workers outside the timing
    scorer._cache.clear()
    t0 = time.perf_counter()
    res = scorer.score(comps, samples)
    dt = time.perf_counter() - t0
    out = {"workload": name, "n": len(comps), "seconds": round(dt, 3), "per_s": round(len(comps) / dt, 1),
           "accuracy_mean": round(res.metrics["reward/accuracy_mean"], 3),
           "slow_path": res.metrics["reward/slow_path"], "timeouts": res.metrics["reward/timeouts"],
           "failed_frac": res.metrics["reward/failed_frac"]}
    print(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    args = ap.parse_args()
    rng = random.Random(0)
    rows = [json.loads(x) for x in open(Path(__file__).resolve().parents[1] / "data/benchmarks/math500.jsonl")]
    print(f"cores: {os.cpu_count()}")
    results = [run("typical", *typical(args.n, rows, rng)), run("slow", *slow(max(200, args.n // 10), rng)),
               run("synthetic", *synthetic(args.n, rng))]
    if results[0]["per_s"] < 500:
        print(f"WARNING: typical throughput {results[0]['per_s']}/s is below the 500/s goal")


if __name__ == "__main__":
    main()
