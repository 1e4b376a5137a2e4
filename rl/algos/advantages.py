"""Outcome-reward advantage estimators for grouped samples (one scalar reward per completion).

Implements
  grpo     (r - mean_g) / (std_g + eps)          DeepSeekMath / R1 (std is the unbiased sample std, as verl)
  dr_grpo  r - mean_g                            Dr. GRPO (Liu et al. 2025): no std normalisation, which
                                                 otherwise up-weights groups with tiny reward variance
  rloo     r - mean of the *other* samples       REINFORCE leave-one-out (Ahmadian et al. 2024)
           = n/(n-1) * (r - mean_g)
All return a per-sequence advantage; the loss broadcasts it over the response tokens. Groups of size 1 get
advantage 0 (no baseline exists). Differences from the papers: none in the math; the std uses eps=1e-6.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def register_advantage(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} already registered; known: {sorted(ADVANTAGE_ESTIMATORS)}")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return deco


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group mean, unbiased group std and group size. rewards, group_ids: [B]."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    g = int(inv.max()) + 1
    r = rewards.double()
    count = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, r) / count
    sq = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, (r - mean[inv]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return mean[inv], std[inv], count[inv]


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """rewards [B], group_ids [B] -> advantages [B] (float32), metrics."""
    mean, std, count = _group_stats(rewards, group_ids)
    adv = torch.where(count > 1, (rewards.double() - mean) / (std + eps), torch.zeros_like(mean))
    return adv.float(), {"adv/zero_std_groups_frac": float((std[count > 1] < eps).double().mean()) if (count > 1).any() else 0.0}


@register_advantage("dr_grpo")
def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, dict]:
    mean, _, count = _group_stats(rewards, group_ids)
    adv = torch.where(count > 1, rewards.double() - mean, torch.zeros_like(mean))
    return adv.float(), {}


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, dict]:
    mean, _, count = _group_stats(rewards, group_ids)
    adv = torch.where(count > 1, (rewards.double() - mean) * count / (count - 1).clamp(min=1), torch.zeros_like(mean))
    return adv.float(), {}


def compute_advantages(name: str, rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    adv, metrics = ADVANTAGE_ESTIMATORS[name](rewards, group_ids)
    metrics = {**metrics, "adv/mean": float(adv.mean()), "adv/abs_mean": float(adv.abs().mean())}
    return adv, metrics
