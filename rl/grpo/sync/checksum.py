"""Comparing the engine's parameter sums with the trainer's per-tensor sums, across vLLM's fused layouts.

vLLM stores some HF tensors fused (float64 sums add up, so a fused parameter's sum is the sum of its parts):
  - attention: `qkv_proj` = q_proj + k_proj + v_proj; MLA with a compressed query: `fused_qkv_a_proj` =
    q_a_proj + kv_a_proj_with_mqa;
  - dense MLPs (and DeepSeek's shared experts): `gate_up_proj` = gate_proj + up_proj;
  - routed experts: `<layer>.mlp.experts[.routed_experts].w13_weight` [E, 2I, H] = the HF experts' gate and up
    projections, `w2_weight` [E, H, I] = their down projections. transformers 5 keeps them fused too
    (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]: what the trainer sends); a
    checkpoint written by `save_pretrained` has them per expert (`mlp.experts.<e>.gate_proj.weight`, ...):
    both are understood. A CPU engine repacks w13/w2 for its kernel and may zero-pad the expert width; both
    keep the sum.
What cannot be compared: on CPU vLLM repacks most linear weights into kernel formats and drops the originals
from `named_parameters` (only norms, embeddings, routers and the experts' w13/w2 remain readable), so an
engine name with no trainer counterpart is skipped; `match_engine_sums` says which names were compared.

Every sum on both sides is `tensor_sum`: float64, added chunk by chunk of `SUM_CHUNK` elements. A chunk that
small is reduced by one thread, so the result does not depend on the thread counts of the trainer ranks and the
engine (a whole-tensor sum does for fp32 tensors: torch splits it over its threads), and each chunk's float64
copy stays in cache: 0.09 s for a [151,936 x 896] bf16 embedding instead of 0.53 s for `t.double().sum()`.
"""
from __future__ import annotations

import re

import torch

SUM_CHUNK = 32768   # elements: at most one thread's share of a torch CPU reduction (its grain size)


def tensor_sum(t: torch.Tensor) -> float:
    """Float64 sum of `t`'s elements, the same number in every process for the same bytes (see above). Always
    on the CPU: a GPU tensor (a trainer's piece with sync.shards=local) is copied first, as a GPU would add in
    another order than the engine's CPU and pay a launch per chunk."""
    flat = t.detach().reshape(-1).cpu()
    total = 0.0
    for i in range(0, flat.numel(), SUM_CHUNK):
        total += float(flat[i:i + SUM_CHUNK].double().sum())
    return total

_FUSED = (
    (".qkv_proj.", ("q_proj", "k_proj", "v_proj")),
    (".fused_qkv_a_proj.", ("q_a_proj", "kv_a_proj_with_mqa")),
    (".gate_up_proj.", ("gate_proj", "up_proj")),
)
_ENGINE_EXPERTS = re.compile(r"^(?P<pre>.*\.experts)(?:\.routed_experts)?\.(?P<w>w13|w2)_weight$")
_HF_EXPERT = re.compile(r"^(?P<pre>.*\.experts)\.\d+\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def _per_expert_index(hf_sums: dict[str, float]) -> dict[tuple[str, str], list[str]]:
    index: dict[tuple[str, str], list[str]] = {}
    for name in hf_sums:
        m = _HF_EXPERT.match(name)
        if m:
            index.setdefault((m["pre"], m["proj"]), []).append(name)
    return index


def hf_parts(name: str, hf_sums: dict[str, float], index: dict[tuple[str, str], list[str]]) -> list[str] | None:
    """The trainer tensors whose sums add up to engine parameter `name`; None when the trainer has none."""
    m = _ENGINE_EXPERTS.match(name)
    if m:
        pre, fused = m["pre"], m["w"] == "w13"
        whole = f"{pre}.gate_up_proj" if fused else f"{pre}.down_proj"
        if whole in hf_sums:
            return [whole]
        parts = [n for p in (("gate_proj", "up_proj") if fused else ("down_proj",)) for n in index.get((pre, p), [])]
        return parts or None
    for fused_name, pieces in _FUSED:
        if fused_name in name:
            parts = [name.replace(fused_name.strip("."), p) for p in pieces]
            return parts if all(p in hf_sums for p in parts) else None
    return [name] if name in hf_sums else None


def match_engine_sums(hf_sums: dict[str, float], engine_sums: dict[str, float],
                      rel_tol: float = 1e-4) -> tuple[list[str], list[str]]:
    """(engine names compared, descriptions of those whose sum differs from the trainer's)."""
    index = _per_expert_index(hf_sums)
    compared, bad = [], []
    for name, s in engine_sums.items():
        parts = hf_parts(name, hf_sums, index)
        if parts is None:
            continue
        compared.append(name)
        want = sum(hf_sums[p] for p in parts)
        if abs(want - s) > rel_tol * max(1.0, abs(want)):
            bad.append(f"{name}: engine {s:.6g} vs trainer {want:.6g}")
    return compared, bad
