import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.tiny import TinyModelSpec, build_tiny_model


def test_both_archs_load_in_transformers(tiny):
    for path, cls in [(tiny.qwen2, "Qwen2ForCausalLM"), (tiny.llama, "LlamaForCausalLM")]:
        model = AutoModelForCausalLM.from_pretrained(path)
        assert type(model).__name__ == cls
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.vocab_size == len(tok)
        ids = tok("What is 1 + 2?", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == ids.shape[1] + 5 or tok.eos_token_id in out[0].tolist()
        assert json.loads((path / "config.json").read_text())["architectures"] == [cls]


def test_cache_is_keyed_by_config(tiny):
    again = build_tiny_model(TinyModelSpec(arch="qwen2"), tiny.tokenizer)
    assert again == tiny.qwen2  # built once, reused
    other = build_tiny_model(TinyModelSpec(arch="qwen2", num_layers=1), tiny.tokenizer)
    assert other != tiny.qwen2
    m = AutoModelForCausalLM.from_pretrained(other)
    assert m.config.num_hidden_layers == 1


def test_seeded_init_is_reproducible(tmp_path, tiny):
    from rl.tiny.models import build_model

    a = AutoModelForCausalLM.from_pretrained(build_model(TinyModelSpec(seed=3), tiny.tokenizer, tmp_path / "a"))
    b = AutoModelForCausalLM.from_pretrained(build_model(TinyModelSpec(seed=3), tiny.tokenizer, tmp_path / "b"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
