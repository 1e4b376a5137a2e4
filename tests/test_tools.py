"""Multi-turn tool rollouts (rl/rollout/tools.py): masks, token-exact round trip, tool failures, outages.

The engine here is scripted (it answers each request with a fixed text per turn), so the tests pin down the
rollout's own logic: what is sent to the engine, what is inserted, what the trainer and the reward get. The
programs run in the real sandbox. The real vLLM engine runs this loop in the TIR demo and the GRPO test."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from rl.rollout.tools import (CLOSE_FENCE, ToolSpec, Trajectory, as_sample, extract_call, generate_with_tools,
                              mark_outages, output_block, strip_outputs, tool_metrics)
from sandbox import ExecResult, Sandbox, capabilities

needs_sandbox = pytest.mark.skipif(not capabilities().strong, reason=f"no bubblewrap: {capabilities().bwrap_error}")


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.qwen2))


@pytest.fixture(scope="module")
def sandbox():
    if not capabilities().strong:
        pytest.skip("no bubblewrap")
    with Sandbox(slots=2, memory_mb=256) as s:
        yield s


class ScriptedEngine:
    """vLLM's LLMEngine surface used by generate_with_tools. `turns(k)` gives the text of turn k (0-based) of
    every trajectory; a text ending in the closing fence stops there (as vLLM's stop string does)."""

    def __init__(self, tok, turns):
        self.tok, self.turns = tok, turns
        self.queue: list = []
        self.requests: list = []       # (prompt ids, SamplingParams) of every request, in order
        self.turn_of: dict = {}

    def add_request(self, rid, inputs, sp):
        ids = list(inputs["prompt_token_ids"])
        self.requests.append((ids, sp))
        self.queue.append((rid, ids, sp))

    def has_unfinished_requests(self):
        return bool(self.queue)

    def step(self):
        outs = []
        for rid, ids, sp in self.queue[:1]:   # one request per step: other trajectories' tools run meanwhile
            k = self.tok.decode(ids).count("```output")
            text = self.turns(k)
            stop = CLOSE_FENCE if (sp.stop and CLOSE_FENCE in sp.stop and text.endswith(CLOSE_FENCE)) else None
            toks = self.tok.encode(text, add_special_tokens=False)
            finish = "stop"
            if len(toks) > sp.max_tokens:
                toks, finish, stop = toks[: sp.max_tokens], "length", None
            lps = [{t: SimpleNamespace(logprob=-0.01 * (j + 1))} for j, t in enumerate(toks)]
            o = SimpleNamespace(token_ids=toks, logprobs=lps, text=self.tok.decode(toks), finish_reason=finish,
                                stop_reason=stop)
            outs.append(SimpleNamespace(request_id=rid, finished=True, outputs=[o]))
        self.queue = self.queue[1:]
        return outs


def params(n=2, max_tokens=96):
    from rl.rollout.vllm_engine import sampling_params

    return sampling_params(n=n, temperature=1.0, max_tokens=max_tokens)


CALL = "<think>\n```python\nprint(365 * 623)\n```\n"
ANSWER = "</think>\n\\boxed{227395}"


def run(tok, turns, run_code, *, n=2, spec=ToolSpec(timeout_s=2.0, max_output_chars=120), max_tokens=96, prompts=None):
    eng = ScriptedEngine(tok, turns)
    prompts = prompts or [tok.encode("What is 365 * 623?", add_special_tokens=False)]
    got = dict(generate_with_tools(None, prompts, params(n, max_tokens), spec, tok, run_code=run_code, engine=eng))
    return got, eng


# ----------------------------------------------------------------------------------------------- pure helpers
def test_extract_call_finds_the_block_the_fence_closes():
    assert extract_call("x\n```python\nprint(1)\n```\n") == "print(1)"
    assert extract_call("```python\na=1\nprint(a)\n```\n") == "a=1\nprint(a)"
    assert extract_call("```python\nprint(1)\n```\nmore") is None            # not at the end
    assert extract_call("some text\n```\n") is None                          # no python block opened
    assert extract_call("```python\nx\n```\n```output\n1\n```\n") is None  # that fence closed an output block


def test_output_block_outcomes_and_clipping():
    spec = ToolSpec(timeout_s=3, memory_mb=64, max_output_chars=60)
    ok = output_block(ExecResult("ok", 0, "42\n", "", 0.01), spec)
    assert ok == ("```output\n42\n```\n", "ok")
    block, kind = output_block(ExecResult("timeout", None, "", "", 3.0), spec)
    assert kind == "timeout" and "TimeoutError" in block and "3 s" in block
    block, kind = output_block(ExecResult("error", 1, "", "Traceback (most recent call last):\n  File ...\nZeroDivisionError: division by zero", 0.01), spec)
    assert kind == "error" and "ZeroDivisionError" in block
    block, kind = output_block(ExecResult("ok", 0, "y" * 1000, "", 0.01), spec)
    assert kind == "ok" and "characters cut" in block and len(block) < 140
    assert output_block(ExecResult("sandbox_error", None, "", "no slot", 0.0, infra_error="no slot"), spec) == (None, "outage")


def test_strip_outputs_keeps_only_the_policys_text():
    t = "<think>\n```python\nprint('\\\\boxed{7}')\n```\n```output\n\\boxed{7}\n```\n</think>\nno answer"
    assert "\\boxed{7}\n```" not in strip_outputs(t) and strip_outputs(t).endswith("</think>\nno answer")


# ----------------------------------------------------------------------------------------------- the loop
@needs_sandbox
def test_token_exact_round_trip_and_masks(tok, sandbox, tiny):
    from data.tasks import tool_trace

    run_code = lambda code: sandbox.run(code, timeout_s=2.0)  # noqa: E731
    got, eng = run(tok, lambda k: [CALL, ANSWER][k], run_code)
    (trajs,) = got.values()
    assert len(trajs) == 2
    t = trajs[0]
    call_ids = tok.encode(CALL, add_special_tokens=False)
    out_ids = tok.encode("```output\n227395\n```\n", add_special_tokens=False)
    ans_ids = tok.encode(ANSWER, add_special_tokens=False)
    assert t.token_ids == call_ids + out_ids + ans_ids
    assert t.loss_mask == [1] * len(call_ids) + [0] * len(out_ids) + [1] * len(ans_ids)
    assert t.logprobs[len(call_ids):len(call_ids) + len(out_ids)] == [0.0] * len(out_ids)
    assert t.logprobs[0] == pytest.approx(-0.01) and t.logprobs[-1] == pytest.approx(-0.01 * len(ans_ids))
    # the second turn's prompt is exactly the first prompt + the sampled ids + the inserted ids
    prompt = eng.requests[0][0]
    assert any(ids == prompt + call_ids + out_ids for ids, _ in eng.requests)
    assert t.calls == 1 and t.turns == 2 and t.outcomes == ["ok"] and t.finish_reason == "stop"
    s = as_sample(t, tok)
    # the transcript is the SFT trace, and the SFT tokenization of it is the rollout's ids (no drift)
    assert s["text"] == tool_trace("365 * 623", "227395")
    assert tok.encode(s["text"], add_special_tokens=False) == t.token_ids
    assert s["graded_text"] == CALL + ANSWER


def test_inserted_tokens_are_out_of_the_loss_in_the_training_batch():
    from rl.grpo.batching import Group, build_batch

    t = Trajectory(0, [5, 6, 7])
    t.add([10, 11], [-0.1, -0.2], sampled=True)
    t.add([12, 13, 14], None, sampled=False)
    t.add([15], [-0.3], sampled=True)
    sample = {"token_ids": t.token_ids, "logprobs": t.logprobs, "loss_mask": t.loss_mask, "finish_reason": "stop"}
    b = build_batch([Group({}, [5, 6, 7], [sample, sample], [1.0, 0.0], [False, False])], torch.tensor([0.5, -0.5]),
                    0, False)
    assert b["input_ids"][0].tolist() == [5, 6, 7, 10, 11, 12, 13, 14, 15]
    assert b["response_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1]
    assert b["rollout_logp"][0, 3:].tolist() == pytest.approx([-0.1, -0.2, 0, 0, 0, -0.3])


@needs_sandbox
@pytest.mark.parametrize("code,expect,outcome", [
    ("while True:\n    pass", "TimeoutError", "timeout"),
    ("while True:\n    print('flood' * 1000)", "cut]", None),          # output limit or timeout: cut either way
    ("print(1 +", "SyntaxError", "error"),
    ("import os\nos.kill(1, 9)", "", None),                               # a program that attacks its supervisor
])
def test_bad_tool_calls_end_with_a_message_in_context_and_the_rollout_goes_on(tok, sandbox, code, expect, outcome):
    call = f"<think>\n```python\n{code}\n```\n"
    got, eng = run(tok, lambda k: [call, ANSWER][k], lambda c: sandbox.run(c, timeout_s=1.0),
                   spec=ToolSpec(timeout_s=1.0, max_output_chars=120), max_tokens=400)
    for t in got[0]:
        text = tok.decode(t.token_ids)
        inserted = text[text.index("```output"):text.index("</think>")]
        assert expect in inserted, inserted
        assert outcome is None or t.outcomes == [outcome]
        assert text.endswith(ANSWER) and t.finish_reason == "stop" and t.outage is None   # it went on


@needs_sandbox
def test_tool_calls_run_concurrently_with_each_other():
    live, peak, lock = [0], [0], threading.Lock()

    def slow(code):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.3)
        with lock:
            live[0] -= 1
        return ExecResult("ok", 0, "227395\n", "", 0.3)

    from transformers import AutoTokenizer

    from rl.tiny import build_tiny
    tok = AutoTokenizer.from_pretrained(str(build_tiny().qwen2))
    t0 = time.perf_counter()
    got, _ = run(tok, lambda k: [CALL, ANSWER][k], slow, n=8, spec=ToolSpec(concurrency=8))
    assert len(got[0]) == 8 and all(t.outcomes == ["ok"] for t in got[0])
    assert peak[0] >= 4 and time.perf_counter() - t0 < 8 * 0.3


def test_max_tool_calls_then_the_policy_must_answer(tok):
    ok = lambda code: ExecResult("ok", 0, "1\n", "", 0.0)  # noqa: E731
    got, eng = run(tok, lambda k: CALL if k < 5 else ANSWER, ok, n=1, spec=ToolSpec(max_calls=2), max_tokens=400)
    (t,) = got[0]
    assert t.calls == 2 and t.turns == 3
    assert [CLOSE_FENCE in (sp.stop or []) for _, sp in eng.requests] == [True, True, False]
    assert tool_metrics([as_sample(t, tok)])["tool/calls_per_sample"] == 2


def test_token_budget_counts_inserted_tokens(tok):
    big = lambda code: ExecResult("ok", 0, "7" * 200 + "\n", "", 0.0)  # noqa: E731
    got, _ = run(tok, lambda k: [CALL, ANSWER][k], big, n=1, spec=ToolSpec(max_output_chars=400), max_tokens=60)
    (t,) = got[0]
    assert len(t.token_ids) == 60 and t.finish_reason == "length" and t.loss_mask[-1] == 0


def test_sandbox_outage_is_a_failed_item_never_a_reward(tok):
    from rewards.scorer import RewardScorer

    down = lambda code: ExecResult("sandbox_error", None, "", "slot did not start", 0.0, infra_error="slot did not start")  # noqa: E731

    def flaky(code):
        raise OSError("sandbox host gone")

    for runner, why in ((down, "slot did not start"), (flaky, "sandbox host gone")):
        got, eng = run(tok, lambda k: [CALL, ANSWER][k], runner, n=2)
        samples = [as_sample(t, tok) for t in got[0]]
        assert all(s["finish_reason"] == "tool_outage" and why in s["tool"]["outage"] for s in samples)
        assert len(eng.requests) == 2                 # no turn after the outage
        scorer = RewardScorer(["accuracy"], [1.0])
        try:
            res = scorer.score([s["graded_text"] for s in samples], [{"answer": "227395"}] * 2)
        finally:
            scorer.close()
        mark_outages(res, samples)
        assert res.failed == [True, True] and res.metrics["reward/tool/failed_frac"] == 1.0
        assert why in res.error_example


# ----------------------------------------------------------------------------------------------- GRPO with tools
@pytest.fixture(scope="session")
def tool_sft(tiny):
    """A tiny Qwen2 after 150 SFT steps on tool-calling traces of 3-digit products: it writes a python block
    in nearly every sample (operands not yet copied reliably). Cached like weak_sft."""
    import json
    import os
    from pathlib import Path

    from conftest import cached_sft

    knobs = json.dumps({"min_digits": 3, "max_digits": 3, "ops": "*", "tool": True})
    return cached_sft(Path(os.environ["R1LAB_CACHE_DIR"]) / "sft" / f"tool-{tiny.qwen2.name}", "configs/tiny_sft.yaml",
                      ["train.max_steps=150", "data.source=synthetic:arithmetic", f"data.task_knobs={knobs}",
                       "data.num_train=3000"])


@needs_sandbox
def test_grpo_with_tool_calls_trains_on_sampled_tokens_only(tool_sft, tmp_path, ray_local):
    """Ray end to end: the rollout worker runs the policy's code in the sandbox mid-response; the trainer's
    log-probs match the engine's on every sampled token (inserted output tokens have no engine log-prob: were
    they not masked, the step-1 check would see a difference of several nats and stop); in-loop validation
    runs with tools through the eval harness."""
    import json

    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    knobs = json.dumps({"min_digits": 3, "max_digits": 3, "ops": "*", "tool": True})
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        f"model.path={tool_sft}", "data.source=synthetic:arithmetic", f"data.task_knobs={knobs}",
        "rollout.tools=python", "rollout.max_new_tokens=96", "rollout.batch_prompts=4", "rollout.n=4",
        "trainer.max_steps=2", "trainer.lr=1e-4", "checkpoint.every=0", f"log.output_dir={tmp_path}",
        "log.progress=false", "resources.ray_address=local", "log.val_every=2", "log.val_problems=8",
        "log.val_samples=2"])
    GRPODriver(cfg).run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if r["step"] > 0 and "tool/calls_per_sample" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["tool/calls_per_sample"] > 0.5 and r["tool/used_frac"] > 0.5 and r["tool/turns_mean"] > 1.5
        assert 0 <= r["tool/error_frac"] <= 1 and r["tool/outage_frac"] == 0.0
        assert r["reward/tool/failed_frac"] == 0.0 and r["rollout/scored_frac"] == 1.0
    assert steps[0]["rollout/logprob_diff"] < 1e-3       # measured on sampled tokens only, at step 1
    val = [r for r in rows if "val/heldout/pass@1" in r]
    assert [r["step"] for r in val] == [0, 2] and all(r["val/heldout/tool_calls_per_sample"] > 0.5 for r in val)


