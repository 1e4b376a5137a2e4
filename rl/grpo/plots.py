"""Plots of a GRPO run, written next to its metrics: where each step's time went (stacked bars)."""
from __future__ import annotations

from pathlib import Path

from data.loading import read_jsonl

PHASES = [("perf/gen_s", "rollout (generation)"), ("perf/reward_s", "rewards (after generation)"),
          ("perf/logprobs_s", "old/ref log-probs"), ("perf/update_s", "update"), ("perf/sync_s", "weight sync"),
          ("perf/idle_s", "other / idle")]


def plot_timing(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Stacked bar per step of the time breakdown logged by the driver; None when there is nothing to plot."""
    rows = [r for r in read_jsonl(metrics_path)[0] if "perf/step_s" in r and "perf/update_s" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.25), 3.5))
    bottom = [0.0] * len(rows)
    for key, label in PHASES:
        vals = [float(r.get(key, 0.0)) for r in rows]
        ax.bar(steps, vals, bottom=bottom, label=label, width=0.8)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.set_title("GRPO step time breakdown")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
