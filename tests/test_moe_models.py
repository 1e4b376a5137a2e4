"""Tiny Mixture-of-Experts policies (Qwen3-MoE, DeepSeek-V3) in transformers and vLLM's CPU build: engine
parity, routed-experts capture, weight reload of expert weights and the sync checksum."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl.moe.routing_capture import MoEShape, RoutedExpertsError, check_routed_experts, moe_shape
from rl.tiny import TinyModelSpec, build_tiny_model

MOE_ARCHS = ("qwen3_moe", "deepseek_v3")
PROMPTS = [[5, 6, 7, 8, 9, 10, 40, 50], [11, 12, 13], [100, 200, 300, 42, 17, 64]]


def moe_path(arch: str, tokenizer):
    # a wider init than the default 0.02 gives varied greedy decodes (the default repeats one token)
    return build_tiny_model(TinyModelSpec(arch=arch, initializer_range=0.3), tokenizer)


# ------------------------------------------------------------------------------------------------ factory
def test_dense_specs_keep_their_cache_keys():
    """The MoE fields stay out of the dense archs' cache key: cached qwen2/llama artifacts stay valid."""
    pre_moe_fields = {"arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                      "max_position_embeddings", "tie_word_embeddings", "initializer_range", "seed", "vocab_size",
                      "dtype", "rope_theta", "tokenizer"}
    for arch in ("qwen2", "llama"):
        d = TinyModelSpec(arch=arch).to_dict()
        assert set(d) == pre_moe_fields
        assert d["num_layers"] == 2 and d["tie_word_embeddings"] is True
    assert set(TinyModelSpec(arch="deepseek_v3").to_dict()) > pre_moe_fields


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_tiny_moe_builds_and_runs_in_transformers(tiny, arch):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(TinyModelSpec(arch=arch), tiny.tokenizer)
    cfg = json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    shape = moe_shape(cfg)
    assert shape is not None and shape.num_experts >= 8 and shape.top_k == 2
    routers = [m for m in model.modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter"))]
    assert len(routers) == len(shape.layers)
    if arch == "deepseek_v3":
        assert type(model).__name__ == "DeepseekV3ForCausalLM"
        assert (cfg["scoring_func"], cfg["topk_method"]) == ("sigmoid", "noaux_tc")
        assert cfg["n_shared_experts"] == 1 and cfg["n_group"] > cfg["topk_group"] >= 1
        assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576 and cfg["q_lora_rank"]
        assert shape.layers == (1, 2)                     # first_k_dense_replace = 1
        assert all(r.e_score_correction_bias.abs().sum() > 0 for r in routers)   # bias-corrected routing is live
    else:
        assert type(model).__name__ == "Qwen3MoeForCausalLM" and cfg["norm_topk_prob"]
        assert shape.layers == (0, 1)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits
    assert logits.shape == (1, len(PROMPTS[0]), cfg["vocab_size"]) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kw,message", [
    ({"arch": "qwen2", "num_experts": 8}, "'num_experts' is for"),
    ({"arch": "qwen3_moe", "n_group": 2}, "'n_group' is for \\['deepseek_v3'\\], not qwen3_moe"),
    ({"arch": "deepseek_v3", "tie_word_embeddings": True}, "tie_word_embeddings=True is not supported"),
    ({"arch": "deepseek_v3", "n_group": 3}, "n_group=3 must divide num_experts"),
    ({"arch": "deepseek_v3", "experts_per_token": 6}, "experts_per_token=6 exceeds"),
    ({"arch": "qwen3_moe", "first_dense_layers": 2}, "first_dense_layers=2 must leave at least one MoE layer"),
])
def test_bad_moe_specs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        TinyModelSpec(**kw)


