"""Quantized rollout (rl.rollout.quantization): the int8 quantizer against its reference, the W8A8 checkpoint
vLLM reads, config checks, and a real int8 vLLM engine that loads, generates and takes synced weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl.grpo.sync.checksum import tensor_sum
from rl.rollout.quantization import (check_roundtrip, dequantize_int8, engine_dtype, engine_model, is_quantized_linear,
                                     is_quantized_param, quantize_int8, quantize_int8_fast, quantize_stream,
                                     write_int8_checkpoint)


def slow_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, one row at a time, in plain Python arithmetic on floats."""
    q, s = [], []
    for row in w.float().tolist():
        amax = max(abs(x) for x in row)
        scale = amax / 127 if amax > 0 else 1.0
        q.append([max(-127, min(127, round(x / scale))) for x in row])
        s.append([scale])
    return torch.tensor(q, dtype=torch.int8), torch.tensor(s)


def test_int8_quantizer_matches_the_row_by_row_reference():
    torch.manual_seed(0)
    w = torch.randn(12, 40) * torch.logspace(-3, 1, 12)[:, None]
    w[3] = 0.0                                             # a zero row: scale 1, all zeros
    q, s = quantize_int8(w)
    rq, rs = slow_quantize(w)
    assert q.dtype == torch.int8 and s.shape == (12, 1)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert int((q.int() - rq.int()).abs().max()) <= 1      # float32 vs Python float rounding at exact ties
    assert float((q.int() != rq.int()).float().mean()) < 0.01
    assert q.abs().max() == 127 and bool((q[3] == 0).all()) and float(s[3]) == 1.0
    check_roundtrip("w", w, q, s)                          # within half a step everywhere
    assert float((dequantize_int8(q, s) - w).abs().max()) <= float(s.max()) / 2 * 1.0001


def test_fast_quantizer_agrees_with_the_reference_within_a_tie():
    torch.manual_seed(1)
    w = (torch.randn(256, 512) * 0.02).to(torch.bfloat16)
    q, s = quantize_int8(w)
    fq, fs = quantize_int8_fast(w)
    assert fq.dtype == torch.int8 and fs.shape == (256, 1)
    torch.testing.assert_close(fs, s, rtol=1e-6, atol=0)
    assert int((fq.int() - q.int()).abs().max()) <= 1 and float((fq != q).float().mean()) < 0.005
    check_roundtrip("w", w, fq, fs)
    with pytest.raises(ValueError, match="more than half a quantization step"):
        bad = fq.clone()
        bad[0, 0] = bad[0, 0] + 2 if bad[0, 0] < 100 else bad[0, 0] - 2
        check_roundtrip("model.layers.0.mlp.up_proj.weight", w, bad, fs)


def test_stream_quantizes_decoder_linears_only_and_refuses_non_finite_weights():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
             "model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight", "lm_head.weight",
             "model.layers.2.mlp.experts.0.up_proj.weight"]
    assert [is_quantized_linear(n) for n in names] == [False, True, False, True, False, False, False]
    tensors = [(n, torch.randn(32, 64) if n.endswith("weight") and "norm" not in n else torch.randn(32)) for n in names]
    out = dict(quantize_stream(tensors))
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert out["model.layers.0.self_attn.q_proj.weight_scale"].shape == (32, 1)
    assert out["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight_scale" not in out
    assert len(out) == len(names) + 2
    bad = torch.randn(32, 64)
    bad[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight.*non-finite.*1 of 32 rows"):
        list(quantize_stream([("model.layers.1.mlp.down_proj.weight", bad)], check=False))
    assert is_quantized_param("x.weight", torch.zeros(2, dtype=torch.int8))
    assert is_quantized_param("x.weight_scale", torch.zeros(2)) and not is_quantized_param("x.weight", torch.zeros(2))


def test_int8_checkpoint_layout_and_engine_model_cache(tiny, tmp_path):
    from safetensors import safe_open

    dst = write_int8_checkpoint(tiny.qwen2, tmp_path / "q")
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["ignore"] == ["lm_head"]
    group = cfg["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["dynamic"] is True
    assert (dst / "tokenizer.json").is_file() and not list(tmp_path.glob("q.partial-*"))
    with safe_open(next(dst.glob("*.safetensors")), framework="pt") as sf:
        keys = set(sf.keys())
        assert sf.get_tensor("model.layers.0.mlp.gate_proj.weight").dtype == torch.int8
        assert "model.layers.0.mlp.gate_proj.weight_scale" in keys and "model.norm.weight" in keys
    with pytest.raises(ValueError, match="already quantized"):
        write_int8_checkpoint(dst, tmp_path / "again")
    p1, kw = engine_model(str(tiny.qwen2), "int8")
    assert engine_model(str(tiny.qwen2), "int8")[0] == p1 and kw == {} and Path(p1, "config.json").is_file()
    assert engine_model(str(tiny.qwen2), "none") == (str(tiny.qwen2), {})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp8 needs a GPU.*int8"):
            engine_model(str(tiny.qwen2), "fp8")
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        engine_model(str(tmp_path / "missing"), "int8")
    assert engine_dtype("float32", "int8", gpu=False) == "bfloat16"
    assert engine_dtype("float32", "int8", gpu=True) == "float32" and engine_dtype("float32", "none", gpu=False) == "float32"


def test_config_checks_and_the_precision_tolerance():
    from rl.config import ConfigError, load_config
    from rl.grpo.config import LOGPROB_TOL, GRPOConfig

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["rollout.quantization=int8"])
    assert cfg.logprob_tol() == LOGPROB_TOL["int8"] > LOGPROB_TOL["none"]
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["rollout.quantization=int8", "algo.logprob_check_tol=0.5"])
    assert cfg.logprob_tol() == 0.5
    assert load_config(GRPOConfig, "configs/tiny_grpo.yaml", []).logprob_tol() == LOGPROB_TOL["none"]
    with pytest.raises(ConfigError, match="rollout.quantization.*GPU rollout workers.*int8"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["rollout.quantization=fp8"])
    with pytest.raises(ConfigError, match="rollout.quantization.*allowed"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["rollout.quantization=int4"])


def _greedy(llm, prompts):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=12,
                                                                                   logprobs=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in out], [o.outputs[0].cumulative_logprob for o in out]


