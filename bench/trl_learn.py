"""`bench/grpo_vs_trl.py --learn`: learning per step, r1lab against TRL's GRPOTrainer on the demo's GRPO stage.

Both sides start from the demo's SFT model (`runs/demo/sft/final`, or one trained here with the demo's SFT stage
when it is missing) and train the demo's GRPO stage as `configs/demo.yaml` defines it: the same prompts in the
same order (r1lab's `Cursor` order, handed to TRL unshuffled), the same rewards (r1lab's scorer, accuracy +
0.1 x format, one function for TRL), 16 prompts x 16 samples per step, 64 new tokens at T=1, lr 1e-4 with
r1lab's linear warm-up over 5 steps (TRL's LambdaLR is r1lab's own `lr_lambda`), clip 0.2 / 0.28, token-mean
loss over the whole batch (TRL's loss_type="dapo"), group-normalised advantages, beta 0, grad clip 1, fp32, 30
steps.
Differences that remain and why: TRL generates with transformers `generate` in the trainer's own weights (no
engine, so no rollout/trainer mismatch), r1lab with vLLM plus its token-level TIS correction; r1lab trains on
two FSDP2 ranks, TRL on one process with gradient accumulation (the same global normaliser).

Both exports are then evaluated by the project's harness with one engine on the same held-out problems as the
demo (128 x 8 samples at T=1, 64 tokens), and the SFT model beside them for reference.
Prints the table and last `learn_gap=` (r1lab's held-out pass@1 minus TRL's). Goal (issue 28): >= -0.03.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def _demo():
    """The demo's pipeline config and the data overrides every stage gets."""
    from launch.pipeline import PipelineConfig
    from rl.config import load_config

    cfg = load_config(PipelineConfig, str(DEMO), [])
    data = [f"data.source=synthetic:{cfg.task}", f"data.task_knobs={json.dumps(cfg.task_knobs)}"]
    return cfg, data


def grpo_config(sft: str, out: Path, seed: int | None = None):
    """The demo's GRPO stage config, starting from `sft`, writing under `out` (trainer.seed: `seed` if given)."""
    from rl.grpo.config import GRPOConfig

    cfg, data = _demo()
    return cfg.grpo.load(GRPOConfig, data + [f"model.path={sft}", f"log.output_dir={out}", "checkpoint.resume=never",
                                             "log.progress=false"] + ([] if seed is None else [f"trainer.seed={seed}"]))


def prepare(out: Path, sft: str, seed: int | None = None) -> dict:
    """The SFT model (trained with the demo's SFT stage when `sft` is missing), the held-out file and TRL's
    prompts in r1lab's order. Returns the workload dict the sides read."""
    from transformers import AutoTokenizer

    from data.prompts import build_prompt
    from data.tasks import make_synthetic, write_problems_jsonl
    from launch.pipeline import run_sft_stage
    from rl.grpo.prompts import Cursor, load_train_rows

    cfg, data = _demo()
    if not (Path(sft) / "config.json").exists():
        print(f"{sft} has no model: training the demo's SFT stage into {out / 'sft'}", flush=True)
        run_sft_stage(cfg, data, out / "sft")
        sft = str(out / "sft" / "final")
    g = grpo_config(sft, out / "r1lab", seed)
    rows = load_train_rows(g.data)[0]
    order = Cursor(g.trainer.seed, len(rows)).take(g.trainer.max_steps * g.rollout.batch_prompts)
    tok = AutoTokenizer.from_pretrained(sft)
    used = [rows[i] for i in order]
    prompts = [build_prompt(str(r["problem"]), tok, template=g.data.template, force_think=g.data.force_think)
               for r in used]
    e = cfg.eval
    held = make_synthetic(cfg.task, e.problems, split="test", seed=0, knobs=cfg.task_knobs)
    return {"sft": str(sft), "prompts": prompts, "rows": [{k: v for k, v in r.items() if k != "prompt"} for r in used],
            "heldout": write_problems_jsonl(held, out / "heldout.jsonl"),
            "eval": {"problems": e.problems, "samples": e.samples, "temperature": e.temperature,
                     "max_tokens": e.max_tokens, "template": g.data.template, "force_think": g.data.force_think},
            "grpo": {"steps": g.trainer.max_steps, "prompts": g.rollout.batch_prompts, "n": g.rollout.n,
                     "max_new_tokens": g.rollout.max_new_tokens, "lr": g.trainer.lr,
                     "warmup": g.trainer.warmup_steps, "clip_low": g.algo.clip_eps_low,
                     "clip_high": g.algo.clip_eps_high, "grad_clip": g.trainer.grad_clip,
                     "functions": list(g.reward.functions), "weights": list(g.reward.weights),
                     "dtype": g.model.dtype, "loss_agg": g.algo.loss_agg, "advantage": g.algo.advantage,
                     "kl_coef": g.algo.kl_coef, "lr_schedule": g.trainer.lr_schedule,
                     "ppo_epochs": g.trainer.ppo_epochs, "mini_batches": g.trainer.mini_batches, "temperature": g.rollout.temperature, "seed": g.trainer.seed}}


