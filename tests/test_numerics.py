"""Trainer numerics at real sizes: chunked log-probs, the log-prob model, loss assembly, micro-batching, precision."""
import pytest
import torch

from rl.algos.assemble import LossTerms, Normalisers, assemble_loss
from rl.algos.logprobs import chunked_token_logprobs, reference_token_logprobs
from rl.algos.losses import token_logprobs
from rl.algos.rollout_correction import rollout_correction
from rl.grpo.microbatch import micro_batches, padding_frac


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [8, 64])
@pytest.mark.parametrize("N", [37, 12])   # H 16: 37 rows walk the vocabulary in three slices, 12 rows in one
def test_chunked_logprobs_match_reference_values_and_gradients(dtype, with_bias, chunk, N):
    torch.manual_seed(0)
    H, V = 16, 50
    h = torch.randn(N, H, dtype=dtype, requires_grad=True)
    w = torch.randn(V, H, dtype=dtype, requires_grad=True)
    b = torch.randn(V, dtype=dtype, requires_grad=True) if with_bias else None
    y = torch.randint(0, V, (N,))
    g1, g2 = torch.randn(N), torch.randn(N)
    params = [t for t in (h, w, b) if t is not None]

    def grads(fn, **kw):
        lp, ent = fn(h, w, y, temperature=0.6, bias=b, with_entropy=True, **kw)
        (lp * g1 + ent * g2).sum().backward()
        out = [t.grad.clone() for t in params]
        for t in params:
            t.grad = None
        return lp.detach(), ent.detach(), out

    lp, ent, got = grads(chunked_token_logprobs, chunk=chunk)
    lp_ref, ent_ref, want = grads(reference_token_logprobs)
    assert torch.allclose(lp, lp_ref, atol=1e-5) and torch.allclose(ent, ent_ref, atol=1e-4)
    for a, r in zip(got, want):   # fp32: exact up to rounding; bf16: the reference accumulates in bf16
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        assert (a.float() - r.float()).abs().max() <= tol * r.float().abs().max(), (a, r)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_with_logged_entropy_and_no_logp_grad(temperature):
    """Entropy computed but only logged (no gradient through it), and entropy-only losses: same gradients as the
    reference (the backward skips the entropy terms when autograd gives it no gradient for them)."""
    torch.manual_seed(1)
    N, H, V = 29, 8, 40
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (N,))
    for use in ("logp", "ent"):
        got = []
        for fn in (chunked_token_logprobs, reference_token_logprobs):
            kw = {"chunk": 8} if fn is chunked_token_logprobs else {}
            lp, ent = fn(h, w, y, temperature=temperature, with_entropy=True, **kw)
            (lp if use == "logp" else ent).sum().backward()
            got.append((h.grad.clone(), w.grad.clone(), ent.detach()))
            h.grad = w.grad = None
        for a, r in zip(got[0], got[1]):   # fp32 rounding: relative to the largest entry
            assert (a - r).abs().max() <= 1e-4 * r.abs().max(), use


