"""Writing HF-format checkpoints from a full state dict: sharded safetensors ("buckets"), atomically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


def write_hf_checkpoint(state: dict[str, torch.Tensor], config, out_dir: str | os.PathLike, bucket_mb: int = 512,
                        tokenizer_from: str | None = None) -> dict[str, float]:
    """Save `state` as model-0000x-of-0000N.safetensors (+ index), config, generation config and tokenizer.

    Written into `<out_dir>.tmp` and renamed, so a reader never sees a half-written directory. Tied LM heads
    are not saved (as `save_pretrained` does). Returns {tensor name: float64 sum} of what was written.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    limit = max(1, bucket_mb) * (1 << 20)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    if tokenizer_from:
        from transformers import AutoTokenizer, GenerationConfig

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(tokenizer_from).save_pretrained(tmp)
        except OSError:
            pass
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return {k: float(v.double().sum()) for k, v in state.items()}


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """PEFT LoRA state dict -> plain HF state dict with W = W0 + scaling * B @ A (what vLLM must serve).

    Keys `base_model.model.X.base_layer.weight` / `X.lora_A.default.weight` / `X.lora_B.default.weight`
    become `X.weight`; everything else loses the `base_model.model.` prefix."""
    out: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in name:
            module = key.rsplit(".base_layer.", 1)[0]
            a = state.get(f"{module}.lora_A.default.weight")
            b = state.get(f"{module}.lora_B.default.weight")
            name = name.replace(".base_layer.", ".")
            if a is not None and b is not None and key.endswith(".base_layer.weight"):
                merged = value.float() + scaling * (b.float() @ a.float())
                value = merged.to(value.dtype)
        out[name] = value
    return out
