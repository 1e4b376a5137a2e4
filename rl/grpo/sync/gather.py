"""Full tensors out of an FSDP2-sharded model, one at a time, in the engine's dtype and with HF names.

`iter_full_tensors` is a *collective* generator: every rank must run it to the end, in step, because each
sharded parameter is all-gathered (`DTensor.full_tensor()`) as it is reached. It casts the local shard to the
target dtype before gathering (half the traffic for bf16 engines), merges LoRA adapters into their base weight
(W = W0 + scaling * B @ A) so the engine serves plain weights, and skips a tied LM head (the engine re-ties
it). Together with `buckets` this bounds the extra memory of a sync or an HF export to about one bucket plus
the largest single tensor, instead of the whole model gathered on rank 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from rl.grpo.fsdp_model import hf_key
from rl.grpo.sync.checksum import tensor_sum

LORA_PREFIX = "base_model.model."


def _full(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sync_name(key: str) -> str | None:
    """The HF name a wrapper state-dict key is sent under (PEFT's prefix and `.base_layer` dropped); None for a
    LoRA adapter, which is merged into its base weight instead."""
    name = hf_key(key)
    if ".lora_A." in name or ".lora_B." in name:
        return None
    return name.removeprefix(LORA_PREFIX).replace(".base_layer.", ".")


def iter_full_tensors(model: torch.nn.Module, dtype: torch.dtype | None, *, lora_scaling: float | None = None,
                      tied_head: bool = False, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor on `device`) for every tensor of the wrapped model's state dict. Collective."""
    state = model.state_dict()
    for key, value in state.items():
        name = sync_name(key)
        if name is None:
            continue  # merged into their base weight below
        if ".base_layer." in key:
            module = key.rsplit(".base_layer.", 1)[0]
            a, b = state.get(f"{module}.lora_A.default.weight"), state.get(f"{module}.lora_B.default.weight")
            if a is not None and b is not None and key.endswith(".base_layer.weight") and lora_scaling:
                w = _full(value, torch.float32) + lora_scaling * (_full(b, torch.float32) @ _full(a, torch.float32))
                yield name, w.to(dtype or value.dtype).to(device)
                continue
        if tied_head and name == "lm_head.weight":
            continue
        yield name, _full(value, dtype).detach().to(device)


def iter_local_shards(model: torch.nn.Module, dtype: torch.dtype | None, *, tied_head: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor, tuple[int, ...], bool]]:
    """(HF name, this rank's piece in `dtype`, the full shape, sharded?) for every tensor: no collective.

    For `sync.shards=local`: FSDP2 shards every parameter on dim 0 over a 1-D mesh, so the pieces of all ranks
    in rank order, concatenated on dim 0, are the full tensor (an uneven split leaves the last ranks a short
    or empty piece). Replicated tensors are sent by rank 0 only. LoRA and 2-D meshes need the gathering path."""
    for key, value in model.state_dict().items():
        name = hf_key(key)
        if ".lora_A." in name or ".lora_B." in name or ".base_layer." in name:
            raise ValueError(f"sync.shards=local cannot merge LoRA adapters ({name}): use sync.shards=gather")
        if tied_head and name == "lm_head.weight":
            continue
        sharded = False
        local = value
        if hasattr(value, "to_local"):
            placements = value.placements
            if len(placements) != 1 or not (placements[0].is_shard(0) or placements[0].is_replicate()):
                raise ValueError(f"sync.shards=local needs parameters sharded on dim 0 over a 1-D mesh; {name} has "
                                 f"{placements}: use sync.shards=gather")
            sharded, local = placements[0].is_shard(0), value.to_local()
        if dtype is not None and local.is_floating_point():
            local = local.to(dtype)
        yield name, local.detach(), tuple(value.shape), sharded


def local_buckets(shards: Iterable[tuple[str, torch.Tensor, tuple[int, ...], bool]], bucket_bytes: int, rank: int
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """`buckets` for the pieces of `iter_local_shards`: boundaries are drawn by the *full* tensors' sizes, so
    every rank cuts the same buckets (the same count, the same names per bucket); a bucket holds this rank's
    pieces only (possibly none: an empty dict is still a bucket)."""
    cur: dict[str, torch.Tensor] = {}
    size = count = 0
    for name, local, shape, sharded in shards:
        n = math.prod(shape) * local.element_size()
        if count and size + n > bucket_bytes:
            yield cur
            cur, size, count = {}, 0, 0
        if sharded or rank == 0:
            cur[name] = local.contiguous()
        size += n
        count += 1
    if count:
        yield cur


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
    """Float64 sum of every tensor (`checksum.tensor_sum`): what the engine side compares against."""
    return {k: tensor_sum(v) for k, v in bucket.items()}


def largest_bucket_bytes(model: torch.nn.Module, dtype: torch.dtype, bucket_bytes: int, *, tied_head: bool = False
                         ) -> int:
    """The largest bucket a sync of `model` in `dtype` makes (full tensors, cut by `buckets`, which
    `local_buckets` matches), without touching any data (meta tensors of the full shapes): what a transport must
    have room for, times its buckets in flight."""
    def shapes() -> Iterator[tuple[str, torch.Tensor]]:
        for key, value in model.state_dict().items():
            name = sync_name(key)   # None: a LoRA adapter, merged into its base weight, which is sent
            if name is not None and not (tied_head and name == "lm_head.weight"):
                yield name, torch.empty(value.shape, dtype=dtype if value.is_floating_point() else value.dtype,
                                        device="meta")

    return max((sum(t.numel() * t.element_size() for t in b.values()) for b in buckets(shapes(), bucket_bytes)),
               default=0)
