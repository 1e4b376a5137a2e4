"""The batch reward scorer used by GRPO and evaluation.

Combines weighted reward functions (registry names or `module:function`) over a batch. Builtin rewards are
linear-time Python and run in-process; the math grader's slow tier and every user plugin run in the hard-
timeout process pool (`rewards.pool`), so a plugin that hangs or crashes costs at most its timeout.

Three outcomes per item and function (`rewards.outcome`): a value, or *failed*: the function raised or timed
out, returned `Failed(reason)`, a non-number or a non-finite number, or the grader could not judge the item
(timeout, dead worker, gold answer that does not parse). A failed item is never scored as 0:
  - `components[name][i]` is NaN and `failed_by_fn[name][i]` is True where `name` failed on item i;
  - `failed[i]` is True when a function with a non-zero weight failed on item i, and then `rewards[i]` is NaN:
    the GRPO driver masks such items out of group statistics and the loss, evaluation reports them apart.
    A weight-0 function (logged, not trained on) never makes an item failed; its failures are only counted.
Metrics (function names with ':' written as '.'): reward/failed_frac, reward/<fn>/failed_frac,
reward/timeouts and reward/errors (failed function-items by kind), reward/latency_ms, reward/cache_hits,
reward/slow_path, reward/total_mean and reward/<fn>_mean over the items that did not fail (NaN when none did),
and reward/<fn>/<key> for the metrics of a batched function's `ScoredBatch` (e.g. the code reward's
weak_frac). One failure message per batch is logged and returned as `error_example`. A pool that cannot run
at all raises `rewards.pool.GraderUnavailable`: nothing is scored then.

Grader verdicts are cached by (boxed answers, gold), which is what the verdict depends on, so repeated samples
of a group are graded once; a failed verdict is never cached.

Retries: a plugin item that failed *transiently* (`rewards.outcome.is_transient`: TransientRewardError,
timeouts, connection errors, HTTP 408/425/429/5xx, `Failed(..., transient=True)` from a batched function, or the
pool's hard per-item timeout) is tried again, up to `retries` times, after `retry_backoff_s` x 2^k seconds,
within the function's `batch_timeout_s` deadline (no retry starts that could not finish in time). Only the
items that failed are re-run (a batched function is called again with just those). An item that still fails
is failed as above (never 0), its message saying how many attempts it had. A deterministic failure (any other
exception, a non-number, `Failed(reason)`) is not retried, nor is the math grader (its timeouts are sympy
blow-ups, the same every time). Metrics: reward/<fn>/retries and reward/retries (re-attempted items).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.countdown import check_completion
from rewards.extract import final_answers
from rewards.math import REWARD_POLICY, Verdict, grader_pool, judge, judge_bounded
from rewards.outcome import Failed, RewardFailed, is_failed, is_transient
from rewards.pool import ERROR, OK, TIMEOUT, GraderUnavailable, HardTimeoutPool
from rewards.registry import RewardFn, get

log = logging.getLogger(__name__)
NAN = float("nan")


@dataclass
class ScoreResult:
    rewards: list[float]                                  # weighted sum per completion; NaN for a failed item
    components: dict[str, list[float]]                    # each reward's raw values; NaN where it failed
    failed: list[bool] = field(default_factory=list)      # a function with a non-zero weight failed on the item
    failed_by_fn: dict[str, list[bool]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error_example: str | None = None                      # one failure message, for the log


@dataclass
class _Column:
    values: list[float]
    failed: list[bool]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Err:
    """One failed attempt at an item: pool status, message, and whether it is worth another try."""
    status: str
    reason: str
    transient: bool = False


def _raised(e: BaseException) -> str:
    return f"raised {type(e).__name__}: {e}"


def _call_plugin(fn, completion: str, sample: Mapping[str, Any]) -> Any:
    """Runs in a pool worker. A transient exception comes back as Failed(transient=True): it is classified here,
    where its class exists (the scorer's process may not have the plugin's HTTP client installed)."""
    try:
        return fn(completion, sample)
    except Exception as e:
        if is_transient(e):
            return Failed(_raised(e), transient=True)
        raise


def _call_batched(fn, completions: list[str], samples: list[Mapping[str, Any]]) -> tuple[Any, dict]:
    try:
        out = fn(completions, samples)
    except Exception as e:
        if is_transient(e):   # the whole call failed transiently: every item is retried
            return Failed(_raised(e), transient=True), {}
        raise
    return list(out), dict(getattr(out, "metrics", None) or {})


def _as_err(value: Any) -> Any:
    """A returned Failed(reason[, transient]) as an _Err; any other value as it is (checked by _put)."""
    if not is_failed(value):
        return value
    return _Err(ERROR, value.reason if value.transient else f"Failed: {value.reason}", value.transient)


def metric_name(fn_name: str) -> str:
    return fn_name.replace(":", ".")


def _mean(values: Sequence[float], failed: Sequence[bool]) -> float:
    kept = [v for v, f in zip(values, failed) if not f]
    return sum(kept) / len(kept) if kept else NAN


class RewardScorer:
    """score(completions, samples) -> ScoreResult. Thread-safe; one instance per process is enough."""

    def __init__(self, functions: Sequence[str] = ("accuracy", "format"), weights: Sequence[float] | None = None,
                 *, timeout_s: float = 5.0, batch_timeout_s: float = 60.0, num_workers: int | None = None,
                 cache_size: int = 100_000, retries: int = 2, retry_backoff_s: float = 0.5) -> None:
        weights = list(weights) if weights is not None else [1.0] * len(functions)
        if len(weights) != len(functions):
            raise ValueError(f"reward weights: {len(weights)} weights for {len(functions)} functions {list(functions)}")
        self.fns: list[RewardFn] = [get(name) for name in functions]
        self.weights = [float(w) for w in weights]
        self.timeout_s, self.batch_timeout_s = timeout_s, batch_timeout_s
        if retries < 0 or retry_backoff_s < 0:
            raise ValueError(f"reward retries ({retries}) and retry_backoff_s ({retry_backoff_s}) must be >= 0")
        self.retries, self.retry_backoff_s = int(retries), float(retry_backoff_s)
        # share the process-wide grader pool unless a size is asked for
        self._owns_pool = num_workers is not None
        self.pool = HardTimeoutPool(num_workers) if self._owns_pool else grader_pool()
        self._cache: OrderedDict[tuple[tuple[str, ...], str], bool] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.cache_size = cache_size
        self.totals = {"timeouts": 0, "errors": 0}

    # ------------------------------------------------------------------------------------------------ accuracy
    def _accuracy(self, completions: list[str], samples: list[Mapping[str, Any]], stats: dict) -> _Column:
        col = _Column([0.0] * len(completions), [False] * len(completions))
        slow: dict[tuple[tuple[str, ...], str], list[int]] = {}  # (answers, gold) -> indices: each graded once
        for i, (c, s) in enumerate(zip(completions, samples)):
            if s.get("task") == "countdown":
                col.values[i] = float(check_completion(c, s))
                continue
            if "answer" not in s:
                raise KeyError(f"accuracy reward: sample {i} has no 'answer' field (fields: {sorted(s)})")
            key = (final_answers(c, REWARD_POLICY), str(s["answer"]))
            cached = self._cached(key)
            if key in slow or cached is not None:
                stats["cache_hits"] += 1
                if key in slow:
                    slow[key].append(i)
                else:
                    col.values[i] = float(cached)  # type: ignore[arg-type]
                continue
            v = judge(*key, REWARD_POLICY, slow=False)
            if v is None:
                slow[key] = [i]
            else:
                self._settle(key, v, [i], col, stats)
        if slow:
            verdicts = judge_bounded(list(slow), policy=REWARD_POLICY, timeout_s=self.timeout_s,
                                     deadline_s=self.batch_timeout_s, pool=self.pool)
            for (key, idx), v in zip(slow.items(), verdicts):
                self._settle(key, v, idx, col, stats)
        stats["slow_path"] += len(slow)
        return col

    def _settle(self, key: tuple, v: Verdict, idx: list[int], col: _Column, stats: dict) -> None:
        if v.failed:
            self._failure(stats, "accuracy", TIMEOUT if v.timeout else ERROR, v.reason, count=len(idx))
            for i in idx:
                col.values[i], col.failed[i] = NAN, True
            return
        with self._cache_lock:
            self._cache[key] = v.correct
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        for i in idx:
            col.values[i] = float(v.correct)

    def _cached(self, key: tuple) -> bool | None:
        with self._cache_lock:
            return self._cache.get(key)

    # ------------------------------------------------------------------------------------------------ plugins
    def _plugin(self, rf: RewardFn, completions: list[str], samples: list[Mapping[str, Any]], stats: dict) -> _Column:
        """Every item of one plugin, transient failures retried with backoff within batch_timeout_s."""
        n = len(completions)
        col = _Column([NAN] * n, [True] * n)
        deadline = time.perf_counter() + self.batch_timeout_s
        todo = list(range(n))
        for attempt in range(self.retries + 1):
            outcomes, metrics = self._attempt(rf, [completions[i] for i in todo], [samples[i] for i in todo], deadline)
            if metrics and not col.metrics and len(todo) == n:   # a batched function's own: its first full answer
                col.metrics = {f"reward/{metric_name(rf.name)}/{k}": float(v) for k, v in metrics.items()}
            retry = [(i, o) for i, o in zip(todo, outcomes) if isinstance(o, _Err) and o.transient]
            delay = self.retry_backoff_s * 2 ** attempt
            again = bool(retry) and attempt < self.retries and time.perf_counter() + delay < deadline
            tries = f" (transient; {attempt + 1} attempt(s)" + (")" if attempt == self.retries else
                                                                ", no time left for another within batch_timeout_s)")
            for i, o in zip(todo, outcomes):
                if not isinstance(o, _Err):
                    self._put(col, i, o, rf.name, stats)
                elif not (o.transient and again):
                    self._failure(stats, rf.name, o.status, o.reason + (tries if o.transient else ""))
            if not again:
                break
            stats["retries"][rf.name] = stats["retries"].get(rf.name, 0) + len(retry)
            time.sleep(delay)
            todo = [i for i, _ in retry]
        return col

    def _attempt(self, rf: RewardFn, completions: list[str], samples: list[Mapping[str, Any]],
                 deadline: float) -> tuple[list, dict]:
        """One try at these items: per item a value to store or an _Err; plus a batched function's metrics."""
        n, left = len(completions), max(0.0, deadline - time.perf_counter())
        if rf.trusted and rf.batched:  # builtin, in-process (bounded by construction, e.g. the sandbox's timeouts)
            try:
                out = rf.fn(completions, samples)
            except GraderUnavailable:
                raise
            except Exception as e:
                return [_Err(ERROR, _raised(e), is_transient(e))] * n, {}
            return self._batched(list(out), n), dict(getattr(out, "metrics", None) or {})
        if rf.trusted:
            outs: list = []
            for c, s in zip(completions, samples):
                try:
                    outs.append(_as_err(rf.fn(c, s)))
                except GraderUnavailable:
                    raise
                except Exception as e:
                    outs.append(_Err(ERROR, _raised(e), is_transient(e)))
            return outs, {}
        if rf.batched:
            (r,) = self.pool.map(_call_batched, [(rf.fn, completions, list(samples))], left, left)
            if r.status != OK:
                return [_Err(r.status, r.error or "", r.status == TIMEOUT)] * n, {}
            values, metrics = r.value
            if is_failed(values):
                return [_Err(ERROR, values.reason, values.transient)] * n, {}
            return self._batched(values, n), metrics
        results = self.pool.map(_call_plugin, [(rf.fn, c, s) for c, s in zip(completions, samples)],
                                min(self.timeout_s, left), left)
        return [_as_err(r.value) if r.status == OK else _Err(r.status, r.error or "", r.status == TIMEOUT)
                for r in results], {}

    def _batched(self, values: list, n: int) -> list:
        """A batched function's answer, per item a value or an _Err (Failed entries, a wrong count)."""
        if len(values) != n:
            return [_Err(ERROR, f"returned {len(values)} rewards for {n} completions")] * n
        return [_as_err(v) for v in values]

    def _put(self, col: _Column, i: int, value: Any, name: str, stats: dict) -> None:
        """Store one returned value; Failed, non-numbers and non-finite numbers leave the item failed."""
        if is_failed(value):
            self._failure(stats, name, ERROR, f"Failed: {value.reason}")
            return
        try:
            v = float(value)
        except (TypeError, ValueError, RewardFailed):
            self._failure(stats, name, ERROR, f"returned {value!r:.200}, not a number")
            return
        if not math.isfinite(v):
            self._failure(stats, name, ERROR, f"returned {v}")
            return
        col.values[i], col.failed[i] = v, False

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
        n = len(completions)
        stats: dict[str, Any] = {"timeouts": 0, "errors": 0, "cache_hits": 0, "slow_path": 0, "example": None,
                                 "retries": {}}
        cols = {rf.name: (self._accuracy(completions, samples, stats) if rf.name == "accuracy"
                          else self._plugin(rf, completions, samples, stats)) for rf in self.fns}
        weighted = [(cols[rf.name], w) for rf, w in zip(self.fns, self.weights) if w != 0.0]
        failed = [any(col.failed[i] for col, _ in weighted) for i in range(n)]
        total = [NAN if failed[i] else sum(w * col.values[i] for col, w in weighted) for i in range(n)]
        metrics = {
            "reward/failed_frac": sum(failed) / max(1, n),
            "reward/timeouts": float(stats["timeouts"]), "reward/errors": float(stats["errors"]),
            "reward/latency_ms": 1000 * (time.perf_counter() - t0),
            "reward/cache_hits": float(stats["cache_hits"]), "reward/slow_path": float(stats["slow_path"]),
            "reward/total_mean": _mean(total, failed),
            "reward/retries": float(sum(stats["retries"].values())),
        }
        for name, col in cols.items():
            metrics.update(col.metrics)  # a function's own metrics first: the scorer's counts below win a clash
            metrics[f"reward/{metric_name(name)}_mean"] = _mean(col.values, col.failed)
            metrics[f"reward/{metric_name(name)}/failed_frac"] = sum(col.failed) / max(1, n)
            metrics[f"reward/{metric_name(name)}/retries"] = float(stats["retries"].get(name, 0))
        if stats["example"]:
            log.warning("reward failures in this batch (failed items=%d of %d, timeouts=%d, errors=%d); example: %s",
                        sum(failed), n, stats["timeouts"], stats["errors"], stats["example"])
        return ScoreResult(total, {k: c.values for k, c in cols.items()}, failed,
                           {k: c.failed for k, c in cols.items()}, metrics, stats["example"])

    def close(self) -> None:
        if self._owns_pool:
            self.pool.close()
