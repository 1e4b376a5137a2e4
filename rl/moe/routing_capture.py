"""Which experts the rollout engine routed each token to: the record's format, and its validation.

Format of a sample's record (`rl.rollout.vllm_engine.Sample.routed_experts`): an integer tensor
[prompt tokens + generated tokens - 1, MoE layers, top_k]. Row t holds the experts that the token at position t
(prompt included) was sent to in each MoE layer, MoE layers in model order with the dense layers left out
(`MoEShape.layers` are their indices among the hidden layers), slots in the router's top-k order. The last
generated token has no row: the engine stops before running it through the model. This is vLLM's own
`routed_experts` layout (`CompletionOutput.routed_experts`, [seq_len, layers, top_k]) restricted to the MoE
layers, and what `rl.moe.replay.pad_routing` takes.

`check_routed_experts` is run on every record as it leaves the engine, so that a capture bug stops the run at
the rollout that produced it, naming the sample, instead of training on garbage: the shape must match the
sample's tokens, ids must lie in [0, num_experts) and differ within a (token, layer), and a record may not be
all zeros (vLLM #54730: one kernel path returned all-zero ids).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


class RoutedExpertsError(ValueError):
    """A routed-experts record that does not describe its sample's tokens; the message names the sample."""


@dataclass(frozen=True)
class MoEShape:
    num_experts: int
    top_k: int
    layers: tuple[int, ...]     # indices (among the hidden layers) of the MoE layers, in model order
    num_hidden_layers: int


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def moe_shape(config: Any) -> MoEShape | None:
    """The MoE layout of an HF config (object or config.json dict); None for a dense model.

    Qwen2/3-MoE: a layer is MoE unless listed in `mlp_only_layers`, every `decoder_sparse_step`-th layer.
    DeepSeek-V2/V3: layers from `first_k_dense_replace` on, every `moe_layer_freq`-th."""
    config = _get(config, "text_config") or config
    n_layers = int(_get(config, "num_hidden_layers", 0) or 0)
    experts = _get(config, "n_routed_experts") or _get(config, "num_experts") or _get(config, "num_local_experts")
    top_k = _get(config, "num_experts_per_tok")
    if not experts or not top_k or not n_layers:
        return None
    if _get(config, "first_k_dense_replace") is not None:
        first, freq = int(_get(config, "first_k_dense_replace")), int(_get(config, "moe_layer_freq", 1) or 1)
        layers = [i for i in range(n_layers) if i >= first and i % freq == 0]
    else:
        dense = set(_get(config, "mlp_only_layers") or [])
        step = int(_get(config, "decoder_sparse_step", 1) or 1)
        layers = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    return MoEShape(int(experts), int(top_k), tuple(layers), n_layers)


def check_routed_experts(routing: Any, *, num_tokens: int, shape: MoEShape, name: str) -> torch.Tensor:
    """Validate one sample's record (see the module docstring); returns it as a torch integer tensor.

    num_tokens: the sample's prompt + generated tokens. Raises RoutedExpertsError naming `name`."""
    if routing is None:
        raise RoutedExpertsError(f"{name}: the engine returned no routed experts")
    ids = torch.as_tensor(routing)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise RoutedExpertsError(f"{name}: routed experts must be integer ids, got {ids.dtype}")
    want = (num_tokens - 1, len(shape.layers), shape.top_k)
    if tuple(ids.shape) != want:
        raise RoutedExpertsError(f"{name}: routed experts have shape {tuple(ids.shape)}, the sample's {num_tokens} "
                                 f"tokens need {want} (tokens but the last, MoE layers, top-k)")
    if ids.numel() == 0:
        return ids
    wide = ids.long()
    bad = ((wide < 0) | (wide >= shape.num_experts)).nonzero()
    if len(bad):
        t, l, _ = bad[0].tolist()
        raise RoutedExpertsError(f"{name}: expert id {int(wide[tuple(bad[0])])} at position {t}, MoE layer {l} is "
                                 f"out of range [0, {shape.num_experts})")
    if ids.numel() >= 2 and not wide.any():
        raise RoutedExpertsError(f"{name}: every routed expert id is 0 (an unfilled capture buffer; vLLM #54730)")
    s = wide.sort(dim=-1).values
    dup = (s[..., 1:] == s[..., :-1]).any(-1).nonzero()
    if len(dup):
        t, l = dup[0].tolist()
        raise RoutedExpertsError(f"{name}: position {t}, MoE layer {l} repeats an expert: {ids[t, l].tolist()}")
    return ids
