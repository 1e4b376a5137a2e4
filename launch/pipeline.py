"""The miniature R1 pipeline behind `make demo`, on tiny models built on the spot (CPU, minutes).

  1. build the tokenizer and a tiny Qwen2 base model
  2. cold-start SFT on worked traces (TRL SFTTrainer)
  3. R1-Zero-style GRPO from the SFT model (Ray: vLLM rollout worker + FSDP2 trainer workers)
  4. distillation into a Llama student: NOT IMPLEMENTED YET (issue 5); the stage is reported as skipped
  5. evaluation of each model on the same held-out problems with the eval harness (pass@1, T=1.0)

Outputs under `output_dir`: summary.json, curves.png, the GRPO metrics JSONL and TensorBoard logs. Re-running
resumes finished stages (SFT is reused, GRPO continues from its last checkpoint); `--fresh` starts clean.

  python launch/pipeline.py --config configs/demo.yaml [--fresh] [section.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import opt  # noqa: E402


@dataclass
class StageSection:
    """One stage: a base config file plus overrides (section.key=value)."""
    config: str = opt("", "YAML config of the stage")
    overrides: list = opt([], "overrides applied on top of the YAML")


@dataclass
class EvalSection:
    """Held-out evaluation of every model."""
    problems: int = opt(128, "held-out problems")
    samples: int = opt(4, "samples per problem")
    temperature: float = opt(1.0, "sampling temperature")
    max_tokens: int = opt(48, "maximum response tokens")


@dataclass
class PipelineConfig:
    output_dir: str = opt("runs/demo", "where every stage writes")
    task_knobs: dict = opt({}, "synthetic task knobs shared by all stages")
    sft: StageSection = field(default_factory=StageSection)
    grpo: StageSection = field(default_factory=StageSection)
    eval: EvalSection = field(default_factory=EvalSection)


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "rollout/reward_mean" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [r["rollout/reward_mean"] for r in rows], label="reward")
    ax[0].plot(steps, [r.get("reward/format_mean", 0) for r in rows], label="format")
    ax[0].set_title("GRPO reward")
    ax[0].set_xlabel("step")
    ax[0].legend()
    ax[1].plot(steps, [r.get("reward/accuracy_mean", 0) for r in rows], label="train accuracy")
    ax[1].set_title("GRPO accuracy (training samples)")
    ax[1].set_xlabel("step")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from rl.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--fresh", action="store_true", help="delete output_dir first instead of resuming")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    out = Path(cfg.output_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    knobs = json.dumps(cfg.task_knobs)

    t0 = _stage("1/5 tokenizer and tiny Qwen2 base model")
    from rl.tiny import build_tiny

    art = build_tiny()
    print(f"base model: {art.qwen2} ({time.time() - t0:.1f}s)")

    t0 = _stage("2/5 cold-start SFT (TRL)")
    from rl.sft.config import SFTStageConfig
    from rl.sft.train import run_sft

    sft_dir = out / "sft"
    if (sft_dir / "summary.json").exists():
        sft_summary = json.loads((sft_dir / "summary.json").read_text())
        print("reusing the finished SFT stage")
    else:
        sft_cfg = load_config(SFTStageConfig, cfg.sft.config or None,
                              list(cfg.sft.overrides) + [f"output_dir={sft_dir}", f"data.task_knobs={knobs}"])
        sft_summary = run_sft(sft_cfg)
    print(f"SFT loss {sft_summary['first_loss']:.3f} -> {sft_summary['last_loss']:.3f} ({time.time() - t0:.1f}s)")

    t0 = _stage("3/5 GRPO on Ray (vLLM rollouts, FSDP2 trainers)")
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    grpo_dir = out / "grpo"
    grpo_cfg = load_config(GRPOConfig, cfg.grpo.config or None, list(cfg.grpo.overrides) + [
        f"model.path={sft_dir / 'final'}", f"log.output_dir={grpo_dir}", f"data.task_knobs={knobs}",
        "checkpoint.resume=auto"])
    if (grpo_dir / "final" / "config.json").exists():
        print("reusing the finished GRPO stage")
    else:
        GRPODriver(grpo_cfg).run()
    plot_curves(grpo_dir / "metrics.jsonl", out / "curves.png")
    print(f"GRPO done ({time.time() - t0:.1f}s); curves at {out / 'curves.png'}")

    _stage("4/5 distillation into a Llama student")
    print("SKIPPED: the distillation stage is not implemented yet (issue 5).")

    t0 = _stage("5/5 held-out evaluation (eval harness)")
    results = evaluate_models({"sft": sft_dir / "final", "grpo": grpo_dir / "final"}, cfg, out)
    summary = {name: {"accuracy": r["metrics"]["pass@1"], "ci95": [r["metrics"]["pass@1_ci95_low"],
                                                                   r["metrics"]["pass@1_ci95_high"]]}
               for name, r in results.items()}
    summary["distill"] = None
    summary["wall_s"] = round(time.time() - t_all, 1)
    summary["eval"] = {"problems": cfg.eval.problems, "samples": cfg.eval.samples,
                       "temperature": cfg.eval.temperature}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'model':<8} {'pass@1':>8}   95% CI")
    for name in ("sft", "grpo"):
        lo, hi = summary[name]["ci95"]
        print(f"{name:<8} {summary[name]['accuracy']:>8.3f}   [{lo:.3f}, {hi:.3f}]")
    print(f"{'distill':<8} {'skipped':>8}")
    print(f"wall time {summary['wall_s']:.0f}s; summary at {out / 'summary.json'}")
    return 0


def evaluate_models(models: dict[str, Path], cfg: PipelineConfig, out: Path) -> dict[str, dict]:
    from data.tasks import make_task, write_problems_jsonl
    from rl.eval.harness import Sampling, evaluate
    from rl.rollout.vllm_engine import make_llm, reload_weights, shutdown

    held = write_problems_jsonl(make_task("chain_sum", cfg.eval.problems, split="test", seed=0, **cfg.task_knobs),
                                out / "heldout.jsonl")
    first = next(iter(models.values()))
    llm = make_llm(str(first), max_model_len=512)
    results = {}
    try:
        for name, path in models.items():
            reload_weights(llm, str(path))
            results[name] = evaluate(held, llm=llm, quiet=True, output=out / f"eval_{name}.json",
                                     sampling=Sampling(temperature=cfg.eval.temperature, top_p=1.0,
                                                       n=cfg.eval.samples, max_tokens=cfg.eval.max_tokens))
    finally:
        shutdown(llm)
    return results


if __name__ == "__main__":
    sys.exit(main())
