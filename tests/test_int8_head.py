"""The int8 LM head of CPU int8 engines (rl.rollout.int8_head, `rollout.int8_lm_head`): its GEMM against a plain
W8A8 reference on both of vLLM's CPU kernel paths, the quant-method swap (logits int8, embedding lookups float,
rebuilt on refresh, bad weights refused), the config checks, and a real engine that generates and takes syncs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rl.rollout.int8_head import Int8Head, Int8HeadMethod, install_int8_head, refresh_int8_head

PATHS = ["onednn", pytest.param("amx", marks=pytest.mark.skipif(
    not torch.cpu._is_amx_tile_supported(), reason="vLLM's packed int8 GEMM needs AMX; this CPU has none"))]


def w8a8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row of w and per token of x, the product in float64: what the kernels compute."""
    def q(t):
        t = t.double()
        s = t.abs().amax(dim=1, keepdim=True) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        return torch.clamp(torch.round(t / s), -127, 127), s
    xq, xs = q(x)
    wq, ws = q(w)
    return (xq @ wq.T) * xs * ws.T


@pytest.mark.parametrize("path", PATHS)
def test_int8_head_matches_the_w8a8_reference(path):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1024, 128, generator=g) * 0.05).bfloat16()
    w[7] = 0                                                   # a zero row (padding of a vocabulary): logits 0
    x = torch.randn(5, 128, generator=g).bfloat16()
    head = Int8Head(w, path=path)
    assert head.path == path
    out = head(x)
    assert out.shape == (5, 1024) and out.dtype == torch.bfloat16
    ref = w8a8_reference(x, w)
    assert (out.double() - ref).abs().max() <= 0.01 * ref.abs().max()        # bf16 output rounding
    assert (out[:, 7] == 0).all()
    exact = x.double() @ w.double().T                        # and int8 stays close to the float head
    assert (out.double() - exact).abs().max() <= 0.03 * exact.abs().max()
    bias = torch.randn(1024, generator=g).bfloat16()
    assert torch.allclose(head(x, bias).float(), (out + bias).float())
    assert head(x.reshape(1, 5, 128)).shape == (1, 5, 1024)


def _model_with_head(vocab=512, hidden=128):
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    head = torch.nn.Module()
    head.weight = torch.nn.Parameter((torch.randn(vocab, hidden) * 0.05).bfloat16(), requires_grad=False)
    head.quant_method = UnquantizedEmbeddingMethod()
    head.quant_method.process_weights_after_loading(head)       # vLLM's CPU head: a packed float copy
    model = torch.nn.Module()
    model.lm_head = head
    return model


def test_install_swaps_the_logits_and_keeps_the_lookup():
    model = _model_with_head()
    head = model.lm_head
    x = torch.randn(3, 128).bfloat16()
    ids = torch.tensor([0, 5, 511])
    method = install_int8_head(model, path="onednn")
    assert head.quant_method is method and isinstance(method, Int8HeadMethod) and not hasattr(head, "cpu_linear")
    assert install_int8_head(model, path="onednn") is method                  # idempotent
    ref = w8a8_reference(x, head.weight)
    assert (method.apply(head, x).double() - ref).abs().max() <= 0.01 * ref.abs().max()
    assert torch.equal(method.embedding(head, ids), head.weight[ids])         # lookups: the float weight, exact
    assert method.supports_pre_processed_weights is True                      # other attributes: vLLM's method
    method.process_weights_after_loading(head)                                # a reload re-processes nothing...
    with torch.no_grad():
        head.weight.mul_(2)
    assert (method.apply(head, x).double() - ref).abs().max() <= 0.01 * ref.abs().max()   # ...until refreshed
    refresh_int8_head(model, check=True)
    assert (method.apply(head, x).double() - 2 * ref).abs().max() <= 0.02 * ref.abs().max()
    assert method.head.path == "onednn"


