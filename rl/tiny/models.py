"""Tiny causal LMs built from a config and saved in HF format: dense Qwen2 / Llama, and Mixture-of-Experts
Qwen3-MoE / DeepSeek-V3 (`rl.tiny.moe`).

These are real `Qwen2ForCausalLM` / `LlamaForCausalLM` / `Qwen3MoeForCausalLM` / `DeepseekV3ForCausalLM`
checkpoints: the same `from_pretrained(path)` code that loads `Qwen/Qwen2.5-Math-1.5B` loads them, and vLLM
serves them unchanged (DeepSeek-V3 on vLLM's CPU build: see `rl.tiny.moe` for what it requires).

Fields set to None take the architecture's default (`rl.tiny.moe.ARCH_DEFAULTS`) when the spec is made, and
`to_dict` (the cache key) leaves out fields that stay None: the dense architectures' keys, and so their cached
artifacts, are the same as before the MoE fields existed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

DENSE_ARCHS = ("qwen2", "llama")
MOE_ARCHS = ("qwen3_moe", "deepseek_v3")
ARCHS = DENSE_ARCHS + MOE_ARCHS


@dataclass(frozen=True)
class TinyModelSpec:
    arch: str = "qwen2"               # one of ARCHS
    hidden_size: int = 128
    num_layers: int | None = None     # None: 2 (deepseek_v3: 3, one dense layer and two MoE layers)
    num_heads: int = 4                # head_dim = hidden_size / num_heads (vLLM CPU kernels want 32/64/...)
    num_kv_heads: int = 2             # (deepseek_v3: MLA has no KV heads; ignored)
    intermediate_size: int = 256      # the dense MLP (MoE archs: of the dense layers)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool | None = None  # None: true (deepseek_v3: false, vLLM's DeepSeek never ties)
    initializer_range: float = 0.02
    seed: int = 0
    vocab_size: int = 0               # 0: the tokenizer's size; larger (e.g. Qwen2.5's 151,936) pads the tokenizer
    dtype: str = "float32"            # dtype of the saved weights ("bfloat16" halves big random models on disk)
    rope_theta: float = 10000.0
    tokenizer: str = "r1"             # "r1": the task tokenizer (think tokens, chat template); "base": a base
                                      # model's (no think tokens, no chat template; rl.tiny.build_base_tokenizer)
    # Mixture of Experts (qwen3_moe, deepseek_v3; None: the arch's default, rl.tiny.moe.ARCH_DEFAULTS)
    num_experts: int | None = None          # routed experts per MoE layer
    experts_per_token: int | None = None    # top-k
    moe_intermediate_size: int | None = None
    first_dense_layers: int | None = None   # the first layers keep a dense MLP (DeepSeek's first_k_dense_replace)
    shared_experts: int | None = None       # deepseek_v3: always-on experts beside the routed ones
    n_group: int | None = None              # deepseek_v3: expert groups of the group-limited top-k
    topk_group: int | None = None           # deepseek_v3: groups a token may use
    routed_scaling_factor: float | None = None  # deepseek_v3: scale of the routed experts' output
    router_bias_std: float | None = None    # deepseek_v3: std of the random e_score_correction_bias
    q_lora_rank: int | None = None          # deepseek_v3 MLA: query compression rank (0: no compression)
    kv_lora_rank: int | None = None         # deepseek_v3 MLA: latent KV rank (vLLM CPU: + qk_rope_head_dim = 576)
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None

    def __post_init__(self) -> None:
        from rl.tiny.moe import resolve_defaults

        for name, value in resolve_defaults(self).items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def make_config(spec: TinyModelSpec, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"hidden_size {spec.hidden_size} not divisible by num_heads {spec.num_heads}")
    common = dict(
        vocab_size=max(len(tokenizer), spec.vocab_size), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, initializer_range=spec.initializer_range,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id, dtype=spec.dtype, rope_theta=spec.rope_theta,
    )
    if spec.arch in MOE_ARCHS:
        from rl.tiny.moe import moe_config

        return moe_config(spec, common)
    return Qwen2Config(**common) if spec.arch == "qwen2" else LlamaConfig(**common)


def build_model(spec: TinyModelSpec, tokenizer_dir: str | Path, out_dir: str | Path) -> Path:
    """Initialise a model with seeded weights and save model + tokenizer + generation config to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(spec.seed)
    if spec.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"tiny model dtype {spec.dtype!r}: use float32 or bfloat16")
    model = AutoModelForCausalLM.from_config(make_config(spec, tok), dtype=getattr(torch, spec.dtype))
    if spec.arch in MOE_ARCHS:
        from rl.tiny.moe import init_router_bias

        init_router_bias(model, spec)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.eos_token_id)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