def test_vocab_slices_keep_the_logit_gradient_buffer_within_the_weight_gradient():
    from rl.algos.logprobs import vocab_slices

    assert vocab_slices(896, 896) == 1 and vocab_slices(1, 896) == 1   # rows <= H: one slice
    assert vocab_slices(2080, 896) == 3 and vocab_slices(16448, 896) == 19
    for rows in range(1, 5000, 37):   # [rows, ceil(V / slices)] never larger than [V, H]
        s = vocab_slices(rows, 896)
        assert rows * -(-151936 // s) <= 151936 * 896 + rows and (s == 1 or rows * -(-151936 // (s - 1)) > 151936 * 896)


def test_chunked_logprobs_never_save_the_logits():
    """Nothing of size tokens x vocab is kept for backward: only hidden states, weight and one float per row."""
    N, H, V = 64, 8, 1000
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lp, ent = chunked_token_logprobs(h, w, torch.randint(0, V, (N,)), chunk=16, with_entropy=True)
    assert max(saved) < N * V and sum(saved) <= N * H + V * H + 3 * N   # + logsumexp and entropy per row
    (lp.sum() + ent.sum()).backward()
    assert h.grad is not None and w.grad is not None


def test_token_logprob_model_matches_full_logits(tiny):
    from transformers import AutoModelForCausalLM

    from rl.grpo.fsdp_model import TokenLogprobModel

    lm = AutoModelForCausalLM.from_pretrained(tiny.qwen2).eval()
    model = TokenLogprobModel(lm, chunk=5)
    ids = torch.randint(3, 300, (3, 12))
    am = torch.ones_like(ids)
    am[2, 9:] = 0
    score = torch.zeros_like(ids)
    score[:, 4:] = 1
    score[2, 9:] = 0
    with torch.no_grad():
        lp, ent = model(ids, am, score, temperature=0.7, with_entropy=True)
        want = token_logprobs(lm(input_ids=ids, attention_mask=am).logits, ids, 0.7)
    m = score.bool()
    assert torch.allclose(lp[m], want[m], atol=1e-5) and (lp[~m] == 0).all() and (ent[m] > 0).all()


def _batch(B=6, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    old = -torch.rand(B, T, generator=g)
    return {"mask": mask, "old": old, "roll": old + 0.05 * torch.randn(B, T, generator=g),
            "adv": torch.randn(B, generator=g), "ref": old - 0.1, "logits": torch.randn(B, T, generator=g)}


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_assembled_loss_and_metrics_are_additive_over_micro_batches(agg):
    """Splitting a mini-batch into micro-batches changes neither the gradient nor the reported loss: the
    metrics are summed over micro-batches, and actor/pg_loss is the real loss (not a fraction of it)."""
    b = _batch()
    terms = LossTerms(loss_agg=agg, tis_cap=2.0, kl_coef=0.1, entropy_coef=0.01)
    norm = Normalisers(float(b["mask"].sum()), float((b["mask"].sum(-1) > 0).sum()), 10)

    def run(parts):
        theta = b["logits"].clone().requires_grad_()
        total, sums = 0.0, {}
        for idx in parts:
            lp = b["old"][idx] + 0.1 * theta[idx]
            loss, m = assemble_loss(lp, b["mask"][idx], b["adv"][idx], b["old"][idx], b["roll"][idx], terms, norm,
                                    entropy=theta[idx].abs(), ref_logp=b["ref"][idx])
            loss.backward()
            total += float(loss.detach())
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        return theta.grad, total, sums

    g_full, loss_full, m_full = run([list(range(6))])
    g_split, loss_split, m_split = run([[0, 3], [1, 4, 5], [2]])
    assert torch.allclose(g_full, g_split, atol=1e-6)
    assert loss_split == pytest.approx(loss_full, abs=1e-6)
    for k in m_full:
        assert m_split[k] == pytest.approx(m_full[k], abs=1e-6), k
    assert m_full["actor/loss"] == pytest.approx(loss_full, abs=1e-6)
    # the pieces add up: loss = pg - entropy_coef * entropy_loss + kl_coef * kl_loss
    assert m_full["actor/pg_loss"] - 0.01 * m_full["actor/entropy_loss"] + 0.1 * m_full["actor/kl_loss"] == \
        pytest.approx(loss_full, abs=1e-6)


def test_sequence_mask_drops_far_off_policy_sequences():
    mask = torch.ones(3, 4)
    old = torch.zeros(3, 4)
    roll = torch.tensor([[0.0] * 4, [-2.0] * 4, [2.0] * 4])   # ratios 1, e^2, e^-2
    _, keep, _ = rollout_correction(old, roll, mask, "seq_mask", seq_low=0.5, seq_high=2.0)
    assert keep[:, 0].tolist() == [1.0, 0.0, 0.0]
    b = _batch(B=3, T=4)
    terms = LossTerms(rollout_correction="seq_mask", tis_cap=2.0)
    _, m = assemble_loss(old.clone().requires_grad_(), mask, b["adv"], old, roll, terms, Normalisers(12, 3, 4))
    assert m["rollout/is_masked_frac"] == pytest.approx(8 / 12)


def test_length_sorted_micro_batches_cut_padding_on_long_tails():
    torch.manual_seed(0)
    lengths = (torch.distributions.LogNormal(6.0, 0.8).sample((256,)).clamp(16, 16384)).long().tolist()
    unsorted = micro_batches(lengths, 32768, by_length=False)
    ordered = micro_batches(lengths, 32768)
    assert sorted(i for grp in ordered for i in grp) == list(range(256))
    for grp in ordered:
        assert max(lengths[i] for i in grp) * len(grp) <= 32768 or len(grp) == 1
    assert padding_frac(lengths, ordered) < 0.5 * padding_frac(lengths, unsorted)


def test_bf16_update_of_fp32_master_survives_where_bf16_weights_round_it_away():
    """Why the master weights stay fp32: an lr-1e-6 Adam step (|dw| ~ 1e-6) is below half a bf16 ulp of
    most weights, so bf16 weights do not move at all."""
    torch.manual_seed(0)
    w = torch.randn(10_000) * 0.02
    for dtype, expect_changed in ((torch.bfloat16, False), (torch.float32, True)):
        p = torch.nn.Parameter(w.clone().to(dtype))
        opt = torch.optim.AdamW([p], lr=1e-6, weight_decay=0.0)
        p.grad = torch.randn_like(p)
        before = p.detach().clone()
        opt.step()
        changed = float((p.detach() != before).float().mean())
        assert (changed > 0.99) if expect_changed else (changed < 0.2), (dtype, changed)
