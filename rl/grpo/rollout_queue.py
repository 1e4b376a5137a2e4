"""Which generation batches are in flight, and with which weights (overlapped rollouts, `rollout.async_steps`).

With async_steps = k, the batch that step t trains on is launched up to k steps earlier, while earlier
steps train: generation of step t+1 overlaps the update of step t. A batch launched when the engines held
weight version v and trained at step t (policy version t) is t - v steps stale; launching batch j only once the
engines hold version j - k keeps every sample's staleness <= k. k = 0 is the synchronous loop.

Rollout actors execute calls in submission order, so "the weights a batch is generated with" is simply the last
weight load submitted before its launch; the driver passes that version here. Each entry also remembers the data
cursor before its prompts were taken, so a checkpoint records where the *untrained* prompts start, and a resumed
run regenerates the batches that were in flight when it stopped.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Pending:
    step: int                 # the training step (0-based) that will consume this batch
    version: int              # weight version the engines held at launch
    cursor: dict[str, int]    # data cursor before this batch's prompts were taken
    handle: Any               # whatever `launch` returned (Ray object refs)


class RolloutQueue:
    def __init__(self, ahead: int) -> None:
        if ahead < 0:
            raise ValueError(f"rollout.async_steps must be >= 0, got {ahead}")
        self.ahead = ahead
        self.pending: deque[Pending] = deque()
        self.next_step: int | None = None

    def fill(self, step: int, version: int, cursor: Callable[[], dict[str, int]],
             launch: Callable[[int], Any]) -> None:
        """Launch every batch up to step + ahead that is not in flight yet, with the engines at `version`."""
        if self.next_step is None:
            self.next_step = step
        while self.next_step <= step + self.ahead:
            before = cursor()
            self.pending.append(Pending(self.next_step, version, before, launch(self.next_step)))
            self.next_step += 1

    def pop(self, step: int) -> Pending:
        if not self.pending or self.pending[0].step != step:
            raise RuntimeError(f"rollout queue out of order: step {step}, pending "
                               f"{[p.step for p in self.pending]}")
        return self.pending.popleft()

    def resume_cursor(self) -> dict[str, int] | None:
        """The cursor of the oldest untrained batch (None when nothing is in flight)."""
        return dict(self.pending[0].cursor) if self.pending else None