def test_bad_heads_are_refused_with_their_names():
    model = _model_with_head()
    install_int8_head(model, path="onednn")
    with torch.no_grad():
        model.lm_head.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match="lm_head.weight has non-finite"):
        refresh_int8_head(model, check=False)
    with pytest.raises(RuntimeError, match="never installed"):
        refresh_int8_head(_model_with_head(), check=False)
    with pytest.raises(ValueError, match="rollout.int8_lm_head.*lm_head.weight"):
        install_int8_head(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown kernel path"):
        Int8Head(torch.ones(16, 32).bfloat16(), path="avx2")


def test_config_and_engine_arguments_refuse_a_head_without_int8():
    from rl.config import ConfigError, load_config
    from rl.grpo.config import GRPOConfig
    from rl.rollout.vllm_engine import make_llm

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["rollout.quantization=int8", "rollout.int8_lm_head=true"])
    assert cfg.rollout.int8_lm_head
    with pytest.raises(ConfigError, match="rollout.int8_lm_head.*rollout.quantization=int8"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["rollout.int8_lm_head=true"])
    with pytest.raises(ConfigError, match="rollout.int8_lm_head.*CPU rollout workers"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["rollout.quantization=int8", "rollout.int8_lm_head=true",
                                                           "resources.rollout_gpus=1"])
    with pytest.raises(ValueError, match="int8_lm_head needs quantization='int8'"):
        make_llm("unused", int8_lm_head=True)


def _logprob_gap(model_dir, prompts, toks, lps) -> float:
    """Mean |engine - transformers fp32| log-prob per generated token."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gaps = []
    with torch.no_grad():
        for p, t, lp in zip(prompts, toks, lps):
            ref = hf(torch.tensor([p + t])).logits.log_softmax(-1)[0, len(p) - 1:-1]
            gaps.append(abs(float(ref.gather(-1, torch.tensor(t)[:, None]).sum()) - lp) / len(t))
    return sum(gaps) / len(gaps)


@pytest.mark.slow   # ~40 s: its own int8 engine, reloaded three times
def test_engine_with_an_int8_head_generates_and_takes_synced_weights(tiny, tmp_path):
    """A real int8 engine with the head int8: close to the fp32 model, a reload of the same weights changes
    nothing, a changed (tied) embedding reaches the int8 head, a NaN in it is refused naming the head."""
    from safetensors.torch import load_file, save_file

    from rl.rollout.vllm_engine import make_llm, shutdown
    from tests.test_quantized_rollout import _greedy, assert_sync_refused

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    llm = make_llm(str(tiny.qwen2), max_model_len=256, enforce_eager=True, kv_cache_gb=0.1, quantization="int8",
                   int8_lm_head=True)
    try:
        want = "amx" if torch.cpu._is_amx_tile_supported() else "onednn"
        assert llm.collective_rpc("r1lab_int8_head_path") == [want]
        toks, lps = _greedy(llm, prompts)
        assert _logprob_gap(tiny.qwen2, prompts, toks, lps) < 0.25                 # LOGPROB_TOL["int8"] per token
        llm.collective_rpc("r1lab_load_from_dir", args=(str(tiny.qwen2),))
        assert _greedy(llm, prompts) == (toks, lps)
        state = load_file(next(Path(tiny.qwen2).glob("*.safetensors")))
        assert "lm_head.weight" not in state                                       # tied: the embedding is the head
        changed = tmp_path / "changed"
        changed.mkdir()
        g = torch.Generator().manual_seed(1)
        emb = state["model.embed_tokens.weight"]
        save_file({**state, "model.embed_tokens.weight": emb + torch.randn(emb.shape, generator=g).to(emb.dtype) * 0.1},
                  changed / "model.safetensors")
        llm.collective_rpc("r1lab_load_from_dir", args=(str(changed),))
        toks2, lps2 = _greedy(llm, prompts)
        assert (toks2, lps2) != (toks, lps)
        for f in Path(tiny.qwen2).iterdir():
            if f.suffix != ".safetensors":
                (changed / f.name).write_bytes(f.read_bytes())
        new_gap = _logprob_gap(changed, prompts, toks2, lps2)        # the engine scores with the new head...
        old_gap = _logprob_gap(tiny.qwen2, prompts, toks2, lps2)     # ...not the old one
        assert new_gap < 0.25 and old_gap > 2 * new_gap, (new_gap, old_gap)
        assert_sync_refused(llm, state, "model.embed_tokens.weight", float("nan"), tmp_path,
                            "lm_head.weight has non-finite")
    finally:
        shutdown(llm)
