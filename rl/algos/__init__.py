"""GRPO family algorithms as pure functions: advantage estimators, policy losses, KL estimators, aggregation,
rollout correction."""
from rl.algos.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, register_advantage
from rl.algos.losses import (LOSS_AGGREGATIONS, POLICY_LOSSES, agg_loss, entropy_from_logits, kl_penalty,
                             policy_loss_defaults, register_policy_loss, token_logprobs)
from rl.algos.rollout_correction import ROLLOUT_CORRECTIONS, rollout_correction

__all__ = ["ADVANTAGE_ESTIMATORS", "compute_advantages", "register_advantage", "POLICY_LOSSES",
           "register_policy_loss", "policy_loss_defaults", "LOSS_AGGREGATIONS", "agg_loss", "kl_penalty",
           "entropy_from_logits", "token_logprobs", "ROLLOUT_CORRECTIONS", "rollout_correction"]
