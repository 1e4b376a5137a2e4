"""The miniature R1 pipeline behind `make demo`, on tiny models built on the spot (CPU, minutes).

  1. build the tokenizer and a tiny Qwen2 base model
  2. cold-start SFT on worked traces (TRL SFTTrainer)
  3. GRPO from the SFT model, R1's reasoning-oriented RL after the cold start (Ray: vLLM rollout worker +
     FSDP2 trainer workers)
  4. distillation: the GRPO model generates traces, rejection sampling keeps the verified ones, and a smaller
     Llama student is trained on them (TRL SFTTrainer)
  5. evaluation of the SFT model, the GRPO model and the student on the same held-out problems with the eval
     harness (pass@1 over several samples at temperature 1.0)
  6. R1-Zero (on in configs/demo.yaml; empty `r1zero.config` skips it): a base model pretrained on plain text
     (no template, no <think>), GRPO straight from it with the R1-Zero template and accuracy + format rewards, both evaluated on the
     same held-out problems (rl/r1zero.py)

Outputs under `output_dir`: summary.json, curves.png, the GRPO metrics JSONL and TensorBoard logs, the
distillation dataset (with provenance) and its acceptance rate. Re-running resumes finished stages (SFT and
distillation are reused, GRPO continues from its last checkpoint); `--fresh` starts clean.

  python launch/pipeline.py --config configs/demo.yaml [--fresh] [section.key=value ...]
  python launch/pipeline.py --config configs/demo_tir.yaml     # tool-integrated reasoning, tools vs no tools
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

from rl.config import ConfigError, EvalSection, StageRef, opt, to_dict  # noqa: E402


@dataclass
class PipelineConfig:
    pipeline: str = opt("r1", "which pipeline: r1 = this one (make demo); tir = tool-integrated reasoning, tools vs "
                              "no tools (rl/tir.py, configs/demo_tir.yaml)", choices=["r1", "tir"])
    output_dir: str = opt("runs/demo", "where every stage writes")
    task: str = opt("arithmetic", "synthetic task of every stage",
                    choices=["arithmetic", "chain_sum", "countdown"])
    task_knobs: dict = opt({}, "synthetic task knobs shared by all stages")
    sft: StageRef = field(default_factory=StageRef)
    grpo: StageRef = field(default_factory=StageRef)
    distill: StageRef = field(default_factory=StageRef)
    eval: EvalSection = field(default_factory=EvalSection)
    r1zero_pretrain: StageRef = field(default_factory=StageRef)
    r1zero: StageRef = field(default_factory=StageRef)

    def validate(self) -> None:
        from rl.config import require

        require(bool(self.r1zero.config) == bool(self.r1zero_pretrain.config), "r1zero.config",
                "the R1-Zero stage needs both r1zero_pretrain.config (the base model's pretraining) and "
                "r1zero.config (GRPO from it), or neither")


def _took(t0: float, reused: bool, before: dict, key: str, reused_s: dict[str, float]) -> float:
    """A stage's time: measured now, or, when it was reused, its time in the previous summary (noted in
    reused_s)."""
    if reused:
        reused_s[key] = before.get("stage_s", {}).get(key, 0.0)
        return reused_s[key]
    return round(time.time() - t0, 1)


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    rows = [r for r in everything if "rollout/reward_mean" in r]
    val = [r for r in everything if "val/heldout/pass@1" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [r["rollout/reward_mean"] for r in rows], label="reward")
    ax[0].plot(steps, [r.get("reward/format_mean", 0) for r in rows], label="format")
    ax[0].set_title("GRPO reward")
    ax[0].set_xlabel("step")
    ax[0].legend()
    ax[1].plot(steps, [r.get("reward/accuracy_mean", 0) for r in rows], label="train accuracy (samples)")
    if val:
        ax[1].plot([r["step"] for r in val], [r["val/heldout/pass@1"] for r in val], "o-",
                   label="held-out pass@1 (validation)")
    ax[1].set_title("GRPO accuracy")
    ax[1].set_xlabel("step")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--fresh", action="store_true", help="delete output_dir first instead of resuming")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        return run_pipeline(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2


def run_pipeline(args: argparse.Namespace) -> int:
    from rl.config import load_config

    if pipeline_kind(args.config, args.overrides) == "tir":
        from rl.tir import TIRConfig, run_tir

        tir = load_config(TIRConfig, args.config, args.overrides)
        if rc := check_stage_models(tir):
            return rc
        if args.fresh and Path(tir.output_dir).exists():
            shutil.rmtree(tir.output_dir)
        run_tir(tir)
        return 0
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    if rc := check_stage_models(cfg):
        return rc
    out = Path(cfg.output_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    data = [f"data.source=synthetic:{cfg.task}", f"data.task_knobs={json.dumps(cfg.task_knobs)}"]
    timings: dict[str, float] = {}
    reused_s: dict[str, float] = {}  # original times of stages this invocation reused
    before = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}

    n = 6 if cfg.r1zero.config else 5
    t0 = _stage(f"1/{n} tokenizer and tiny Qwen2 base model")
    from rl.tiny import build_tiny

    art = build_tiny()
    print(f"base model: {art.qwen2} ({time.time() - t0:.1f}s)")

    t0 = _stage(f"2/{n} cold-start SFT (TRL)")
    sft_dir = out / "sft"
    sft_summary, reused = run_sft_stage(cfg, data, sft_dir)
    loss = f"{sft_summary['first_loss']:.3f} -> {sft_summary['last_loss']:.3f}"
    print(f"SFT loss {loss} ({time.time() - t0:.1f}s)")
    timings["sft_s"] = _took(t0, reused, before, "sft_s", reused_s)

    t0 = _stage(f"3/{n} GRPO on Ray (vLLM rollouts, FSDP2 trainers)")
    grpo_dir = out / "grpo"
    reused = run_grpo_stage(cfg, data, sft_dir / "final", grpo_dir)
    plot_curves(grpo_dir / "metrics.jsonl", out / "curves.png")
    print(f"GRPO done ({time.time() - t0:.1f}s); curves at {out / 'curves.png'}")
    timings["grpo_s"] = _took(t0, reused, before, "grpo_s", reused_s)

    t0 = _stage(f"4/{n} distillation into a smaller Llama student, and 5/{n} held-out evaluation (eval harness)")
    dist, reused = run_distill_stage(cfg, data, grpo_dir / "final", sft_dir / "final", out / "distill")
    timings["distill_and_eval_s"] = _took(t0, reused, before, "distill_and_eval_s", reused_s)

    evals = {name: json.loads((out / "distill" / f"eval_{key}.json").read_text())
             for name, key in (("sft", "sft"), ("grpo", "teacher"), ("distill", "student"))}
    summary = {name: {"accuracy": r["metrics"]["pass@1"],
                      "ci95": [r["metrics"]["pass@1_ci95_low"], r["metrics"]["pass@1_ci95_high"]]}
               for name, r in evals.items()}
    summary["grpo_gain"] = summary["grpo"]["accuracy"] - summary["sft"]["accuracy"]
    summary["distill_over_grpo"] = (summary["distill"]["accuracy"] / summary["grpo"]["accuracy"]
                                    if summary["grpo"]["accuracy"] else None)
    ds = dist["dataset"]
    summary["distill_dataset"] = {"kept": ds["kept"], "candidates": ds["candidates"],
                                  "acceptance_rate": ds["acceptance_rate"], "path": ds["dataset"]}
    summary["student_model"] = dist["student"]["model"]
    held = f"synthetic:{cfg.task} (held-out)"
    card_results({sft_dir / "final": evals["sft"], grpo_dir / "final": evals["grpo"],
                  Path(dist["student"]["path"]): evals["distill"]}, held)
    if cfg.r1zero.config:
        t0 = _stage(f"6/{n} R1-Zero: pretrained base model -> GRPO, no SFT")
        from rl.r1zero import run_r1zero_stage

        r1z_reused = (out / "r1zero" / "summary.json").exists()
        summary["r1zero"] = r1z = run_r1zero_stage(cfg.r1zero_pretrain, cfg.r1zero, data, dist["heldout"],
                                                   cfg.eval, out / "r1zero")
        timings["r1zero_s"] = _took(t0, r1z_reused, before, "r1zero_s", reused_s)
        r1z_dir = out / "r1zero"
        found = [(n, r1z_dir / f"eval_{e}.json") for n, e in (("base", "base"), ("grpo", "r1zero"))]
        card_results({r1z_dir / n / "final": json.loads(f.read_text()) for n, f in found if f.exists()}, held)
        print(f"R1-Zero: base {r1z['base_accuracy']:.3f} -> {r1z['accuracy']:.3f} pass@1 (gain {r1z['gain']:+.3f}); "
              f"format {r1z['base_format_rate']:.2f} -> {r1z['format_rate']:.2f}; curves at "
              f"{out / 'r1zero' / 'r1zero_curves.png'}")
    # a re-run that reuses finished stages reports their original times, so wall_s stays the pipeline's cost
    summary["this_invocation_s"] = round(time.time() - t_all, 1)
    summary["wall_s"] = round(time.time() - t_all + sum(reused_s.values()), 1)
    summary["stage_s"] = timings
    summary["eval"] = {"problems": cfg.eval.problems, "samples": cfg.eval.samples,
                       "temperature": cfg.eval.temperature, "heldout": dist["heldout"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [(name, summary[name]["accuracy"], summary[name]["ci95"]) for name in ("sft", "grpo", "distill")]
    if "r1zero" in summary:
        r1z = summary["r1zero"]
        rows += [("base", r1z["base_accuracy"], r1z["base_ci95"]), ("r1zero", r1z["accuracy"], r1z["ci95"])]
    print(f"\n{'model':<8} {'pass@1':>8}   95% CI")
    for name, acc, (lo, hi) in rows:
        print(f"{name:<8} {acc:>8.3f}   [{lo:.3f}, {hi:.3f}]")
    ratio = summary["distill_over_grpo"]
    print(f"GRPO gain over SFT: {summary['grpo_gain']:+.3f}; student / GRPO: "
          f"{'n/a' if ratio is None else f'{ratio:.2f}'}; distillation kept {ds['kept']}/{ds['candidates']} "
          f"traces (acceptance {ds['acceptance_rate']:.3f})")
    note = f" (this invocation {summary['this_invocation_s']:.0f}s; reused: {sorted(reused_s)})" if reused_s else ""
    print(f"wall time {summary['wall_s']:.0f}s{note}; summary at {out / 'summary.json'}")
    return 0


def card_results(evals: dict[Path, dict], dataset: str) -> None:
    """The held-out results into the model cards of this pipeline's exports (a model-index per card)."""
    from rl.model_card import add_results, eval_result

    for export, res in evals.items():
        add_results(export, [eval_result(res, dataset)])


