"""Three outcomes for every reward and grade: correct, wrong, and *failed*.

A failed item is one whose reward could not be computed: the grader timed out or crashed, the gold answer does
not parse, the sandbox was unavailable. It is neither right nor wrong, so it must never be scored as 0 (which
would teach the policy that a correct answer was wrong) nor as 1. Callers exclude failed items from group
statistics and from the loss (GRPO), and report them separately from wrong answers (evaluation).

The contract for reward functions (`rewards.registry`):
  - a per-item function `fn(completion, sample) -> float` signals a failed item by raising; any exception
    (or a timeout) makes the item failed, `RewardFailed` says so on purpose, with a reason;
  - a batched function `fn(completions, samples) -> list` returns, per item, a float or a `Failed(reason)`.

Transient failures are retried before an item counts as failed (`RewardScorer(retries=...)`, GRPO's
`reward.retries`, with exponential backoff): a remote verifier that is busy, unreachable or slow may answer the
next time, a wrong gold answer never will. What is transient (`is_transient`):
  - `TransientRewardError` (raise it to ask for a retry), `TimeoutError` and `ConnectionError` (with their
    subclasses: socket timeouts, refused / reset / aborted connections, broken pipes);
  - `urllib.error.URLError` that is not an HTTP answer (name resolution, unreachable network);
  - an HTTP answer with status 408, 425, 429 or 5xx, read from `.code` (urllib's HTTPError), `.status_code` or
    `.status` of the exception or of its `.response` (requests, httpx, aiohttp, openai-style clients);
  - an exception whose class (or a base) is named like a client library's network error: ending in `Timeout`,
    `TimeoutError`, `TimeoutException`, `ConnectionError`, `ConnectError` or `NetworkError` (requests, httpx,
    aiohttp, openai);
  - for batched functions, `Failed(reason, transient=True)` on an item.
Anything else (ValueError, KeyError, RewardFailed, a non-number) is deterministic and fails the item at once.
"""
from __future__ import annotations

from dataclasses import dataclass


class RewardFailed(Exception):
    """Raised by a reward function when it cannot compute an item's reward (not the same as a wrong answer)."""


class TransientRewardError(RewardFailed):
    """Raised by a reward function whose failure may not repeat (a busy or unreachable verifier): retried."""


@dataclass(frozen=True)
class Failed:
    """The value a batched reward function returns for an item it could not score."""
    reason: str
    transient: bool = False   # worth retrying (a batched function's remote call failed for this item)

    def __float__(self) -> float:  # a failed item must never be read as a number by accident
        raise RewardFailed(f"a failed reward item has no value ({self.reason})")


def is_failed(value: object) -> bool:
    return isinstance(value, Failed)


RETRY_HTTP_STATUS = frozenset({408, 425, 429})
_NETWORK_NAMES = ("Timeout", "TimeoutError", "TimeoutException", "ConnectionError", "ConnectError", "NetworkError")


def _http_status(e: BaseException) -> int | None:
    for obj in (e, getattr(e, "response", None)):
        for attr in ("code", "status_code", "status"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, int) and 100 <= v < 600:
                return v
    return None


def is_transient(e: BaseException) -> bool:
    """Whether a reward function's exception is worth a retry (the list in this module's docstring)."""
    import urllib.error

    if isinstance(e, (TransientRewardError, TimeoutError, ConnectionError)):
        return True
    status = _http_status(e)
    if status is not None:
        return status in RETRY_HTTP_STATUS or status >= 500
    if isinstance(e, urllib.error.URLError):
        return True
    return any(cls.__name__.endswith(_NETWORK_NAMES) for cls in type(e).__mro__)


class ScoredBatch(list):
    """What a batched reward function may return instead of a plain list: the per-item values (floats or
    `Failed`) plus metrics about the batch, e.g. {"weak_frac": 0.1}; the scorer reports each as
    `reward/<function>/<key>`."""

    def __init__(self, values, metrics: dict[str, float] | None = None) -> None:
        super().__init__(values)
        self.metrics = dict(metrics or {})
