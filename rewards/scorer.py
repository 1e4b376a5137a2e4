"""The batch reward scorer used by GRPO and evaluation.

Combines weighted reward functions (registry names or `module:function`) over a batch. Builtin rewards are
linear-time Python and run in-process; the math grader's slow tier and every user plugin run in the hard-
timeout process pool (`rewards.pool`), so a plugin that hangs or crashes costs at most its timeout: that
item's reward is 0, and the failure is counted (`reward/timeouts`, `reward/errors`) and one example logged.
Grader verdicts are cached by (extracted answer, gold), which is what the verdict depends on, so repeated
samples of a group are graded once.
"""
from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.countdown import check_completion
from rewards.extract import extract_answer
from rewards.math import fast_verdict, grade_answer, grader_pool
from rewards.pool import OK, TIMEOUT, HardTimeoutPool
from rewards.registry import RewardFn, get

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    rewards: list[float]                                  # weighted sum per completion
    components: dict[str, list[float]]                    # each reward's raw values
    metrics: dict[str, float] = field(default_factory=dict)
    error_example: str | None = None                      # one failure message, for the log


def _call_plugin(fn, completion: str, sample: Mapping[str, Any]) -> float:
    return fn(completion, sample)


def _call_batched(fn, completions: list[str], samples: list[Mapping[str, Any]]) -> list[float]:
    return list(fn(completions, samples))


class RewardScorer:
    """score(completions, samples) -> ScoreResult. Thread-safe; one instance per process is enough."""

    def __init__(self, functions: Sequence[str] = ("accuracy", "format"), weights: Sequence[float] | None = None,
                 *, timeout_s: float = 5.0, batch_timeout_s: float = 60.0, num_workers: int | None = None,
                 cache_size: int = 100_000) -> None:
        weights = list(weights) if weights is not None else [1.0] * len(functions)
        if len(weights) != len(functions):
            raise ValueError(f"reward weights: {len(weights)} weights for {len(functions)} functions {list(functions)}")
        self.fns: list[RewardFn] = [get(name) for name in functions]
        self.weights = [float(w) for w in weights]
        self.timeout_s, self.batch_timeout_s = timeout_s, batch_timeout_s
        # share the process-wide grader pool unless a size is asked for
        self._owns_pool = num_workers is not None
        self.pool = HardTimeoutPool(num_workers) if self._owns_pool else grader_pool()
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self.cache_size = cache_size
        self.totals = {"timeouts": 0, "errors": 0}

    # ------------------------------------------------------------------------------------------------ accuracy
    def _accuracy(self, completions: list[str], samples: list[Mapping[str, Any]], stats: dict) -> list[float]:
        out: list[float] = [0.0] * len(completions)
        slow: dict[tuple[str, str], list[int]] = {}  # (answer, gold) -> indices: each pair graded once
        for i, (c, s) in enumerate(zip(completions, samples)):
            if s.get("task") == "countdown":
                out[i] = float(check_completion(c, s))
                continue
            if "answer" not in s:
                raise KeyError(f"accuracy reward: sample {i} has no 'answer' field (fields: {sorted(s)})")
            pred, gold = extract_answer(c), str(s["answer"])
            if pred is None:
                continue
            key = (pred, gold)
            if key in self._cache or key in slow:
                stats["cache_hits"] += 1
                if key in slow:
                    slow[key].append(i)
                else:
                    out[i] = float(self._cache[key])
                continue
            v = fast_verdict(pred, gold)
            if v is None:
                slow[key] = [i]
            else:
                self._remember(key, v)
                out[i] = float(v)
        if slow:
            results = self.pool.map(grade_answer, list(slow), self.timeout_s, self.batch_timeout_s)
            for (key, idx), r in zip(slow.items(), results):
                if r.status == OK:
                    self._remember(key, bool(r.value))
                    for i in idx:
                        out[i] = float(bool(r.value))
                else:
                    self._failure(stats, "accuracy", r.status, r.error, count=len(idx))
        stats["slow_path"] += len(slow)
        return out

    def _remember(self, key: tuple[str, str], verdict: bool) -> None:
        self._cache[key] = verdict
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # ------------------------------------------------------------------------------------------------ plugins
    def _plugin(self, rf: RewardFn, completions: list[str], samples: list[Mapping[str, Any]], stats: dict) -> list[float]:
        n = len(completions)
        if rf.trusted:  # builtin, in-process (bounded by construction, e.g. the code reward's sandbox timeouts)
            if rf.batched:
                return [float(v) for v in rf.fn(completions, samples)]
            return [float(rf.fn(c, s)) for c, s in zip(completions, samples)]
        if rf.batched:
            (r,) = self.pool.map(_call_batched, [(rf.fn, completions, list(samples))], self.batch_timeout_s,
                                 self.batch_timeout_s)
            if r.status != OK:
                self._failure(stats, rf.name, r.status, r.error, count=n)
                return [0.0] * n
            values = r.value
            if len(values) != n:
                self._failure(stats, rf.name, "error", f"returned {len(values)} rewards for {n} completions", count=n)
                return [0.0] * n
            return [self._as_reward(v, rf.name, stats) for v in values]
        results = self.pool.map(_call_plugin, [(rf.fn, c, s) for c, s in zip(completions, samples)],
                                self.timeout_s, self.batch_timeout_s)
        out = []
        for r in results:
            if r.status != OK:
                self._failure(stats, rf.name, r.status, r.error)
                out.append(0.0)
            else:
                out.append(self._as_reward(r.value, rf.name, stats))
        return out

    def _as_reward(self, value: Any, name: str, stats: dict) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self._failure(stats, name, "error", f"returned {value!r}, not a number")
            return 0.0
        if not math.isfinite(v):
            self._failure(stats, name, "error", f"returned {v}")
            return 0.0
        return v

    def _failure(self, stats: dict, name: str, status: str, error: str | None, count: int = 1) -> None:
        key = "timeouts" if status == TIMEOUT else "errors"
        stats[key] += count
        self.totals[key] += count
        if stats["example"] is None:
            stats["example"] = f"reward {name!r} {status}: {(error or '').strip()[:2000]}"

    # ------------------------------------------------------------------------------------------------ API
    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> ScoreResult:
        if len(completions) != len(samples):
            raise ValueError(f"score: {len(completions)} completions but {len(samples)} samples")
        t0 = time.perf_counter()
        completions, samples = list(completions), list(samples)
        stats: dict[str, Any] = {"timeouts": 0, "errors": 0, "cache_hits": 0, "slow_path": 0, "example": None}
        components = {}
        for rf in self.fns:
            if rf.name == "accuracy":
                components[rf.name] = self._accuracy(completions, samples, stats)
            else:
                components[rf.name] = self._plugin(rf, completions, samples, stats)
        total = [sum(w * components[rf.name][i] for rf, w in zip(self.fns, self.weights))
                 for i in range(len(completions))]
        n = max(1, len(completions))
        metrics = {
            "reward/timeouts": float(stats["timeouts"]), "reward/errors": float(stats["errors"]),
            "reward/latency_ms": 1000 * (time.perf_counter() - t0),
            "reward/cache_hits": float(stats["cache_hits"]), "reward/slow_path": float(stats["slow_path"]),
            "reward/total_mean": sum(total) / n,
        }
        for name, values in components.items():
            metrics[f"reward/{name.replace(':', '.')}_mean"] = sum(values) / n
        if stats["example"]:
            log.warning("reward failures in this batch (timeouts=%d, errors=%d); example: %s",
                        stats["timeouts"], stats["errors"], stats["example"])
        return ScoreResult(total, components, metrics, stats["example"])

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()
