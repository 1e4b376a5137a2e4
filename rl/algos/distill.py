"""On-policy distillation: per-token reverse KL to a teacher as the advantage (Agarwal et al. 2024, GKD;
Thinking Machines 2025, "On-policy distillation"; Qwen3's strong-to-weak distillation).

The student samples y ~ pi; the teacher q scores the sampled tokens. The objective is the reverse KL
    KL(pi || q) = E_{y~pi} sum_t [log pi(y_t | y_<t) - log q(y_t | y_<t)],
whose score-function gradient is E[sum_t (log pi_t - log q_t) grad log pi_t] (the extra E[grad log pi] term is 0).
So each sampled token gets the advantage  A_t = -(log pi_t - log q_t)  (detached), and the ordinary
policy-gradient loss (here PPO-clip, with its importance ratio and clipping) minimises the reverse KL: tokens the
teacher finds likelier than the student are pushed up, the others down. It is mode-seeking and dense (one signal
per token instead of one per sequence), which is why it needs far fewer samples than RL.

How this differs from the papers: we use the per-token (discount 0) estimate as Thinking Machines do, not the
full future sum of the reverse KL; we subtract the batch's mean reverse KL as a baseline (unbiased, lower
variance: measured on the tiny model, the reverse KL did not fall without it); and the reverse-KL advantage is
*added* to the GRPO advantage (scaled by `coef`), so distillation and rule rewards can be mixed. Pure
distillation = reward weights of 0.
Teacher and student must share the tokenizer: log q is read at the student's token ids.
"""
from __future__ import annotations

import torch


def reverse_kl_advantages(adv: torch.Tensor, logp: torch.Tensor, teacher_logp: torch.Tensor, coef: float,
                          baseline: float = 0.0) -> torch.Tensor:
    """adv [B] (sequence advantages) or [B, T]; logp, teacher_logp [B, T] log-probs of the sampled tokens under
    the student (at sampling time) and the teacher -> per-token advantages [B, T]
        adv - coef * ((logp - teacher) - baseline).
    A constant baseline (e.g. the batch's mean reverse KL) leaves the gradient unbiased (E[grad log pi] = 0 at
    every position) and removes most of its variance: without it every token's advantage has the same sign."""
    seq = adv[:, None] if adv.dim() == 1 else adv
    return seq - coef * ((logp - teacher_logp).detach() - baseline)


def reverse_kl_metrics(logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean per-token reverse-KL estimate (k1) over response tokens."""
    m = mask.bool()
    d = (logp - teacher_logp)[m]
    return {"distill/reverse_kl": float(d.mean()) if d.numel() else 0.0}
