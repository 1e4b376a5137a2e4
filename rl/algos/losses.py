"""Policy losses, loss aggregation, KL and entropy for GRPO-style training.

Shapes: B sequences, T token positions. `mask` [B, T] is 1 on response tokens that take part in the loss.
Per-token log-probs are aligned with the tokens they score (position t holds log p(x_t | x_<t)).

PPO-clip (the GRPO objective) with
  - asymmetric clipping: ratio clipped to [1 - clip_eps_low, 1 + clip_eps_high] (DAPO "clip-higher");
  - dual-clip (Ye et al. 2020): for negative advantages the loss is also capped at -A * dual_clip_c;
  - truncated importance sampling (TIS, Yao et al. 2025) against the rollout engine's log-probs: each
    token's loss is multiplied by min(exp(old_logp - rollout_logp), tis_cap), correcting the mismatch
    between vLLM's sampler and the trainer's numerics.
KL to the reference policy sits in the loss (as GRPO does, not in the reward) with estimators
  k1 = log r,  k2 = (log r)^2 / 2,  k3 = exp(-log r) + log r - 1   where log r = logp - ref_logp
(Schulman 2020, "Approximating KL divergence"); k3 is GRPO's choice.
Aggregations (how token losses become one number; see Dr. GRPO and DAPO):
  token_mean               sum(loss * mask) / num_tokens                (DAPO, token-level)
  seq_mean_token_mean      mean over sequences of each sequence's token mean   (original GRPO)
  seq_mean_token_sum_norm  sum(loss * mask) / (num_seqs * max_len)      (Dr. GRPO, a constant normaliser)
Normalisers can be passed in (global counts over all data-parallel ranks and micro-batches), so that
splitting a batch does not change the gradient.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

POLICY_LOSSES: dict[str, Callable] = {}
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def register_policy_loss(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} already registered; known: {sorted(POLICY_LOSSES)}")
        POLICY_LOSSES[name] = fn
        return fn
    return deco


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, T, V], input_ids [B, T] -> [B, T] log p(x_t | x_<t) (position 0 is 0).

    Logits are divided by the sampling temperature so that these match the sampler's distribution."""
    logits = logits[:, :-1].float() / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(lp, (1, 0))


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T, V] -> [B, T] entropy of the next-token distribution, aligned like `token_logprobs`."""
    logits = logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return F.pad(-(logp.exp() * logp).sum(-1), (1, 0))


def agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, *, num_tokens: float | None = None,
             num_seqs: float | None = None, max_len: int | None = None) -> torch.Tensor:
    """loss, mask [B, T] -> scalar. Normalisers default to this batch's own counts."""
    mask = mask.to(loss.dtype)
    if mode == "token_mean":
        denom = num_tokens if num_tokens is not None else mask.sum()
        return (loss * mask).sum() / max(float(denom), 1.0)
    if mode == "seq_mean_token_mean":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        n = num_seqs if num_seqs is not None else float((mask.sum(-1) > 0).sum())
        return per_seq.sum() / max(float(n), 1.0)
    if mode == "seq_mean_token_sum_norm":
        n = num_seqs if num_seqs is not None else loss.shape[0]
        length = max_len if max_len is not None else loss.shape[1]
        return (loss * mask).sum() / max(float(n) * length, 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {LOSS_AGGREGATIONS}")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled tokens' log-probs [B, T]."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # clamp for numerical safety far from the reference, as verl does
        return (torch.exp(-log_ratio.clamp(-20, 20)) + log_ratio - 1).clamp(-10, 10)
    raise ValueError(f"unknown KL estimator {kind!r}; allowed: {KL_ESTIMATORS}")


@register_policy_loss("ppo_clip")
def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip_c: float | None = None,
                  agg: str = "token_mean", rollout_logp: torch.Tensor | None = None, tis_cap: float | None = None,
                  num_tokens: float | None = None, num_seqs: float | None = None, max_len: int | None = None,
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate. logp/old_logp/mask [B, T]; advantages [B] or [B, T]. Returns (loss, metrics)."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    log_ratio = (logp - old_logp).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)
    clipped = torch.maximum(pg1, pg2)
    pg = clipped
    lower_clipped = torch.zeros_like(pg, dtype=torch.bool)
    if dual_clip_c is not None:
        cap = -adv * dual_clip_c
        lower_clipped = (adv < 0) & (clipped > cap)
        pg = torch.where(adv < 0, torch.minimum(clipped, cap), clipped)
    if rollout_logp is not None and tis_cap is not None:
        w = torch.exp((old_logp - rollout_logp).clamp(-20, 20)).clamp(max=tis_cap).detach()
        pg = pg * w
    loss = agg_loss(pg, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    m = mask.bool()
    n = max(int(m.sum()), 1)
    pg1, pg2, log_ratio = pg1.detach(), pg2.detach(), log_ratio.detach()
    metrics = {
        "actor/pg_loss": float(loss.detach()),
        "actor/clipfrac": float(((pg2 > pg1) & m).sum()) / n,
        "actor/ppo_kl": float((-log_ratio * m).sum()) / n,
        "actor/pg_clipfrac_lower": float((lower_clipped & m).sum()) / n,
    }
    return loss, metrics
