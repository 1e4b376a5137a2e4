"""Three outcomes for every reward and grade: correct, wrong, and *failed*.

A failed item is one whose reward could not be computed: the grader timed out or crashed, the gold answer does
not parse, the sandbox was unavailable. It is neither right nor wrong, so it must never be scored as 0 (which
would teach the policy that a correct answer was wrong) nor as 1. Callers exclude failed items from group
statistics and from the loss (GRPO), and report them separately from wrong answers (evaluation).

The contract for reward functions (`rewards.registry`):
  - a per-item function `fn(completion, sample) -> float` signals a failed item by raising; any exception
    (or a timeout) makes the item failed, `RewardFailed` says so on purpose, with a reason;
  - a batched function `fn(completions, samples) -> list` returns, per item, a float or a `Failed(reason)`.
"""
from __future__ import annotations

from dataclasses import dataclass


class RewardFailed(Exception):
    """Raised by a reward function when it cannot compute an item's reward (not the same as a wrong answer)."""


@dataclass(frozen=True)
class Failed:
    """The value a batched reward function returns for an item it could not score."""
    reason: str

    def __float__(self) -> float:  # a failed item must never be read as a number by accident
        raise RewardFailed(f"a failed reward item has no value ({self.reason})")


def is_failed(value: object) -> bool:
    return isinstance(value, Failed)


class ScoredBatch(list):
    """What a batched reward function may return instead of a plain list: the per-item values (floats or
    `Failed`) plus metrics about the batch, e.g. {"weak_frac": 0.1}; the scorer reports each as
    `reward/<function>/<key>`."""

    def __init__(self, values, metrics: dict[str, float] | None = None) -> None:
        super().__init__(values)
        self.metrics = dict(metrics or {})
