"""transformers 5's fused expert tensors, split into the per-expert tensors of an MoE checkpoint.

transformers 5 keeps a layer's routed experts as two 3-D parameters (Qwen3-MoE, DeepSeek-V3):
`<layer>.mlp.experts.gate_up_proj` [E, 2I, H] (expert e's gate projection in rows :I, its up projection in rows
I:) and `<layer>.mlp.experts.down_proj` [E, H, I]. That is what the trainer's state dict, and so the weight
sync, carries. `save_pretrained` writes the checkpoint format instead, one tensor per expert and projection
(`<layer>.mlp.experts.<e>.gate_proj.weight` [I, H], `up_proj` [I, H], `down_proj` [H, I]), and that is the
format vLLM loads for every MoE model: vLLM 0.32's DeepSeek-V3 loader has no name for the fused tensors
("KeyError: 'layers.1.mlp.experts.down_proj'"; its Qwen3-MoE loader happens to take both).
`split_experts` turns the former into the latter (views, no copy).
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import torch

_FUSED = re.compile(r"^(?P<pre>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def split_experts(name: str, tensor: torch.Tensor, hidden_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) itself, or for a fused expert tensor its per-expert checkpoint tensors.

    ValueError when a fused tensor's shape does not have the hidden size where transformers puts it (a layout
    this function does not know, e.g. [E, H, 2I])."""
    m = _FUSED.match(name)
    if m is None or tensor.dim() != 3:
        yield name, tensor
        return
    pre, experts = m["pre"], tensor.shape[0]
    if m["kind"] == "gate_up_proj":
        if tensor.shape[2] != hidden_size or tensor.shape[1] % 2:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} is not [experts, 2 x intermediate, hidden="
                             f"{hidden_size}]")
        inter = tensor.shape[1] // 2
        for e in range(experts):
            yield f"{pre}.{e}.gate_proj.weight", tensor[e, :inter]
            yield f"{pre}.{e}.up_proj.weight", tensor[e, inter:]
    else:
        if tensor.shape[1] != hidden_size:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} is not [experts, hidden={hidden_size}, "
                             "intermediate]")
        for e in range(experts):
            yield f"{pre}.{e}.down_proj.weight", tensor[e]
