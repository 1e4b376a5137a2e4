"""GSPO and CISPO against slow, obvious references (float64 loops over sequences and tokens): loss values,
gradients, clipped and unclipped sequences, padding invariance; the config's clip defaults."""
import math

import pytest
import torch

from rl.algos import POLICY_LOSSES, policy_loss_defaults
from rl.algos.losses import cispo_loss, gspo_loss, ppo_clip_loss
from rl.config import ConfigError, load_config
from rl.grpo.config import GRPOConfig

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def batch(seed=0, B=6, T=9, spread=0.3):
    """float64 log-probs with per-sequence shifts, so that some sequences' ratios leave any clip range."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    shift = torch.linspace(-spread, spread, B, dtype=torch.float64)[:, None]
    logp = old + shift + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[:, 0] = 1
    w = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)   # stand-in rollout-correction weights
    return logp, old, adv, mask, w


def coefficients(mask, agg):
    """c[b][t]: d(aggregated loss) / d(token loss), the obvious way."""
    B, T = mask.shape
    m = mask.tolist()
    n_tok = sum(map(sum, m))
    n_seq = sum(1 for row in m if sum(row) > 0)
    c = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if m[b][t]:
                c[b][t] = {"token_mean": 1 / n_tok, "seq_mean_token_mean": 1 / (sum(m[b]) * n_seq),
                           "seq_mean_token_sum_norm": 1 / (B * T)}[agg]
    return c


def slow_gspo(logp, old, adv, mask, w, lo, hi, agg):
    """(loss, d loss / d logp) of the GSPO-token objective, one token at a time."""
    B, T = logp.shape
    c = coefficients(mask, agg)
    loss, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        s = math.exp(sum(float(logp[b, t] - old[b, t]) for t in toks) / len(toks))
        a = float(adv[b])
        unclipped, clipped = -a * s, -a * min(max(s, 1 - lo), 1 + hi)
        for t in toks:
            loss += c[b][t] * float(w[b, t]) * max(unclipped, clipped)
            if unclipped >= clipped:           # the unclipped side is active: d(s_i,t)/d log pi_t = s_i
                grad[b, t] = c[b][t] * float(w[b, t]) * -a * s
    return loss, grad


def slow_cispo(logp, old, adv, mask, w, lo, hi, agg):
    B, T = logp.shape
    c = coefficients(mask, agg)
    loss, grad = 0.0, torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                weight = min(max(math.exp(float(logp[b, t] - old[b, t])), 1 - lo), 1 + hi)
                loss += c[b][t] * float(w[b, t]) * -weight * float(adv[b]) * float(logp[b, t])
                grad[b, t] = c[b][t] * float(w[b, t]) * -weight * float(adv[b])
    return loss, grad


def run(fn, logp, old, adv, mask, **kw):
    x = logp.clone().requires_grad_()
    loss, metrics = fn(x, old, adv, mask, **kw)
    loss.backward()
    return float(loss.detach()), x.grad, metrics


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [(3e-4, 4e-4), (0.05, 0.08), (0.9, 5.0)])   # most / some / no sequences clipped
def test_gspo_matches_reference_loss_and_gradient(agg, clip):
    logp, old, adv, mask, w = batch()
    loss, grad, m = run(gspo_loss, logp, old, adv, mask, clip_eps_low=clip[0], clip_eps_high=clip[1], agg=agg,
                        is_weights=w)
    ref_loss, ref_grad = slow_gspo(logp, old, adv, mask, w, *clip, agg)
    assert loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12)
    # the whole sequence is clipped or not: clipfrac is the share of tokens in sequences whose gradient is 0
    zero_rows = [(grad[b][mask[b].bool()] == 0).all().item() for b in range(len(adv))]
    assert m["actor/clipfrac"] == pytest.approx(sum(mask[b].sum().item() for b in range(len(adv)) if zero_rows[b])
                                                / mask.sum().item())
    if clip == (0.9, 5.0):
        assert m["actor/clipfrac"] == 0
    if clip == (3e-4, 4e-4):
        assert 0 < m["actor/clipfrac"] < 1


def test_gspo_with_seq_mean_token_mean_is_the_papers_sequence_objective():
    """mean_i max(-A_i s_i, -A_i clip(s_i)) with s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), differentiated through
    s_i itself (no stop-gradient trick): the same value and gradient."""
    logp, old, adv, mask, _ = batch(seed=3, spread=0.02)
    lo, hi = 3e-4, 4e-4
    x = logp.clone().requires_grad_()
    total = 0.0
    for b in range(len(adv)):
        toks = [t for t in range(logp.shape[1]) if mask[b, t]]
        s = torch.exp(sum(x[b, t] - old[b, t] for t in toks) / len(toks))
        a = float(adv[b])
        total = total + torch.maximum(-a * s, -a * s.clamp(1 - lo, 1 + hi))
    (total / len(adv)).backward()
    loss, grad, _ = run(gspo_loss, logp, old, adv, mask, agg="seq_mean_token_mean")   # paper defaults
    assert loss == pytest.approx(float(total.detach()) / len(adv), rel=1e-9)
    assert torch.allclose(grad, x.grad, atol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [(1.0, 0.2), (0.2, 0.28), (10.0, 4.0)])
def test_cispo_matches_reference_loss_and_gradient(agg, clip):
    logp, old, adv, mask, w = batch(seed=1, spread=0.6)
    loss, grad, m = run(cispo_loss, logp, old, adv, mask, clip_eps_low=clip[0], clip_eps_high=clip[1], agg=agg,
                        is_weights=w)
    ref_loss, ref_grad = slow_cispo(logp, old, adv, mask, w, *clip, agg)
    assert loss == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12)
    ratio = (logp - old).exp()
    clipped = ((ratio < 1 - clip[0]) | (ratio > 1 + clip[1])) & mask.bool()
    assert m["actor/clipfrac"] == pytest.approx(float(clipped.sum() / mask.sum()))
    if clip == (10.0, 4.0):
        assert m["actor/clipfrac"] == 0


def test_cispo_never_drops_a_tokens_gradient_where_ppo_clip_does():
    logp, old, adv, mask, _ = batch(seed=2, spread=0.6)
    adv = adv.abs()                                   # A > 0: PPO-clip zeroes the gradient of r > 1 + eps
    _, g_ppo, _ = run(ppo_clip_loss, logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2)
    _, g_cispo, m = run(cispo_loss, logp, old, adv, mask, clip_eps_low=1.0, clip_eps_high=0.2)
    above = ((logp - old).exp() > 1.2) & mask.bool()
    assert above.sum() > 3 and m["actor/clipfrac"] > 0
    assert (g_ppo[above] == 0).all()
    assert (g_cispo[mask.bool()] != 0).all()
    assert torch.allclose(g_cispo[above], -1.2 * adv[:, None].expand_as(above)[above] / mask.sum())


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo"])
@pytest.mark.parametrize("agg", AGGS)
def test_padding_changes_nothing(name, agg):
    """Extra padded columns and a fully padded row (mask 0, garbage log-probs and weights) change neither the
    loss, the gradient at real tokens, nor the metrics; padded positions get no gradient."""
    logp, old, adv, mask, w = batch(seed=4)
    B, T = logp.shape
    norm = {"num_tokens": float(mask.sum()), "num_seqs": float(B), "max_len": T}
    kw = {"agg": agg, "clip_eps_low": 0.1, "clip_eps_high": 0.1} if name != "cispo" else {"agg": agg}
    loss, grad, m = run(POLICY_LOSSES[name], logp, old, adv, mask, is_weights=w, **kw, **norm)
    g = torch.Generator().manual_seed(9)

    def pad(x, value_scale):
        out = value_scale * torch.randn(B + 1, T + 4, generator=g, dtype=torch.float64)
        out[:B, :T] = x
        return out

    pmask = torch.zeros(B + 1, T + 4, dtype=torch.float64)
    pmask[:B, :T] = mask
    p_logp, p_old, p_w = pad(logp, 30.0), pad(old, 30.0), pad(w, 1e3)
    p_adv = torch.cat([adv, torch.tensor([7.0], dtype=torch.float64)])
    p_loss, p_grad, p_m = run(POLICY_LOSSES[name], p_logp, p_old, p_adv, pmask, is_weights=p_w, **kw, **norm)
    assert p_loss == pytest.approx(loss, rel=1e-12, abs=1e-14)
    assert torch.allclose(p_grad[:B, :T], grad, atol=1e-14) and (p_grad[pmask == 0] == 0).all()
    assert p_m == pytest.approx(m, rel=1e-12, abs=1e-14)


def test_every_loss_takes_the_same_call_and_rejects_dual_clip_it_does_not_define():
    logp, old, adv, mask, w = batch()
    for name in ("ppo_clip", "gspo", "cispo"):
        loss, m = POLICY_LOSSES[name](logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=None,
                                      agg="token_mean", is_weights=w, num_tokens=10.0, num_seqs=6.0, max_len=9)
        assert {"actor/pg_loss", "actor/clipfrac", "actor/ppo_kl"} <= set(m) and loss.dim() == 0
    for name in ("gspo", "cispo"):
        with pytest.raises(ValueError, match="dual_clip_c is defined for ppo_clip only"):
            POLICY_LOSSES[name](logp, old, adv, mask, dual_clip_c=3.0)


def test_clip_defaults_are_each_losses_own_and_old_configs_keep_theirs():
    assert policy_loss_defaults("ppo_clip") == {"clip_eps_low": 0.2, "clip_eps_high": 0.2}
    assert policy_loss_defaults("gspo") == {"clip_eps_low": 3e-4, "clip_eps_high": 4e-4}
    assert policy_loss_defaults("cispo") == {"clip_eps_low": 1.0, "clip_eps_high": 0.2}
    a = load_config(GRPOConfig, None).algo
    assert (a.policy_loss, a.clip_eps_low, a.clip_eps_high) == ("ppo_clip", 0.2, 0.2)
    a = load_config(GRPOConfig, "configs/tiny_grpo.yaml").algo            # the YAML's values stay
    assert (a.clip_eps_low, a.clip_eps_high, a.rollout_correction) == (0.2, 0.28, "token_tis")
    a = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["algo.policy_loss=gspo", "algo.clip_eps_low=null",
                                                           "algo.clip_eps_high=null"]).algo
    assert (a.clip_eps_low, a.clip_eps_high) == (3e-4, 4e-4)
    a = load_config(GRPOConfig, None, ["algo.policy_loss=cispo", "algo.clip_eps_low=10"]).algo   # verl's example
    assert (a.clip_eps_low, a.clip_eps_high) == (10.0, 0.2)


@pytest.mark.parametrize("overrides,message", [
    (["algo.policy_loss=gspo", "algo.clip_eps_low=1.5"], r"algo.clip_eps_low: must be in \[0, 1\)"),
    (["algo.policy_loss=cispo", "algo.clip_eps_low=-1"], r"algo.clip_eps_low: must be >= 0"),
    (["algo.policy_loss=gspo", "algo.dual_clip_c=3"], r"algo.dual_clip_c: dual-clip is defined for .*ppo_clip"),
    (["algo.policy_loss=sapo"], r"algo.policy_loss: 'sapo' unknown; allowed: \['cispo', 'gspo', 'ppo_clip'\]"),
])
def test_policy_loss_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GRPOConfig, None, overrides)