def check_stage_models(cfg) -> int:
    """The model paths the stages start from (the others are this pipeline's own exports), checked before any
    stage runs: 0, or 2 after printing one line naming the stage's key and the path."""
    from rl.config import ConfigError
    from rl.model_path import preflight
    from rl.sft.config import SFTStageConfig

    try:
        checks = [(cfg.sft.load(SFTStageConfig).model.path, "sft stage model.path")]
        if getattr(cfg, "distill", None) is not None and cfg.distill.config:
            from rl.distill.config import DistillConfig

            student = cfg.distill.load(DistillConfig, ["teacher.path=grpo"]).student.load(SFTStageConfig)
            checks.append((student.model.path, "distill stage student model.path"))
        if getattr(cfg, "r1zero_pretrain", None) is not None and cfg.r1zero_pretrain.config:
            base = cfg.r1zero_pretrain.load(SFTStageConfig).model.path
            checks.append((base, "r1zero_pretrain stage model.path"))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    return rc if isinstance(rc := preflight(checks), int) else 0


def pipeline_kind(config: str, overrides: list[str]) -> str:
    """The `pipeline` key of the YAML, or of an override (pipeline=tir): which config class to load."""
    import yaml

    kind = "r1"
    if config and Path(config).exists():
        kind = (yaml.safe_load(Path(config).read_text()) or {}).get("pipeline", kind)
    for o in overrides:
        if o.startswith("pipeline="):
            kind = o.split("=", 1)[1]
    return kind


