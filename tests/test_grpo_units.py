"""GRPO pieces that need no Ray: batching, dynamic sampling, cursor, schedules, config validation."""
import pytest
import torch

from rl.config import ConfigError, load_config
from rl.grpo.batching import Group, build_batch, fill_batch, group_advantages, pad_id_of, shard, unshard
from rl.grpo.config import GRPOConfig
from rl.grpo.driver import fused_sums
from rl.grpo.microbatch import micro_batches
from rl.grpo.prompts import Cursor
from rl.grpo.trainer_worker import lr_lambda


def _group(rewards, prompt=(1, 2, 3)):
    samples = [{"token_ids": [10 + i, 11], "logprobs": [-0.5, -0.25], "finish_reason": "stop", "text": ""}
               for i in range(len(rewards))]
    return Group({"answer": "1"}, list(prompt), samples, list(rewards))


def test_dynamic_sampling_keeps_batch_size():
    calls = []

    def make(k):
        calls.append(k)
        # every other group has uniform rewards (no signal)
        return [_group([1.0, 1.0] if i % 2 else [0.0, 1.0]) for i in range(k)]

    groups, m = fill_batch(make, target=8, dynamic=True, max_rounds=10)
    assert len(groups) == 8 and all(not g.uniform for g in groups)
    assert calls == [8, 4, 2, 1]  # each round asks only for what is still missing
    assert m["rollout/groups_dropped"] == 7 and m["rollout/groups_kept"] == 8 and m["rollout/gen_rounds"] == 4
    groups, m = fill_batch(make, target=8, dynamic=False, max_rounds=10)
    assert len(groups) == 8 and m["rollout/gen_rounds"] == 1  # without dynamic sampling nothing is dropped


def test_dynamic_sampling_gives_up_after_max_rounds():
    groups, m = fill_batch(lambda k: [_group([1.0, 1.0]) for _ in range(k)], target=4, dynamic=True, max_rounds=3)
    assert groups == [] and m["rollout/gen_rounds"] == 3 and m["rollout/groups_dropped"] == 12


def test_build_batch_aligns_tokens_masks_and_logprobs():
    g1 = _group([1.0, 0.0])
    g2 = _group([0.5], prompt=(7,))
    g2.samples[0]["finish_reason"] = "length"
    b = build_batch([g1, g2], torch.tensor([1.0, -1.0, 0.0]), pad_id=0, overlong_filter=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 10, 11], [1, 2, 3, 11, 11], [7, 10, 11, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]  # truncated: out
    assert b["rollout_logp"][0].tolist() == [0, 0, 0, -0.5, -0.25]
    assert b["attention_mask"][2].tolist() == [1, 1, 1, 0, 0]


def test_shard_unshard_roundtrip():
    b = build_batch([_group([1.0, 0.0, 1.0]), _group([0.0, 1.0], prompt=(4, 5, 6, 7))],
                    torch.arange(5.0), 0, False)
    shards, parts = shard(b, 2)
    assert sorted(i for p in parts for i in p) == list(range(5))
    back = unshard([s["adv"] for s in shards], parts, 5)
    assert back.tolist() == list(range(5))


