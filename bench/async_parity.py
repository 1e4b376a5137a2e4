"""Does overlapped generation (`rollout.async_steps=k`) learn as well as the synchronous loop? (slow)

The demo's GRPO stage (configs/demo.yaml: 30 steps of 16 prompts x 16 samples from the demo's SFT model), run
with async_steps = 0 and = k from the same SFT checkpoint (`runs/demo/sft/final`: run `make demo` first), each
evaluated like the demo: held-out pass@1 over 128 problems x 8 samples at T=1 with the eval harness. Prints
both accuracies, their difference, the staleness seen in training, and the mean step time of each mode.

  .venv/bin/python bench/async_parity.py [--k 1] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(k: int, out: Path, sft: Path, heldout: str) -> dict:
    from data.loading import read_jsonl
    from launch.pipeline import PipelineConfig
    from rl.config import load_config
    from rl.eval.harness import Sampling, evaluate_models
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    pipe = load_config(PipelineConfig, "configs/demo.yaml")
    data = [f"data.source=synthetic:{pipe.task}", f"data.task_knobs={json.dumps(pipe.task_knobs)}"]
    shutil.rmtree(out, ignore_errors=True)
    cfg = pipe.grpo.load(GRPOConfig, data + [f"model.path={sft}", f"log.output_dir={out}", "checkpoint.resume=never",
                                             f"rollout.async_steps={k}", "log.progress=false"])
    GRPODriver(cfg).run()
    e = pipe.eval
    res = evaluate_models({f"async{k}": str(out / "final")}, heldout,
                          Sampling(temperature=e.temperature, top_p=1.0, n=e.samples, max_tokens=e.max_tokens),
                          out, max_model_len=512)
    rows, _ = read_jsonl(out / "metrics.jsonl")
    train = [r for r in rows if "perf/step_s" in r]
    return {"k": k, "pass@1": res[f"async{k}"]["metrics"]["pass@1"],
            "staleness_max": max(r["rollout/staleness_max"] for r in train),
            "staleness_mean": sum(r["rollout/staleness_mean"] for r in train) / len(train),
            "step_s": sum(r["perf/step_s"] for r in train[1:]) / max(1, len(train) - 1),
            "val": {r["step"]: r["val/heldout/pass@1"] for r in rows if "val/heldout/pass@1" in r}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--demo", default="runs/demo")
    a = ap.parse_args()
    sft, heldout = Path(a.demo) / "sft" / "final", Path(a.demo) / "distill" / "heldout.jsonl"
    if not (sft / "config.json").exists() or not heldout.exists():
        raise SystemExit(f"needs a finished `make demo` in {a.demo} (SFT model and held-out file)")
    results = []
    for rep in range(a.repeats):
        for k in (0, a.k):
            results.append(run(k, Path("runs/async_parity") / f"k{k}_r{rep}", sft, str(heldout)))
            print(json.dumps(results[-1]), flush=True)
    for k in (0, a.k):
        mine = [r for r in results if r["k"] == k]
        print(f"async_steps={k}: held-out pass@1 {[round(r['pass@1'], 3) for r in mine]} "
              f"(mean {sum(r['pass@1'] for r in mine) / len(mine):.3f}), staleness max "
              f"{max(r['staleness_max'] for r in mine):.0f}, step {sum(r['step_s'] for r in mine) / len(mine):.2f}s")
    sync = sum(r["pass@1"] for r in results if r["k"] == 0) / a.repeats
    over = sum(r["pass@1"] for r in results if r["k"] == a.k) / a.repeats
    print(f"pass@1 difference (async - sync): {over - sync:+.3f}")


if __name__ == "__main__":
    main()
