"""Evaluation metrics as pure functions.

  pass@1    mean correctness over all samples of a problem, averaged over problems
  pass@k    the unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), averaged over problems
  maj@k     majority vote over the first k samples' extracted answers, answers grouped by equivalence
            (ties go to the answer seen first); a problem without any extracted answer scores 0
  ci95      normal-approximation 95% interval over problems (mean +- 1.96 * sd / sqrt(N))
  failed_frac  share of all samples the grader could not judge (timeout, crash, unparsable gold)

A failed sample is neither right nor wrong; every metric above counts it as not correct (conservative: a
grader outage can only lower pass@k and maj@k, never raise them), and `failed_frac` says how many there were.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct (numerically stable form)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_for(n: int) -> list[int]:
    """Powers of two up to n: 1, 2, 4, ..."""
    return [2**i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []


def ci95(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return (0.0, 0.0)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return (max(0.0, mean - half), min(1.0, mean + half))


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool],
                     equivalent: Callable[[str, str], bool]) -> bool:
    """Is the most common (by equivalence) extracted answer correct?"""
    clusters: list[list[int]] = []  # indices; clusters[j][0] is the representative
    for i, a in enumerate(answers):
        if a is None:
            continue
        for cl in clusters:
            rep = cl[0]
            # answers graded against the same gold: two correct ones are equivalent, a correct and a wrong
            # one are not; only two wrong answers need a direct comparison
            same = (correct[i] and correct[rep]) or (not correct[i] and not correct[rep]
                                                      and equivalent(a, answers[rep]))  # type: ignore[arg-type]
            if same:
                cl.append(i)
                break
        else:
            clusters.append([i])
    if not clusters:
        return False
    best = max(clusters, key=len)  # max() keeps the first of equal-sized clusters
    return bool(correct[best[0]])


def aggregate(per_problem: Sequence[Sequence[bool]], answers: Sequence[Sequence[str | None]] | None = None,
              equivalent: Callable[[str, str], bool] | None = None,
              failed: Sequence[Sequence[bool]] | None = None) -> dict[str, float]:
    """Flat metrics dict from per-problem correctness lists (and extracted answers for maj@k). `failed` marks
    the samples that could not be graded (their correctness must be False); it adds `failed_frac`."""
    if not per_problem:
        raise ValueError("no problems to aggregate")
    if failed is not None:
        for i, (v, f) in enumerate(zip(per_problem, failed)):
            if len(v) != len(f) or any(c and x for c, x in zip(v, f)):
                raise ValueError(f"problem {i}: failed samples must be counted as not correct ({v} vs {f})")
    n_min = min(len(v) for v in per_problem)
    metrics: dict[str, float] = {}
    p1 = [sum(v) / len(v) for v in per_problem]
    metrics["pass@1"] = sum(p1) / len(p1)
    metrics["pass@1_ci95_low"], metrics["pass@1_ci95_high"] = ci95(p1)
    for k in ks_for(n_min)[1:]:
        vals = [pass_at_k(len(v), sum(v), k) for v in per_problem]
        metrics[f"pass@{k}"] = sum(vals) / len(vals)
    if answers is not None and equivalent is not None:
        for k in ks_for(n_min)[1:]:
            vals = [float(majority_correct(a[:k], v[:k], equivalent)) for a, v in zip(answers, per_problem)]
            metrics[f"maj@{k}"] = sum(vals) / len(vals)
            metrics[f"maj@{k}_ci95_low"], metrics[f"maj@{k}_ci95_high"] = ci95(vals)
    if failed is not None:
        metrics["failed_frac"] = sum(map(sum, failed)) / max(1, sum(map(len, failed)))
    return metrics