def test_cursor_continues_exactly_after_restore():
    a = Cursor(seed=3, size=10)
    seen = [a.take(4) for _ in range(6)]  # crosses epochs
    b = Cursor(seed=3, size=10)
    for _ in range(3):
        b.take(4)
    c = Cursor(seed=3, size=10, **b.state())
    assert [c.take(4) for _ in range(3)] == seen[3:]
    flat = [i for s in seen for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # no repeat, no skip


def test_lr_schedules():
    cfg = load_config(GRPOConfig, None, ["trainer.lr_schedule=cosine", "trainer.warmup_steps=2", "trainer.max_steps=10",
                                         "reward.functions=[accuracy]", "reward.weights=[1.0]"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0) and f(10) == pytest.approx(0.0, abs=1e-9)
    cfg = load_config(GRPOConfig, None, ["trainer.lr_schedule=multistep", "trainer.milestones=[3, 6]",
                                         "trainer.gamma=0.5"])
    f = lr_lambda(cfg)
    assert [f(s) for s in (0, 2, 3, 5, 6, 9)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_micro_batches_respect_token_budget():
    groups = micro_batches([10, 10, 30, 5, 5, 5], max_tokens=40, by_length=False)
    assert [i for g in groups for i in g] == list(range(6))
    for g in groups:
        assert max([10, 10, 30, 5, 5, 5][i] for i in g) * len(g) <= 40 or len(g) == 1


def test_fused_checksum_mapping():
    hf = {"model.layers.0.self_attn.q_proj.weight": 1.0, "model.layers.0.self_attn.k_proj.weight": 2.0,
          "model.layers.0.self_attn.v_proj.weight": 3.0, "model.layers.0.mlp.gate_proj.weight": 4.0,
          "model.layers.0.mlp.up_proj.weight": 5.0, "model.norm.weight": 6.0}
    ok = {"model.layers.0.self_attn.qkv_proj.weight": 6.0, "model.layers.0.mlp.gate_up_proj.weight": 9.0,
          "model.norm.weight": 6.0}
    assert fused_sums(hf, ok) == []
    assert len(fused_sums(hf, {**ok, "model.norm.weight": 6.5})) == 1


@pytest.mark.parametrize("override,message", [
    ("algo.advantage=ppo", r"algo.advantage: 'ppo' unknown; allowed: \['dr_grpo', 'grpo', 'rloo'\]"),
    ("algo.loss_agg=sum", r"algo.loss_agg: 'sum' is not allowed; allowed values"),
    ("rollout.n=1", r"rollout.n: GRPO needs at least 2"),
    ("reward.functions=[accuracy, nope]", r"reward.weights: 2 weights|reward.functions: unknown reward 'nope'"),
    ("trainer.lr=-1", r"trainer.lr: must be > 0"),
    ("trainer.max_step=3", r"unknown key 'trainer.max_step'.*allowed: .*max_steps"),
    ("rollout.temperature=0", r"rollout.temperature"),
    ("algo.kl_estimator=k4", r"algo.kl_estimator: 'k4' is not allowed"),
])
def test_config_errors_name_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", [override])


def test_bad_config_fails_before_ray_starts(capsys, monkeypatch):
    import ray

    from launch.grpo import main

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for an invalid config")

    monkeypatch.setattr(ray, "init", no_ray)
    assert main(["--config", "configs/tiny_grpo.yaml", "algo.advantage=nope"]) == 2
    assert "algo.advantage" in capsys.readouterr().err


def test_all_shipped_configs_validate():
    from pathlib import Path

    from launch.pipeline import PipelineConfig
    from rl.distill.config import DistillConfig
    from rl.sft.config import SFTStageConfig

    for path in Path("configs").glob("*grpo*.yaml"):
        load_config(GRPOConfig, path)
    load_config(SFTStageConfig, "configs/tiny_sft.yaml")
    load_config(SFTStageConfig, "configs/r1zero_pretrain.yaml")
    load_config(DistillConfig, "configs/tiny_distill.yaml")
    demo = load_config(PipelineConfig, "configs/demo.yaml")          # R1-Zero (stage 6) is on in the demo
    demo.r1zero_pretrain.load(SFTStageConfig)
    demo.r1zero.load(GRPOConfig)
    load_config(PipelineConfig, "configs/demo.yaml", ["r1zero_pretrain.config=", "r1zero.config="])  # off
    with pytest.raises(ConfigError, match="r1zero"):
        load_config(PipelineConfig, "configs/demo.yaml", ["r1zero_pretrain.config="])
    for stage, cls in (("sft", SFTStageConfig), ("grpo", GRPOConfig), ("distill", DistillConfig)):
        getattr(demo, stage).load(cls)


def test_overrides_replace_dict_fields_merge_sections_and_read_exponents():
    base = load_config(GRPOConfig, "configs/tiny_grpo.yaml")
    assert base.data.task_knobs["min_terms"] == 2 and base.rollout.n == 8
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["data.task_knobs={max_value: 9}", "trainer.lr=2e-4"])
    assert cfg.data.task_knobs == {"max_value": 9}          # a dict field is replaced, not mixed with the YAML's
    assert cfg.data.num_train == base.data.num_train        # while the section keeps its other keys
    assert cfg.trainer.lr == 2e-4                           # YAML 1.1 reads "2e-4" as a string; we accept it
    with pytest.raises(ConfigError, match=r"trainer.lr: expected a number, got 'fast'"):
        load_config(GRPOConfig, None, ["trainer.lr=fast"])


def test_streamed_lora_weights_are_merged_like_peft(tiny):
    """The weights sent to vLLM under LoRA are W0 + scaling * B @ A, named like the plain HF model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rl.grpo.fsdp_model import TokenLogprobModel
    from rl.grpo.sync import buckets, iter_full_tensors

    model = AutoModelForCausalLM.from_pretrained(tiny.qwen2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():  # non-zero adapters (B starts at zero)
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    wrapper = TokenLogprobModel(peft_model)
    streamed = {}
    for b in buckets(iter_full_tensors(wrapper, torch.float32, lora_scaling=8 / 4, tied_head=True), 64 << 10):
        streamed.update(b)
    reference = peft_model.merge_and_unload().state_dict()
    assert set(streamed) == set(reference) - {"lm_head.weight"}   # tied head: the engine re-ties it
    for k in streamed:
        assert torch.allclose(streamed[k], reference[k], atol=1e-6), k


# ------------------------------------------------------------------------------------ seams (issue: real sizes)
def test_pad_id_for_tokenizers_without_a_pad_token():
    """Llama 3's tokenizer has no pad token: padding used to crash build_batch (torch.full with None)."""
    class Tok:
        pad_token_id, eos_token_id = None, 128001
    assert pad_id_of(Tok()) == 128001
    Tok.eos_token_id = [128001, 128009]
    assert pad_id_of(Tok()) == 128001
    b = build_batch([_group([1.0, 0.0])], torch.tensor([1.0, -1.0]), pad_id_of(Tok()), False)
    assert b["input_ids"].dtype == torch.long


def test_failed_rewards_are_left_out_of_group_statistics_and_the_loss():
    g = _group([1.0, 0.0, float("nan"), 1.0])
    g.failed = [False, False, True, False]
    adv, m = group_advantages("grpo", [g, _group([0.0, 1.0])])
    # the 3 scored samples: mean 2/3, sample std 0.577 -> (1 - 2/3) / 0.577 = 0.577, (0 - 2/3) / 0.577 = -1.155
    assert adv.tolist() == pytest.approx([0.57735, -1.1547, 0.0, 0.57735, -0.70711, 0.70711], abs=1e-4)
    assert m["rollout/scored_frac"] == pytest.approx(5 / 6) and m["rollout/reward_mean"] == pytest.approx(3 / 5)
    b = build_batch([g], adv, 0, False)
    assert b["response_mask"][2].sum() == 0 and b["response_mask"][[0, 1, 3]].sum() == 6
    uniform = _group([1.0, float("nan")])
    uniform.failed = [False, True]
    assert uniform.uniform   # one scored sample: no GRPO signal, dynamic sampling drops it


def test_a_step_whose_dynamic_sampling_keeps_nothing_is_skipped_not_a_crash(monkeypatch, tmp_path):
    from rl.grpo.driver import GRPODriver

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [f"log.output_dir={tmp_path}", "rollout.dynamic_sampling=true"])
    d = GRPODriver(cfg)
    monkeypatch.setattr(d, "_next_groups", lambda: ([], {"rollout/gen_rounds": 4, "rollout/groups_kept": 0}))
    m = d.train_step()   # no trainer exists: reaching them would fail
    assert m["train/skipped"] == 1.0 and m["rollout/groups_kept"] == 0


def test_validation_uses_the_training_template_and_think_forcing():
    from rl.grpo.driver import validation_sampling

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["data.template=r1_zero", "data.force_think=true",
                                                             "log.val_samples=3", "rollout.max_new_tokens=40"])
    s = validation_sampling(cfg)
    assert (s.template, s.force_think, s.n, s.max_tokens, s.top_p) == ("r1_zero", True, 3, 40, 1.0)


