"""Routing replay (R2/R3) in the trainer's HF forward: rl/moe/replay.py on tiny Qwen3-MoE and DeepSeek-V3 models.

What the experts actually ran is observed at the dispatch: a forward pre-hook on each MoE block's `experts`
module captures the ids and weights it receives and its output, independent of the replay's own bookkeeping.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from rl.moe.replay import (
    RoutingError,
    find_routers,
    moe_layout,
    pad_routing,
    routing,
    slice_routing,
    validate_routing_ids,
)

ARCHS = ("qwen3_moe", "deepseek_v3")
V = 128


def tiny_config(arch: str):
    from transformers import DeepseekV3Config, Qwen3MoeConfig

    common = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
              "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 256,
              "initializer_range": 0.1, "tie_word_embeddings": False}
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=True)
    # group-limited routing (one group of 4 out of 2) and a non-zero correction bias: both only choose experts
    return DeepseekV3Config(**common, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                            topk_group=1, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def make_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    for r in find_routers(model):
        if hasattr(r, "e_score_correction_bias"):
            r.e_score_correction_bias.copy_(torch.randn(r.num_experts) * 0.05)
    return model.eval()


def token_logp(model, input_ids, attention_mask, position_ids=None):
    """log p(x_t | x_<t) [B, T-1] from the HF model's logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]


def random_ids(B, T, L, E, k, gen=None):
    """Valid ids [B, T, L, k]: k distinct experts per (token, layer)."""
    return torch.rand(B, T, L, E, generator=gen).argsort(-1)[..., :k]


