"""Teacher traces and rejection sampling (DeepSeek-R1 section 2.3.3 / 2.4, "distillation").

R1 builds its 800k SFT set by sampling the RL model on many prompts and keeping only the traces a rule checker
(or, for open-ended data, a judge) accepts, dropping mixed-language, overlong and repetitive ones. We do the
rule-based part: a trace is kept when it finished (not truncated), is within the length cap, reaches every
reward's minimum (by default: verified-correct answer and well-formed <think> block), is not a duplicate of a
trace already kept for the same prompt, and the prompt's quota is not full. Every kept row records where it
came from (teacher, sampling parameters, reward values), and the summary records the acceptance rate and why
the others were rejected.

`select_traces` is pure (no model), so the rules are tested directly.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rl.distill.config import FilterSection, TraceSampling

REJECT_REASONS = ("truncated", "too_long", "score_failed", "low_reward", "duplicate", "over_quota")


def generate_traces(llm: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], sampling: TraceSampling, *,
                    template: str = "chat", force_think: bool = False) -> list[dict[str, Any]]:
    """Sample `sampling.n` traces per row with vLLM. One candidate dict per trace, in prompt order."""
    from data.prompts import THINK_PREFIX, build_prompt
    from rl.rollout.vllm_engine import generate, sampling_params

    prompts = [build_prompt(str(r["problem"]), tokenizer, template=template, force_think=force_think) for r in rows]
    params = sampling_params(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                             max_tokens=sampling.max_tokens, seed=sampling.seed, logprobs=False)
    outs = generate(llm, prompts, params, use_tqdm=True)
    prefix = THINK_PREFIX if force_think else ""  # the forced tag belongs to the trace the student learns
    cands = []
    for i, (row, samples) in enumerate(zip(rows, outs)):
        for k, s in enumerate(samples):
            cands.append({"prompt_index": i, "sample": k, "row": dict(row), "completion": prefix + s.text,
                          "num_tokens": len(s.token_ids), "finish_reason": s.finish_reason})
    return cands


def _norm(text: str) -> str:
    return " ".join(text.split())


def select_traces(cands: Sequence[Mapping[str, Any]], scores: Mapping[str, Sequence[float]], f: FilterSection,
                  length_cap: int) -> tuple[list[int], list[str | None], dict[str, Any]]:
    """Rejection sampling. cands: dicts with prompt_index, completion, num_tokens, finish_reason;
    scores: {reward name: [value per candidate]}. Returns (kept indices, reason per candidate (None = kept),
    stats with counts per reason and the acceptance rate)."""
    mins = dict(zip(f.rewards, f.min_scores))
    seen: dict[int, set[str]] = {}
    per_prompt: Counter[int] = Counter()
    kept, reasons = [], []
    for j, c in enumerate(cands):
        p = c["prompt_index"]
        key = _norm(c["completion"])
        if c["finish_reason"] == "length":
            reason = "truncated"
        elif c["num_tokens"] > length_cap:
            reason = "too_long"
        elif any(math.isnan(scores[name][j]) for name in mins):
            reason = "score_failed"   # the reward could not be computed: not verified, so never kept
        elif any(scores[name][j] < m for name, m in mins.items()):
            reason = "low_reward"
        elif f.dedup and key in seen.get(p, set()):
            reason = "duplicate"
        elif f.max_per_prompt and per_prompt[p] >= f.max_per_prompt:
            reason = "over_quota"
        else:
            reason = None
            kept.append(j)
            per_prompt[p] += 1
            seen.setdefault(p, set()).add(key)
        reasons.append(reason)
    counts = Counter(r for r in reasons if r is not None)
    prompts = {c["prompt_index"] for c in cands}
    stats = {"candidates": len(cands), "kept": len(kept),
             "acceptance_rate": len(kept) / len(cands) if cands else 0.0,
             "prompts": len(prompts), "prompts_with_a_kept_trace": len(per_prompt),
             "rejected": {r: counts.get(r, 0) for r in REJECT_REASONS},
             "reward_means": {n: _mean([x for x in v if not math.isnan(x)]) for n, v in scores.items()}}
    return kept, reasons, stats


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v) if v else 0.0


def score_traces(cands: Sequence[Mapping[str, Any]], f: FilterSection, max_tokens: int
                 ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each filter reward's raw value per candidate (through the shared scorer: pool, timeouts, cache), and the
    scorer's metrics. A value the scorer could not compute (timeout, crash, unparsable gold) is NaN, and
    `select_traces` rejects that trace as "score_failed": only verified traces are kept."""
    from rewards.scorer import RewardScorer

    scorer = RewardScorer(f.rewards)
    samples = [{**c["row"], "completion_tokens": c["num_tokens"], "max_tokens": max_tokens} for c in cands]
    res = scorer.score([c["completion"] for c in cands], samples)
    if any(any(f) for f in res.failed_by_fn.values()):
        print(f"warning: reward scoring failed on some traces (rejected as score_failed): {res.metrics}; "
              f"example: {res.error_example}", flush=True)
    return {name: list(res.components[name]) for name in f.rewards}, dict(res.metrics)


def dataset_rows(cands: Sequence[Mapping[str, Any]], kept: Sequence[int], scores: Mapping[str, Sequence[float]],
                 provenance: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Kept traces as SFT rows: problem, answer, completion, the task's own fields, and `provenance`."""
    rows = []
    for j in kept:
        c = cands[j]
        extra = {k: v for k, v in c["row"].items() if k not in ("prompt", "solution", "problem", "answer")}
        rows.append({"problem": c["row"]["problem"], "answer": c["row"]["answer"], "completion": c["completion"],
                     **extra,
                     "provenance": {**provenance, "prompt_index": c["prompt_index"], "sample": c["sample"],
                                    "num_tokens": c["num_tokens"],
                                    "rewards": {n: float(v[j]) for n, v in scores.items()}}})
    return rows


def write_jsonl_atomic(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """All rows or nothing: written to a temporary file, then renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
