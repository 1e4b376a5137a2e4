"""rl.rollout.cpu_sampler (inverse-CDF sampling in vLLM's CPU sampler) and rl.heap."""
from __future__ import annotations

import math
import types

import pytest
import torch

from rl.rollout.cpu_sampler import row_uniforms, sample_rows


def reference(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The obvious inverse CDF in float64: first i with cumsum[i] > u * total."""
    c = probs.double().cumsum(-1)
    return torch.searchsorted(c, (u * c[:, -1])[:, None], right=True)[:, 0]


def boundary_gap(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Distance of each row's target from the nearest cumulative boundary (relative to the row's mass)."""
    c = probs.double().cumsum(-1)
    t = u * c[:, -1]
    return (c - t[:, None]).abs().min(-1).values / c[:, -1]


@pytest.mark.parametrize("v,block", [(1000, 128), (1024, 128), (300, 7), (5, 128), (130, 128)])
def test_sample_rows_is_the_inverse_cdf(v, block):
    """Equal to the float64 reference for every target not within rounding of a boundary; vocabulary a multiple
    of the block or not, shorter than one block."""
    g = torch.Generator().manual_seed(v)
    logits = torch.randn(64, v, generator=g) * 3
    logits[:, ::3] = -math.inf                                   # masked tokens (top-k/top-p leave -inf)
    logits[0, :] = -math.inf
    logits[0, v // 2] = 0.0                                      # one token left
    probs = logits.softmax(-1)
    for _ in range(20):
        u = torch.rand(64, dtype=torch.float64, generator=g)
        got = sample_rows(probs, u, block=block)
        want = reference(probs, u)
        clear = boundary_gap(probs, u) > 1e-9
        assert clear.sum() > 50
        assert torch.equal(got[clear], want[clear])
        assert bool((probs.gather(1, got[:, None]) > 0).all())   # never a token of probability 0
    assert bool((sample_rows(probs, torch.rand(64, dtype=torch.float64, generator=g), block) == v // 2)[0])


def test_sample_rows_never_picks_a_zero_token_at_the_ends():
    """u = 0 and u just below 1 (whose target can round onto the total): the first and the last token with mass,
    also when whole blocks (and the row's last block) have none."""
    probs = torch.zeros(3, 1000)
    probs[0, 5] = probs[0, 700] = 0.5
    probs[1, 130:140] = 1.0                                      # mass in one block only
    probs[2, ::2] = torch.rand(500)
    for u, picks in ((0.0, [5, 130, 0]), (1.0 - 2.0 ** -53, [700, 139, 998])):
        got = sample_rows(probs, torch.full((3,), u, dtype=torch.float64), block=128)
        assert got.tolist() == picks


def test_sample_rows_draws_the_distribution():
    """Many draws: the frequencies of a peaked 12-token distribution match it (within 5 sigma each)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.3, 0.2, 0.0, 0.15, 0.1, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01, 0.0])
    n = 200_000
    got = sample_rows(p.expand(n, -1).contiguous(), torch.rand(n, dtype=torch.float64, generator=g), block=5)
    freq = torch.bincount(got, minlength=12).double() / n
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert bool(((freq - p.double()).abs() <= 5 * sigma + 1e-12).all())
    assert freq[2] == 0 and freq[11] == 0


def test_sample_rows_refuses_bad_shapes():
    with pytest.raises(ValueError, match="probs must be"):
        sample_rows(torch.ones(4), torch.zeros(4, dtype=torch.float64))


def test_seeded_rows_take_their_generators_uniform():
    """Rows of seeded requests draw from their own generator (reproducible), the others from the global one."""
    torch.manual_seed(1)
    a = row_uniforms(4, {1: torch.Generator().manual_seed(7), 3: torch.Generator().manual_seed(8)})
    torch.manual_seed(2)
    b = row_uniforms(4, {1: torch.Generator().manual_seed(7), 3: torch.Generator().manual_seed(8)})
    assert a[1] == b[1] and a[3] == b[3] and a[0] != b[0]
    assert a.dtype == torch.float64 and bool(((a >= 0) & (a < 1)).all())


def test_vllms_sampler_with_the_inverse_cdf():
    """The swapped `TopKTopPSampler.forward_cpu`: the processed log-probs are vLLM's (log-softmax after top-k),
    masked tokens are never drawn, draws follow the processed distribution; fp64 Gumbel keeps vLLM's own code."""
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from rl.rollout import cpu_sampler

    # left installed: in-process engines of later tests get it through rl.rollout.worker_ext's import anyway
    assert cpu_sampler.install() and TopKTopPSampler.forward_cpu is cpu_sampler.forward_cpu
    sampler = TopKTopPSampler("processed_logprobs")
    assert sampler.forward.__func__ is cpu_sampler.forward_cpu
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]]).expand(20_000, -1).contiguous()
    k = torch.full((20_000,), 3, dtype=torch.long)
    want = torch.tensor([2.0, 1.0, -math.inf, -math.inf, -math.inf, 3.0]).log_softmax(-1)
    torch.manual_seed(0)
    tokens, logprobs = sampler(logits.clone(), {}, k, None)
    assert torch.allclose(logprobs[0], want) and logprobs.dtype == torch.float32
    freq = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert freq[2:5].sum() == 0
    assert bool(((freq - want.exp().double()).abs() < 0.02).all())
    fp64 = types.SimpleNamespace(use_fp64_gumbel=True)
    called = []
    saved = cpu_sampler._VLLM_FORWARD_CPU
    cpu_sampler._VLLM_FORWARD_CPU = lambda *a: called.append(a) or "vllm"
    try:
        assert cpu_sampler.forward_cpu(fp64, logits, {}, None, None) == "vllm" and called
    finally:
        cpu_sampler._VLLM_FORWARD_CPU = saved


def test_temperature_of_one_skips_the_division():
    """The swapped `Sampler.apply_temperature`: rows all at T=1 (greedy rows counting as 1, as vLLM makes them)
    come back untouched and undivided; any other temperature goes to vLLM's division, in place."""
    from vllm.v1.sample.sampler import Sampler

    from rl.rollout import cpu_sampler

    assert cpu_sampler.install() and cpu_sampler.installed() == {"inverse_cdf": True, "temperature": True}
    calls = []
    saved = cpu_sampler._VLLM_APPLY_TEMPERATURE
    cpu_sampler._VLLM_APPLY_TEMPERATURE = lambda *a: calls.append(a) or saved(*a)
    try:
        x = torch.randn(3, 10)
        ref = x.clone()
        assert Sampler.apply_temperature(x, torch.ones(3), True) is x and torch.equal(x, ref) and not calls
        assert Sampler.apply_temperature(x, torch.tensor([1.0, 0.0, 1.0]), False) is x and not calls
        out = Sampler.apply_temperature(x, torch.tensor([1.0, 0.5, 1.0]), True)
        assert len(calls) == 1 and torch.equal(out, ref / torch.tensor([[1.0], [0.5], [1.0]]))
        y = ref.clone()
        Sampler.apply_temperature(y, torch.tensor([0.0, 2.0, 1.0]), False)    # greedy row divided by 1
        assert len(calls) == 2 and torch.equal(y, ref / torch.tensor([[1.0], [2.0], [1.0]]))
    finally:
        cpu_sampler._VLLM_APPLY_TEMPERATURE = saved


@pytest.mark.parametrize("rows,v", [(1, 7), (5, 100), (64, 151_936), (17, 32_001)])
def test_rank_count_by_int8_gemm_is_exact(rows, v, monkeypatch):
    """vllm_cpu_fixes fix 4: the mask summed by an int8 GEMM (which is what runs) equals the plain count, ties and
    -inf included, for row counts and vocabularies that are and are not multiples of the GEMM's blocks, and for a
    transposed layout (a non-contiguous mask)."""
    from rl.rollout import vllm_cpu_fixes

    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(1) or int_mm(*a))
    g = torch.Generator().manual_seed(rows)
    x = torch.randint(-4, 4, (rows, v), generator=g).float()
    x[:, ::5] = -math.inf
    values = x[torch.arange(rows), torch.randint(0, v, (rows,), generator=g)][:, None]
    got = vllm_cpu_fixes._count_at_least(x, values)
    assert got.dtype == torch.int64 and torch.equal(got, (x >= values).sum(-1)) and len(calls) == 1
    xt = x.t().contiguous().t()                     # same values, column-major
    assert rows == 1 or not (xt >= values).is_contiguous()
    assert torch.equal(vllm_cpu_fixes._count_at_least(xt, values), (x >= values).sum(-1)) and len(calls) == 2
    assert v not in vllm_cpu_fixes._INT_MM_REFUSED


