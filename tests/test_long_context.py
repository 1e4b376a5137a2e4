"""Long responses: packed micro-batches (rl.packing.PackedLayout + the packed attention) and Ulysses sequence
parallelism (rl.grpo.sequence_parallel), fp32 on tiny models: the same log-probs, loss and gradients as one
unpadded sequence at a time, no attention across packed sequences, and k=2 gloo ranks == one rank."""
import json
import os

import pytest
import torch

from rl.packing import PackedLayout
from rl.ports import free_port


def tiny_lm(kv_heads: int = 2, seed: int = 0, packed: bool = True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl.grpo.sequence_parallel import register_packed_attention

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=128, max_position_embeddings=256,
                      attn_implementation=register_packed_attention() if packed else "sdpa")
    return Qwen2ForCausalLM(cfg).float()


def _sequences(lengths, prompt=3, seed=0):
    """Padded [n, L] ids, attention mask and score (response) mask for sequences of these lengths."""
    g = torch.Generator().manual_seed(seed)
    n, L = len(lengths), max(lengths)
    ids = torch.randint(1, 97, (n, L), generator=g)
    am = torch.zeros(n, L, dtype=torch.long)
    for i, m in enumerate(lengths):
        am[i, :m] = 1
    score = am.clone().float()
    score[:, :prompt] = 0
    return ids, am, score


def _packed(model, layout, ids, score, temperature=0.7):
    lp, ent = model(layout.pack(ids), None, layout.pack(score), temperature, True,
                    position_ids=layout.position_ids(), cu_seqlens=layout.cu_seqlens())
    return layout.unpack(lp), layout.unpack(ent)


@pytest.fixture(params=[1.0, 2.0, 1e9])
def attention_path(request, monkeypatch):
    """The SDPA path's bucketing: every length its own padded call (1.0), the default, all sequences in one
    padded call (1e9: the short ones padded to the longest)."""
    import rl.grpo.sequence_parallel as sp

    monkeypatch.setattr(sp, "BUCKET_RATIO", request.param)
    return request.param


def test_layout_moves_any_per_token_tensor_and_back():
    """pack/unpack are inverse on real tokens for tensors with trailing dims (e.g. MoE routing ids [rows,
    positions, layers, k]); the tail pad up to a multiple of k is its own segment."""
    layout = PackedLayout.of([5, 2, 3], multiple=4)
    assert layout.width == 12 and layout.cu_seqlens().tolist() == [0, 5, 7, 10, 12]
    assert layout.position_ids().tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 0, 1]]
    ids = torch.randint(0, 8, (3, 6, 4, 2))
    for i, n in enumerate(layout.lengths):
        ids[i, n:] = -1
    packed = layout.pack(ids, fill=-1)
    assert packed.shape == (1, 12, 4, 2) and (packed[0, 10:] == -1).all()
    assert torch.equal(layout.unpack(packed, length=6, fill=-1), ids)
    with pytest.raises(ValueError, match=r"expected \[3, >= 5"):
        layout.pack(ids[:, :4])


def test_packed_logprobs_equal_unpadded_per_sequence(attention_path):
    """Each sequence alone (no padding, HF's own SDPA attention) vs all of them packed in one row: log-probs and
    entropies of every scored token agree to < 1e-5 (fp32)."""
    from rl.grpo.fsdp_model import TokenLogprobModel

    lengths = [37, 5, 64, 12, 1, 20]
    ids, am, score = _sequences(lengths)
    plain = TokenLogprobModel(tiny_lm(packed=False).eval(), chunk=7)
    packed = TokenLogprobModel(tiny_lm(packed=True).eval(), chunk=7)
    diffs = []
    with torch.no_grad():
        lp, ent = _packed(packed, PackedLayout.of(lengths, multiple=2), ids, score)
        for i, n in enumerate(lengths):
            want_lp, want_ent = plain(ids[i:i + 1, :n], am[i:i + 1, :n], score[i:i + 1, :n], 0.7, True)
            m = score[i, :n].bool()
            diffs += [(lp[i, :n][m] - want_lp[0][m]).abs(), (ent[i, :n][m] - want_ent[0][m]).abs()]
            assert (lp[i][~score[i].bool()] == 0).all()
    diffs = torch.cat(diffs)
    assert diffs.numel() == 2 * sum(n - 3 for n in lengths if n > 3) and diffs.max() < 1e-5, diffs.max()


def test_a_packed_sequence_never_changes_its_neighbours(attention_path):
    """Changing one packed sequence's tokens changes the others' log-probs and entropies by exactly 0."""
    from rl.grpo.fsdp_model import TokenLogprobModel

    lengths = [30, 9, 17]
    ids, _, score = _sequences(lengths)
    other = ids.clone()
    other[1, :9] = torch.randint(1, 97, (9,), generator=torch.Generator().manual_seed(5))
    model = TokenLogprobModel(tiny_lm().eval())
    layout = PackedLayout.of(lengths)
    with torch.no_grad():
        a, ea = _packed(model, layout, ids, score)
        b, eb = _packed(model, layout, other, score)
    assert not torch.equal(a[1], b[1])
    for i in (0, 2):
        assert torch.equal(a[i], b[i]) and torch.equal(ea[i], eb[i]), i


