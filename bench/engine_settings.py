"""The rollout engine's settings at Qwen2.5-0.5B's shape, measured: compiled or eager, threads.

Each setting runs in its own process (one in-process vLLM CPU engine per process; vLLM binds the process's OpenMP
threads), bf16 weights as GRPO runs them, random prompts of 48 tokens, exactly --new-tokens new tokens at T=1,
for the real-shape bench's batch (4 prompts x 4 samples) and a larger one (8 x 8): engine start, then the best
of 3 generate calls after a warm-up. Prints a table and last `best=` (the setting with the most tokens/s on the
larger batch). The GRPO defaults this checks: `rollout.enforce_eager` false (compiled), `rollout.threads` 0 (every
core the actor may use).

  .venv/bin/python bench/engine_settings.py [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = "tiny:qwen2:shape=qwen2.5-0.5b"
SETTINGS = {"compiled, 2 threads": {"eager": False, "threads": 2},
            "eager, 2 threads": {"eager": True, "threads": 2},
            "compiled, 1 thread": {"eager": False, "threads": 1}}
BATCHES = ((4, 4), (8, 8))


def side(eager: bool, threads: int, new_tokens: int) -> dict:
    import torch
    from vllm import SamplingParams

    from rl.grpo.rollout_worker import set_engine_threads
    from rl.model_path import resolve_model_path
    from rl.rollout import vllm_engine as ve

    set_engine_threads(threads)
    src = resolve_model_path(SHAPE)
    t0 = time.perf_counter()
    llm = ve.make_llm(src, dtype="bfloat16", in_process=True, enforce_eager=eager, kv_cache_gb=1)
    out = {"start_s": time.perf_counter() - t0}
    g = torch.Generator().manual_seed(0)
    for prompts, n in BATCHES:
        ids = [torch.randint(100, 5000, (48,), generator=g).tolist() for _ in range(prompts)]
        sp = SamplingParams(temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=0, n=n)
        ve.generate(llm, ids, sp)   # warm-up
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            ve.generate(llm, ids, sp)
            best = min(best, time.perf_counter() - t)
        out[f"{prompts}x{n}"] = {"gen_s": best, "tokens_per_s": prompts * n * new_tokens / best}
    ve.shutdown(llm)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        s = SETTINGS[a.side]
        Path(a.out).write_text(json.dumps(side(s["eager"], s["threads"], a.new_tokens)))
        return
    res = {}
    for name in SETTINGS:
        out = Path(f"/tmp/r1lab_engine_settings_{abs(hash(name))}.json")
        out.unlink(missing_ok=True)
        rc = subprocess.call([sys.executable, __file__, "--side", name, "--out", str(out), "--new-tokens",
                              str(a.new_tokens)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rc or not out.exists():
            print(f"{name}: failed (exit {rc})")
            continue
        res[name] = json.loads(out.read_text())
    cols = [f"{p}x{n}" for p, n in BATCHES]
    print(f"Qwen2.5-0.5B shape, bf16, {a.new_tokens} new tokens at T=1; tokens/s (generate s)")
    print(f"{'setting':<22} {'start s':>8} " + " ".join(f"{c:>18}" for c in cols))
    for name, r in res.items():
        print(f"{name:<22} {r['start_s']:>8.1f} " + " ".join(
            f"{r[c]['tokens_per_s']:>9.0f} ({r[c]['gen_s']:>5.2f} s)" for c in cols))
    if not res:
        raise SystemExit("no setting ran")
    print(f"best={max(res, key=lambda k: res[k][cols[-1]]['tokens_per_s'])}")


if __name__ == "__main__":
    main()