def batch(B=3, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.ones(B, T, dtype=torch.long)


class Spy:
    """Captures, per MoE layer, each call of the experts (hidden, ids, weights, output) and the router's input."""

    def __init__(self, model):
        self.experts = [m.experts for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
        self.routers = find_routers(model)
        self.calls: list[list[dict]] = [[] for _ in self.experts]
        self.router_in: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self.handles = []
        for i, (e, r) in enumerate(zip(self.experts, self.routers)):
            self.handles.append(e.register_forward_pre_hook(self._dispatch(i)))
            self.handles.append(e.register_forward_hook(self._output(i)))
            self.handles.append(r.register_forward_pre_hook(self._router(i)))

    def _dispatch(self, i):
        # a pre-hook: a checkpoint recomputation may stop inside the experts' forward, before a post-hook
        def hook(mod, args):
            h, ids, w = args
            self.calls[i].append({"h": h.detach(), "ids": ids.detach().clone(), "w": w.detach()})
        return hook

    def _output(self, i):
        def hook(mod, args, out):
            self.calls[i][-1]["out"] = out.detach()
        return hook

    def _router(self, i):
        def hook(mod, args):
            self.router_in[i].append(args[0].detach().reshape(-1, mod.hidden_dim))
        return hook

    def dispatched(self, call=0):
        """Ids [N, L, k] the experts received in call `call` of each layer."""
        return torch.stack([c[call]["ids"] for c in self.calls], dim=1)

    def own(self, call=0):
        """The router's own choice [N, L, k] on its inputs of call `call` (class forward: no hooks)."""
        return torch.stack([type(r).forward(r, x[call])[2] for r, x in zip(self.routers, self.router_in)], dim=1)

    def remove(self):
        for h in self.handles:
            h.remove()


def expert_output(experts, h, ids, w):
    """Sum over slots of w * expert_ids(h), one token at a time, from the fused weight tensors."""
    out = torch.zeros_like(h)
    for n in range(h.shape[0]):
        for j in range(ids.shape[1]):
            gate, up = (experts.gate_up_proj[ids[n, j]] @ h[n]).chunk(2)
            out[n] += w[n, j] * (experts.down_proj[ids[n, j]] @ (experts.act_fn(gate) * up))
    return out


# ------------------------------------------------------------------------------------------------ (1) exactness
@pytest.mark.parametrize("arch", ARCHS)
def test_record_then_replay_reproduces_logprobs_exactly(arch):
    model = make_model(arch)
    ids, am = batch()
    with torch.no_grad():
        plain = token_logp(model, ids, am)                      # before any hook exists
        with routing(model, "off", am):
            off = token_logp(model, ids, am)
        with routing(model, "record", am) as rec:
            recorded = token_logp(model, ids, am)
        with routing(model, "replay", am, ids=rec.ids) as rep:
            replayed = token_logp(model, ids, am)
        L, E, k = moe_layout(model)
        with routing(model, "replay", am, ids=random_ids(*am.shape, L, E, k)):
            other = token_logp(model, ids, am)
        after = token_logp(model, ids, am)                     # hooks stay installed, idle outside a block
    assert torch.equal(plain, off) and torch.equal(plain, recorded) and torch.equal(plain, replayed)
    assert torch.equal(plain, after)
    assert rec.ids.shape == (*am.shape, L, k)
    assert rep.metrics()["moe/routing_agreement"] == 1.0 and rep.metrics()["moe/replayed_frac"] == 1.0
    assert (plain - other).abs().max() > 1e-3                  # replaying other experts does change the model


# ------------------------------------------------------------------------------------------------ (2) dispatch
@pytest.mark.parametrize("arch", ARCHS)
def test_replayed_ids_are_the_experts_dispatched(arch):
    model = make_model(arch)
    L, E, k = moe_layout(model)
    ids, am = batch()
    target = random_ids(*am.shape, L, E, k, torch.Generator().manual_seed(3))
    target[0, 5, 1] = -1                                       # no record for one (token, layer): own routing
    spy = Spy(model)
    with torch.no_grad(), routing(model, "replay", am, ids=target) as rec:
        token_logp(model, ids, am)
    got, own, flat = spy.dispatched(), spy.own(), target.reshape(-1, L, k)
    rec_mask = flat[..., 0] >= 0
    assert torch.equal(got[rec_mask], flat[rec_mask])          # every recorded (token, layer), slot by slot
    assert torch.equal(got[~rec_mask], own[~rec_mask])
    for i, (c,) in enumerate(spy.calls):                       # and those experts produced the layer's output
        assert torch.allclose(expert_output(spy.experts[i], c["h"], c["ids"], c["w"]), c["out"], atol=1e-5)
    # the metric: |own ∩ replayed| / k over replayed (token, layer), "own" from the router's inputs in this forward
    overlap = (own[..., :, None] == flat[..., None, :]).any(-1).float().sum(-1) / k
    m = rec.metrics()
    assert m["moe/routing_agreement"] == pytest.approx(float(overlap[rec_mask].mean()), abs=1e-6)
    assert m["moe/replayed_frac"] == pytest.approx(float(rec_mask.float().mean()))


@pytest.mark.parametrize("arch", ARCHS)
def test_replayed_weights_follow_the_trainers_own_router(arch):
    """Weights at replayed ids are the trainer's router probabilities there, renormalised as the model does."""
    model = make_model(arch)
    L, E, k = moe_layout(model)
    ids, am = batch(B=2, T=6)
    target = random_ids(*am.shape, L, E, k, torch.Generator().manual_seed(4)).reshape(-1, L, k)
    spy = Spy(model)
    with torch.no_grad(), routing(model, "replay", am, ids=target.view(*am.shape, L, k)):
        token_logp(model, ids, am)
    for i, r in enumerate(spy.routers):
        logits = torch.nn.functional.linear(spy.router_in[i][0].float(), r.weight.float())
        if arch == "qwen3_moe":
            p = torch.softmax(logits, -1).gather(1, target[:, i])
            want = p / p.sum(-1, keepdim=True)
        else:
            s = logits.sigmoid().gather(1, target[:, i])
            want = s / s.sum(-1, keepdim=True) * r.routed_scaling_factor
        assert torch.allclose(spy.calls[i][0]["w"], want, atol=1e-6)


# ------------------------------------------------------------------------------------------------ (3) gradient
@pytest.mark.parametrize("arch", ARCHS)
def test_gate_receives_gradient_under_replay(arch):
    model = make_model(arch).train()
    L, E, k = moe_layout(model)
    ids, am = batch()
    with routing(model, "replay", am, ids=random_ids(*am.shape, L, E, k), aux_grad=False) as rec:
        loss = token_logp(model, ids, am).mean()
    loss.backward()
    assert not rec.aux_loss.requires_grad
    for r in find_routers(model):
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    model.zero_grad()
    with routing(model, "replay", am, ids=random_ids(*am.shape, L, E, k)) as rec:
        token_logp(model, ids, am)
    rec.aux_loss.backward()                                    # the aux loss alone reaches every gate too
    for r in find_routers(model):
        assert r.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ (4) exactly once
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_consumed_once_under_checkpointing_and_micro_batches(arch):
    ids, am = batch(B=4, T=10)
    am[1, 7:] = 0
    am[3, 5:] = 0
    L, E, k = moe_layout(make_model(arch))
    target = random_ids(*am.shape, L, E, k, torch.Generator().manual_seed(5))
    groups = [[0, 2], [3, 1]]

    def run(checkpointing: dict | None, backward_each: bool, aux: bool):
        model = make_model(arch).train()
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        spy, recs, losses = Spy(model), [], []
        for rows in groups:
            n = int(am[rows].sum(-1).max())
            part_am = am[rows, :n]
            with routing(model, "replay", part_am, ids=slice_routing(target, rows, n)) as rec:
                loss = (token_logp(model, ids[rows, :n], part_am) * part_am[:, 1:]).sum()
            if aux:                                            # its graph reaches into the checkpointed layers
                loss = loss + 0.5 * rec.aux_loss
            recs.append(rec)
            losses.append(loss)
            if backward_each:
                loss.backward()                                # after the block, as the trainer does
        if not backward_each:
            sum(losses).backward()                             # both forwards first, then one backward
        return model, spy, recs

    base = {aux: run(None, True, aux) for aux in (True, False)}
    assert all(rec.recomputed == [0] * L for rec in base[True][2])
    # HF's default (non-reentrant) checkpointing, with backward per micro-batch or one backward for both; and
    # reentrant checkpointing, whose forward runs without grad (so the aux loss has no gradient there)
    for ckpt, backward_each, aux in [({"use_reentrant": False}, True, True), ({"use_reentrant": False}, False, True),
                                     ({"use_reentrant": True}, True, False)]:
        model, spy, recs = run(ckpt, backward_each, aux)
        for rec in recs:
            assert rec.consumed == [1] * L and rec.recomputed == [1] * L
        assert all(len(c) == 4 for c in spy.calls)             # 2 micro-batches x (forward + recomputation)
        fwd_calls = (0, 2) if backward_each else (0, 1)          # fwd1 rec1 fwd2 rec2 / fwd1 fwd2 + both recs
        recomputed = [spy.dispatched(c) for c in range(4) if c not in fwd_calls]
        for g, rows in enumerate(groups):
            n = int(am[rows].sum(-1).max())
            want = slice_routing(target, rows, n).reshape(-1, L, k)
            real = am[rows, :n].reshape(-1).bool()
            fwd = spy.dispatched(fwd_calls[g])
            again = [r for r in recomputed if r.shape == fwd.shape]  # the micro-batches differ in length
            assert torch.equal(fwd[real], want[real]) and len(again) == 1 and torch.equal(again[0], fwd)
        g_ckpt, g_base = _grads(model), _grads(base[aux][0])   # the recomputation ran the replayed experts
        assert g_ckpt.keys() == g_base.keys()
        assert all(torch.allclose(g_ckpt[n], g_base[n], atol=1e-6) for n in g_base)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_block_runs_exactly_one_forward(arch):
    model = make_model(arch)
    ids, am = batch()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="ran twice"), routing(model, "record", am):
            token_logp(model, ids, am)
            token_logp(model, ids, am)
        with pytest.raises(RuntimeError, match="exactly once"), routing(model, "record", am):
            pass
        with pytest.raises(RoutingError, match="covers 3 x 12"), routing(model, "record", am):
            token_logp(model, ids[:2], am[:2])
        with routing(model, "record", am) as rec:              # the model is usable again after errors
            token_logp(model, ids, am)
    assert rec.consumed == [1] * moe_layout(model)[0]


# ------------------------------------------------------------------------------------------------ (5) padding
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_never_replayed(arch, side):
    model = make_model(arch)
    L, E, k = moe_layout(model)
    g = torch.Generator().manual_seed(7)
    lengths, T = [9, 5, 7], 9
    rows = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    row_ids = [random_ids(1, n, L, E, k, g)[0] for n in lengths]
    ids = torch.zeros(3, T, dtype=torch.long)
    am = torch.zeros(3, T, dtype=torch.long)
    target = random_ids(3, T, L, E, k, g)                      # valid ids at padding too: must be ignored
    for b, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, sl], am[b, sl], target[b, sl] = rows[b], 1, row_ids[b]
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    spy = Spy(model)
    with torch.no_grad(), routing(model, "replay", am, ids=target) as rec:
        padded = token_logp(model, ids, am, position_ids=pos)
    got, own, real = spy.dispatched(), spy.own(), am.reshape(-1).bool()
    assert torch.equal(got[~real], own[~real])                 # padding: the router's own choice
    assert torch.equal(got[real], target.reshape(-1, L, k)[real])
    assert rec.metrics()["moe/replayed_frac"] == 1.0           # padding is not counted as missing
    spy.remove()
    for b, n in enumerate(lengths):
        one_am = torch.ones(1, n, dtype=torch.long)
        with torch.no_grad(), routing(model, "replay", one_am, ids=row_ids[b][None]):
            alone = token_logp(model, rows[b][None], one_am)[0]
        mine = padded[b, :n - 1] if side == "right" else padded[b, T - n:]
        assert torch.allclose(mine, alone, atol=1e-5)


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("arch", ARCHS)
def test_metrics_and_aux_loss(arch):
    model = make_model(arch)
    L, E, k = moe_layout(model)
    ids, am = batch()
    am[2, 8:] = 0
    spy = Spy(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, output_router_logits=True)
    with torch.no_grad(), routing(model, "off", am) as rec:
        model(input_ids=ids, attention_mask=am)
    real = am.reshape(-1).bool()
    if arch == "qwen3_moe":                                    # HF's own load-balancing loss of the same forward
        assert float(rec.aux_loss) == pytest.approx(float(out.aux_loss), rel=1e-5)
    else:                                                      # DeepSeek-V3's sequence-wise loss, row by row
        per = []
        for i, r in enumerate(spy.routers):
            s = torch.sigmoid(torch.nn.functional.linear(spy.router_in[i][1], r.weight.detach())).view(*am.shape, E)
            chosen = spy.calls[i][1]["ids"].view(*am.shape, k)
            for b in range(am.shape[0]):
                m = am[b].bool()
                f = torch.bincount(chosen[b][m].reshape(-1), minlength=E) * E / (k * m.sum())
                p = (s[b][m] / s[b][m].sum(-1, keepdim=True)).mean(0)
                per.append(float((f * p).sum()))
        assert float(rec.aux_loss) == pytest.approx(sum(per) / len(per), rel=1e-5)
    # all real tokens on experts {0, 1} in every layer: two equally loaded experts, entropy log 2 / log E
    two = torch.tensor([0, 1]).expand(*am.shape, L, k).clone()
    with torch.no_grad(), routing(model, "replay", am, ids=two) as rec:
        model(input_ids=ids, attention_mask=am)
    assert rec.metrics()["moe/expert_load_entropy"] == pytest.approx(math.log(2) / math.log(E))
    assert torch.equal(spy.dispatched(2)[real], two.reshape(-1, L, k)[real])


