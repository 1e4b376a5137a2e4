"""GRPO algorithms against slow, obvious reference implementations."""
import math
import random

import pytest
import torch

from rl.algos import agg_loss, compute_advantages, kl_penalty, token_logprobs
from rl.algos.losses import POLICY_LOSSES, entropy_from_logits, ppo_clip_loss
from rl.algos.rollout_correction import rollout_correction


def random_groups(seed, n_groups=7, max_size=6):
    rng = random.Random(seed)
    rewards, gids = [], []
    for g in range(n_groups):
        size = rng.randint(1, max_size)
        for _ in range(size):
            rewards.append(rng.choice([0.0, 1.0, 0.5, rng.random()]))
            gids.append(g * 13 + 5)  # arbitrary ids
    perm = list(range(len(rewards)))
    rng.shuffle(perm)
    return torch.tensor([rewards[i] for i in perm]), torch.tensor([gids[i] for i in perm])


def slow_advantages(name, rewards, gids, eps=1e-6):
    out = []
    for i in range(len(rewards)):
        group = [float(rewards[j]) for j in range(len(rewards)) if gids[j] == gids[i]]
        n, r = len(group), float(rewards[i])
        if n == 1:
            out.append(0.0)
            continue
        mean = sum(group) / n
        if name == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1))
            out.append((r - mean) / (std + eps))
        elif name == "dr_grpo":
            out.append(r - mean)
        elif name == "rloo":
            out.append(r - (sum(group) - r) / (n - 1))
    return torch.tensor(out)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("seed", range(5))
def test_advantages_match_reference(name, seed):
    rewards, gids = random_groups(seed)
    adv, metrics = compute_advantages(name, rewards, gids)
    assert torch.allclose(adv, slow_advantages(name, rewards, gids).float(), atol=1e-5)
    assert "adv/mean" in metrics


def test_unknown_estimator_lists_known():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'.*grpo"):
        compute_advantages("ppo", torch.zeros(2), torch.zeros(2))


def slow_ppo(logp, old, adv, mask, lo, hi, dual, agg, rollout=None, tis=None):
    B, T = logp.shape
    per_tok = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            ratio = math.exp(logp[b, t] - old[b, t])
            a = float(adv[b])
            loss = max(-a * ratio, -a * min(max(ratio, 1 - lo), 1 + hi))
            if dual is not None and a < 0:
                loss = min(loss, -a * dual)
            if tis is not None:
                loss *= min(math.exp(old[b, t] - rollout[b, t]), tis)
            per_tok[b][t] = loss
    m = mask.tolist()
    if agg == "token_mean":
        return sum(per_tok[b][t] * m[b][t] for b in range(B) for t in range(T)) / sum(map(sum, m))
    if agg == "seq_mean_token_mean":
        return sum(sum(per_tok[b][t] * m[b][t] for t in range(T)) / sum(m[b]) for b in range(B)) / B
    return sum(per_tok[b][t] * m[b][t] for b in range(B) for t in range(T)) / (B * T)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("tis", [None, 2.0])
def test_ppo_clip_matches_reference(agg, dual, tis):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.5
    rollout = old + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1
    weights = rollout_correction(old, rollout, mask, "token_tis", tis_cap=tis)[0] if tis else None
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=dual,
                                  agg=agg, is_weights=weights)
    ref = slow_ppo(logp, old, adv, mask, 0.2, 0.28, dual, agg, rollout, tis)
    assert float(loss) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert 0 <= metrics["actor/clipfrac"] <= 1 and "actor/pg_loss" in metrics
    assert "ppo_clip" in POLICY_LOSSES


def test_clip_higher_is_asymmetric():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.25, 0.75]]))
    mask = torch.ones(1, 2)
    loss, _ = ppo_clip_loss(logp, old, torch.tensor([1.0]), mask, clip_eps_low=0.2, clip_eps_high=0.28,
                            agg="seq_mean_token_sum_norm")
    # ratio 1.25 < 1.28 is not clipped; ratio 0.75 < 0.8 is clipped to 0.8 only from below (max of losses)
    assert float(loss) == pytest.approx(-(1.25 + 0.75) / 2)


def test_splitting_a_batch_with_global_normalisers_keeps_the_gradient():
    g = torch.Generator().manual_seed(1)
    B, T = 6, 7
    old = -torch.rand(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.4).float()
    mask[:, 0] = 1
    for agg in ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]:
        logp = (old + 0.1).clone().requires_grad_(True)
        ppo_clip_loss(logp, old, adv, mask, agg=agg)[0].backward()
        full = logp.grad.clone()
        logp.grad = None
        for part in (slice(0, 2), slice(2, 6)):
            loss, _ = ppo_clip_loss(logp[part], old[part], adv[part], mask[part], agg=agg,
                                    num_tokens=float(mask.sum()), num_seqs=B, max_len=T)
            loss.backward()
        assert torch.allclose(logp.grad, full, atol=1e-6), agg


def test_agg_loss_reference():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(agg_loss(loss, mask, "token_mean")) == pytest.approx((1 + 2 + 4) / 3)
    assert float(agg_loss(loss, mask, "seq_mean_token_mean")) == pytest.approx((1.5 + 4) / 2)
    assert float(agg_loss(loss, mask, "seq_mean_token_sum_norm")) == pytest.approx(7 / 6)
    with pytest.raises(ValueError, match="allowed"):
        agg_loss(loss, mask, "sum")


def test_kl_estimators_match_definitions():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    lr = logp - ref
    assert torch.allclose(kl_penalty(logp, ref, "k1"), lr)
    assert torch.allclose(kl_penalty(logp, ref, "k2"), 0.5 * lr**2)
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.exp(ref - logp) - (ref - logp) - 1)
    # Monte-Carlo: E_pi[k1] and E_pi[k3] estimate KL(pi || ref); k3 is never negative
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(6, generator=g), 0)
    rf = torch.softmax(torch.randn(6, generator=g), 0)
    true_kl = float((pi * (pi / rf).log()).sum())
    x = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    lp, lr_ = pi.log()[x], rf.log()[x]
    assert float(kl_penalty(lp, lr_, "k1").mean()) == pytest.approx(true_kl, abs=0.01)
    assert float(kl_penalty(lp, lr_, "k3").mean()) == pytest.approx(true_kl, abs=0.01)
    assert float(kl_penalty(lp, lr_, "k3").min()) >= 0


def test_token_logprobs_and_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    lp = token_logprobs(logits, ids, temperature=0.7)
    for b in range(2):
        assert lp[b, 0] == 0
        for t in range(1, 5):
            ref = torch.log_softmax(logits[b, t - 1] / 0.7, -1)[ids[b, t]]
            assert float(lp[b, t]) == pytest.approx(float(ref), abs=1e-5)
    ent = entropy_from_logits(logits)
    p = torch.softmax(logits[0, 2], -1)
    assert float(ent[0, 3]) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)
