"""R1-Zero in miniature: RL straight from a base model, no SFT.

What it implements (DeepSeek-R1 paper, section 2.2): a *base* model, which has seen the task's material only as
pretraining text (`data.pretrain`: worked solutions in prose and as `a+b=c` lines, some ending "The answer is
\\boxed{83}.", markup tags of other names; never the R1 template, never `<think>`, never a question followed by
an R1-formatted answer), is trained with GRPO from the R1-Zero prompt template and rule-based rewards only
(accuracy + format). It has to discover the protocol (reason inside <think> ... </think>, then a boxed answer)
from the rewards, and it gets more problems right as it does.

  1. a tiny Qwen2 with a *base* tokenizer (no think tokens: like Qwen2.5's base tokenizer, text spells the tags
     in BPE pieces; no chat template), pretrained by plain next-token training (the SFT stage, data.format=text)
  2. GRPO from it (configs/r1zero_grpo.yaml: template r1_zero, rewards accuracy + format)
  3. the base model and the result evaluated with the eval harness on the pipeline's held-out problems, with
     the same R1-Zero prompt; format rate = the format reward over those samples

What makes it work in miniature (docs/demo.md, "R1-Zero"): the base model must be able to write the word piece
`think` (glossary pages make it a live token) and must close a tag by *copying* the opened name (tags named from
hundreds of vocabulary pieces, 1,500 pretraining steps); then it closes `<think>` in ~2-6% of samples unprompted
and GRPO amplifies the protocol along with accuracy, the two rewards summed with equal weights (make demo
--fresh, 2026-12-07: format 0.01 -> 0.96, pass@1 0.29 -> 0.94 after 55 GRPO steps; with the format at half
weight it emerged only once accuracy had saturated, 0.85 at step 55 from the same base).

How it differs from the paper: the base model is pretrained here in seconds on synthetic text rather than on
the web; the prompt ends with "<think>\\n" when `data.force_think` is set (as several open reproductions do);
the rule-based format reward is R1's (<think>...</think> then a boxed answer).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from data.loading import read_jsonl


def run_r1zero_stage(pretrain_ref, grpo_ref, data: list[str], heldout: str, eval_section, out: Path) -> dict[str, Any]:
    """Pretrain the base model, run GRPO from it, evaluate both; returns the stage's summary (also written to
    out/summary.json). Finished parts are reused on a re-run."""
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver
    from rl.sft.config import SFTStageConfig
    from rl.sft.train import run_sft

    if (out / "summary.json").exists():
        print("reusing the finished R1-Zero stage")
        return json.loads((out / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    base_dir, grpo_dir = out / "base", out / "grpo"
    if not (base_dir / "summary.json").exists():
        run_sft(pretrain_ref.load(SFTStageConfig, [f"output_dir={base_dir}"]))
    pre = json.loads((base_dir / "summary.json").read_text())
    gcfg = grpo_ref.load(GRPOConfig, data + [f"model.path={base_dir / 'final'}", f"log.output_dir={grpo_dir}",
                                             "checkpoint.resume=auto"])
    if not (grpo_dir / "final" / "config.json").exists():
        GRPODriver(gcfg).run()
    evals = evaluate_base_and_final(base_dir / "final", grpo_dir / "final", heldout, eval_section, gcfg, out)
    summary = {"base_accuracy": evals["base"]["accuracy"], "accuracy": evals["r1zero"]["accuracy"],
               "base_format_rate": evals["base"]["format_rate"], "format_rate": evals["r1zero"]["format_rate"],
               "base_response_length": evals["base"]["length"], "response_length": evals["r1zero"]["length"],
               "gain": evals["r1zero"]["accuracy"] - evals["base"]["accuracy"],
               "ci95": evals["r1zero"]["ci95"], "base_ci95": evals["base"]["ci95"],
               "pretrain": {"steps": pre["steps"], "first_loss": pre["first_loss"], "last_loss": pre["last_loss"]},
               "grpo_steps": gcfg.trainer.max_steps, "template": gcfg.data.template,
               "force_think": gcfg.data.force_think}
    plot_r1zero(grpo_dir / "metrics.jsonl", out / "r1zero_curves.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_base_and_final(base: Path, final: Path, heldout: str, e, gcfg, out: Path) -> dict[str, dict]:
    """Held-out pass@1 (T = e.temperature, e.samples per problem) with the R1-Zero prompt, and the format rate
    and mean response length (characters) of those samples."""
    from rewards.functions import format_reward
    from rl.eval.harness import evaluate_models
    from rl.grpo.driver import validation_sampling

    # the run's prompt template and <think> forcing, as its in-loop validation; the pipeline's eval sampling
    sampling = replace(validation_sampling(gcfg), temperature=e.temperature, n=e.samples, seed=0)
    res = evaluate_models({"base": str(base), "r1zero": str(final)}, heldout, sampling, out,
                          max_model_len=gcfg.rollout.max_model_len, enforce_eager=e.enforce_eager)
    report = {}
    for name, r in res.items():
        rows, _ = read_jsonl(out / f"eval_{name}.samples.jsonl")
        m = r["metrics"]
        report[name] = {"accuracy": m["pass@1"], "ci95": [m["pass@1_ci95_low"], m["pass@1_ci95_high"]],
                        "format_rate": sum(format_reward(x["completion"], {}) for x in rows) / max(1, len(rows)),
                        "length": sum(len(x["completion"]) for x in rows) / max(1, len(rows))}
    return report


def plot_r1zero(metrics_path: Path, out_png: Path) -> None:
    """Reward, format compliance, held-out pass@1 and response length per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything, _ = read_jsonl(metrics_path)
    rows = [r for r in everything if "rollout/reward_mean" in r]
    val = [r for r in everything if "val/heldout/pass@1" in r]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    ax[0].plot(steps, [r.get("reward/accuracy_mean", 0) for r in rows], label="accuracy reward (train samples)")
    ax[0].plot(steps, [r.get("reward/format_mean", 0) for r in rows], label="format compliance (train samples)")
    if val:
        ax[0].plot([r["step"] for r in val], [r["val/heldout/pass@1"] for r in val], "o-", label="held-out pass@1")
    ax[0].set_title("R1-Zero: reward, format, accuracy")
    ax[0].legend(fontsize=7)
    ax[1].plot(steps, [r["rollout/response_length_mean"] for r in rows])
    ax[1].set_title("response length (tokens)")
    ax[2].plot(steps, [r["rollout/reward_mean"] for r in rows])
    ax[2].set_title("total reward")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
