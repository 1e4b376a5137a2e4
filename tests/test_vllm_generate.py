"""vLLM (CPU) and transformers agree on the tiny Qwen2's greedy continuation."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.prompts import build_prompt
from rl.rollout.vllm_engine import generate, reload_weights, sampling_params
from rl.tiny import TinyModelSpec, build_tiny_model

pytestmark = pytest.mark.vllm


def test_greedy_agrees_with_transformers(vllm_engine, tiny):
    # A random model with the default 0.02 init emits one token forever; a wider init gives a varied, still
    # deterministic continuation, so agreement is a real check. Loaded through the weight-reload path.
    path = build_tiny_model(TinyModelSpec(arch="qwen2", initializer_range=0.3), tiny.tokenizer)
    reload_weights(vllm_engine, str(path))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [build_prompt(p, tok) for p in ("What is 12 + 34?", "Compute 5+7+9.")]
    out = generate(vllm_engine, prompts, sampling_params(temperature=0.0, max_tokens=32))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for prompt, samples in zip(prompts, out):
        vllm_ids = samples[0].token_ids
        assert len(set(vllm_ids)) > 5, "degenerate continuation would make the check meaningless"
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        hf = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        hf_ids = hf[0, ids.shape[1]:].tolist()
        assert vllm_ids == hf_ids[: len(vllm_ids)]
        # and the sampler's logprobs match the trainer-side log-softmax
        with torch.no_grad():
            logits = model(torch.tensor([ids[0].tolist() + vllm_ids])).logits[0, ids.shape[1] - 1:-1]
        ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(vllm_ids)[:, None])[:, 0]
        assert torch.allclose(ref, torch.tensor(samples[0].logprobs), atol=1e-3)


def test_a_reload_builds_no_gemm_handle_for_the_input_embedding(monkeypatch):
    """rl.rollout.vllm_cpu_fixes fix 6, on vLLM's own embedding classes: inside the reload context the input
    embedding is processed without a GEMM handle while a (tied) LM head sharing its method still gets one; after
    it, the class's method is back. Correctness of reloads with the fix (greedy decodes and log-probs against
    transformers, weights that changed) is the test above, whose engine reloads through it."""
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead, UnquantizedEmbeddingMethod,
                                                                     VocabParallelEmbedding)

    from rl.rollout.vllm_cpu_fixes import skip_embedding_gemm_on_reload

    def bare(cls):   # the layer without vLLM's parallel state: only what processing reads
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.weight = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
        return m

    method = UnquantizedEmbeddingMethod()
    embed, head = bare(VocabParallelEmbedding), bare(ParallelLMHead)
    embed.quant_method = head.quant_method = method
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens, model.lm_head = embed, head
    built = []
    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", lambda layer, remove_weight: built.append(layer))
    with skip_embedding_gemm_on_reload(model):
        method.process_weights_after_loading(embed)
        method.process_weights_after_loading(head)
    assert built == [head]
    method.process_weights_after_loading(embed)   # outside a reload (the first load): vLLM's own behaviour
    assert built == [head, embed] and "process_weights_after_loading" not in vars(method)
    built.clear()
    del model.lm_head            # logits from the embedding itself (vLLM's Gemma 2): its handle must be rebuilt
    with skip_embedding_gemm_on_reload(model):
        method.process_weights_after_loading(embed)
    assert built == [embed]


def test_streamed_groups_have_every_sample_and_temperature_logprobs(vllm_engine, tiny):
    """generate_stream yields each prompt's n samples once they are all finished (the engine's default
    cumulative output would carry only the last child), with log-probs of the *sampling* distribution
    (after temperature: vLLM's processed_logprobs mode), as the trainer computes them."""
    from rl.rollout.vllm_engine import generate_stream

    path = build_tiny_model(TinyModelSpec(arch="qwen2", initializer_range=0.3), tiny.tokenizer)
    reload_weights(vllm_engine, str(path))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(build_prompt(p, tok), add_special_tokens=False).input_ids for p in ("What is 1+2?", "Hi", "3*4?")]
    got = dict(generate_stream(vllm_engine, prompts, sampling_params(n=5, temperature=0.6, max_tokens=16)))
    assert sorted(got) == [0, 1, 2] and all(len(s) == 5 for s in got.values())
    assert len({tuple(s.token_ids) for s in got[0]}) > 1            # really 5 different samples
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    s = got[1][0]
    with torch.no_grad():
        logits = model(torch.tensor([prompts[1] + s.token_ids])).logits[0, len(prompts[1]) - 1:-1]
    at_t = torch.log_softmax(logits.float() / 0.6, -1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
    assert torch.allclose(at_t, torch.tensor(s.logprobs), atol=1e-3)


def test_the_engine_counts_token_ranks_eagerly_and_exactly(vllm_engine):
    """rl.rollout.vllm_cpu_fixes fix 4: the engine's sampler uses the eager rank count (no inductor compile at
    the first generate), and it counts ranks as vLLM's compiled `(x >= v).sum(-1)` does, ties included."""
    from rl.rollout.vllm_cpu_fixes import _count_at_least

    assert vllm_engine.collective_rpc("r1lab_rank_count_is_eager") == [True]   # in the engine's worker process
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-5, 5, (7, 50), generator=g).float()      # many ties
    v = x[:, 3:4].clone()
    slow = torch.tensor([sum(float(a) >= float(b) for a in row) for row, b in zip(x, v[:, 0])])
    assert torch.equal(_count_at_least(x, v), slow) and _count_at_least(x, v).dtype == torch.int64