def check_comparable(w: dict) -> None:
    """Refuse settings this comparison does not map onto TRL (the demo's, today, all map)."""
    g = w["grpo"]
    need = {"loss_agg": "token_mean", "advantage": "grpo", "kl_coef": 0.0, "dtype": "float32",
            "lr_schedule": "constant", "ppo_epochs": 1, "mini_batches": 1}
    wrong = {k: g[k] for k, ok in need.items() if g[k] != ok}
    if wrong:
        raise SystemExit(f"--learn maps the demo's GRPO stage onto TRL only for {need}; configs/demo.yaml has {wrong}")


def run_r1lab_side(w: dict, out: Path) -> dict:
    from data.loading import read_jsonl
    from rl.grpo.driver import GRPODriver

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    GRPODriver(grpo_config(w["sft"], out, w["grpo"]["seed"])).run()
    rows = [r for r in read_jsonl(out / "metrics.jsonl")[0] if "reward/total_mean" in r]
    return {"model": str(out / "final"), "train_s": time.perf_counter() - t0,
            "reward_curve": [r["reward/total_mean"] for r in rows]}


def make_reward(functions: list[str], weights: list[float]):
    """r1lab's scorer as one TRL reward function: the weighted sum, None (TRL: NaN, left out) where it failed."""
    from rewards.scorer import RewardScorer

    scorer = RewardScorer(functions, weights)

    def r1lab_reward(prompts, completions, **columns) -> list[float | None]:
        keys = [k for k in columns if isinstance(columns[k], list) and len(columns[k]) == len(completions)]
        samples = [{k: columns[k][i] for k in keys} for i in range(len(completions))]
        res = scorer.score([c if isinstance(c, str) else c[-1]["content"] for c in completions], samples)
        return [None if math.isnan(r) else float(r) for r in res.rewards]

    return r1lab_reward


def run_trl_side(w: dict, out: Path) -> dict:
    from bench.trl_side import run_trl
    from rl.grpo.trainer_worker import lr_lambda

    g = w["grpo"]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    cols = {k: [r.get(k) for r in w["rows"]] for k in w["rows"][0] if k not in ("problem",)}
    res = run_trl(w["sft"], w["prompts"], [r["answer"] for r in w["rows"]], mode="default", steps=g["steps"],
                  warmup=0, n=g["n"], prompts_per_step=g["prompts"], max_new_tokens=g["max_new_tokens"],
                  lr=g["lr"], bf16=False, seed=g["seed"], out_dir=str(out), micro_batch_size=32, threads=2,
                  reward_funcs=[make_reward(g["functions"], g["weights"])], columns=cols,
                  lr_lambda=lr_lambda(grpo_config(w["sft"], out, g["seed"])), save_dir=str(out / "final"),
                  overrides={"epsilon": g["clip_low"], "epsilon_high": g["clip_high"], "max_grad_norm": g["grad_clip"],
                             "temperature": g["temperature"], "generation_kwargs": {}, "loss_type": "dapo",
                             "scale_rewards": "group"})
    curve = [lg["reward"] for lg in res["trl_logs"] if "reward" in lg]
    return {"model": str(out / "final"), "train_s": time.perf_counter() - t0, "reward_curve": curve}


def evaluate(w: dict, models: dict[str, str], out: Path) -> dict[str, dict]:
    from rl.eval.harness import Sampling, evaluate_models

    e = w["eval"]
    sampling = Sampling(temperature=e["temperature"], top_p=1.0, n=e["samples"], max_tokens=e["max_tokens"],
                        template=e["template"], force_think=e["force_think"])
    return evaluate_models(models, w["heldout"], sampling, out, enforce_eager=True)


def report(w: dict, sides: dict[str, dict], evals: dict[str, dict]) -> float:
    g = w["grpo"]
    print(f"\nthe demo's GRPO stage from {w['sft']}: {g['steps']} steps x {g['prompts']} prompts x {g['n']} samples, "
          f"{g['max_new_tokens']} tokens, lr {g['lr']} (warm-up {g['warmup']}), clip {g['clip_low']}/{g['clip_high']}, "
          f"rewards {g['functions']} x {g['weights']}; held-out {w['eval']['problems']} x {w['eval']['samples']} "
          f"at T={w['eval']['temperature']}")
    print(f"{'model':<8} {'pass@1':>7}   95% CI           train s  reward first 5 -> last 5 steps")
    for name, r in evals.items():
        m = r["metrics"]
        s = sides.get(name, {})
        curve = s.get("reward_curve") or []
        trend = (f"{sum(curve[:5]) / len(curve[:5]):.3f} -> {sum(curve[-5:]) / len(curve[-5:]):.3f}"
                 if len(curve) >= 5 else "")
        train = f"{s['train_s']:7.0f}" if s else " " * 7
        print(f"{name:<8} {m['pass@1']:>7.3f}   [{m['pass@1_ci95_low']:.3f}, {m['pass@1_ci95_high']:.3f}]   "
              f"{train}  {trend}")
    return evals["r1lab"]["metrics"]["pass@1"] - evals["trl"]["metrics"]["pass@1"]
