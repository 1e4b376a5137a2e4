"""The loss of one training micro-batch, assembled from the pure pieces (as verl's dp_actor does).

    w, kept = rollout_correction(old_logp, rollout_logp, mask)   token/sequence TIS, MIS, IcePop or none
    loss = policy_loss(logp, old_logp, A, kept, is_weights=w)   ppo_clip | gspo | cispo
         - entropy_coef * agg(entropy, kept)                    optional entropy bonus
         + kl_coef * agg(KL_k(logp, ref_logp), kept)            optional KL to the reference (GRPO's k3)
         + moe_aux_coef * share * moe_aux_loss                  optional MoE load-balancing loss
where A is the sequence advantage, plus -distill_coef * (log pi - log teacher - baseline) per token when a
teacher is set (on-policy distillation, `rl.algos.distill`). The correction applies to every policy loss: its
weights multiply the policy-gradient term of each token, and the tokens it rejects leave the whole loss (as
if they were not loss tokens) while the normalisers stay the global counts of loss tokens and sequences.

Normalisers are *global* (all micro-batches and data-parallel ranks of one optimizer step), so the gradient
does not depend on how the batch is split. For the same reason every metric returned here is additive: the
sum over the micro-batches and ranks of one mini-batch is that mini-batch's value. Loss terms are this
micro-batch's share of the mini-batch loss; token diagnostics (clip fraction, entropy, KL) are divided by the
global token count. So `actor/pg_loss` summed over micro-batches is the real loss, not a fraction of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.algos.distill import reverse_kl_advantages
from rl.algos.losses import POLICY_LOSSES, agg_loss, kl_penalty
from rl.algos.rollout_correction import rollout_correction


@dataclass(frozen=True)
class Normalisers:
    """Counts over the whole mini-batch (every micro-batch on every rank)."""
    num_tokens: float         # response tokens that take part in the loss
    num_seqs: float           # sequences with at least one such token
    max_len: int              # rollout.max_new_tokens (Dr. GRPO's constant normaliser)


@dataclass(frozen=True)
class LossTerms:
    """What the algorithm config asks for (a plain view of AlgoConfig, so this module needs no config)."""
    policy_loss: str = "ppo_clip"
    loss_agg: str = "token_mean"
    clip_eps_low: float | None = None    # None: the policy loss's own default (rl.algos.policy_loss_defaults)
    clip_eps_high: float | None = None
    dual_clip_c: float = 0.0
    tis_cap: float = 0.0
    rollout_correction: str = "token_tis"   # rl.algos.rollout_correction.ROLLOUT_CORRECTIONS (or an alias)
    seq_mask_low: float = 0.5
    seq_mask_high: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 5.0
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    distill_coef: float = 0.0
    moe_aux_coef: float = 0.0               # weight of the MoE router's load-balancing loss (rl.moe.replay)

    @classmethod
    def from_algo(cls, a) -> LossTerms:
        return cls(**{k: getattr(a, k) for k in cls.__dataclass_fields__ if hasattr(a, k)})


def assemble_loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, old_logp: torch.Tensor,
                  rollout_logp: torch.Tensor, terms: LossTerms, norm: Normalisers, *,
                  entropy: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                  teacher_logp: torch.Tensor | None = None, distill_baseline: float = 0.0,
                  moe_aux_loss: torch.Tensor | None = None, moe_aux_share: float = 1.0
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """logp (with grad), mask, old_logp, rollout_logp, entropy, ref_logp, teacher_logp: [B, T]; adv [B].
    moe_aux_loss: scalar load-balancing loss of this micro-batch's forward (rl.moe.replay), added as
    moe_aux_coef * moe_aux_share * moe_aux_loss, share = this micro-batch's part of the mini-batch (its real
    tokens over the mini-batch's), so the summed loss holds the token-weighted mean of the micro-batches' losses.

    Returns (loss, metrics); every metric is additive over the micro-batches and ranks of a mini-batch."""
    mask = mask.to(logp.dtype)
    agg = dict(num_tokens=norm.num_tokens, num_seqs=norm.num_seqs, max_len=norm.max_len)
    if teacher_logp is not None and terms.distill_coef > 0:
        adv = reverse_kl_advantages(adv, old_logp, teacher_logp, terms.distill_coef, distill_baseline)
    weights, kept, metrics = rollout_correction(
        old_logp, rollout_logp, mask, terms.rollout_correction, tis_cap=terms.tis_cap,
        seq_low=terms.seq_mask_low, seq_high=terms.seq_mask_high, icepop_low=terms.icepop_low,
        icepop_high=terms.icepop_high, num_tokens=norm.num_tokens)
    mask = kept.to(logp.dtype)   # weights are exactly 1 where a mode does not weight: x * 1.0 == x
    clip = {k: v for k, v in (("clip_eps_low", terms.clip_eps_low), ("clip_eps_high", terms.clip_eps_high))
            if v is not None}
    loss, pm = POLICY_LOSSES[terms.policy_loss](
        logp, old_logp, adv, mask, **clip, dual_clip_c=terms.dual_clip_c or None, agg=terms.loss_agg,
        is_weights=weights.to(logp.dtype), **agg)
    local_tokens = float(mask.sum())
    share = local_tokens / max(norm.num_tokens, 1.0)   # local token fraction -> global token fraction
    metrics["actor/pg_loss"] = float(loss.detach())
    for k in ("actor/clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        if k in pm:
            metrics[k] = pm[k] * share
    if entropy is not None:
        metrics["actor/entropy"] = float((entropy.detach() * mask).sum()) / max(norm.num_tokens, 1.0)
        if terms.entropy_coef > 0:
            ent_loss = agg_loss(entropy, mask, terms.loss_agg, **agg)
            loss = loss - terms.entropy_coef * ent_loss
            metrics["actor/entropy_loss"] = float(ent_loss.detach())
    if ref_logp is not None and terms.kl_coef > 0:
        kl = kl_penalty(logp, ref_logp, terms.kl_estimator)
        kl_loss = agg_loss(kl, mask, terms.loss_agg, **agg)
        loss = loss + terms.kl_coef * kl_loss
        metrics["actor/kl_loss"] = float(kl_loss.detach())
        metrics["actor/kl"] = float((kl.detach() * mask).sum()) / max(norm.num_tokens, 1.0)
    if moe_aux_loss is not None and terms.moe_aux_coef > 0:
        loss = loss + terms.moe_aux_coef * moe_aux_share * moe_aux_loss.to(loss.dtype)
        metrics["actor/moe_aux_loss"] = float(moe_aux_loss.detach()) * moe_aux_share
    metrics["actor/loss"] = float(loss.detach())
    return loss, metrics