def run_sft_stage(cfg: PipelineConfig, data: list[str], sft_dir: Path) -> tuple[dict, bool]:
    from rl.sft.config import SFTStageConfig
    from rl.sft.train import run_sft

    if (sft_dir / "summary.json").exists():
        print("reusing the finished SFT stage")
        return json.loads((sft_dir / "summary.json").read_text()), True
    sft_cfg = cfg.sft.load(SFTStageConfig, data + [f"output_dir={sft_dir}"])
    return run_sft(sft_cfg), False


def run_grpo_stage(cfg: PipelineConfig, data: list[str], init: Path, grpo_dir: Path) -> bool:
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    grpo_cfg = cfg.grpo.load(GRPOConfig, data + [
        f"model.path={init}", f"log.output_dir={grpo_dir}", "checkpoint.resume=auto"])
    if (grpo_dir / "final" / "config.json").exists():
        print("reusing the finished GRPO stage")
        return True
    GRPODriver(grpo_cfg).run()
    return False


def run_distill_stage(cfg: PipelineConfig, data: list[str], teacher: Path, sft: Path, out: Path
                      ) -> tuple[dict, bool]:
    """Distillation from the GRPO model; its evaluation also covers the SFT model (same held-out problems)."""
    from rl.distill.config import DistillConfig
    from rl.distill.run import run_distill

    if (out / "summary.json").exists() and (out / "eval_sft.json").exists():
        print("reusing the finished distillation stage")
        return json.loads((out / "summary.json").read_text()), True
    evals = [f"eval.{k}={v}" for k, v in to_dict(cfg.eval).items()] + ["eval.top_p=1.0", "eval.benchmark="]
    dcfg = cfg.distill.load(DistillConfig, data + evals + [f"teacher.path={teacher}", f"output_dir={out}"])
    return run_distill(dcfg, also_evaluate={"sft": str(sft)}), False


if __name__ == "__main__":
    sys.exit(main())