def test_moe_path_overrides():
    from rl.model_path import resolve_model_path

    path = resolve_model_path("tiny:deepseek_v3:num_experts=16,n_group=8,topk_group=3,experts_per_token=4")
    cfg = json.loads(Path(path, "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]) == (16, 8, 3, 4)


# ------------------------------------------------------------------------------------------------ validation
def test_routed_experts_validation_names_the_sample():
    shape = MoEShape(num_experts=8, top_k=2, layers=(1, 2), num_hidden_layers=3)
    good = torch.tensor([[[0, 3], [5, 1]], [[2, 7], [4, 6]]], dtype=torch.int16)       # 3 tokens -> 2 rows
    assert torch.equal(check_routed_experts(good.numpy(), num_tokens=3, shape=shape, name="s"), good)
    cases = [
        (good[:1], "shape \\(1, 2, 2\\), the sample's 3 tokens need \\(2, 2, 2\\)"),
        (torch.where(good == 7, 8, good), "expert id 8 at position 1, MoE layer 0 is out of range \\[0, 8\\)"),
        (torch.zeros_like(good), "every routed expert id is 0"),
        (torch.where(good == 3, 0, good), "position 0, MoE layer 0 repeats an expert"),
        (good.float(), "must be integer ids"),
        (None, "returned no routed experts"),
    ]
    for bad, message in cases:
        with pytest.raises(RoutedExpertsError, match="^prompt 4 sample 1: .*" + message):
            check_routed_experts(bad, num_tokens=3, shape=shape, name="prompt 4 sample 1")


# ------------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_engine(request, tiny):
    """One fp32 vLLM CPU engine per MoE architecture (with routed-experts capture) and its model path."""
    from rl.rollout.vllm_engine import make_llm, shutdown

    path = moe_path(request.param, tiny.tokenizer)
    llm = make_llm(str(path), dtype="float32", max_model_len=512, enforce_eager=True, kv_cache_gb=0.25,
                   return_routed_experts=True)
    yield request.param, path, llm
    shutdown(llm)


def _greedy(llm, n: int = 24):
    from rl.rollout.vllm_engine import generate, sampling_params

    return [s[0] for s in generate(llm, PROMPTS, sampling_params(temperature=0.0, max_tokens=n))]


def _hf_logprobs(model, samples) -> list[torch.Tensor]:
    """The trainer's scorer (TokenLogprobModel, fp32) on prompt + completion, one padded batch."""
    from rl.grpo.fsdp_model import TokenLogprobModel

    rows = [p + s.token_ids for p, s in zip(PROMPTS, samples)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    score = torch.zeros_like(mask)
    for b, (p, s) in enumerate(zip(PROMPTS, samples)):
        score[b, len(p):len(p) + len(s.token_ids)] = 1
    with torch.no_grad():
        logp, _ = TokenLogprobModel(model)(ids, mask, score)
    return [logp[b, len(p):len(p) + len(s.token_ids)] for b, (p, s) in enumerate(zip(PROMPTS, samples))]


@pytest.mark.vllm
def test_engine_parity_fp32(moe_engine):
    """The same greedy tokens scored by vLLM CPU and by the trainer's HF forward (fp32) agree."""
    from transformers import AutoModelForCausalLM

    arch, path, llm = moe_engine
    samples = _greedy(llm)
    assert all(len(set(s.token_ids)) > 5 for s in samples), "degenerate decodes would make the check weak"
    ref = _hf_logprobs(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), samples)
    diff = torch.cat([(r - torch.tensor(s.logprobs)).abs() for r, s in zip(ref, samples)])
    print(f"{arch}: mean |logprob diff| {diff.mean():.2e} (max {diff.max():.2e}) over {len(diff)} tokens")
    assert diff.mean() < 1e-3


def _hf_router_choices(model, ids: list[int]) -> torch.Tensor:
    """[tokens, MoE layers, top_k] expert ids the HF routers choose for `ids`."""
    got = []
    routers = [m for m in model.modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter"))]
    hooks = [r.register_forward_hook(lambda mod, inp, out: got.append(out[2])) for r in routers]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(got, 1)


@pytest.mark.vllm
def test_routed_experts_are_the_routers_choices(moe_engine):
    """Every sample's record covers its tokens (prompt + completion but the last), and it is what the HF
    routers choose for those tokens (the same expert sets, up to near-ties)."""
    from transformers import AutoModelForCausalLM

    arch, path, llm = moe_engine
    samples = _greedy(llm, n=16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    shape = moe_shape(model.config)
    agree = total = 0
    for p, s in zip(PROMPTS, samples):
        rec = s.routed_experts
        assert rec is not None and tuple(rec.shape) == (len(p) + len(s.token_ids) - 1, len(shape.layers), 2)
        assert 0 <= int(rec.min()) and int(rec.max()) < shape.num_experts and rec.any()
        hf = _hf_router_choices(model, p + s.token_ids[:-1])
        same = (rec.long().sort(-1).values == hf.sort(-1).values).all(-1)
        agree, total = agree + int(same.sum()), total + same.numel()
    print(f"{arch}: routed-expert sets equal to HF's in {agree}/{total} (token, layer) pairs")
    assert agree >= 0.97 * total
    assert len({tuple(s.routed_experts[:, 0].flatten().tolist()) for s in samples}) == len(samples)


@pytest.mark.vllm
def test_expert_weight_reload_and_checksum(moe_engine, tmp_path):
    """An expert weight changed in the trainer's (transformers 5: fused 3-D) state dict reaches the engine
    through the in-place reload: the decode changes, vLLM matches HF with the new weights, and the engine's
    fused w13/w2 sums match the trainer's per-tensor sums (a corrupted one is named)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from rl.grpo.sync.checksum import match_engine_sums

    arch, path, llm = moe_engine
    before = _greedy(llm, n=16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    shape = moe_shape(model.config)
    layer = shape.layers[0]
    used = torch.cat([s.routed_experts[:, 0].flatten() for s in before]).bincount().argmax()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    assert state[key].dim() == 3, "transformers 5 keeps the experts fused"
    state[key][used] *= 3.0                     # the most used expert of the first MoE layer
    if arch == "deepseek_v3":                   # and MLA's up-projection, which vLLM splits into W_UK / W_UV
        state[f"model.layers.{layer}.self_attn.kv_b_proj.weight"] *= 1.5
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    try:
        sent = llm.collective_rpc("r1lab_load_from_dir", args=(str(tmp_path),))[0]
        llm.reset_prefix_cache()
        after = _greedy(llm, n=16)
        assert [s.token_ids for s in after] != [s.token_ids for s in before]
        model.load_state_dict(state, strict=False)
        ref = _hf_logprobs(model, after)
        diff = torch.cat([(r - torch.tensor(s.logprobs)).abs() for r, s in zip(ref, after)])
        assert diff.mean() < 1e-3, f"{arch}: engine and HF disagree after the reload ({diff.mean():.3g})"

        engine = llm.collective_rpc("r1lab_param_sums")[0]
        compared, bad = match_engine_sums(sent, engine)
        experts = [n for n in compared if n.endswith(("w13_weight", "w2_weight"))]
        print(f"{arch}: {len(compared)} of {len(engine)} engine tensors compared; not comparable: "
              f"{sorted(set(engine) - set(compared))}")
        assert bad == [] and len(experts) == 2 * len(shape.layers)
        corrupt = {**sent, key: sent[key] + 1.0}
        assert [b.split(":")[0] for b in match_engine_sums(corrupt, engine)[1]] == [
            f"model.layers.{layer}.mlp.experts.routed_experts.w13_weight"]
    finally:                                    # the module's other tests expect the original weights
        llm.collective_rpc("r1lab_load_from_dir", args=(str(path),))
        llm.reset_prefix_cache()
    assert [s.token_ids for s in _greedy(llm, n=16)] == [s.token_ids for s in before]


def test_checksum_understands_per_expert_checkpoints():
    """A save_pretrained checkpoint (experts one by one) compares with the engine's fused w13/w2 too."""
    from rl.grpo.sync.checksum import match_engine_sums

    pre = "model.layers.1.mlp.experts"
    hf = {f"{pre}.{e}.{p}.weight": float(e + i) for e in range(4) for i, p in
          enumerate(("gate_proj", "up_proj", "down_proj"))}
    attn = "model.layers.0.self_attn"
    hf.update({f"{attn}.q_a_proj.weight": 1.0, f"{attn}.kv_a_proj_with_mqa.weight": 2.0})
    engine = {f"{pre}.routed_experts.w13_weight": sum(2 * e + 1 for e in range(4)),
              f"{pre}.routed_experts.w2_weight": sum(e + 2 for e in range(4)),
              f"{attn}.fused_qkv_a_proj.weight": 3.0, f"{attn}.o_proj.x": 9.0}
    compared, bad = match_engine_sums(hf, engine)
    assert bad == [] and sorted(compared) == sorted(n for n in engine if not n.endswith(".x"))
    engine[f"{pre}.routed_experts.w2_weight"] += 1
    assert len(match_engine_sums(hf, engine)[1]) == 1
