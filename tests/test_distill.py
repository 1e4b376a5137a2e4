"""Distillation: rejection-sampling rules, the on-policy reverse-KL gradient, input checks, and a real run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl.config import ConfigError, check_model_path, load_config
from rl.distill.config import DistillConfig, FilterSection


def _cand(p: int, text: str, tokens: int = 10, finish: str = "stop") -> dict:
    return {"prompt_index": p, "sample": 0, "row": {"problem": f"q{p}", "answer": "1"}, "completion": text,
            "num_tokens": tokens, "finish_reason": finish}


def test_select_traces_applies_every_rule_in_order():
    from rl.distill.traces import select_traces

    cands = [_cand(0, "a  b"), _cand(0, "a b"),          # same trace up to whitespace: second is a duplicate
             _cand(0, "c"), _cand(0, "d"),                # quota of 2 kept per prompt: d is over quota
             _cand(1, "x", finish="length"),              # truncated
             _cand(1, "y", tokens=50),                    # above the length cap of 20
             _cand(1, "z"),                               # wrong answer
             _cand(1, "w"),                               # badly formatted
             _cand(2, "a  b"),                            # same text as prompt 0's, but another prompt: kept
             _cand(2, "v")]                               # the grader failed (NaN): not verified, never kept
    scores = {"accuracy": [1, 1, 1, 1, 1, 1, 0, 1, 1, float("nan")], "format": [1, 1, 1, 1, 1, 1, 1, 0.5, 1, 1]}
    f = FilterSection(rewards=["accuracy", "format"], min_scores=[1.0, 1.0], dedup=True, max_per_prompt=2)
    kept, reasons, stats = select_traces(cands, scores, f, length_cap=20)
    assert reasons == [None, "duplicate", None, "over_quota", "truncated", "too_long", "low_reward", "low_reward",
                       None, "score_failed"]
    assert kept == [0, 2, 8]
    assert stats["kept"] == 3 and stats["candidates"] == 10
    assert stats["acceptance_rate"] == pytest.approx(3 / 10)
    assert stats["rejected"] == {"truncated": 1, "too_long": 1, "score_failed": 1, "low_reward": 2, "duplicate": 1,
                                 "over_quota": 1}
    assert stats["reward_means"]["accuracy"] == pytest.approx(8 / 9)
    assert stats["prompts"] == 3 and stats["prompts_with_a_kept_trace"] == 2


def test_reverse_kl_advantage_gives_the_exact_reverse_kl_gradient():
    """E_{y~pi}[-A(y) grad log pi(y)] with A = -(log pi - log q) equals grad KL(pi || q): checked by enumerating
    a 6-token vocabulary (one step), against autograd on the closed-form KL."""
    from rl.algos.distill import reverse_kl_advantages

    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    log_q = torch.log_softmax(torch.randn(6), -1)
    logp_all = torch.log_softmax(theta, -1)
    # every token y as a "sampled" sequence of length 1, weighted by its probability (the exact expectation)
    adv = reverse_kl_advantages(torch.zeros(6), logp_all.detach()[:, None], log_q[:, None], coef=1.0)[:, 0]
    surrogate = -(logp_all.detach().exp() * adv * logp_all).sum()
    (g_pg,) = torch.autograd.grad(surrogate, theta)
    logp2 = torch.log_softmax(theta, -1)
    kl = (logp2.exp() * (logp2 - log_q)).sum()
    (g_kl,) = torch.autograd.grad(kl, theta)
    assert torch.allclose(g_pg, g_kl, atol=1e-6)
    # and it adds to a sequence advantage, scaled by coef
    a = reverse_kl_advantages(torch.tensor([2.0]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), 0.5)
    assert torch.allclose(a, torch.tensor([[2.0 - 0.25, 2.0 + 0.5]]))


def test_model_path_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher\.path=.*no-such-dir: no such model directory"):
        check_model_path(str(tmp_path / "no-such-dir"), "teacher.path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"teacher\.path=.*no config\.json"):
        check_model_path(str(tmp_path / "empty"), "teacher.path")
    with pytest.raises(ConfigError, match=r"not key=value of a tiny-model field"):
        check_model_path("tiny:llama:hidden=3", "model.path")


def test_tiny_spec_in_a_model_path_builds_a_smaller_student(tiny):
    from rl.config import resolve_model_path

    path = Path(resolve_model_path("tiny:llama:hidden_size=64,num_heads=2,num_kv_heads=1,intermediate_size=128"))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 64 and cfg["intermediate_size"] == 128
    assert (path / "tokenizer.json").read_bytes() == (tiny.qwen2 / "tokenizer.json").read_bytes()


def test_distill_cli_reports_bad_input(tmp_path, capsys):
    from launch.distill import main

    assert main(["--config", "configs/tiny_distill.yaml", f"teacher.path={tmp_path}/gone"]) == 2
    assert "teacher.path=" in capsys.readouterr().err


@pytest.fixture(scope="module")
def other_tokenizer_model(tiny):
    """A tiny Qwen2 whose tokenizer was trained with another vocabulary size (an incompatible tokenizer)."""
    from rl.tiny import TinyModelSpec, build_tiny_model, build_tokenizer

    return build_tiny_model(TinyModelSpec(arch="qwen2"), build_tokenizer(vocab_size=384))


def test_same_tokenizer_check(tiny, other_tokenizer_model):
    from rl.distill.compat import check_same_tokenizer

    check_same_tokenizer(str(tiny.qwen2), str(tiny.llama))  # Qwen2 and Llama built on one tokenizer: fine
    with pytest.raises(ConfigError, match=r"algo\.distill_teacher=.*tokenizer differs.*launch/distill\.py"):
        check_same_tokenizer(str(tiny.qwen2), str(other_tokenizer_model))


def test_grpo_on_policy_distillation_rejects_incompatible_teacher_before_ray(tiny, other_tokenizer_model, tmp_path):
    import ray

    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        f"log.output_dir={tmp_path}", f"algo.distill_teacher={other_tokenizer_model}", "resources.ray_address=local"])
    with pytest.raises(ConfigError, match=r"algo\.distill_teacher"):
        GRPODriver(cfg)
    assert not ray.is_initialized()
    cfg.algo.distill_teacher = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"algo\.distill_teacher=.*missing: no such model directory"):
        GRPODriver(cfg)


def _distill_cfg(tmp_path: Path, teacher: str, *extra: str) -> DistillConfig:
    return load_config(DistillConfig, "configs/tiny_distill.yaml",
                       [f"teacher.path={teacher}", f"output_dir={tmp_path / 'run'}", *extra])


def test_distill_bad_input_fails_before_any_work(tiny, tmp_path, monkeypatch):
    import rl.rollout.vllm_engine as ve
    from data.loading import DataError
    from rl.distill.run import run_distill

    def no_engine(*a, **k):
        raise AssertionError("an engine was started before the inputs were checked")

    monkeypatch.setattr(ve, "make_llm", no_engine)
    with pytest.raises(ConfigError, match=r"teacher\.path=.*nowhere: no such model directory"):
        run_distill(_distill_cfg(tmp_path, str(tmp_path / "nowhere")))
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    with pytest.raises(DataError, match=r"prompts\.jsonl: row 1 \(line 2\): missing required field 'problem'"):
        run_distill(_distill_cfg(tmp_path, str(tiny.qwen2), f"data.source={bad}", "eval.problems=0"))
    with pytest.raises(ConfigError, match=r"student model\.path=.*absent: no such model directory"):
        run_distill(_distill_cfg(tmp_path, str(tiny.qwen2), f"student.overrides=[model.path={tmp_path}/absent]"))
    with pytest.raises(ConfigError, match=r"filter\.rewards: .*nope"):
        _distill_cfg(tmp_path, str(tiny.qwen2), "filter.rewards=[accuracy, nope]", "filter.min_scores=[1, 1]")
    with pytest.raises(ConfigError, match=r"eval\.benchmark"):
        _distill_cfg(tmp_path, str(tiny.qwen2), f"data.source={bad}")
    assert not (tmp_path / "run" / "traces.jsonl").exists()


def test_traces_dataset_has_provenance_and_acceptance_rate(tiny_sft, vllm_engine, tmp_path):
    """Teacher traces through the session engine (holding the SFT model) -> rejection sampling -> dataset rows
    with provenance, and a summary whose acceptance rate matches the rows."""
    from rl.distill.run import check_inputs, make_traces
    from rl.rollout.vllm_engine import reload_weights

    teacher = str(tiny_sft[0])
    reload_weights(vllm_engine, teacher)
    cfg = _distill_cfg(tmp_path, teacher, "data.source=synthetic:chain_sum", "data.num_train=48",
                       "data.task_knobs={min_terms: 2, max_terms: 2, min_value: 1, max_value: 30}",
                       "sampling.max_tokens=48", "eval.problems=0")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    summary = make_traces(cfg, check_inputs(cfg, out), out, vllm_engine)
    rows = [json.loads(x) for x in (out / "dataset.jsonl").read_text().splitlines()]
    traces = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 48 * 4 == summary["candidates"]
    assert 0 < len(rows) == summary["kept"] == sum(t["kept"] for t in traces)
    assert summary["acceptance_rate"] == pytest.approx(len(rows) / len(traces))
    written = json.loads((out / "dataset_summary.json").read_text())
    assert written["acceptance_rate"] == summary["acceptance_rate"]
    assert written["scoring"]["reward/errors"] == 0 and written["scoring"]["reward/timeouts"] == 0
    from rewards.math import verify

    for r in rows:
        assert verify(r["completion"], r["answer"])            # verified-correct only
        p = r["provenance"]
        assert p["teacher"] == teacher and p["sampling"]["n"] == 4 and p["sampling"]["temperature"] == 1.0
        assert p["rewards"] == {"accuracy": 1.0, "format": 1.0}
    keys = {(r["provenance"]["prompt_index"], " ".join(r["completion"].split())) for r in rows}
    assert len(keys) == len(rows)                               # deduplicated per prompt
    assert all(t["reject_reason"] for t in traces if not t["kept"])


@pytest.mark.slow  # a learning run: `make test-slow` (fast tier budget, issue 25)
def test_on_policy_distillation_lowers_reverse_kl_to_the_teacher(weak_sft, tiny_sft, tmp_path, ray_local):
    """Pure on-policy distillation (rule rewards weighted 0): the student samples, the teacher scores the sampled
    tokens, and the per-token reverse KL to the teacher falls."""
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        f"model.path={weak_sft}", f"algo.distill_teacher={tiny_sft[0]}", "algo.distill_coef=1.0",
        "reward.weights=[0.0, 0.0]", "trainer.max_steps=20", "trainer.lr=0.0005", "trainer.warmup_steps=3",
        "rollout.batch_prompts=16", "rollout.n=16", "checkpoint.every=0",
        f"log.output_dir={tmp_path}", "log.progress=false", "resources.ray_address=local"])
    GRPODriver(cfg).run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    kl = [r["distill/reverse_kl"] for r in rows if "distill/reverse_kl" in r]
    assert len(kl) == 20 and all(r["rollout/reward_mean"] == 0.0 for r in rows if "rollout/reward_mean" in r)
    # measured: 2.71 -> 1.90 per token (first five steps' mean 2.50, last five 1.98)
    first, last = sum(kl[:5]) / 5, sum(kl[-5:]) / 5
    assert last < 0.88 * first, kl


@pytest.mark.slow  # a learning run: `make test-slow` (fast tier budget, issue 25)
def test_run_distill_end_to_end_small(tiny_sft, tmp_path):
    """The whole stage on a small budget: teacher traces -> dataset -> a smaller Llama student (TRL SFT) ->
    teacher and student (and an extra model) evaluated on the same held-out file. The accuracy target is
    checked by the demo (tests/test_demo.py, slow); here: the plumbing, the files and the summary."""
    from rl.distill.run import run_distill

    teacher = str(tiny_sft[0])
    cfg = _distill_cfg(tmp_path, teacher, "data.source=synthetic:chain_sum", "data.num_train=64",
                       "data.task_knobs={min_terms: 2, max_terms: 2, min_value: 1, max_value: 30}",
                       "sampling.n=2", "sampling.max_tokens=48", "eval.problems=16", "eval.samples=2",
                       "eval.max_tokens=48",
                       "student.overrides=['model.path=tiny:llama:hidden_size=64,num_heads=2,num_kv_heads=1,"
                       "intermediate_size=128', train.max_steps=20]")
    s = run_distill(cfg, also_evaluate={"again": teacher})
    out = Path(cfg.output_dir)
    assert set(s["accuracy"]) == {"teacher", "again", "student"}
    assert s["accuracy"]["again"] == pytest.approx(s["accuracy"]["teacher"], abs=0.2)  # same weights, resampled
    assert s["dataset"]["kept"] > 0 and (out / "dataset.jsonl").exists() and (out / "traces.jsonl").exists()
    student = json.loads((out / "student" / "final" / "config.json").read_text())
    assert student["model_type"] == "llama" and student["hidden_size"] == 64
    assert s["student"]["model"].startswith("tiny:llama:")
    assert s["student"]["last_loss"] < s["student"]["first_loss"]
    for name in ("teacher", "again", "student"):
        r = json.loads((out / f"eval_{name}.json").read_text())
        assert r["num_problems"] == 16 and r["samples_per_problem"] == 2
    assert json.loads((out / "summary.json").read_text())["heldout"].endswith("heldout.jsonl")


def test_engine_signature_groups_same_architecture(tiny, tiny_sft):
    from rl.eval.harness import _engine_signature

    assert _engine_signature(tiny.qwen2) == _engine_signature(tiny_sft[0])    # reload_weights can serve both
    assert _engine_signature(tiny.qwen2) != _engine_signature(tiny.llama)     # another engine