def test_heap_threshold_and_its_skips():
    """rl.heap: the threshold is twice the fp32 logits of max_num_seqs rows (>= 64 MiB); the
    user's own thresholds in GLIBC_TUNABLES are left alone."""
    from rl.heap import MIN_THRESHOLD, keep_step_buffers, threshold_bytes

    assert threshold_bytes(256, 151_936) == 297 << 20            # 2 x 256 x 151,936 x 4 B, rounded up to MiB
    assert threshold_bytes(4, 512) == MIN_THRESHOLD
    assert threshold_bytes(4096, 262_144) == 2**31 - 1                # mallopt takes a C int
    assert keep_step_buffers(1 << 30, tunables="glibc.malloc.mmap_threshold=1").startswith("skipped: GLIBC_TUNABLES")
    assert keep_step_buffers(1 << 30, tunables="glibc.malloc.trim_threshold=1").startswith("skipped: GLIBC_TUNABLES")


def test_keeping_step_buffers_stops_the_page_faults():
    """In a fresh process: a 40 MB buffer allocated, filled and freed 20 times first-touches its pages every time
    under glibc's defaults (one minor fault per 4 KiB page at least), after keep_step_buffers mostly not (the heap
    serves it again; 6 of the 20 grew the heap in one run here)."""
    from conftest import heap_fault_probe

    code = """
import resource, sys, torch
from rl.heap import keep_step_buffers, release
if sys.argv[1] in ("keep", "release"):
    print(keep_step_buffers(64 << 20, tunables=""))
if sys.argv[1] == "release":
    print(release())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(10_000_000).fill_(1.0)
before = faults()
for _ in range(20):
    torch.empty(10_000_000).fill_(1.0)
print(faults() - before)
"""
    out = heap_fault_probe(code, ("default", "keep", "release"))
    assert out["keep"][0] == "applied" and out["release"][:2] == ["applied", "True"]
    assert int(out["default"][0]) >= 20 * 9_000 and int(out["keep"][1]) < int(out["default"][0]) / 2, out
    assert int(out["release"][2]) >= 20 * 9_000, out           # released: a 40 MB buffer is mapped afresh again