def test_failure_watch_stops_a_run_whose_tool_sandbox_keeps_failing():
    from rl.grpo.rewards_check import FailureWatch, RewardFailureError

    watch = FailureWatch(0.2, 2, ["accuracy", "tool"], [1.0, 1.0])
    watch.check({"reward/tool/failed_frac": 1.0, "reward/accuracy/failed_frac": 0.0}, 1)
    with pytest.raises(RewardFailureError, match="'tool' failed on 100%"):
        watch.check({"reward/tool/failed_frac": 1.0, "reward/accuracy/failed_frac": 0.0,
                     "reward/example": "tool call: sandbox unavailable"}, 2)


# ----------------------------------------------------------------------------------------------- eval and pipeline
@needs_sandbox
def test_eval_harness_with_tools_reports_tool_use(tool_sft, tiny, vllm_engine, tmp_path):
    """`launch/eval.py --tools python` goes through this: multi-turn sampling, grading of the policy's own
    text, tool statistics in results.json and per sample."""
    import json

    from data.tasks import make_task, write_problems_jsonl
    from rl.eval.harness import Sampling, evaluate
    from rl.rollout.vllm_engine import reload_weights

    bench = write_problems_jsonl(make_task("arithmetic", 8, split="test", min_digits=3, max_digits=3, ops="*"),
                                 tmp_path / "heldout.jsonl")
    reload_weights(vllm_engine, str(tool_sft))
    try:
        res = evaluate(bench, llm=vllm_engine, sampling=Sampling(temperature=1.0, top_p=1.0, n=2, max_tokens=96,
                                                                 tools="python"), output=tmp_path / "r.json")
    finally:
        reload_weights(vllm_engine, str(tiny.qwen2))
    assert res["tools"]["calls_per_sample"] > 0.5 and res["tools"]["used_frac"] > 0.5
    assert res["sampling"]["tools"] == "python"
    rows = [json.loads(x) for x in (tmp_path / "r.samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all("tool_outcomes" in r for r in rows)
    assert any("```output\n" in r["completion"] for r in rows)      # the transcript keeps the inserted output


def test_eval_cli_rejects_tools_with_a_completions_file(tmp_path):
    from launch.eval import main

    with pytest.raises(SystemExit):
        main(["--benchmark", "math500", "--completions", str(tmp_path / "c.jsonl"), "--output",
              str(tmp_path / "r.json"), "--tools", "python"])


def test_pipeline_dispatches_to_the_tir_config_and_validates_it():
    from launch.pipeline import pipeline_kind
    from rl.config import ConfigError, load_config
    from rl.grpo.config import GRPOConfig
    from rl.tir import TIRConfig

    assert pipeline_kind("configs/demo_tir.yaml", []) == "tir"
    assert pipeline_kind("configs/demo.yaml", []) == "r1"
    cfg = load_config(TIRConfig, "configs/demo_tir.yaml")
    g = cfg.grpo.load(GRPOConfig, ["rollout.tools=python"])
    assert g.rollout.tool_spec().max_calls == g.rollout.max_tool_calls
    with pytest.raises(ConfigError, match="task_knobs.tool"):
        load_config(TIRConfig, "configs/demo_tir.yaml", ['task_knobs={"min_digits": 3, "tool": true}'])
    with pytest.raises(ConfigError, match="rollout.tools"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["rollout.tools=bash"])
    with pytest.raises(ConfigError, match="rollout.max_tool_calls"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["rollout.tools=python", "rollout.max_tool_calls=0"])
