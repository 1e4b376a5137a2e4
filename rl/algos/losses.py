"""Policy losses, loss aggregation, KL and entropy for GRPO-style training.

Shapes: B sequences, T token positions. `mask` [B, T] is 1 on response tokens that take part in the loss.
Per-token log-probs are aligned with the tokens they score (position t holds log p(x_t | x_<t)).

Policy losses (registry POLICY_LOSSES; every one is called the same way, see `ppo_clip_loss`):
  ppo_clip  PPO-clip, the GRPO objective, with asymmetric clipping (ratio clipped to [1 - clip_eps_low,
            1 + clip_eps_high], DAPO "clip-higher") and dual-clip (Ye et al. 2020: for negative advantages the
            loss is also capped at -A * dual_clip_c);
  gspo      GSPO (Zheng et al. 2025, arXiv 2507.18071): the sequence-level ratio, clipped (`gspo_loss`);
  cispo     CISPO (MiniMax-M1, arXiv 2506.13585): clipped, detached IS weights on a REINFORCE term, so no
            token's gradient is ever dropped (`cispo_loss`).
`is_weights` [B, T] (detached) multiply each token's loss: the rollout correction
(rl.algos.rollout_correction: truncated/masked importance sampling against the rollout engine's log-probs) is
applied through them.
A loss's keyword defaults for clip_eps_low/high are its paper's (`policy_loss_defaults`).
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

import inspect
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


def policy_loss_defaults(name: str) -> dict[str, float]:
    """The registered loss's own clip_eps_low / clip_eps_high (its keyword defaults)."""
    params = inspect.signature(POLICY_LOSSES[name]).parameters
    return {k: params[k].default for k in ("clip_eps_low", "clip_eps_high")}


def _per_token(advantages: torch.Tensor) -> torch.Tensor:
    return advantages[:, None] if advantages.dim() == 1 else advantages


def _pg_metrics(loss: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor, log_ratio: torch.Tensor,
                lower_clipped: torch.Tensor | None = None) -> dict[str, float]:
    """The policy-gradient diagnostics over this batch's loss tokens (assemble rescales them to global)."""
    m = mask.bool()
    n = max(int(m.sum()), 1)
    out = {"actor/pg_loss": float(loss.detach()),
           "actor/clipfrac": float((clipped & m).sum()) / n,
           "actor/ppo_kl": float((-log_ratio.detach() * m).sum()) / n}
    if lower_clipped is not None:
        out["actor/pg_clipfrac_lower"] = float((lower_clipped & m).sum()) / n
    return out


def _only_ppo_dual_clip(name: str, dual_clip_c: float | None) -> None:
    if dual_clip_c is not None:
        raise ValueError(f"dual_clip_c is defined for ppo_clip only, not for {name} (got {dual_clip_c})")


