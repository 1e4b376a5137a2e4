"""The rollout-correction family against slow, obvious references: weights, masks, metrics and the gradient of
the assembled loss, per mode; tokens outside the loss mask (padding, inserted tool output) never count;
micro-batch splitting changes nothing for any policy loss x correction."""
import math

import pytest
import torch

from rl.algos.assemble import LossTerms, Normalisers, assemble_loss
from rl.algos.rollout_correction import ROLLOUT_CORRECTIONS, rollout_correction
from rl.config import ConfigError, load_config
from rl.grpo.config import GRPOConfig

TH = {"tis_cap": 2.0, "seq_low": 0.8, "seq_high": 1.25, "icepop_low": 0.5, "icepop_high": 1.5}


def batch(seed=0, B=7, T=8):
    """float64 log-probs whose rollout ratios span every threshold (token ratios ~ e^{+-1}, sequences apart)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    seq_shift = torch.linspace(-0.4, 0.4, B, dtype=torch.float64)[:, None]
    roll = old - seq_shift + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    mask[:, 0] = 1
    logp = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, roll, mask, adv


def slow_correction(old, roll, mask, mode, tis_cap, seq_low, seq_high, icepop_low, icepop_high):
    """Weights and kept mask from the definitions, one sequence and token at a time."""
    mode = {"tis": "token_tis", "seq_mask": "seq_mis"}.get(mode, mode)
    B, T = old.shape
    w = [[1.0] * T for _ in range(B)]
    kept = [[float(mask[b, t]) for t in range(T)] for b in range(B)]
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        log_r = {t: float(old[b, t] - roll[b, t]) for t in toks}
        rho = math.exp(sum(log_r.values()))                      # product of the token ratios
        geo = math.exp(sum(log_r.values()) / len(toks))          # their geometric mean
        for t in toks:
            r = math.exp(log_r[t])
            if mode == "token_tis":
                w[b][t] = min(r, tis_cap)
            elif mode == "seq_tis":
                w[b][t] = min(rho, tis_cap)
            elif mode == "token_mis":
                w[b][t], kept[b][t] = r, float(r <= tis_cap)
            elif mode == "seq_mis":
                kept[b][t] = float(seq_low <= geo <= seq_high)
            elif mode == "icepop":
                w[b][t], kept[b][t] = r, float(icepop_low <= r <= icepop_high)
    return torch.tensor(w, dtype=torch.float64), torch.tensor(kept, dtype=torch.float64)


@pytest.mark.parametrize("mode", list(ROLLOUT_CORRECTIONS) + ["tis", "seq_mask"])
def test_weights_masks_and_metrics_match_reference(mode):
    _, old, roll, mask, _ = batch()
    w, kept, m = rollout_correction(old, roll, mask, mode, **TH)
    ref_w, ref_kept = slow_correction(old, roll, mask, mode, **TH)
    assert torch.allclose(w, ref_w, rtol=1e-12) and torch.equal(kept, ref_kept)
    assert not w.requires_grad
    n = float(mask.sum())
    assert m["rollout/is_weight_mean"] == pytest.approx(float((ref_w * ref_kept).sum()) / n)
    assert m["rollout/is_masked_frac"] == pytest.approx(float((mask - ref_kept).sum()) / n)
    masks = mode in ("token_mis", "seq_mis", "icepop", "seq_mask")
    assert (m["rollout/is_masked_frac"] > 0) == masks       # the batch crosses every threshold
    assert (m["rollout/is_masked_frac"] < 0.9)
    if mode in ("token_tis", "tis", "seq_tis"):
        assert w.max() == 2.0 and w.min() < 1                 # truncated above, not below


def test_sequence_tis_uses_the_product_and_seq_mis_the_geometric_mean():
    old = torch.zeros(2, 3, dtype=torch.float64)
    roll = torch.tensor([[-0.2] * 3, [-0.3] * 3], dtype=torch.float64)   # r = e^0.2, e^0.3 on every token
    mask = torch.ones(2, 3, dtype=torch.float64)
    w, _, _ = rollout_correction(old, roll, mask, "seq_tis", tis_cap=5.0)
    assert w[:, 0].tolist() == pytest.approx([math.exp(0.6), math.exp(0.9)])
    _, kept, _ = rollout_correction(old, roll, mask, "seq_mis", seq_low=0.5, seq_high=math.exp(0.25))
    assert kept[:, 0].tolist() == [1.0, 0.0]    # geometric means e^0.2 (kept) and e^0.3 (above the bound)


@pytest.mark.parametrize("mode", ROLLOUT_CORRECTIONS)
def test_tokens_outside_the_loss_mask_never_count(mode):
    """Padding and inserted tool-output tokens (mask 0) may hold any log-probs: the weights and kept mask of
    the loss tokens, the sequence ratios and the metrics do not change; they themselves get weight 1, kept 0."""
    _, old, roll, mask, _ = batch(seed=1)
    w, kept, m = rollout_correction(old, roll, mask, mode, **TH)
    g = torch.Generator().manual_seed(5)
    off = mask == 0
    old2, roll2 = old.clone(), roll.clone()
    old2[off] = 40 * torch.randn(int(off.sum()), generator=g, dtype=torch.float64)
    roll2[off] = -40 * torch.randn(int(off.sum()), generator=g, dtype=torch.float64)
    w2, kept2, m2 = rollout_correction(old2, roll2, mask, mode, **TH)
    assert torch.equal(w2, w) and torch.equal(kept2, kept) and m2 == m
    assert (w2[off] == 1).all() and (kept2[off] == 0).all()


def test_token_tis_with_cap_0_is_off_and_unknown_modes_are_named():
    _, old, roll, mask, _ = batch()
    w, kept, m = rollout_correction(old, roll, mask, "token_tis", tis_cap=0.0)
    assert (w == 1).all() and torch.equal(kept, mask) and m["rollout/is_weight_mean"] == 1.0
    with pytest.raises(ValueError, match=r"unknown rollout correction 'geo'.*token_tis"):
        rollout_correction(old, roll, mask, "geo")
    with pytest.raises(ValueError, match="seq_tis needs tis_cap > 0"):
        rollout_correction(old, roll, mask, "seq_tis", tis_cap=0.0)


def slow_ppo_token(x, old, a, lo=0.2, hi=0.28):
    ratio = torch.exp(x - old)
    return torch.maximum(-a * ratio, -a * ratio.clamp(1 - lo, 1 + hi))


@pytest.mark.parametrize("mode", ROLLOUT_CORRECTIONS)
def test_assembled_gradient_matches_reference(mode):
    """Weights multiply each token's PPO-clip loss, rejected tokens leave it, and the normaliser stays the
    global count of loss tokens: summed token by token, with autograd of the slow version."""
    logp, old, roll, mask, adv = batch(seed=2)
    ref_w, ref_kept = slow_correction(old, roll, mask, mode, **TH)
    x = logp.clone().requires_grad_()
    n = float(mask.sum())
    total = 0.0
    for b in range(len(adv)):
        for t in range(logp.shape[1]):
            if ref_kept[b, t]:
                total = total + float(ref_w[b, t]) * slow_ppo_token(x[b, t], old[b, t], float(adv[b])) / n
    total.backward()
    terms = LossTerms(clip_eps_low=0.2, clip_eps_high=0.28, rollout_correction=mode, tis_cap=TH["tis_cap"],
                      seq_mask_low=TH["seq_low"], seq_mask_high=TH["seq_high"], icepop_low=TH["icepop_low"],
                      icepop_high=TH["icepop_high"])
    y = logp.clone().requires_grad_()
    loss, _ = assemble_loss(y, mask, adv, old, roll, terms, Normalisers(n, len(adv), logp.shape[1]))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(total.detach()), rel=1e-10)
    assert torch.allclose(y.grad, x.grad, atol=1e-14)
    assert (y.grad[ref_kept == 0] == 0).all()


@pytest.mark.parametrize("policy_loss", ["ppo_clip", "gspo", "cispo"])
@pytest.mark.parametrize("mode", ROLLOUT_CORRECTIONS)
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_with_global_normalisers_change_nothing(policy_loss, mode, agg):
    """Any policy loss x correction x aggregation: the gradient of the split mini-batch is the gradient of
    the whole, and every metric (rollout/*, actor/*) summed over the micro-batches is the whole's."""
    logp, old, roll, mask, adv = batch(seed=3)
    ent = torch.rand_like(logp)
    terms = LossTerms(policy_loss=policy_loss, loss_agg=agg, rollout_correction=mode, tis_cap=2.0, seq_mask_low=0.8,
                      seq_mask_high=1.25, icepop_low=0.5, icepop_high=1.5, entropy_coef=0.01, kl_coef=0.1)
    norm = Normalisers(float(mask.sum()), float((mask.sum(-1) > 0).sum()), logp.shape[1])

    def run(parts):
        x = logp.clone().requires_grad_()
        sums = {}
        for idx in parts:
            loss, m = assemble_loss(x[idx], mask[idx], adv[idx], old[idx], roll[idx], terms, norm,
                                    entropy=ent[idx], ref_logp=old[idx] - 0.1)
            loss.backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        return x.grad, sums

    g_full, m_full = run([list(range(7))])
    g_split, m_split = run([[0, 3], [1, 4, 5], [2, 6]])
    assert torch.allclose(g_full, g_split, atol=1e-13)
    assert m_split == pytest.approx(m_full, abs=1e-12)
    assert {"rollout/is_weight_mean", "rollout/is_masked_frac", "actor/pg_loss", "actor/clipfrac"} <= set(m_full)


def test_config_aliases_thresholds_and_errors():
    a = load_config(GRPOConfig, None, ["algo.rollout_correction=tis"]).algo
    assert a.rollout_correction == "token_tis"
    a = load_config(GRPOConfig, None, ["algo.rollout_correction=seq_mask"]).algo
    assert a.rollout_correction == "seq_mis"
    a = load_config(GRPOConfig, None, ["algo.rollout_correction=icepop", "algo.icepop_high=3"]).algo
    terms = LossTerms.from_algo(a)
    assert (terms.rollout_correction, terms.icepop_low, terms.icepop_high) == ("icepop", 0.5, 3.0)
    for overrides, message in [
        (["algo.rollout_correction=geo"], r"algo.rollout_correction: 'geo' is not allowed; allowed values"),
        (["algo.rollout_correction=icepop", "algo.icepop_low=1.5"], r"algo.icepop_low: need 0 < icepop_low"),
        (["algo.rollout_correction=token_mis", "algo.tis_cap=0"], r"algo.tis_cap: .*token_mis needs tis_cap >= 1"),
        (["algo.rollout_correction=seq_tis", "algo.tis_cap=0"], r"algo.tis_cap: .*seq_tis needs tis_cap >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(GRPOConfig, None, overrides)
