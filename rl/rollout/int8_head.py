"""An int8 LM head for int8 rollout engines on CPU (`rollout.int8_lm_head`).

Why: at Qwen2.5-0.5B's shape the vocabulary projection (151,936 x 896, tied to the embedding) is 27% of the
weights, and each decode step of 64 sequences spends ~27 ms of ~200 in it (bf16, 2 cores; bench/quantized_rollout.py).
The compressed-tensors checkpoint that gives the decoder its int8 layers cannot quantize the head: vLLM's head is
a `VocabParallelEmbedding`, which that format's quant methods do not cover. So the engine swaps the head's quant
method in place: `Int8HeadMethod.apply` (the logits GEMM, the only thing vLLM calls on a head besides weight
loading) runs W8A8 with the decoder's numerics (symmetric int8 weights per vocabulary row, activations quantized
per token at run time) through the same vLLM CPU kernels (`int8_scaled_mm_with_quant` with AMX, oneDNN
otherwise). The float weight stays (a tied head shares it with the token embedding, whose lookups are untouched)
and every weight sync rebuilds the int8 copy from it (`refresh_int8_head`), checked like the other int8 weights.

What it costs: the head's rounding adds to the engine-vs-trainer log-prob mismatch (measured in
bench/quantized_rollout.py and README "Quantized rollout"); the rollout-correction modes see it like any other.
LLM-compressor's W8A8 recipes leave the head in float for that reason, so this is off by default.
"""
from __future__ import annotations

import torch

from rl.rollout.quantization import quantize_weight


class Int8Head:
    """Int8 weights and per-row fp32 scales of a [V, H] head, with the kernel that multiplies by them.
    `path`: "amx" (vLLM's packed int8 GEMM, needs AMX) or "onednn"; None picks as vLLM's int8 linear does."""

    def __init__(self, weight: torch.Tensor, *, name: str = "lm_head.weight", check: bool = False,
                 path: str | None = None):
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

        w = weight.detach()
        q, scale = quantize_weight(name, w, check=check, what="int8 LM head")
        self.n, self.k = w.shape
        self.scale = scale.contiguous()            # [V, 1] fp32, kept alive: the kernels read it at every call
        self.path = path or ("amx" if check_cpu_sgl_kernel(self.n, self.k, torch.int8) else "onednn")
        if self.path == "amx":
            self.packed = torch.ops._C.convert_weight_packed(q)
        elif self.path == "onednn":
            self.q_t = q.t()                       # [H, V] view, as vLLM's oneDNN int8 linear builds its handle
            # the output dtype: the engine's compute dtype (vLLM passes its load-time default dtype, the same)
            self.handle = ops.create_onednn_scaled_mm(self.q_t, self.scale, w.dtype, True, False, 32)
        else:
            raise ValueError(f"int8 LM head: unknown kernel path {path!r} (amx | onednn)")

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] bf16/fp16 -> logits [T, V] in x's dtype."""
        from vllm import _custom_ops as ops

        shape = x.shape
        x = x.reshape(-1, self.k)
        if self.path == "amx":
            out = torch.ops._C.int8_scaled_mm_with_quant(x, self.packed, self.scale, None, x.dtype, True)
        else:
            xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)
            out = torch.empty((x.shape[0], self.n), dtype=x.dtype)
            ops.onednn_scaled_mm(self.handle, xq, out, xs, xzp, None, None)
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], self.n)


class Int8HeadMethod:
    """Stands in for an LM head's quant method: logits through `Int8Head`, everything else (attributes, the
    embedding lookup of a module that is both) through the method it replaced. Weight processing is left to
    `refresh_int8_head`: the float head's own packed kernel copy is never used again, so it is not rebuilt."""

    def __init__(self, inner):
        self.inner = inner
        self.head: Int8Head | None = None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(x, bias)

    def embedding(self, layer: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embedding(layer, ids)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _head_module(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(model, "lm_head", None)
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise ValueError(f"rollout.int8_lm_head: {type(model).__name__} has no 2-D `lm_head.weight` to quantize; "
                         "set rollout.int8_lm_head=false")
    return head


def install_int8_head(model: torch.nn.Module, *, path: str | None = None) -> Int8HeadMethod:
    """Swap `model.lm_head`'s quant method for `Int8HeadMethod` and build its int8 weights from the head's
    current float weight. Idempotent."""
    head = _head_module(model)
    method = head.quant_method
    if not isinstance(method, Int8HeadMethod):
        method = Int8HeadMethod(method)
        head.quant_method = method
        if hasattr(head, "cpu_linear"):
            del head.cpu_linear                     # the float head's packed copy (vLLM's CPU GEMM): unused now
    method.head = Int8Head(head.weight, check=False, path=path)
    return method


def refresh_int8_head(model: torch.nn.Module, *, check: bool) -> None:
    """Rebuild the int8 head from the float weight after a weight sync (a tied head: the new embedding);
    `check`: the round trip within half a quantization step, as on the decoder's int8 weights."""
    head = _head_module(model)
    method = head.quant_method
    if not isinstance(method, Int8HeadMethod):
        raise RuntimeError("refresh_int8_head: the int8 LM head was never installed (install_int8_head)")
    method.head = Int8Head(head.weight, check=check, path=method.head.path if method.head else None)
