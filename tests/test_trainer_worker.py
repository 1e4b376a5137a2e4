"""The trainer worker without Ray: in-process (one gloo rank) and under torchrun (several ranks)."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from rl.config import load_config
from rl.grpo.config import GRPOConfig
from rl.grpo.sync.checksum import tensor_sum
from rl.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def _worker(cfg, model_path, base_path=None, sync_spec=None):
    from rl.grpo.trainer_worker import TrainerWorker

    return TrainerWorker(0, 1, "127.0.0.1", free_port(), cfg, str(model_path), str(base_path or model_path), sync_spec)


def _batch(worker, tokens=256):
    sys.path.insert(0, str(REPO / "launch"))
    from train_step import synthetic_shard

    b = synthetic_shard(worker.model.hf.config.vocab_size, 0, tokens, 16, 24, 12, 0.5, seed=0)
    b["rollout_logp"] = worker.compute_logprobs(b)["old_logp"]
    return b


def _reduce_comms(w) -> list:
    """The gradient reduce-scatter hook of every FSDP unit of the worker's model."""
    return [g._reduce_scatter_comm for mod in w.model.modules() if hasattr(mod, "_get_fsdp_state")
            for g in mod._get_fsdp_state()._fsdp_param_groups]


def test_kl_reference_is_the_base_model_also_when_starting_from_a_checkpoint(tiny, tiny_sft):
    """A resumed run starts the policy from its checkpoint, but the KL reference must stay the base model
    (it used to be loaded from the checkpoint, i.e. the current policy, so the KL was ~0 after a resume)."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["algo.kl_coef=0.01", "trainer.threads=1"])
    resumed_from, base = tiny_sft[0], tiny.qwen2
    w = _worker(cfg, resumed_from, base)
    try:
        def same(model, path):
            ref = AutoModelForCausalLM.from_pretrained(path).state_dict()
            got = {k[len("lm."):]: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                   for k, v in model.state_dict().items()}
            return all(torch.equal(got[k].float(), ref[k].float()) for k in ref if k in got)
        assert same(w.ref, base) and not same(w.ref, resumed_from)
        assert same(w.model, resumed_from)
    finally:
        w.shutdown()


def test_bf16_compute_updates_fp32_masters_and_pushes_their_bf16_cast(tiny, tmp_path):
    """model.dtype=bfloat16 at lr 1e-6: the fp32 master weights change (bf16 weights would round the update
    away), and the engine is sent exactly the bf16 cast of the masters, bucket by bucket."""
    from rl.grpo.sync import FileTransport

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["model.dtype=bfloat16", "trainer.lr=1e-6",
                                                             "trainer.threads=1", "trainer.grad_clip=0"])
    transport = FileTransport(str(tmp_path / "shm"), "test", readers=1, timeout_s=60)
    w = _worker(cfg, tiny.qwen2, sync_spec=transport.spec())
    try:
        batch = _batch(w)
        before = w.state_sums()
        for _ in range(2):
            batch["old_logp"] = w.compute_logprobs(batch)["old_logp"]
            w.update(batch)
        after = w.state_sums()
        params = [k for k in before if k.startswith("param:")]
        assert all(p.dtype == torch.float32 for p in w.model.parameters())
        # one CPU rank: every FSDP unit's reduce hook gives the backward's freed heap back (rl/heap.py)
        comms = _reduce_comms(w)
        assert comms and all(getattr(c, "trim_heap", False) for c in comms), comms
        changed = [k for k in params if after[k] != before[k]]
        assert len(changed) == len(params), sorted(set(params) - set(changed))
        received = {}
        reader = threading.Thread(target=lambda: received.update(dict(transport.receive(7, 0))))
        reader.start()
        sent = w.push_weights(version=7, bucket_mb=0.1, checksum=True)
        reader.join(timeout=60)
        assert sent["buckets"] > 1 and set(received) == set(sent["sums"])
        masters = {k[len("lm."):]: p.full_tensor() if hasattr(p, "full_tensor") else p
                   for k, p in w.model.named_parameters()}
        for name, t in received.items():
            assert t.dtype == torch.bfloat16, name
            assert torch.equal(t, masters[name].detach().to(torch.bfloat16)), name
            assert tensor_sum(t) == sent["sums"][name]
        assert not list((tmp_path / "shm" / "r1lab-sync-test").glob("*.safetensors"))  # writer cleaned up
    finally:
        w.shutdown()
    assert not (tmp_path / "shm" / "r1lab-sync-test").exists()



def test_each_micro_batch_asks_for_sdpas_kernel_at_its_longest_row(tiny, monkeypatch):
    """rl.grpo.attention_kernel: the update's forward and backward of each micro-batch, and the old-log-prob pass,
    ask for SDPA's kernel at the micro-batch's longest row (trainer.math_attention_below); the update counts every
    layer's attention as kept for the backward (no gradient checkpointing), the log-prob pass one; the tiny
    model's rows then run the math kernel."""
    import rl.grpo.trainer_worker as tw

    kernels, real_sdpa = [], tw.training_sdpa

    def spy(n, dev, below, **kw):
        ctx = real_sdpa(n, dev, below, **kw)
        kernels.append((n, below, kw["rows"], kw["layers_held"], type(ctx).__name__))
        return ctx

    monkeypatch.setattr(tw, "training_sdpa", spy)
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["trainer.threads=1", "trainer.math_attention_below=150"])
    w = _worker(cfg, tiny.qwen2)
    try:
        batch = _batch(w)
        lengths = batch["attention_mask"].sum(-1)
        kernels.clear()
        batch["old_logp"] = w.compute_logprobs(batch)["old_logp"]
        assert kernels and all(held == 1 for *_, held, _ in kernels)
        assert sum(rows for _, _, rows, _, _ in kernels) == len(lengths)
        kernels.clear()
        w.update(batch)
        layers = w.model.hf.config.num_hidden_layers
        assert kernels and len(kernels) % 2 == 0 and kernels[::2] == kernels[1::2], kernels   # forward, backward
        assert all(below == 150 and held == layers for _, below, _, held, _ in kernels), kernels
        assert max(n for n, *_ in kernels) == int(lengths.max()) and sum(k[2] for k in kernels[::2]) == len(lengths)
        assert int(lengths.max()) < 150 and all(name != "nullcontext" for *_, name in kernels)   # math, every time
    finally:
        w.shutdown()