@register_policy_loss("ppo_clip")
def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip_c: float | None = None,
                  agg: str = "token_mean", is_weights: torch.Tensor | None = None,
                  num_tokens: float | None = None, num_seqs: float | None = None, max_len: int | None = None,
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate. logp/old_logp/mask/is_weights [B, T]; advantages [B] or [B, T] -> (loss, metrics).

    The signature every registered policy loss has; normalisers are passed on to `agg_loss`."""
    adv = _per_token(advantages)
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
    if is_weights is not None:
        pg = pg * is_weights.detach()
    loss = agg_loss(pg, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return loss, _pg_metrics(loss, mask, pg2.detach() > pg1.detach(), log_ratio, lower_clipped)


@register_policy_loss("gspo")
def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_eps_low: float = 3e-4, clip_eps_high: float = 4e-4, dual_clip_c: float | None = None,
              agg: str = "token_mean", is_weights: torch.Tensor | None = None,
              num_tokens: float | None = None, num_seqs: float | None = None, max_len: int | None = None,
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO, sequence-level clipping. Shapes and return as `ppo_clip_loss`.

        s_i    = exp(mean_t m_t (log pi_t - log pi_old_t))       the sequence's geometric-mean ratio
        s_i,t  = sg[s_i] * pi_t / sg[pi_t]                       value s_i, d s_i,t / d log pi_t = s_i
        loss_t = max(-A s_i,t, -A clip(s_i,t, 1 - clip_eps_low, 1 + clip_eps_high))   (x is_weights)
    so a sequence is clipped as a whole, and its unclipped tokens get the gradient -A s_i. With
    agg=seq_mean_token_mean this is the paper's sequence objective mean_i max(-A_i s_i, -A_i clip(s_i)), value
    and gradient (GSPO-token with A_i,t = A_i); defaults 3e-4 / 4e-4 are the paper's clip range.
    As verl 0.9.1's `compute_policy_loss_gspo` (core_algos.py of the PyPI wheel verl-0.9.1, sha256
    db6e6f2a...): log s_i,t clamped at 10 before exp, no dual-clip, aggregated with the configured `agg`
    (verl 0.9.1 does the same; its 0.8.0.dev tree, commit b178a3cd, forced seq-mean-token-mean). Differences:
    the per-token log-ratio is taken on loss tokens only (torch.where), so values at padding never enter
    s_i, and `actor/pg_clipfrac_lower` (always 0 in verl) is not reported."""
    _only_ppo_dual_clip("gspo", dual_clip_c)
    adv = _per_token(advantages)
    m = mask.to(logp.dtype)
    log_ratio = torch.where(m.bool(), logp - old_logp, torch.zeros_like(logp))
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    s = torch.exp((logp - logp.detach() + seq_log_ratio.detach()).clamp(max=10.0))
    pg1 = -adv * s
    pg2 = -adv * s.clamp(1 - clip_eps_low, 1 + clip_eps_high)
    pg = torch.maximum(pg1, pg2)
    if is_weights is not None:
        pg = pg * is_weights.detach()
    loss = agg_loss(pg, m, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return loss, _pg_metrics(loss, m, pg2.detach() > pg1.detach(), log_ratio)


@register_policy_loss("cispo")
def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
               clip_eps_low: float = 1.0, clip_eps_high: float = 0.2, dual_clip_c: float | None = None,
               agg: str = "token_mean", is_weights: torch.Tensor | None = None,
               num_tokens: float | None = None, num_seqs: float | None = None, max_len: int | None = None,
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO, clipped IS weights. Shapes and return as `ppo_clip_loss`.

        r_t    = pi_t / pi_old_t                                  (log-ratio clamped to +-20)
        loss_t = -sg[clip(r_t, 1 - clip_eps_low, 1 + clip_eps_high)] * A * log pi_t      (x is_weights)
    The weight is clipped and detached, never the token: every token keeps the gradient -w_t A (PPO-clip
    zeroes the gradient of tokens outside the trust region). As verl 0.9.1's `compute_policy_loss_cispo`
    (PyPI wheel verl-0.9.1, sha256 db6e6f2a...; the 0.8.0.dev tree, commit b178a3cd, is the same), including
    `actor/clipfrac` = share of tokens whose weight was clipped. Defaults: MiniMax-M1 puts no lower bound on
    the weight (clip_eps_low >= 1: ratios are positive, so 1 - clip_eps_low <= 0 never binds; verl's example
    uses 10) and tunes only the upper one; 0.2 is verl's example (examples/cispo_trainer/ at b178a3cd). TRL's
    CISPO caps the weight at epsilon_high itself (recommending 5.0 after ScaleRL): clip_eps_high=4.0 here."""
    _only_ppo_dual_clip("cispo", dual_clip_c)
    adv = _per_token(advantages)
    log_ratio = (logp - old_logp).clamp(-20, 20)
    ratio = torch.exp(log_ratio.detach())
    weight = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)
    pg = -weight * adv * logp
    if is_weights is not None:
        pg = pg * is_weights.detach()
    loss = agg_loss(pg, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return loss, _pg_metrics(loss, mask, weight != ratio, log_ratio)