def _sp_rank(rank: int, world: int, port: int, out: str) -> None:
    """One of two gloo ranks: sequence parallelism k=2 on a replica of the tiny model vs k=1 (rank 0 also runs
    k=1 alone); the loss (assembled as the trainer does, with entropy and KL terms) and the parameter gradients
    summed over the group are compared on rank 0."""
    import torch.distributed as dist

    from rl.algos.assemble import LossTerms, Normalisers, assemble_loss
    from rl.grpo.fsdp_model import TokenLogprobModel
    from rl.grpo.sequence_parallel import SPGroup, make_sp_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = make_sp_group(world, rank, 2)
    terms = LossTerms(loss_agg="seq_mean_token_mean", entropy_coef=0.01, kl_coef=0.1)
    results = {}
    for kv in (2, 1):   # KV heads split over the ranks / repeated to the ranks
        for name, lengths in (("odd_single", [13]), ("packed", [9, 4, 6, 21])):
            ids, _, score = _sequences(lengths, seed=len(lengths))
            adv = torch.linspace(-1, 1, len(lengths))
            layout = PackedLayout.of(lengths, multiple=2)
            runs = []
            for sp in ([group, SPGroup()] if rank == 0 else [group]):
                model = TokenLogprobModel(tiny_lm(kv_heads=kv), chunk=5, sp=sp)
                lp, ent = _packed(model, layout, ids, score)
                old = lp.detach() + 0.05 * torch.cos(torch.arange(lp.numel()).view(lp.shape).float())
                m = score[:, :lp.shape[1]]
                norm = Normalisers(float(m.sum()), float(len(lengths)), 32)
                loss, _ = assemble_loss(lp, m, adv, old, old, terms, norm, entropy=ent, ref_logp=old - 0.1)
                loss.backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                if sp.size > 1:
                    for g in grads.values():
                        dist.all_reduce(g, group=sp.group)
                runs.append((float(loss.detach()), lp.detach(), grads))
            if rank == 0:
                (l2, lp2, g2), (l1, lp1, g1) = runs
                results[f"kv{kv}/{name}"] = {
                    "loss_rel": abs(l2 - l1) / abs(l1), "lp_max": float((lp2 - lp1).abs().max()),
                    "grad_rel": max(float((g2[n] - g1[n]).abs().max() / g1[n].abs().max()) for n in g1)}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def test_sequence_parallel_two_ranks_equal_one_rank(tmp_path):
    """k=2 gloo ranks, each with half of the packed row's tokens and heads exchanged by all_to_all_single: the
    loss and every parameter's gradient (summed over the group) equal k=1 within 1e-5 relative, for a row of
    odd length (padded to 14) and a packed row of four sequences; KV heads split (2) and repeated (1)."""
    import torch.multiprocessing as mp

    out = tmp_path / "sp.json"
    mp.spawn(_sp_rank, args=(2, free_port(), str(out)), nprocs=2)
    res = json.loads(out.read_text())
    assert len(res) == 4, res
    for case, r in res.items():
        assert r["loss_rel"] < 1e-5 and r["lp_max"] < 1e-5 and r["grad_rel"] < 1e-5, (case, r)


def test_the_heads_check_names_the_numbers():
    from types import SimpleNamespace as NS

    from rl.config import ConfigError, load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.sequence_parallel import check_heads

    with pytest.raises(ConfigError, match=r"trainer.sequence_parallel=4: the model has 14 attention heads, not "
                                          r"divisible by 4 .*divisors of 14: \[1, 2, 7, 14\]"):
        check_heads(NS(num_attention_heads=14, num_key_value_heads=2), 4)
    with pytest.raises(ConfigError, match=r"sequence_parallel=2: the model has 3 KV heads: 2 must divide them, or "
                                          r"be a multiple of them"):
        check_heads(NS(num_attention_heads=12, num_key_value_heads=3), 2)
    check_heads(NS(num_attention_heads=14, num_key_value_heads=2), 2)   # split
    check_heads(NS(num_attention_heads=8, num_key_value_heads=2), 4)    # each KV head repeated twice
    with pytest.raises(ConfigError, match=r"trainer.sequence_parallel: trainer.num_workers=3 is not divisible by "
                                          r"sequence_parallel=2"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["trainer.num_workers=3", "trainer.sequence_parallel=2",
                                                          "trainer.packing=true"])
    with pytest.raises(ConfigError, match="set trainer.packing=true"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["trainer.sequence_parallel=2", "trainer.packing=false"])


