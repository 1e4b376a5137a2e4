"""GRPO end to end on Ray: 2 FSDP2 trainer workers + 1 vLLM rollout worker on the tiny model."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.config import load_config
from rl.grpo.config import GRPOConfig
from rl.grpo.driver import GRPODriver, WorkerDied, latest_checkpoint

sys.path.insert(0, str(Path(__file__).parent))  # plugins_for_tests

REQUIRED_METRICS = ["rollout/reward_mean", "rollout/response_length_mean", "actor/pg_loss", "actor/kl",
                    "actor/entropy", "actor/clipfrac", "actor/grad_norm", "perf/rollout_s", "perf/train_s",
                    "perf/sync_s", "perf/tokens_per_s", "rollout/logprob_diff", "reward/timeouts",
                    "reward/errors", "reward/latency_ms"]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_grpo_learns_syncs_and_exports(weak_sft, tmp_path, vllm_engine, ray_local):
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        f"model.path={weak_sft}", "trainer.max_steps=24", "trainer.lr=0.001",
        "reward.functions=[accuracy, format, plugins_for_tests:raises]", "reward.weights=[1.0, 0.5, 0.0]",
        "sync.checksum_every=4", "checkpoint.every=8", f"log.output_dir={tmp_path}", "log.progress=false",
        "resources.ray_address=local", "log.val_every=12", "log.val_problems=16", "log.val_samples=2"])
    driver = GRPODriver(cfg)
    result = driver.run()
    assert driver.sync_method == "shm"   # sync.method=auto on one node: the shared-memory transport
    all_rows = read_metrics(tmp_path)
    # in-loop validation through the eval harness, before training and every 12 steps
    assert [r["step"] for r in all_rows if "val/heldout/pass@1" in r] == [0, 12, 24]
    rows = [r for r in all_rows if r["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, 25)) and result["steps"] == 24
    for name in REQUIRED_METRICS:
        assert name in rows[0], name
    reward = [r["rollout/reward_mean"] for r in rows]
    first, last = sum(reward[:6]) / 6, sum(reward[-6:]) / 6
    assert last > first + 0.1, reward                                     # learning happened
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows)            # engine runs the trainer's weights
    assert [r["step"] for r in rows if r.get("sync/checksum_ok") == 1.0] == [1, 4, 8, 12, 16, 20, 24]
    # the raising plugin (weight 0: logged, not trained on) fails on every item: counted, no item excluded
    assert all(r["reward/errors"] > 0 and r["reward/plugins_for_tests.raises/failed_frac"] == 1.0 for r in rows)
    assert all(r["rollout/scored_frac"] == 1.0 for r in rows)
    assert all(r["perf/padding_frac"] < 0.5 for r in rows)
    # checkpoints are atomic and complete; the final export loads in transformers and vLLM
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_000024"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    final = Path(result["final"])
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert not torch.equal(model.model.embed_tokens.weight,
                           AutoModelForCausalLM.from_pretrained(weak_sft).model.embed_tokens.weight)
    from rl.rollout.vllm_engine import generate, reload_weights, sampling_params

    reload_weights(vllm_engine, str(final))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Compute 12+7."}], tokenize=False,
                                     add_generation_prompt=True)
    s = generate(vllm_engine, [prompt], sampling_params(temperature=0, max_tokens=16))[0][0]
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    hf = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    assert s.token_ids == hf.tolist()[: len(s.token_ids)]


@pytest.mark.slow  # a learning run: `make test-slow` (fast tier budget, issue 25)
@pytest.mark.parametrize("loss,extra", [("gspo", ["algo.loss_agg=seq_mean_token_mean", "trainer.lr=0.001"]),
                                        ("cispo", ["trainer.lr=0.0005"])])
def test_gspo_and_cispo_learn(loss, extra, weak_sft, tmp_path, ray_local):
    """Each policy loss at its paper's clip range (null: the loss's own default), with two mini-batches per step
    so that the second one is off-policy and the clipping acts: reward rises. CISPO has no trust region, so it
    gets half the learning rate: at 1e-3 the second mini-batch's unclipped step wrecks the tiny model's format
    in one step (measured; PPO-clip with its clipping switched off does the same)."""
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        f"model.path={weak_sft}", f"algo.policy_loss={loss}", "algo.clip_eps_low=null", "algo.clip_eps_high=null",
        *extra, "trainer.mini_batches=2", "trainer.max_steps=16", "reward.weights=[1.0, 0.5]", "checkpoint.every=0",
        f"log.output_dir={tmp_path}", "log.progress=false", "resources.ray_address=local"])
    GRPODriver(cfg).run()
    rows = [r for r in read_metrics(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, 17))
    reward = [r["rollout/reward_mean"] for r in rows]
    first, last = sum(reward[:4]) / 4, sum(reward[-4:]) / 4
    assert last > first + 0.1, reward                                     # learning happened
    assert sum(r["actor/clipfrac"] > 0 for r in rows) >= 8               # the second mini-batch is clipped
    assert all(0.5 < r["rollout/is_weight_mean"] <= 1.01 and r["rollout/is_masked_frac"] == 0 for r in rows)


@pytest.mark.slow  # the fast tier restarts killed workers in tests/test_recovery.py (issue 25's budget)
def test_dead_worker_stops_with_clear_error_and_intact_checkpoint(tmp_path, ray_local):
    import ray

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        "trainer.max_steps=10", f"log.output_dir={tmp_path}", "log.progress=false", "resources.ray_address=local",
        "trainer.max_restarts=0"])
    d = GRPODriver(cfg)
    d.start()
    try:
        for _ in range(2):
            d.train_step()
            d.step += 1
        ckpt = d.save_checkpoint()
        ray.kill(d.trainers[1])
        with pytest.raises(WorkerDied, match=r"^trainer worker 1 \(TrainerWorker\) died during .* step 3\. Stopping; the last intact checkpoint is .*step_000002"):
            d.train_step()
    finally:
        d.close()
    assert (ckpt / "DONE").exists() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2   # sharded: one per rank
    AutoModelForCausalLM.from_pretrained(ckpt / "hf")


def _run(cmd, env, out, kill_after_lines=None, timeout=600):
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    if kill_after_lines is None:
        log, _ = p.communicate(timeout=timeout)
        return p.returncode, log
    import psutil

    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_lines:
            break
        if p.poll() is not None:  # it ended before it could be killed: say how, instead of waiting out the timeout
            return p.returncode, p.stdout.read()
        time.sleep(0.2)
    procs = [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    for pid in procs:  # the driver and everything it started (Ray, actors, vLLM): a hard crash
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=60)
    return p.returncode, ""


@pytest.mark.parametrize("back_to_two", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_kill_and_resume_continues_exactly_across_trainer_counts(tmp_path, back_to_two, ray_local, capsys,
                                                                monkeypatch):
    """A launcher process killed mid-run (SIGKILL of it and everything it started), resumed with 1 trainer worker
    instead of 2 (and, in the slow tier, continued with 2 again; tests/test_trainer_worker.py reshards 1 -> 2 under
    torchrun in the fast tier): sharded checkpoints reshard, step numbering and the data cursor continue exactly,
    and the killed run's sync directory is swept by the next start. The resumes run in this process on the
    session's Ray (the same driver code as a launch, ~15 s cheaper each). The first resume's rendezvous port is
    taken by another listener before rank 0 binds it: the trainer group starts again on a new port."""
    out, shm = tmp_path / "run", tmp_path / "shm"
    # kl_coef > 0 also exercises the frozen reference model (the base model, also after a resume)
    overrides = ["trainer.max_steps=8", "checkpoint.every=2", f"log.output_dir={out}", "log.progress=false",
                 "resources.ray_address=local", "algo.kl_coef=0.01", "trainer.lr=0.001",
                 "reward.functions=[plugins_for_tests:ones]", "reward.weights=[1.0]", f"sync.dir={shm}"]
    cmd = [sys.executable, "launch/grpo.py", "--config", "configs/tiny_grpo.yaml", *overrides]

    def resume(extra: list[str]) -> str:
        capsys.readouterr()
        GRPODriver(load_config(GRPOConfig, "configs/tiny_grpo.yaml", overrides + extra)).run()
        return capsys.readouterr().out

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    rc, log = _run(cmd, env, out, kill_after_lines=5)
    assert rc == -signal.SIGKILL, log[-3000:]
    leaked = list(shm.glob("r1lab-sync-*"))
    assert len(leaked) == 1                     # a killed run cannot clean up after itself...
    before = read_metrics(out)
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and len(before) >= 5
    done_step = int(ckpt.name.split("_")[1])
    with socket.socket() as held, monkeypatch.context() as m:
        held.bind(("", 0))
        held.listen()
        ports = []

        def first_one_taken(self, real=GRPODriver.rendezvous_address):
            addr, port = real(self)
            ports.append(port)
            return addr, (held.getsockname()[1] if len(ports) == 1 else port)

        m.setattr(GRPODriver, "rendezvous_address", first_one_taken)
        log = resume(["trainer.num_workers=1"])
    assert len(ports) == 2 and "rendezvous port" in log and "EADDRINUSE" in log, log[-2000:]
    assert f"resuming from {ckpt} at step {done_step + 1}" in log
    assert f"removed sync directories of dead runs: ['{leaked[0]}']" in log   # ...the next start sweeps it
    assert not list(shm.glob("r1lab-sync-*"))   # and a run that ends removes its own
    last = 8
    if back_to_two:
        log = resume(["trainer.max_steps=10"])                                   # 1 -> 2 trainer workers
        assert "resuming from" in log and "at step 9" in log
        last = 10
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, last + 1))  # no step repeated or skipped
    # the data cursor advances by exactly one batch per step, across the kill and the world-size changes
    assert [r["data/cursor"] for r in rows] == [(8.0 * s) % 400 for s in range(1, last + 1)]
    assert latest_checkpoint(out / "checkpoints").name == f"step_{last:06d}"
    assert rows[0]["actor/kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["actor/kl"] > 0


def test_bf16_run_checksums_and_a_failing_reward_stops_it(tmp_path, ray_local):
    """bf16 compute at lr 1e-6: the engines run the bf16 cast of the fp32 masters (checksums every step), and
    a reward function failing on 30% of the items is excluded from training and stops the run at step 3."""
    from rl.grpo.rewards_check import RewardFailureError

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        "model.dtype=bfloat16", "trainer.lr=1e-6", "sync.checksum_every=1", "rollout.n=10", "trainer.max_steps=6",
        "reward.functions=[plugins_for_tests:fails_three_in_ten, format]", "reward.weights=[1.0, 0.1]",
        f"log.output_dir={tmp_path}", "log.progress=false", "resources.ray_address=local", "checkpoint.every=0"])
    with pytest.raises(RewardFailureError, match=r"'plugins_for_tests.fails_three_in_ten' failed on 30% .* step 3"):
        GRPODriver(cfg).run()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reward/plugins_for_tests.fails_three_in_ten/failed_frac"] == pytest.approx(0.3)
        assert r["rollout/scored_frac"] == pytest.approx(0.7) and r["reward/failed_frac"] == pytest.approx(0.3)
        assert r["sync/checksum_ok"] == 1.0 and r["rollout/logprob_diff"] < 0.01
        assert "grader fell over" in r["reward/example"]


def test_lora_grpo_syncs_merged_weights(tmp_path, ray_local):
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        "model.lora_r=8", "model.lora_alpha=16", "trainer.max_steps=4", "trainer.lr=0.01",
        "reward.functions=[plugins_for_tests:ones]", "reward.weights=[1.0]", "sync.checksum_every=1",
        "checkpoint.every=0", f"log.output_dir={tmp_path}", "log.progress=false", "resources.ray_address=local"])
    GRPODriver(cfg).run()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["sync/checksum_ok"] == 1.0 for r in rows)
    # after each update the engine serves base + B @ A: its log-probs match the trainer's LoRA model
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows)
    assert rows[-1]["actor/grad_norm"] > 0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not any("lora" in n for n, _ in final.named_parameters())