# ------------------------------------------------------------------------------------------------ (6) FSDP2
@pytest.fixture
def gloo_world(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    created = not dist.is_initialized()
    if created:
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_replay_through_fsdp2_token_logprob_model(arch, dtype, tmp_path, gloo_world):
    """load_model: FSDP2 shards each decoder layer, gradient checkpointing on, bf16 mixed precision or fp32."""
    from rl.grpo.fsdp_model import load_model

    make_model(arch).save_pretrained(tmp_path / "moe")
    mc = types.SimpleNamespace(dtype=dtype, gradient_checkpointing=True, trust_remote_code=False, lora_r=0)
    model = load_model(str(tmp_path / "moe"), mc, torch.device("cpu"), gloo_world, trainable=True)
    L, E, k = moe_layout(model)
    ids, am = batch(B=2, T=10)
    am[1, 6:] = 0
    score = am.clone()
    score[:, 0] = 0
    model.eval()
    with torch.no_grad(), routing(model, "record", am) as rec:   # R2: the old-log-prob pass records
        old, _ = model(ids, am, score)
    model.train()
    spy = Spy(model)
    with routing(model, "replay", am, ids=rec.ids) as rep:
        new, _ = model(ids, am, score)
    (new * score).sum().backward()
    assert torch.equal(new.detach(), old)                      # replaying the record: the same log-probs
    assert rep.consumed == [1] * L and rep.recomputed == [1] * L
    target = random_ids(*am.shape, L, E, k)
    with routing(model, "replay", am, ids=target):
        new, _ = model(ids, am, score)
    (new * score).sum().backward()
    real = am.reshape(-1).bool()
    assert torch.equal(spy.dispatched(2)[real], target.reshape(-1, L, k)[real])
    assert torch.equal(spy.dispatched(3), spy.dispatched(2))   # the recomputation in backward
    for r in find_routers(model):
        grad = r.weight.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        assert grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ (7) validation
def test_validation_names_the_sample():
    am = torch.ones(3, 6, dtype=torch.long)
    am[1, 4:] = 0
    good = random_ids(3, 6, 2, 8, 2)
    names = ["p0/s0", "p0/s1", "p1/s0"]
    kw = {"num_layers": 2, "num_experts": 8, "top_k": 2, "names": names}
    validate_routing_ids(good, am, **kw)
    padded = good.clone()
    padded[1, 5] = 99                                          # padding is never checked nor replayed
    validate_routing_ids(padded, am, **kw)
    cases = [
        (lambda x: x.__setitem__((2, 3, 1, 0), 8),
         r"sample p1/s0 \(row 2\): expert id 8 at position 3, MoE layer 1 is out of range \[0, 8\)"),
        (lambda x: x.__setitem__((0, 1, 0, 1), -5), r"sample p0/s0 \(row 0\).*-5.*out of range"),
        (lambda x: x.__setitem__(1, 0), r"sample p0/s1 \(row 1\): every recorded expert id is 0"),
        (lambda x: x.__setitem__((2, 0, 0, 1), x[2, 0, 0, 0]),
         r"sample p1/s0 \(row 2\): position 0, MoE layer 0 repeats an expert"),
        (lambda x: x.__setitem__((0, 2, 1, 0), -1), r"sample p0/s0 \(row 0\): position 2, MoE layer 1 mixes -1"),
    ]
    for corrupt, msg in cases:
        bad = good.clone()
        corrupt(bad)
        with pytest.raises(RoutingError, match=msg):
            validate_routing_ids(bad, am, **kw)
    with pytest.raises(RoutingError, match=r"shape \(3, 6, 3, 2\), the batch needs \(3, 6, 2, 2\)"):
        validate_routing_ids(random_ids(3, 6, 3, 8, 2), am, **kw)
    with pytest.raises(RoutingError, match="integer tensor"):
        validate_routing_ids(good.float(), am, **kw)
    no_record = good.clone()
    no_record[0, 2, 1] = -1                                    # a whole (token, layer) without a record is fine
    validate_routing_ids(no_record, am, **kw)


def test_pad_routing_layout_and_errors():
    recs = [random_ids(1, 4, 2, 8, 2)[0], None, random_ids(1, 6, 2, 8, 2)[0]]
    out = pad_routing(recs, [5, 3, 6], width=7, names=["a", "b", "c"])
    assert out.shape == (3, 7, 2, 2)
    assert torch.equal(out[0, :4], recs[0]) and (out[0, 4:] == -1).all() and (out[1] == -1).all()
    assert torch.equal(out[2, :6], recs[2]) and (out[2, 6:] == -1).all()
    with pytest.raises(RoutingError, match=r"sample c \(row 2\) has 8 tokens but a routing record of shape \(6, 2, 2\)"):
        pad_routing(recs, [5, 3, 8], width=8, names=["a", "b", "c"])
    assert torch.equal(slice_routing(out, [2, 0], 5), out[[2, 0], :5])


def test_replay_rejects_bad_ids_before_the_forward_and_dense_models():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = make_model("qwen3_moe")
    _, am = batch()
    L, E, k = moe_layout(model)
    bad = random_ids(*am.shape, L, E, k)
    bad[1, 4, 2, 1] = E
    names = ["s0", "s1", "s2"]
    with pytest.raises(RoutingError, match=r"sample s1 \(row 1\): expert id 8 at position 4, MoE layer 2"), \
            routing(model, "replay", am, ids=bad, names=names):
        raise AssertionError("the forward must not run")
    with pytest.raises(RoutingError, match="mode must be one of"), routing(model, "r3", am):
        pass
    dense = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(RoutingError, match="no supported MoE router"), routing(dense, "record", am):
        pass
