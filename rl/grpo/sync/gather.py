"""Full tensors out of an FSDP2-sharded model, one at a time, in the engine's dtype and with HF names.

`iter_full_tensors` is a *collective* generator: every rank must run it to the end, in step, because each
sharded parameter is all-gathered (`DTensor.full_tensor()`) as it is reached. It casts the local shard to the
target dtype before gathering (half the traffic for bf16 engines), merges LoRA adapters into their base weight
(W = W0 + scaling * B @ A) so the engine serves plain weights, and skips a tied LM head (the engine re-ties
it). Together with `buckets` this bounds the extra memory of a sync or an HF export to about one bucket plus
the largest single tensor, instead of the whole model gathered on rank 0.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from rl.grpo.fsdp_model import hf_key

LORA_PREFIX = "base_model.model."


def _full(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def iter_full_tensors(model: torch.nn.Module, dtype: torch.dtype | None, *, lora_scaling: float | None = None,
                      tied_head: bool = False, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor on `device`) for every tensor of the wrapped model's state dict. Collective."""
    state = model.state_dict()
    for key, value in state.items():
        name = hf_key(key)
        if ".lora_A." in name or ".lora_B." in name:
            continue  # merged into their base weight below
        if name.startswith(LORA_PREFIX):
            name = name[len(LORA_PREFIX):]
        if ".base_layer." in name:
            module = key.rsplit(".base_layer.", 1)[0]
            name = name.replace(".base_layer.", ".")
            a, b = state.get(f"{module}.lora_A.default.weight"), state.get(f"{module}.lora_B.default.weight")
            if a is not None and b is not None and key.endswith(".base_layer.weight") and lora_scaling:
                w = _full(value, torch.float32) + lora_scaling * (_full(b, torch.float32) @ _full(a, torch.float32))
                yield name, w.to(dtype or value.dtype).to(device)
                continue
        if tied_head and name == "lm_head.weight":
            continue
        yield name, _full(value, dtype).detach().to(device)


def buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Group (name, tensor) pairs into dicts of about `bucket_bytes` (a bigger tensor gets a bucket alone)."""
    cur: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if cur and size + n > bucket_bytes:
            yield cur
            cur, size = {}, 0
        cur[name] = t.contiguous()
        size += n
    if cur:
        yield cur


def tensor_sums(bucket: dict[str, torch.Tensor]) -> dict[str, float]:
    """Float64 sum of every tensor: what the engine side compares against."""
    return {k: float(v.double().sum()) for k, v in bucket.items()}