def test_the_engine_draws_from_its_distribution_by_inverse_cdf(vllm_engine, tiny):
    """rl.rollout.cpu_sampler and rl.heap run in the engine's worker process: its sampler draws by
    inverse CDF and the heap thresholds are set. 4,000 one-token samples of one prompt at T=0.7 and top-k 20
    follow transformers' distribution (softmax of logits / T over the top 20): every token within 5 sigma, none
    outside the top k."""
    assert vllm_engine.collective_rpc("r1lab_sampler_is_inverse_cdf") == [True]
    assert vllm_engine.collective_rpc("r1lab_temperature_one_skipped") == [True]
    heap = vllm_engine.collective_rpc("r1lab_keep_step_buffers")[0]
    assert heap == "applied" or "threshold" in os.environ.get("GLIBC_TUNABLES", "") or heap.startswith("skipped: lib")
    path = build_tiny_model(TinyModelSpec(arch="qwen2", initializer_range=0.3), tiny.tokenizer)
    reload_weights(vllm_engine, str(path))
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(build_prompt("What is 2+2?", tok), add_special_tokens=False).input_ids
    n = 4000
    out = generate(vllm_engine, [ids], sampling_params(n=n, temperature=0.7, top_k=20, max_tokens=1))
    drawn = torch.tensor([s.token_ids[0] for s in out[0]])
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double() / 0.7
    top = logits.topk(20).indices
    want = torch.zeros_like(logits)
    want[top] = logits[top].softmax(-1)
    freq = torch.bincount(drawn, minlength=len(logits)).double() / n
    assert freq[want == 0].sum() == 0
    sigma = (want * (1 - want) / n).sqrt()
    assert bool(((freq - want).abs() <= 5 * sigma + 1e-9).all()), (freq[top], want[top])
    assert (want[top] > 0.02).sum() >= 3, "a near-deterministic distribution would make the check weak"


def test_cpu_kv_cache_is_what_the_sequences_need():
    from rl.rollout.vllm_engine import cpu_kv_cache_bytes

    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128}
    # 2 layers x (K, V) x 2 heads x 32 dims x 4 bytes = 1,024 bytes a token; 256 sequences x (32 + 1) blocks of 16
    assert cpu_kv_cache_bytes(cfg, 512, 256) == 256 * 33 * 16 * 1024
    assert cpu_kv_cache_bytes({**cfg, "head_dim": 64}, 500, 8) == 8 * 33 * 16 * 2048   # 500 -> 32 blocks + 1
    assert cpu_kv_cache_bytes({**cfg, "kv_lora_rank": 512}, 512, 256) is None          # MLA: vLLM decides
    assert cpu_kv_cache_bytes({"text_config": {}, **cfg}, 512, 256) is None
    assert cpu_kv_cache_bytes({"hidden_size": 128}, 512, 256) is None


def test_an_in_process_engine_leaves_this_process_as_it_found_it(tiny):
    """vLLM's CPU worker makes torch.set_num_threads a no-op for its whole process and freezes vLLM's environment
    cache; an in-process engine (one at a time) must leave neither behind, nor its heap thresholds
    (rl.heap: released at shutdown), and it gets a KV cache of its need."""
    import rl.heap as engine_heap
    from vllm import envs

    from rl.rollout.vllm_engine import _set_multiprocessing, cpu_kv_cache_bytes, make_llm, shutdown

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    released = []
    release, engine_heap.release = engine_heap.release, lambda: released.append(True) or release()
    llm = make_llm(str(tiny.qwen2), max_model_len=256, enforce_eager=True, in_process=True)
    try:
        assert len(generate(llm, ["1+1="], sampling_params(temperature=0.0, max_tokens=4))[0][0].token_ids) == 4
        kv = llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes
        assert kv == cpu_kv_cache_bytes(AutoModelForCausalLM.from_pretrained(tiny.qwen2).config.to_dict(), 256, 256)
        heap_here = llm._r1lab_heap_here
    finally:
        shutdown(llm)
        engine_heap.release = release
    assert released == ([True] if heap_here else []) and not llm._r1lab_heap_here
    assert heap_here or "threshold" in os.environ.get("GLIBC_TUNABLES", "")
    assert torch.set_num_threads is set_threads
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    envs.enable_envs_cache()       # as an in-process engine core does at start-up, for its whole process
    _set_multiprocessing(True)     # what the next make_llm does first: clear it, so that its own choice is read
    assert not hasattr(envs.__getattr__, "cache_clear") and envs.VLLM_ENABLE_V1_MULTIPROCESSING
