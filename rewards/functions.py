"""Builtin reward functions (R1-style rule-based rewards) and their weighted combination.

All follow the plugin contract `fn(completion, sample) -> float`:
  accuracy  1.0 if the final boxed answer is right (math grader; countdown rows are checked by evaluating the
            expression), 0.0 if it is wrong; an item the grader could not judge (timeout, dead worker, gold
            answer that does not parse) raises `GradingFailed` (a `RewardFailed`): it is failed, not 0
  format    1.0 for `<think>...</think>` followed by a boxed answer (R1's format reward), else 0.0
  overlong  DAPO's soft overlong penalty: 0 up to `max_tokens - buffer`, then linearly down to -1 at
            `max_tokens` (lengths in tokens when the sample carries `completion_tokens`, else characters/4)
  length_penalty  -length / max_tokens
The weighted combination of several rewards is `rewards.scorer.RewardScorer`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rewards.countdown import check_completion
from rewards.extract import extract_answer
from rewards.registry import register

_FORMAT = re.compile(r"^\s*(<think>)?(?P<think>.*?)</think>(?P<answer>.*)$", re.S)


@register("accuracy", trusted=True)
def accuracy(completion: str, sample: Mapping[str, Any]) -> float:
    """Task-aware correctness: countdown by evaluation, everything else by the (bounded) math grader."""
    if sample.get("task") == "countdown":
        return float(check_completion(completion, sample))
    from rewards.math import REWARD_POLICY, verify

    if "answer" not in sample:
        raise KeyError(f"accuracy reward: the sample has no 'answer' field (fields: {sorted(sample)})")
    return 1.0 if verify(completion, sample["answer"], policy=REWARD_POLICY) else 0.0  # raises GradingFailed for a failed item


@register("format", trusted=True)
def format_reward(completion: str, sample: Mapping[str, Any]) -> float:
    """R1 format: reasoning inside <think>...</think> (the opening tag may be in the prompt), then a boxed
    answer after it, and no second think block."""
    m = _FORMAT.match(completion)
    if not m or "<think>" in m.group("answer") or "</think>" in m.group("think"):
        return 0.0
    return 1.0 if extract_answer(completion) is not None and m.group("think").strip() else 0.0


def overlong_penalty(length: int, max_tokens: int, buffer: int) -> float:
    """DAPO soft overlong punishment, in [-1, 0]."""
    if max_tokens <= 0 or length <= max_tokens - buffer:
        return 0.0
    return max(-1.0, (max_tokens - buffer - length) / max(1, buffer))


@register("overlong", trusted=True)
def overlong(completion: str, sample: Mapping[str, Any]) -> float:
    length = int(sample.get("completion_tokens") or len(completion) // 4)
    return overlong_penalty(length, int(sample.get("max_tokens", 0)), int(sample.get("overlong_buffer", 0)))


@register("length_penalty", trusted=True)
def length_penalty(completion: str, sample: Mapping[str, Any]) -> float:
    """Plain length cost in [-1, 0]: -length / max_tokens (tokens when known, else characters/4)."""
    max_len = int(sample.get("max_tokens", 0)) or 1
    length = int(sample.get("completion_tokens") or len(completion) // 4)
    return -min(1.0, length / max_len)