def assert_sync_refused(llm, state: dict, name: str, value: float, tmp_path: Path, match: str) -> None:
    """A sync of `state` with `value` written into one element of tensor `name` fails with an error matching
    `match` (a quantizing engine never loads non-finite weights silently)."""
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir(exist_ok=True)
    state = dict(state, **{name: state[name].clone()})
    state[name].view(-1)[0] = value
    save_file(state, bad / "model.safetensors")
    with pytest.raises(Exception, match=match):
        llm.collective_rpc("r1lab_load_from_dir", args=(str(bad), False))


@pytest.mark.slow   # 44 s: a second engine (the fast tier shares one), started and reloaded four times
def test_int8_engine_generates_and_takes_synced_weights(tiny, tmp_path):
    """A real W8A8 engine (a second, small one: int8 is a different kernel path than the session engine's):
    close to the fp32 model, a reload of the same weights changes nothing, a changed weight changes the output,
    the sums it returns are those of the tensors as sent, and its parameter sums leave int8 tensors out."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from rl.rollout.vllm_engine import make_llm, shutdown

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    llm = make_llm(str(tiny.qwen2), max_model_len=256, enforce_eager=True, kv_cache_gb=0.1, quantization="int8")
    try:
        toks, lps = _greedy(llm, prompts)
        hf = AutoModelForCausalLM.from_pretrained(tiny.qwen2, dtype=torch.float32).eval()
        with torch.no_grad():
            for p, t, lp in zip(prompts, toks, lps):
                ref = hf(torch.tensor([p + t])).logits.log_softmax(-1)[0, len(p) - 1:-1]
                ref_lp = float(ref.gather(-1, torch.tensor(t)[:, None]).sum())
                assert abs(ref_lp - lp) / len(t) < 0.25, (ref_lp, lp)   # LOGPROB_TOL["int8"] per token
        sums = llm.collective_rpc("r1lab_load_from_dir", args=(str(tiny.qwen2),))[0]
        state = load_file(next(Path(tiny.qwen2).glob("*.safetensors")))
        assert sums == {k: tensor_sum(v) for k, v in state.items()}   # as sent, before quantization
        assert _greedy(llm, prompts) == (toks, lps)
        changed = tmp_path / "changed"
        changed.mkdir()
        save_file({k: (v * 3 if ".mlp.down_proj." in k else v) for k, v in state.items()}, changed / "model.safetensors")
        llm.collective_rpc("r1lab_load_from_dir", args=(str(changed),))
        assert _greedy(llm, prompts) != (toks, lps)
        engine_sums = llm.collective_rpc("r1lab_param_sums")[0]
        assert any("norm" in k for k in engine_sums) and not any(k.endswith("weight_scale") for k in engine_sums)
        assert not any(k.endswith("proj.weight") for k in engine_sums)   # decoder linears are int8 (biases stay)
        assert_sync_refused(llm, state, "model.layers.0.self_attn.o_proj.weight", float("inf"), tmp_path,
                            "o_proj.weight.*non-finite")
    finally:
        shutdown(llm)


@pytest.mark.slow
def test_grpo_with_int8_rollout_passes_its_checks(tmp_path, ray_local):
    """Three GRPO steps with an int8 engine on Ray: every sync checksum-checked, the step-1 log-prob check at
    the int8 tolerance, and the correction's metrics logged."""
    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        "rollout.quantization=int8", "trainer.max_steps=3", "sync.checksum_every=1", "resources.ray_address=local",
        f"log.output_dir={tmp_path}", "log.progress=false", "algo.rollout_correction=icepop"])
    GRPODriver(cfg).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["sync/checksum_ok"] == 1.0 for r in rows)
    assert all(0 < r["rollout/logprob_diff"] < cfg.logprob_tol() for r in rows)
    assert all("rollout/is_masked_frac" in r for r in rows)
