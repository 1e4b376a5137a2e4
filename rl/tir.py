"""Tool-integrated reasoning (TIR) in miniature: a cold start on traces that call a Python tool, then GRPO with
multi-turn tool rollouts, against the same budget without tools (`launch/pipeline.py --config
configs/demo_tir.yaml`; not part of `make demo`).

What it implements (the ToRL / ReTool line of work, in small): the task is one a tiny model cannot compute
reliably in its head (products of multi-digit numbers), but can with a tool. Two arms, same problems, same
SFT steps, same GRPO steps and token budget:
  - tools:    SFT on traces that write `print(a * b)` in a python block and answer from its output
              (data.tasks.tool_trace), then GRPO whose rollouts run those blocks in the sandbox
              (rl/rollout/tools.py: inserted output tokens are masked out of the loss);
  - no_tools: SFT on worked traces that compute by hand (partial products), then GRPO without tools.
Both arms' SFT and GRPO models are evaluated on the same held-out problems with the eval harness (with tools
for the tools arm: `Sampling.tools`), pass@1 at T=1.

How it differs from the papers: the cold start is synthetic and short; the tool keeps no state between calls;
answers are graded on the policy's own text (a boxed answer printed by the program does not count).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from data.loading import read_jsonl
from rl.config import EvalSection, StageRef, opt, require

ARMS = {"tools": "python", "no_tools": ""}


@dataclass
class TIRConfig:
    pipeline: str = opt("tir", "which pipeline launch/pipeline.py runs: tir = this one", choices=["tir"])
    output_dir: str = opt("runs/demo_tir", "where both arms write (tools/, no_tools/, summary.json, tir_curves.png)")
    task: str = opt("arithmetic", "synthetic task (its `tool` knob switches the cold-start traces to tool calls)",
                    choices=["arithmetic"])
    task_knobs: dict = opt({"min_digits": 3, "max_digits": 3, "ops": "*"}, "task difficulty, the same for both arms")
    sft: StageRef = field(default_factory=StageRef)
    grpo: StageRef = field(default_factory=StageRef)
    eval: EvalSection = field(default_factory=EvalSection)

    def validate(self) -> None:
        require("tool" not in self.task_knobs, "task_knobs.tool",
                "is set per arm by the TIR pipeline (tools: true, no_tools: false); remove it")


def _arm_data(cfg: TIRConfig, tools: bool) -> list[str]:
    knobs = {**cfg.task_knobs, "tool": tools}
    return [f"data.source=synthetic:{cfg.task}", f"data.task_knobs={json.dumps(knobs)}"]


def run_arm(cfg: TIRConfig, arm: str, out: Path) -> tuple[Path, Path, Any, dict[str, float]]:
    """SFT then GRPO of one arm (finished parts reused). Returns (sft final, grpo final, GRPO config, stage
    times in s)."""
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver
    from rl.sft.config import SFTStageConfig
    from rl.sft.train import run_sft

    data = _arm_data(cfg, bool(ARMS[arm]))
    sft_dir, grpo_dir = out / arm / "sft", out / arm / "grpo"
    times: dict[str, float] = {}
    t0 = time.time()
    if not (sft_dir / "summary.json").exists():
        run_sft(cfg.sft.load(SFTStageConfig, data + [f"output_dir={sft_dir}"]))
        times["sft_s"] = round(time.time() - t0, 1)
    gcfg = cfg.grpo.load(GRPOConfig, data + [f"model.path={sft_dir / 'final'}", f"log.output_dir={grpo_dir}",
                                             "checkpoint.resume=auto", f"rollout.tools={ARMS[arm]}"])
    t0 = time.time()
    if not (grpo_dir / "final" / "config.json").exists():
        GRPODriver(gcfg).run()
        times["grpo_s"] = round(time.time() - t0, 1)
    return sft_dir / "final", grpo_dir / "final", gcfg, times


def run_tir(cfg: TIRConfig) -> dict[str, Any]:
    """Both arms, their evaluation, summary.json and tir_curves.png under cfg.output_dir."""
    from data.tasks import make_synthetic, write_problems_jsonl
    from rl.rollout.vllm_engine import make_llm, shutdown
    from rl.tiny import build_tiny

    t_all = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny()
    rows = make_synthetic(cfg.task, cfg.eval.problems, split="test", seed=0, knobs=cfg.task_knobs)
    heldout = write_problems_jsonl(rows, out / "heldout.jsonl")
    before = json.loads((out / "summary.json").read_text()).get("stage_s", {}) if (out / "summary.json").exists() else {}
    arms, stage_s = {}, {}
    for arm in ARMS:
        print(f"\n=== TIR arm '{arm}': SFT, then GRPO {'with' if ARMS[arm] else 'without'} tools ===", flush=True)
        *arms[arm], times = run_arm(cfg, arm, out)
        stage_s.update({f"{arm}_{k}": v for k, v in times.items()})
    # stages reused from an earlier invocation keep their original times, so wall_s stays the pipeline's cost
    reused_s = {k: v for k, v in before.items() if k != "eval_s" and k not in stage_s}
    t0 = time.time()
    first = arms["tools"][0]
    llm = make_llm(str(first), max_model_len=arms["tools"][2].rollout.max_model_len, seed=0)
    try:
        summary = {arm: evaluate_arm(arm, *arms[arm], heldout, cfg.eval, out, llm, first) for arm in ARMS}
    finally:
        shutdown(llm)
    stage_s["eval_s"] = round(time.time() - t0, 1)
    summary["gain_over_no_tools"] = summary["tools"]["accuracy"] - summary["no_tools"]["accuracy"]
    summary["this_invocation_s"] = round(time.time() - t_all, 1)
    summary["wall_s"] = round(time.time() - t_all + sum(reused_s.values()), 1)
    summary["stage_s"] = {**reused_s, **stage_s}
    summary["reused"] = sorted(reused_s)
    summary["eval"] = {"problems": cfg.eval.problems, "samples": cfg.eval.samples,
                       "temperature": cfg.eval.temperature, "max_tokens": cfg.eval.max_tokens, "heldout": heldout}
    plot_tir(out, out / "tir_curves.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def evaluate_arm(arm: str, sft: Path, final: Path, gcfg, heldout: str, e: EvalSection, out: Path, llm,
                 llm_model: Path) -> dict[str, Any]:
    """Held-out pass@1 of the arm's SFT and GRPO models (with the arm's tools), and the tool statistics."""
    from rl.eval.harness import evaluate_models
    from rl.grpo.driver import validation_sampling

    # the run's own prompt template, <think> forcing and tool settings; the pipeline's eval sampling
    sampling = replace(validation_sampling(gcfg), temperature=e.temperature, n=e.samples, max_tokens=e.max_tokens,
                       seed=0)
    res = evaluate_models({"sft": str(sft), "grpo": str(final)}, heldout, sampling, out / arm, llm=llm,
                          llm_model=llm_model)
    m = res["grpo"]["metrics"]
    report = {"accuracy": m["pass@1"], "ci95": [m["pass@1_ci95_low"], m["pass@1_ci95_high"]],
              "sft_accuracy": res["sft"]["metrics"]["pass@1"], "tools": gcfg.rollout.tools or None,
              "grpo_steps": gcfg.trainer.max_steps, "failed_samples": res["grpo"]["failed"]}
    t = res["grpo"].get("tools")
    if t:
        report.update({"tool_call_rate": t["calls_per_sample"], "tool_used_frac": t["used_frac"],
                       "tool_error_rate": t["error_frac"], "tool_timeout_rate": t["timeout_frac"],
                       "accuracy_when_tool_used": t["pass@1_when_used"],
                       "sft_tool_call_rate": res["sft"]["tools"]["calls_per_sample"]})
    return report


def print_summary(s: dict[str, Any]) -> None:
    print(f"\n{'arm':<9} {'SFT':>6} {'GRPO':>6}   95% CI")
    for arm in ARMS:
        a = s[arm]
        print(f"{arm:<9} {a['sft_accuracy']:>6.3f} {a['accuracy']:>6.3f}   [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]")
    t = s["tools"]
    print(f"tools - no_tools: {s['gain_over_no_tools']:+.3f}; tool calls/sample {t['tool_call_rate']:.2f}, "
          f"error rate {t['tool_error_rate']:.3f}, timeouts {t['tool_timeout_rate']:.3f}; wall {s['wall_s']:.0f}s")


def plot_tir(out: Path, png: Path) -> None:
    """Per GRPO step, both arms: train accuracy and held-out pass@1; tool calls and errors; response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    for arm, style in (("tools", "-"), ("no_tools", "--")):
        path = out / arm / "grpo" / "metrics.jsonl"
        if not path.exists():
            continue
        everything, _ = read_jsonl(path)
        rows = [r for r in everything if "rollout/reward_mean" in r]
        val = [r for r in everything if "val/heldout/pass@1" in r]
        steps = [r["step"] for r in rows]
        ax[0].plot(steps, [r.get("reward/accuracy_mean", 0) for r in rows], style, label=f"{arm}: train accuracy")
        if val:
            ax[0].plot([r["step"] for r in val], [r["val/heldout/pass@1"] for r in val], style, marker="o",
                       label=f"{arm}: held-out pass@1")
        ax[2].plot(steps, [r["rollout/response_length_mean"] for r in rows], style, label=arm)
        if arm == "tools":
            ax[1].plot(steps, [r.get("tool/calls_per_sample", 0) for r in rows], label="calls per sample")
            ax[1].plot(steps, [r.get("tool/error_frac", 0) for r in rows], label="error share of calls")
            ax[1].plot(steps, [r.get("tool/used_frac", 0) for r in rows], label="samples that used the tool")
    ax[0].set_title("accuracy: tools vs no tools")
    ax[1].set_title("tool use (tools arm)")
    ax[2].set_title("response length (tokens, incl. tool output)")
    for a in ax:
        a.set_xlabel("GRPO step")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