def _trainer_rank(rank: int, world: int, ports: list, model_path: str, out: str) -> None:
    """The real TrainerWorker (FSDP2 over both gloo ranks) on the same shard on both ranks, three ways: padded
    rows (sp 1, so two data-parallel copies), packed rows (sp 1), packed rows split over both ranks (sp 2, one
    data-parallel group). Rank 0 writes the old log-probs, the update's metrics and the AdamW moments."""
    import sys

    from test_trainer_worker import _reduce_comms

    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.trainer_worker import TrainerWorker

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
    from train_step import synthetic_shard

    results = {}
    for port, (name, extra) in zip(ports, [("padded", ["trainer.packing=false"]), ("packed", ["trainer.packing=true"]),
                                           ("sp2", ["trainer.packing=true", "trainer.sequence_parallel=2"])]):
        cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
            *extra, "trainer.threads=1", f"trainer.num_workers={world}", "trainer.micro_batch_tokens=96",
            "trainer.grad_clip=0", "algo.entropy_coef=0.01", "algo.loss_agg=seq_mean_token_mean"])
        w = TrainerWorker(rank, world, "127.0.0.1", port, cfg, model_path)
        try:
            b = synthetic_shard(w.model.hf.config.vocab_size, 0, 240, 11, 70, 20, 0.8, seed=3)
            lp = w.compute_logprobs(b)["old_logp"]
            b["old_logp"], b["rollout_logp"] = lp, lp + 0.02 * torch.cos(torch.arange(lp.numel()).view(lp.shape))
            m = w.update(b)
            sums = w.state_sums()
            comms = sorted({f"{type(c).__name__} trim_heap={c.trim_heap}" for c in _reduce_comms(w)})
        finally:
            w.shutdown()
        results[name] = {"lp": lp.tolist(), "metrics": m, "comms": comms,
                         "sq": {k: v for k, v in sums.items() if k.startswith("exp_avg_sq:")}}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def test_trainer_packed_and_sequence_parallel_updates_equal_padded(tiny, tmp_path):
    """Whole trainer step (FSDP2, micro-batches of a 96-token budget, entropy bonus, per-sequence loss
    aggregation): padded rows, packed rows and packed rows over k=2 sequence-parallel ranks give the same old
    log-probs (< 1e-5), loss, entropy and gradient norm, and the same per-tensor squared gradients (AdamW's
    second moment after one step) within 1e-5 relative."""
    import torch.multiprocessing as mp

    out = tmp_path / "trainer.json"
    mp.spawn(_trainer_rank, args=(2, [free_port() for _ in range(3)], str(tiny.qwen2), str(out)), nprocs=2)
    res = json.loads(out.read_text())
    ref = res["padded"]
    # every FSDP unit reduces gradients with rl.grpo.reduce_scatter.ReduceByOwner on gloo, trimming the heap
    assert all(r["comms"] == ["ReduceByOwner trim_heap=True"] for r in res.values()), {k: r["comms"] for k, r in res.items()}
    assert ref["metrics"]["perf/padding_frac"] > 0.05 > res["packed"]["metrics"]["perf/padding_frac"]
    for name in ("packed", "sp2"):
        r = res[name]
        assert (torch.tensor(r["lp"]) - torch.tensor(ref["lp"])).abs().max() < 1e-5, name
        for k in ("actor/pg_loss", "actor/loss", "actor/entropy", "actor/grad_norm"):
            assert r["metrics"][k] == pytest.approx(ref["metrics"][k], rel=1e-5), (name, k)
        assert set(r["sq"]) == set(ref["sq"]) and len(ref["sq"]) > 10
        for k, v in ref["sq"].items():
            assert r["sq"][k] == pytest.approx(v, rel=1e-5), (name, k)


@pytest.mark.slow  # a learning run: `make test-slow` (fast tier budget, issue 25)
def test_grpo_with_packing_and_two_sequence_parallel_ranks_learns(weak_sft, tmp_path, ray_local):
    """GRPO on Ray with packed micro-batches split over two sequence-parallel trainer workers (one data-parallel
    group): the engine runs the trainer's weights (log-prob check), nothing is padded, and reward rises."""
    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        f"model.path={weak_sft}", "trainer.packing=true", "trainer.sequence_parallel=2", "trainer.max_steps=14",
        "trainer.lr=0.001", "reward.weights=[1.0, 0.5]", "checkpoint.every=0", f"log.output_dir={tmp_path}",
        "log.progress=false", "resources.ray_address=local"])
    GRPODriver(cfg).run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert all(r["rollout/logprob_diff"] < 1e-3 and r["perf/padding_frac"] < 0.01 for r in rows)
    reward = [r["rollout/reward_mean"] for r in rows]
    assert sum(reward[-4:]) / 4 > sum(reward[:4]) / 4 + 0.1, reward


def test_the_packed_row_context_survives_fsdp_input_casting():
    """FSDP2's mixed-precision policy casts a forward's inputs with torch's `_apply_to_tensors`, which rebuilds
    dataclasses: the packed-row context must reach the attention as the same object (its call count and plan are
    read after the forward; as a dataclass, bf16 training failed with "does not route attention")."""
    from torch.distributed.utils import _apply_to_tensors

    from rl.grpo.sequence_parallel import PackedAttention

    ctx = PackedAttention(cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32), max_len=3)
    out = _apply_to_tensors(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, {"r1lab_packed": ctx})
    assert out["r1lab_packed"] is ctx
