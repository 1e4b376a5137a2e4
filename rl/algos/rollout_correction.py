"""Rollout correction: reweight or mask tokens by how far the policy that sampled them is from the trainer's.

The rollout engine samples from pi_rollout, which is not the trainer's pi_old: its sampler's numerics differ
(vLLM kernels, bf16, fused ops; MoE routing and quantized rollouts differ more), and with overlapped rollouts
(`rollout.async_steps`) its weights are up to k updates older, so the same correction also covers staleness.
Per token, with m the loss mask (1 on the policy's own response tokens; padding and inserted tool-output
tokens are 0 and never enter any ratio below):

    log r_t = log pi_old(y_t) - log pi_rollout(y_t)         (clamped to +-20 before exp, as verl does)
    rho_i   = exp(sum_t m_t log r_t)                        the sequence's likelihood ratio (product of r_t)
    g_i     = exp(sum_t m_t log r_t / sum_t m_t)            its geometric mean (length-invariant)

mode        weight w_t (detached)               kept (1 = in the loss)              literature
none        1                                   m_t
token_tis   min(r_t, tis_cap)                   m_t                                 Yao et al. 2025, "TIS"
seq_tis     min(rho_i, tis_cap)                 m_t                                 verl rollout_is=sequence
token_mis   r_t                                 m_t * [r_t <= tis_cap]              masked IS (token-MIS)
seq_mis     1                                   m_t * [seq_low <= g_i <= seq_high]  verl Geo-RS; our seq_mask
icepop      r_t                                 m_t * [icepop_low <= r_t <= icepop_high]   IcePop (Ring-1T)

`tis` and `seq_mask` (the names before this family) are accepted aliases of `token_tis` and `seq_mis`.

Choices made against verl 0.9.1 (verl/trainer/ppo/rollout_corr_helper.py of the PyPI wheel verl-0.9.1,
sha256 db6e6f2a...; its 0.8.0.dev tree, commit b178a3cd, has the same token/sequence TIS but no IcePop yet):
  - seq_tis uses the *product* rho_i (verl: rollout_is=sequence, exp(masked_sum(log_ratio)); TRL's
    sequence_truncate too): it is the sequence's actual importance weight, so truncating it gives the TIS
    estimator at sequence level. A geometric mean is not an importance weight of anything.
  - seq_mis tests the *geometric mean* g_i and keeps weight 1 (what our `seq_mask` always did; verl calls
    this Geo-RS, rollout_rs=seq_mean_k1). verl's "Seq-MIS" preset instead masks on the product rho_i and keeps
    rho_i as the weight. Deliberate: the spread of log rho_i grows like sqrt(length) (4,000 tokens with a
    per-token log-ratio noise of 0.02 give a standard deviation of 1.3), so a fixed [0.5, 2] on the product
    rejects most long reasoning traces for their length alone; the geometric mean does not.
  - token_mis and icepop keep r_t as the weight of kept tokens (masked IS: "rho_t * 1[rho_t <= C]"; IcePop's
    M(k) = k inside [alpha, beta], 0 outside; verl's rollout_is_threshold "low_high" and TRL's token_mask do
    the same). token_mis has an upper threshold only (tis_cap, the same C verl uses for both); icepop is
    two-sided with IcePop's alpha = 0.5, beta = 5.
  - tis_cap = 0 turns token_tis off (weight 1), as `tis` always did; the other capped modes need a cap.

Metrics are additive over micro-batches and ranks (see rl.algos.assemble), divided by the global number of
loss tokens `num_tokens`:
    rollout/is_weight_mean   mean over loss tokens of w_t * kept_t: what multiplies a token's policy gradient,
                             counting masked tokens as 0 (1.0 when the correction changes nothing)
    rollout/is_masked_frac   share of loss tokens that the correction masked
"""
from __future__ import annotations

import torch

ROLLOUT_CORRECTIONS = ("none", "token_tis", "seq_tis", "token_mis", "seq_mis", "icepop")
ALIASES = {"tis": "token_tis", "seq_mask": "seq_mis"}
SAFETY_BOUND = 20.0   # |log ratio| is clamped to this before exp (exp(20) ~ 4.9e8), as verl does


def canonical_mode(mode: str) -> str:
    """The family's name for `mode` (aliases resolved); ValueError listing the allowed names otherwise."""
    mode = ALIASES.get(mode, mode)
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; allowed: {list(ROLLOUT_CORRECTIONS)} "
                         f"(aliases: {ALIASES})")
    return mode


def masked_log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] log pi_old - log pi_rollout on loss tokens, exactly 0 elsewhere (whatever the values there)."""
    diff = (old_logp.detach() - rollout_logp.detach()).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return torch.where(mask.bool(), diff, torch.zeros_like(diff))


def rollout_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, mode: str, *,
                       tis_cap: float = 2.0, seq_low: float = 0.5, seq_high: float = 2.0,
                       icepop_low: float = 0.5, icepop_high: float = 5.0, num_tokens: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """old_logp, rollout_logp, mask [B, T] -> (weights [B, T] detached, kept [B, T], metrics).

    `kept` is `mask` with the rejected tokens set to 0 (float, old_logp's dtype); `weights` are 1 wherever
    mask is 0.
    `num_tokens`: the global loss-token count the metrics are divided by (default: this batch's)."""
    mode = canonical_mode(mode)
    if mode in ("seq_tis", "token_mis") and not tis_cap > 0:
        raise ValueError(f"rollout correction {mode} needs tis_cap > 0, got {tis_cap}")
    m = mask.to(old_logp.dtype)
    mb = m.bool()
    log_r = masked_log_ratio(old_logp, rollout_logp, m)
    ones = torch.ones_like(log_r)
    w, keep = ones, ones
    if mode == "token_tis" and tis_cap > 0:
        w = log_r.exp().clamp(max=tis_cap)
    elif mode == "seq_tis":
        log_rho = log_r.sum(-1, keepdim=True).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        w = log_rho.exp().clamp(max=tis_cap).expand_as(log_r)
    elif mode == "token_mis":
        r = log_r.exp()
        w, keep = r, (r <= tis_cap).to(r.dtype)
    elif mode == "seq_mis":
        g = (log_r.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).exp()
        keep = ((g >= seq_low) & (g <= seq_high)).to(g.dtype).expand_as(log_r)
    elif mode == "icepop":
        r = log_r.exp()
        w, keep = r, ((r >= icepop_low) & (r <= icepop_high)).to(r.dtype)
    weights = torch.where(mb, w, ones).detach()
    kept = m * keep
    n = float(num_tokens) if num_tokens is not None else float(m.sum())
    n = max(n, 1.0)
    metrics = {"rollout/is_weight_mean": float((weights * kept).sum()) / n,
               "rollout/is_masked_frac": float((m - kept).sum()) / n}
    return weights, kept, metrics