def _torchrun(nproc: int, args: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "launch/train_step.py", "--response-tokens", "256", "--steps", "1", "--warmup", "0",
           *args, "trainer.threads=1", f"log.output_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])


@pytest.mark.parametrize("model", [None, pytest.param("tiny:deepseek_v3", marks=pytest.mark.slow)])
def test_torchrun_training_step_and_sharded_checkpoints_across_world_sizes(model, tmp_path):
    """Under torchrun (no Ray): a training step on 2 ranks, a DCP checkpoint restored exactly on 1 rank
    (2 -> 1) and that rank's checkpoint restored exactly on 2 ranks (1 -> 2): weights, AdamW moments, step.
    Also for the DeepSeek-V3-style MoE policy (MLA, routed and shared experts, the router's bias buffer)."""
    policy = [f"model.path={model}"] if model else []
    a = _torchrun(2, ["--save", str(tmp_path / "c2"), *policy], tmp_path)
    assert a["world"] == 2 and a["grad_norm"] > 0 and a["train_tokens_per_s"] > 0
    assert sorted(p.name for p in (tmp_path / "c2" / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    b = _torchrun(1, ["--load", str(tmp_path / "c2"), "--save", str(tmp_path / "c1"), *policy], tmp_path)
    assert b["restored_max_rel_diff"] == 0.0 and b["restored_keys"] > 10 and b["loaded_step"] == 1
    if model:                      # the restored state covers the experts and MLA's projections
        keys = json.loads((tmp_path / "c2" / "state_sums.json").read_text())
        assert any(".experts." in k for k in keys) and any("kv_a_proj_with_mqa" in k for k in keys), sorted(keys)[:20]
    c = _torchrun(2, ["--load", str(tmp_path / "c1"), *policy], tmp_path)
    assert c["restored_max_rel_diff"] == 0.0 and c["loaded_step"] == 2


def test_skipping_the_old_logprob_forward_gives_the_same_update(tiny):
    """Strictly on-policy (one epoch, one mini-batch): the update's own forward supplies the old log-probs
    (detached). Same loss, metrics and new weights as with the separate no-grad forward."""
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["trainer.threads=1", "trainer.num_workers=1"])
    results = []
    for separate in (True, False):
        w = _worker(cfg, tiny.qwen2)
        try:
            b = _batch(w)
            if separate:
                b["old_logp"] = w.compute_logprobs(b)["old_logp"]
            m = w.update(b)
            sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                  for k, v in w.model.state_dict().items()}
            results.append((m, sd))
        finally:
            w.shutdown()
    (m1, sd1), (m2, sd2) = results
    for k in ("actor/pg_loss", "actor/loss", "actor/grad_norm", "actor/clipfrac"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), k
    assert all(torch.allclose(sd1[k], sd2[k], atol=1e-7) for k in sd1)
    fresh = _fresh_state(tiny.qwen2)
    assert any(not torch.allclose(sd1[k].float(), fresh[k].float()) for k in sd1 if k in fresh)  # it did train


def _fresh_state(path):
    from transformers import AutoModelForCausalLM

    return {"lm." + k: v for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_release_heap_false_keeps_the_heap(tiny, monkeypatch):
    """trainer.release_heap=false: glibc's heap is kept for reuse (rl.heap.keep_freed_heap: thresholds
    raised, trimming off), no FSDP unit's reduce hook trims, a step never calls the trim, and shutdown puts
    glibc's thresholds back (this worker runs in pytest's process)."""
    import rl.grpo.trainer_worker as tw
    import rl.heap as eh

    calls, kept, released = [], [], []
    monkeypatch.setattr(tw, "release_free_heap", lambda: calls.append(1) or True)
    real_keep, real_release = eh.keep_step_buffers, eh.release
    monkeypatch.setattr(eh, "keep_step_buffers", lambda *a, **k: kept.append((a, k)) or real_keep(*a, **k))
    monkeypatch.setattr(eh, "release", lambda: released.append(1) or real_release())
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["trainer.release_heap=false", "trainer.threads=1"])
    w = _worker(cfg, tiny.qwen2)
    try:
        assert kept == [((eh.MAX_THRESHOLD,), {"trim": eh.NEVER_TRIM})]
        if w.heap.startswith(("skipped: lib", "skipped: GLIBC_TUNABLES", "skipped: no glibc")):
            pytest.skip(f"another allocator or the user's thresholds: {w.heap}")
        assert w.heap == "applied" and w.ready()["heap"] == "applied"
        comms = _reduce_comms(w)
        assert comms and not any(c.trim_heap for c in comms)
        batch = _batch(w)
        batch["old_logp"] = w.compute_logprobs(batch)["old_logp"]
        w.update(batch)
        assert calls == []
    finally:
        w.shutdown()
    assert released == [1] and w.heap == "released"
