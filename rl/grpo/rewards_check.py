"""Reward bookkeeping of a GRPO step: merging the per-group scores of the rollout workers into step metrics,
and stopping a run whose rewards keep failing.

A reward function that fails on an item (timeout, crash, unparsable gold, sandbox outage) makes that item
*failed*: excluded from its group's statistics and from the loss (rl.grpo.batching). A few failures are noise;
a function that fails on a large share of items for several steps in a row is broken, and training on the
remaining items would quietly optimise a different objective. `FailureWatch` stops the run then, naming the
function, its failure rate and one example.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("r1lab.grpo")
SUMMED = ("reward/timeouts", "reward/errors", "reward/latency_ms", "reward/cache_hits", "reward/slow_path")


class RewardFailureError(RuntimeError):
    """Rewards failed on too many items for too many steps; the message names the function."""


def metric_name(fn: str) -> str:
    return fn.replace(":", ".")


def merge_reward_metrics(parts: Sequence[dict[str, Any]], functions: Sequence[str],
                         weights: Sequence[float]) -> dict[str, float]:
    """Step metrics from per-group score results (each: components, failed_by_fn, failed, metrics,
    error_example). Means are over the items a function scored; failure shares over all items."""
    out: dict[str, float] = {}
    n = sum(len(p["failed"]) for p in parts)
    if not n:
        return out
    for fn in functions:
        vals, fails = [], 0
        for p in parts:
            for v, f in zip(p["components"][fn], p["failed_by_fn"][fn]):
                fails += bool(f)
                if not f:
                    vals.append(v)
        key = metric_name(fn)
        out[f"reward/{key}_mean"] = sum(vals) / len(vals) if vals else 0.0
        out[f"reward/{key}/failed_frac"] = fails / n
    out["reward/failed_frac"] = sum(sum(map(bool, p["failed"])) for p in parts) / n
    scored = [r for p in parts for r, f in zip(p["rewards"], p["failed"]) if not f and not math.isnan(r)]
    out["reward/total_mean"] = sum(scored) / len(scored) if scored else 0.0
    extra: dict[str, list[tuple[float, int]]] = {}
    for p in parts:
        size = len(p["failed"])
        for k, v in p["metrics"].items():
            if k not in out and isinstance(v, (int, float)):
                extra.setdefault(k, []).append((float(v), size))
    for k, vs in extra.items():
        if k in SUMMED or not k.endswith(("_mean", "_frac")):
            out[k] = sum(v for v, _ in vs)
        else:
            out[k] = sum(v * s for v, s in vs) / max(1, sum(s for _, s in vs))
    example = next((p["error_example"] for p in parts if p.get("error_example")), None)
    if example:
        log.warning("reward failures this step (failed_frac=%.3f); example: %s", out["reward/failed_frac"], example)
        out["reward/example"] = example  # a string: kept in metrics.jsonl, skipped by TensorBoard
    return out


class FailureWatch:
    """Stop after `max_steps` consecutive steps in which a function that is trained on (non-zero weight) failed
    on more than `max_frac` of the items. Weight-0 functions are only logged, so their failures only count."""

    def __init__(self, max_frac: float, max_steps: int, functions: Sequence[str] = (),
                 weights: Sequence[float] = ()) -> None:
        self.max_frac, self.max_steps = max_frac, max_steps
        self.watched = [metric_name(f) for f, w in zip(functions, weights) if w != 0]
        self.streak: dict[str, int] = {}

    def check(self, metrics: dict[str, Any], step: int) -> None:
        for fn in self.watched:
            frac = metrics.get(f"reward/{fn}/failed_frac")
            if frac is None:
                continue
            self.streak[fn] = self.streak.get(fn, 0) + 1 if frac > self.max_frac else 0
            if self.streak[fn] >= self.max_steps:
                raise RewardFailureError(
                    f"reward function {fn!r} failed on {frac:.0%} of the items at step {step}, above "
                    f"reward.max_failed_frac={self.max_frac} for {self.streak[fn]} steps in a row (failed items "
                    f"are left out of training, so the run would optimise something else). Example: "
                    f"{metrics.get('reward/example', 'n/a')}")
