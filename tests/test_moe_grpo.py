"""Routing replay wired into GRPO: config, batches that carry the engine's expert ids, the trainer worker's
forwards (micro-batching, length sorting, packing) replaying exactly those ids, the load-balancing loss in the
loss assembly, and a GRPO run on Ray with a tiny Qwen3-MoE under R3."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl.config import ConfigError, load_config
from rl.grpo.config import GRPOConfig
from rl.moe.replay import find_routers, moe_layout
from rl.moe.trainer_routing import (
    ENGINE_KEY,
    RECORD_KEY,
    WeightedMetrics,
    agreement,
    finish_weighted,
    forward_mode,
    micro_ids,
    packed_mask,
)
from rl.packing import PackedLayout
from rl.ports import free_port

V = 128
MARK = 100          # token ids >= MARK mark the first token of sample (id - MARK); other tokens are < MARK


# ------------------------------------------------------------------------------------------------ pure pieces
def test_forward_mode_table():
    assert forward_mode("off", "old", {}) == ("off", None)
    assert forward_mode("off", "update", {ENGINE_KEY: 0}) == ("off", None)
    assert forward_mode("r2", "old", {ENGINE_KEY: 0}) == ("record", None)
    assert forward_mode("r2", "update", {RECORD_KEY: 0}) == ("replay", RECORD_KEY)
    assert forward_mode("r2", "update", {}) == ("record", None)            # no old pass: same weights
    assert forward_mode("r3", "old", {ENGINE_KEY: 0}) == ("replay", ENGINE_KEY)
    assert forward_mode("r3", "update", {ENGINE_KEY: 0, RECORD_KEY: 0}) == ("replay", ENGINE_KEY)
    with pytest.raises(ValueError, match="rollout.return_routed_experts"):
        forward_mode("r3", "update", {})


def test_micro_ids_follow_padded_and_packed_layouts():
    ids = torch.arange(3 * 6 * 2 * 1).view(3, 6, 2, 1).to(torch.int16)
    got = micro_ids(ids, [2, 0], 4)
    assert got.dtype == torch.long and torch.equal(got, ids[[2, 0], :4].long())
    layout = PackedLayout.of([4, 2], multiple=4)                      # rows 2 (4 tokens), 0 (2 tokens) + 2 pad
    packed = micro_ids(ids, [2, 0], 0, layout)
    assert packed.shape == (1, 8, 2, 1)
    assert torch.equal(packed[0, :4], ids[2, :4].long()) and torch.equal(packed[0, 4:6], ids[0, :2].long())
    assert (packed[0, 6:] == -1).all()                                 # the pad tail is never replayed
    assert torch.equal(micro_ids(ids, [2, 0], 0, layout, lo=4, n=4), packed[:, 4:])   # a sequence-parallel slice
    assert packed_mask(layout).tolist() == [[1] * 6 + [0] * 2]
    assert packed_mask(layout, 4, 4).tolist() == [[1, 1, 0, 0]]


def test_agreement_and_weighted_metrics():
    own = torch.tensor([[[[0, 1]], [[2, 3]], [[4, 5]]]])               # [1, 3, 1, 2]
    target = torch.tensor([[[[1, 0]], [[2, 7]], [[-1, -1]]]])
    assert agreement(own, target, torch.ones(1, 3)) == (1.5, 2)        # 1 + 1/2 over two recorded tokens
    assert agreement(own, target, torch.tensor([[0, 1, 1]])) == (0.5, 1)
    m = WeightedMetrics()
    m.add("moe/a", 1.0, 3)
    m.add("moe/a", 0.0, 1)
    sums = m.take()
    assert m.sums == {}
    doubled = {k: 2 * v for k, v in sums.items()}                      # any additive reduction keeps the mean
    assert finish_weighted(doubled) == {"moe/a": 0.75}


def test_aux_loss_enters_the_assembled_loss():
    from rl.algos.assemble import LossTerms, Normalisers, assemble_loss

    torch.manual_seed(0)
    logp = torch.randn(2, 5, requires_grad=True)
    mask, adv = torch.ones(2, 5), torch.tensor([1.0, -1.0])
    aux_p = torch.tensor(2.0, requires_grad=True)
    norm = Normalisers(10, 2, 5)
    args = (logp, mask, adv, logp.detach(), logp.detach())
    base, _ = assemble_loss(*args, LossTerms(), norm)
    off, _ = assemble_loss(*args, LossTerms(), norm, moe_aux_loss=aux_p * 3, moe_aux_share=0.25)
    on, m = assemble_loss(*args, LossTerms(moe_aux_coef=0.01), norm, moe_aux_loss=aux_p * 3, moe_aux_share=0.25)
    assert torch.equal(off, base)                                       # coef 0: the aux loss is ignored
    assert float((on - base).detach()) == pytest.approx(0.01 * 0.25 * 6.0)
    assert m["actor/moe_aux_loss"] == pytest.approx(0.25 * 6.0)
    on.backward()
    assert float(aux_p.grad) == pytest.approx(0.01 * 0.25 * 3)


# ------------------------------------------------------------------------------------------------ config
def _cfg(*overrides):
    return load_config(GRPOConfig, "configs/tiny_grpo.yaml", list(overrides))


def test_config_keys_and_errors():
    from rl.moe.replay import DEFAULT_AUX_COEF

    cfg = _cfg()
    assert (cfg.rollout.return_routed_experts, cfg.algo.routing_replay) == (False, "off")
    assert cfg.algo.moe_aux_coef == DEFAULT_AUX_COEF == 0.0
    with pytest.raises(ConfigError, match="algo.routing_replay.*rollout.return_routed_experts=true"):
        _cfg("algo.routing_replay=r3")
    with pytest.raises(ConfigError, match="algo.routing_replay.*allowed values: off, r2, r3"):
        _cfg("algo.routing_replay=r4")
    with pytest.raises(ConfigError, match="algo.routing_replay"):
        _cfg("algo.routing_replay=true")
    assert _cfg("algo.routing_replay=off").algo.routing_replay == "off"      # YAML's bare off is false
    with pytest.raises(ConfigError, match="rollout.return_routed_experts.*rollout.tools"):
        _cfg("rollout.return_routed_experts=true", "rollout.tools=python")
    with pytest.raises(ConfigError, match="algo.moe_aux_coef"):
        _cfg("algo.moe_aux_coef=-1")
    with pytest.raises(ConfigError, match="r2 with trainer.sequence_parallel"):
        _cfg("algo.routing_replay=r2", "trainer.packing=true", "trainer.sequence_parallel=2")
    assert _cfg("algo.routing_replay=r3", "rollout.return_routed_experts=true").algo.routing_replay == "r3"


def test_replay_is_refused_on_a_dense_model_at_start_up(tiny):
    from transformers import AutoConfig

    from rl.grpo.driver import check_moe_config

    dense = AutoConfig.from_pretrained(tiny.qwen2)
    check_moe_config(_cfg(), dense)                                    # off: fine
    for extra in (["algo.routing_replay=r2"], ["algo.routing_replay=r3", "rollout.return_routed_experts=true"],
                  ["algo.moe_aux_coef=0.001"]):
        with pytest.raises(ConfigError, match="dense model"):
            check_moe_config(_cfg(*extra), dense)


# ------------------------------------------------------------------------------------------------ batches
def _random_ids(n, L, E, k, gen):
    return torch.rand(n, L, E, generator=gen).argsort(-1)[..., :k].to(torch.int16)


def _groups(L, E, k, seed=0, n_groups=3, n=3):
    """Groups whose samples carry engine records [prompt + response - 1, L, k]; every sample's first token is
    its marker MARK + (sample index in the batch), found nowhere else."""
    from rl.grpo.batching import Group

    gen = torch.Generator().manual_seed(seed)
    groups, b = [], 0
    for g in range(n_groups):
        plen = 3 + g
        samples = []
        for _ in range(n):
            rlen = int(torch.randint(2, 12, (1,), generator=gen))
            prompt = [MARK + b] + torch.randint(0, MARK, (plen - 1,), generator=gen).tolist()
            resp = torch.randint(0, MARK, (rlen,), generator=gen).tolist()
            samples.append({"token_ids": resp, "logprobs": [-1.0] * rlen, "finish_reason": "stop", "text": "",
                            "routed_experts": _random_ids(plen + rlen - 1, L, E, k, gen), "prompt": prompt})
            b += 1
        # build_batch takes one prompt per group: give each sample its own group so markers stay unique
        groups += [Group({}, s.pop("prompt"), [s], [float(j % 2)], [False]) for j, s in enumerate(samples)]
    return groups


def test_build_batch_pads_routing_aligned_with_input_ids_and_shards_keep_it():
    from rl.grpo.batching import build_batch, shard

    groups = _groups(L=2, E=8, k=2)
    batch = build_batch(groups, torch.zeros(len(groups)), 0, False)
    ids = batch[ENGINE_KEY]
    assert ids.dtype == torch.int16 and ids.shape == (*batch["input_ids"].shape, 2, 2)
    for b, g in enumerate(groups):
        rec, n = g.samples[0]["routed_experts"], int(batch["attention_mask"][b].sum())
        assert torch.equal(ids[b, : n - 1], rec) and (ids[b, n - 1:] == -1).all()   # last token, padding: -1
    shards, parts = shard(batch, 2)
    for s, rows in zip(shards, parts):
        assert torch.equal(s[ENGINE_KEY], ids[rows]) and torch.equal(s["input_ids"], batch["input_ids"][rows])


# ------------------------------------------------------------------------------------------------ trainer worker


class Dispatch:
    """Per policy forward: the token ids it ran and, per MoE layer, the expert ids the experts module received
    (observed at dispatch, independent of the replay's bookkeeping; recomputations in backward are ignored)."""

    def __init__(self, model, num_layers):
        self.L = num_layers
        self.forwards: list[dict] = []
        model.hf.get_input_embeddings().register_forward_pre_hook(self._start)
        experts = [m.experts for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
        assert len(experts) == num_layers
        for i, e in enumerate(experts):
            e.register_forward_pre_hook(self._layer(i))

    def _start(self, mod, args):
        self.forwards.append({"tokens": args[0].detach().clone(), "ids": [None] * self.L})

    def _layer(self, i):
        def hook(mod, args):
            f = self.forwards[-1]
            if f["ids"][i] is None:                       # the forward's call, not a checkpoint recomputation
                f["ids"][i] = args[1].detach().clone()
        return hook

    def per_token(self, forwards, lengths):
        """{(row, position): [L, k] dispatched ids} of the given forwards, rows found by their marker token."""
        out = {}
        for f in forwards:
            tokens = f["tokens"].reshape(-1).tolist()
            ids = torch.stack(f["ids"], dim=1)            # [N, L, k]
            row, t = None, 0
            for j, tok in enumerate(tokens):
                if tok >= MARK:
                    row, t = tok - MARK, 0
                elif row is not None:
                    t += 1
                if row is not None and t < lengths[row]:
                    out.setdefault((row, t), []).append(ids[j])
        return out


@pytest.mark.parametrize("arch,packing", [("qwen3_moe", False), ("qwen3_moe", True), ("deepseek_v3", False)])
def test_trainer_replays_the_recorded_ids_per_token_and_layer(arch, packing, tmp_path):
    """r3 through the trainer worker: every real (token, layer) of every micro-batch (length-sorted, several per
    pass; packed rows with `packing`), in the old-log-prob pass and in the update, runs exactly the engine's
    recorded experts; the last token (no record) runs the trainer's own. Then r2: the update replays exactly what
    the old-log-prob pass recorded. Metrics: agreement logged, weighted."""
    from test_routing_replay import make_model

    from rl.grpo.batching import build_batch
    from rl.grpo.trainer_worker import TrainerWorker

    make_model(arch).save_pretrained(tmp_path / "moe")
    base = ["trainer.threads=1", "trainer.micro_batch_tokens=48", f"trainer.packing={str(packing).lower()}",
            "rollout.return_routed_experts=true", "model.gradient_checkpointing=true"]
    cfg = _cfg(*base, "algo.routing_replay=r3")
    w = TrainerWorker(0, 1, "127.0.0.1", free_port(), cfg, str(tmp_path / "moe"))
    try:
        L, E, k = moe_layout(w.model)
        spy = Dispatch(w.model, L)
        groups = _groups(L, E, k, seed=1)
        batch = build_batch(groups, torch.linspace(-1, 1, len(groups)), 0, False)
        lengths = batch["attention_mask"].sum(-1).tolist()
        batch["old_logp"] = batch["rollout_logp"] = w.compute_logprobs(batch)["old_logp"]
        n_old = len(spy.forwards)
        assert n_old >= 3                                                   # several micro-batches
        metrics = w.update(batch)
        engine = batch[ENGINE_KEY].long()
        for forwards in (spy.forwards[:n_old], spy.forwards[n_old:]):
            seen = spy.per_token(forwards, lengths)
            assert set(seen) == {(b, t) for b, n in enumerate(lengths) for t in range(n)}   # every token, once
            for (b, t), runs in seen.items():
                assert len(runs) == 1
                if t < lengths[b] - 1:
                    assert torch.equal(runs[0], engine[b, t]), (b, t)
        assert 0 <= metrics["moe/routing_agreement"] < 1 and metrics["moe/replayed_frac"] < 1
        assert 0 < metrics["moe/expert_load_entropy"] <= 1 and "moe/aux_loss" in metrics
        assert not any(key.endswith("@w") for key in metrics)
        w.routing.replay = "r2"                                            # R2: record, then replay the record
        spy.forwards.clear()
        del batch["old_logp"]
        old = w.compute_logprobs(batch)
        rec = old[RECORD_KEY]
        assert rec.shape == engine.shape and rec.dtype == torch.int16
        batch.update(old_logp=old["old_logp"], **{RECORD_KEY: rec})
        n_old = len(spy.forwards)
        metrics = w.update(batch)
        seen_old, seen_new = spy.per_token(spy.forwards[:n_old], lengths), spy.per_token(spy.forwards[n_old:], lengths)
        for (b, t), runs in seen_new.items():
            assert torch.equal(runs[0], rec[b, t].long()) and torch.equal(runs[0], seen_old[b, t][0])
        assert (rec[batch["attention_mask"] == 0] == -1).all()
        assert metrics["moe/routing_agreement"] == 1.0     # same weights in both passes: own == recorded
    finally:
        w.shutdown()


def _sp_rank(rank: int, world: int, ports: list, model_dir: str, out: str) -> None:
    """The real TrainerWorker on two gloo ranks, the same shard on both: packed rows as two data-parallel copies
    (sp 1) and packed rows split over both ranks (sequence_parallel=2), each under r3 with the shard's engine
    records; and sp 2 with replay off. Rank 0 writes the old log-probs and the update's metrics."""
    from rl.grpo.batching import build_batch
    from rl.grpo.trainer_worker import TrainerWorker

    results = {}
    runs = [("sp1", ["algo.routing_replay=r3"]), ("sp2", ["algo.routing_replay=r3", "trainer.sequence_parallel=2"]),
            ("sp2_off", ["algo.routing_replay=off", "trainer.sequence_parallel=2"])]
    for port, (name, extra) in zip(ports, runs):
        cfg = _cfg("trainer.threads=1", f"trainer.num_workers={world}", "trainer.micro_batch_tokens=48",
                   "trainer.packing=true", "rollout.return_routed_experts=true", "trainer.grad_clip=0", *extra)
        w = TrainerWorker(rank, world, "127.0.0.1", port, cfg, model_dir)
        try:
            L, E, k = moe_layout(w.model)
            batch = build_batch(_groups(L, E, k, seed=1), torch.linspace(-1, 1, 9), 0, False)
            lp = w.compute_logprobs(batch)["old_logp"]
            batch["old_logp"] = batch["rollout_logp"] = lp
            m = w.update(batch)
        finally:
            w.shutdown()
        results[name] = {"lp": lp.tolist(), "mask": batch["response_mask"].tolist(),
                         "metrics": {key: float(v) for key, v in m.items() if isinstance(v, (int, float))}}
    if rank == 0:
        Path(out).write_text(json.dumps(results))


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_r3_under_sequence_parallelism_equals_one_rank(arch, tmp_path):
    """r3 with the packed row split over two sequence-parallel ranks replays each token's recorded experts on the
    rank that holds it: the same old log-probs (< 1e-5), loss, gradient norm, agreement and replayed fraction as
    without the split. The records are random experts, not the model's choices, so replaying them misaligned (or
    not at all: replay off) would move the log-probs far more than that."""
    import torch.multiprocessing as mp

    from test_routing_replay import make_model

    make_model(arch).save_pretrained(tmp_path / "moe")
    out = tmp_path / "sp.json"
    mp.spawn(_sp_rank, args=(2, [free_port() for _ in range(3)], str(tmp_path / "moe"), str(out)), nprocs=2)
    res = json.loads(out.read_text())
    mask = torch.tensor(res["sp1"]["mask"]).bool()
    ref, sp2, off = (torch.tensor(res[n]["lp"])[mask] for n in ("sp1", "sp2", "sp2_off"))
    assert (sp2 - ref).abs().max() < 1e-5
    assert (off - ref).abs().mean() > 1e-2                     # the records matter: replay is what made them equal
    for key in ("actor/pg_loss", "actor/loss", "actor/grad_norm", "moe/routing_agreement", "moe/replayed_frac"):
        assert res["sp2"]["metrics"][key] == pytest.approx(res["sp1"]["metrics"][key], rel=1e-5, abs=1e-7), key
    assert 0 < res["sp1"]["metrics"]["moe/replayed_frac"] < 1


def test_dense_policy_has_no_routing_and_refuses_replay(tiny):
    from rl.grpo.trainer_worker import TrainerWorker
    from rl.moe.replay import RoutingError
    from rl.moe.trainer_routing import TrainerRouting

    w = TrainerWorker(0, 1, "127.0.0.1", free_port(), _cfg("trainer.threads=1"), str(tiny.qwen2))
    try:
        assert w.routing is None and not find_routers(w.model)
        with pytest.raises(RoutingError, match="algo.routing_replay"):
            TrainerRouting.build(w.model, "r3", 0.0)
    finally:
        w.shutdown()


# ------------------------------------------------------------------------------------------------ GRPO on Ray
def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def weak_sft_moe(tiny):
    """A tiny Qwen3-MoE after a short cold start (as conftest's weak_sft for Qwen2): it half-follows the R1
    format, so GRPO has something to learn within a few steps on CPU."""
    import os

    from conftest import cached_sft

    return cached_sft(Path(os.environ["R1LAB_CACHE_DIR"]) / "sft" / "weak-moe-qwen3_moe-20", "configs/tiny_sft.yaml",
                      ["model.path=tiny:qwen3_moe", "train.max_steps=20", "train.lr_schedule=constant"])


@pytest.mark.slow  # a learning run on Ray: `make test-slow` (fast tier budget, issue 25)
def test_grpo_with_r3_learns_on_a_tiny_moe(weak_sft_moe, tmp_path, ray_local):
    """GRPO on Ray (vLLM CPU engine recording its routing, FSDP2 trainers replaying it): the engine and trainer
    agree on the log-probs, the routing agreement is logged every step, and the reward rises."""
    from rl.grpo.driver import GRPODriver

    cfg = _cfg(f"model.path={weak_sft_moe}", "rollout.return_routed_experts=true", "algo.routing_replay=r3",
               "trainer.max_steps=20", "trainer.lr=0.001", "reward.weights=[1.0, 0.5]", "checkpoint.every=0",
               "sync.checksum_every=6", f"log.output_dir={tmp_path}", "log.progress=false",
               "resources.ray_address=local")
    GRPODriver(cfg).run()
    rows = [r for r in read_metrics(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows)          # fp32 engine, replayed routing
    assert all(0.9 < r["moe/routing_agreement"] <= 1.0 for r in rows)
    assert all(r["moe/replayed_frac"] > 0.9 for r in rows)              # all but each sample's last token
    assert all(0 < r["moe/expert_load_entropy"] <= 1 for r in rows)
    reward = [r["rollout/reward_mean"] for r in rows]
    first, last = sum(reward[:4]) / 4, sum(reward[-4:]) / 4
    assert last > first + 0.1, reward                                     # learning happened


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_hf_export_writes_experts_per_expert_and_reloads_exactly(arch, tmp_path):
    """The trainer's HF export (final/ and checkpoints' hf/) holds the per-expert checkpoint format that vLLM's
    DeepSeek-V3 loader needs (fused tensors: "KeyError: 'layers.1.mlp.experts.down_proj'"), and transformers
    loads it back to the same logits."""
    from safetensors import safe_open
    from test_routing_replay import make_model
    from transformers import AutoModelForCausalLM

    from rl.grpo.trainer_worker import TrainerWorker

    make_model(arch).save_pretrained(tmp_path / "moe")
    w = TrainerWorker(0, 1, "127.0.0.1", free_port(), _cfg("trainer.threads=1"), str(tmp_path / "moe"))
    try:
        out = w.export_hf(str(tmp_path / "export"), with_tokenizer=False)
    finally:
        w.shutdown()
    names = set()
    for f in Path(out).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            names |= set(sf.keys())
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    assert any(n.endswith("experts.7.down_proj.weight") for n in names)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(ref, got)
