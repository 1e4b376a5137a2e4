"""Tiny Qwen2 / Llama causal LMs built from a config and saved in HF format.

These are real `Qwen2ForCausalLM` / `LlamaForCausalLM` checkpoints: the same `from_pretrained(path)` code
that loads `Qwen/Qwen2.5-Math-1.5B` loads them, and vLLM serves them unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyModelSpec:
    arch: str = "qwen2"               # "qwen2" or "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4                # head_dim = hidden_size / num_heads (vLLM CPU kernels want 32/64/...)
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    seed: int = 0
    vocab_size: int = 0               # 0: the tokenizer's size; larger (e.g. Qwen2.5's 151,936) pads the tokenizer
    dtype: str = "float32"            # dtype of the saved weights ("bfloat16" halves big random models on disk)
    rope_theta: float = 10000.0
    tokenizer: str = "r1"             # "r1": the task tokenizer (think tokens, chat template); "base": a base
                                      # model's (no think tokens, no chat template; rl.tiny.build_base_tokenizer)

    def to_dict(self) -> dict:
        return asdict(self)


ARCHS = ("qwen2", "llama")


def make_config(spec: TinyModelSpec, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    if spec.arch not in ARCHS:
        raise ValueError(f"tiny model arch {spec.arch!r} unknown; allowed: {ARCHS}")
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
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.eos_token_id)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