def test_validation_without_held_out_problems_is_a_config_error(tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"problem": "1+1?", "answer": "2"}\n')
    with pytest.raises(ConfigError, match=r"log.val_every: validation needs held-out problems.*log.val_benchmark"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", [f"data.source={rows}", "log.val_every=5"])
    load_config(GRPOConfig, "configs/tiny_grpo.yaml", [f"data.source={rows}", "log.val_every=5",
                                                       "log.val_benchmark=math500"])


def test_sync_method_is_a_real_choice():
    with pytest.raises(ConfigError, match=r"sync.method: 'nccl' is not allowed; allowed values: \['auto', 'shm', 'file'\]"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["sync.method=nccl"])


def test_sft_template_is_used_and_lora_keys_are_not_silently_accepted():
    from rl.sft.config import SFTStageConfig
    from rl.sft.train import sft_row

    with pytest.raises(ConfigError, match=r"unknown key 'model.lora_r'.*lora.enabled=true"):
        load_config(SFTStageConfig, "configs/tiny_sft.yaml", ["model.lora_r=8"])
    row = sft_row("What is 1+1?", "<think>\n1+1=2\n</think>\n\\boxed{2}", "r1_zero")
    assert row["prompt"].startswith("A conversation between User and Assistant") and "1+1" in row["prompt"]
    assert isinstance(row["completion"], str)
    chat = sft_row("What is 1+1?", "x", "chat")
    assert chat["prompt"][0]["role"] == "user" and chat["completion"][0]["role"] == "assistant"


def test_tiny_model_paths_take_real_shapes():
    from rl.config import resolve_model_path

    with pytest.raises(ConfigError, match=r"unknown shape 'gpt5'; known: \['qwen2.5-0.5b', 'qwen2.5-1.5b'\]"):
        resolve_model_path("tiny:qwen2:shape=gpt5")
    from rl.tiny import SHAPES

    assert SHAPES["qwen2.5-0.5b"]["vocab_size"] == 151936 and SHAPES["qwen2.5-0.5b"]["num_layers"] == 24


def test_padded_tokenizer_keeps_encoding_and_decodes_every_id(tiny):
    from transformers import AutoTokenizer

    from rl.tiny import padded_tokenizer

    base = AutoTokenizer.from_pretrained(tiny.tokenizer)
    padded = AutoTokenizer.from_pretrained(padded_tokenizer(tiny.tokenizer, 4096))
    text = "<think>\nWhat is 12+34?\n</think>\n\\boxed{46}<|im_end|>"
    assert len(padded) == 4096 and padded(text).input_ids == base(text).input_ids
    assert padded.decode([4095]) == "<|r1lab_unused_4095|>" and padded.convert_tokens_to_ids("</think>") == \
        base.convert_tokens_to_ids("</think>")


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_overlapped_rollouts_are_never_more_than_k_steps_stale(k):
    """The driver's protocol: at step t the engines hold weight version t (t updates synced); fill() launches
    batches up to step t + k; the batch of step t was launched with some version v and is t - v stale."""
    from rl.grpo.rollout_queue import RolloutQueue

    q, seen, launched = RolloutQueue(k), [], []
    cursor = {"pos": 0}
    for t in range(12):
        q.fill(t, version=t, cursor=lambda: dict(cursor), launch=lambda s: launched.append(s) or s)
        p = q.pop(t)
        assert p.step == t and p.handle == t
        seen.append(t - p.version)
        assert q.resume_cursor() is None or len(q.pending) <= k
    assert launched == list(range(12 + k))
    assert max(seen) <= k and (k == 0 or seen[k:] == [k] * (12 - k))   # steady state: exactly k stale
    with pytest.raises(ValueError):
        RolloutQueue(-1)
    with pytest.raises(RuntimeError, match="out of order"):
        RolloutQueue(0).pop(3)


def test_actor_malloc_tunables_add_huge_pages_and_keep_the_users():
    from rl.grpo.driver import malloc_tunables, ray_runtime_env

    assert malloc_tunables("") == "glibc.malloc.hugetlb=1"
    assert malloc_tunables("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert malloc_tunables("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"   # the user's choice stands
    assert "glibc.malloc.hugetlb" in ray_runtime_env()["env_vars"]["GLIBC_TUNABLES"]


def test_actors_run_with_the_tunables(ray_local):
    """The Ray workers the driver's runtime environment starts see them (glibc reads them at process start)."""
    import os

    import ray

    got = ray.get(ray.remote(lambda: os.environ.get("GLIBC_TUNABLES", "")).options(num_cpus=0).remote())
    assert "glibc.malloc.hugetlb=1" in got


def test_sync_method_auto_is_shm_on_one_node_and_shm_refuses_several():
    from types import SimpleNamespace

    from rl.grpo.driver import GRPODriver

    for method, nodes, want in [("auto", 1, "shm"), ("auto", 2, "file"), ("file", 1, "file"), ("shm", 1, "shm")]:
        d = SimpleNamespace(cfg=load_config(GRPOConfig, "configs/tiny_grpo.yaml", [f"sync.method={method}"]),
                            sync_method=None)
        GRPODriver._choose_sync(d, nodes, 2)
        assert d.sync_method == want, (method, nodes)
        GRPODriver._choose_sync(d, 3 - nodes, 2)   # a run that lost (or regained) nodes keeps its transport
        assert d.sync_method == want, (method, nodes)
    d.placement_info = {"trainer_nodes": ["a", "a"], "rollout_nodes": ["a"]}
    GRPODriver._check_sync_nodes(d)
    d.placement_info["rollout_nodes"] = ["b"]
    with pytest.raises(ConfigError, match="sync.method=shm: the run's workers are on 2 nodes.*sync.method=file"):
        GRPODriver._check_sync_nodes(d)
