"""Surviving failures inside one run (rl.grpo.recovery): the fault log and its budgets, a weight transfer that
does not wait for a dead reader, a reader that notices a dead writer, and a real GRPO run on Ray whose rollout
worker is SIGKILLed mid-generation and whose trainer worker is SIGKILLed mid-update, and which finishes."""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rl.grpo.recovery import FaultLog, RecoveryExhausted
from rl.grpo.sync.transport import FileTransport, SyncError

sys.path.insert(0, str(Path(__file__).parent))  # plugins_for_tests


def test_fault_log_budgets_metrics_and_history():
    lines = []
    log = FaultLog(max_rollout=1, max_trainer=0, log=lambda *a, **k: lines.append(a[0]))
    f = log.admit("rollout", 0, "rollout worker 0 died while generating", 3)
    log.done(f, 2.5)
    assert log.metrics() == {"fault/restarts": 1.0, "fault/lost_steps": 0.0, "fault/recovery_s": 2.5}
    assert log.metrics()["fault/recovery_s"] == 0.0          # reported once
    with pytest.raises(RecoveryExhausted, match=r"trainer.max_restarts=0 restarts already used.*step 3: rollout "
                                                r"worker 0 died while generating \(recovered in 2.5 s\); step 5: "
                                                r"trainer worker 1 died \(not recovered\)") as e:
        log.admit("trainer", 1, "trainer worker 1 died", 5)
    assert e.value.kind == "trainer" and e.value.index == 1
    with pytest.raises(RecoveryExhausted, match="rollout.max_restarts=1"):
        log.admit("rollout", 0, "again", 6)
    assert any("recovering (rollout restart 1 of 1)" in s for s in lines)


def _write(t: FileTransport, version: int, n: int, readers, gone):
    t.begin(readers, gone)
    for k in range(n):
        t.send(version, k, {f"w{k}": torch.full((4,), float(k))})
    t.finish(version, n)


def test_writer_does_not_wait_for_a_stopped_reader(tmp_path):
    t = FileTransport(str(tmp_path), "run", readers=2, timeout_s=30, max_inflight=1)
    t.open_writer()
    got = []
    reader = threading.Thread(target=lambda: got.extend(n for n, _ in t.receive(1, 0)))
    reader.start()
    t0 = time.monotonic()
    _write(t, 1, 4, None, lambda: {1})        # reader 1 is dead: nobody marks its buckets
    reader.join(10)
    assert time.monotonic() - t0 < 5 and got == ["w0", "w1", "w2", "w3"]
    assert not list(t.dir.glob("*.safetensors"))               # buckets deleted once the live reader has them
    # a transfer addressed to reader 1 alone (its replacement) does not wait for reader 0
    got.clear()
    reader = threading.Thread(target=lambda: got.extend(n for n, _ in t.receive(2, 1)))
    reader.start()
    _write(t, 2, 3, [1], None)
    reader.join(10)
    assert got == ["w0", "w1", "w2"]
    with pytest.raises(SyncError, match=r"readers \[5\] out of range"):
        t.begin([5])
    t.close()


def test_reader_fails_at_once_when_the_writer_died(tmp_path):
    t = FileTransport(str(tmp_path), "run", readers=1, timeout_s=60)
    t.open_writer()
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = json.loads((t.dir / "owner.json").read_text())
    (t.dir / "owner.json").write_text(json.dumps({**owner, "pid": dead.pid}))
    t0 = time.monotonic()
    with pytest.raises(SyncError, match=rf"the writer \(trainer rank 0, pid {dead.pid}\) died"):
        list(t.receive(1, 0))
    assert time.monotonic() - t0 < 5


def _kill_when(out: Path, after_lines: int, proctitle: str, killed: list, stop: threading.Event):
    """SIGKILL the first process whose title is `proctitle` (Ray names a worker executing a method
    `ray::Class.method`) once metrics.jsonl has `after_lines` lines: a real crash in the middle of that call."""
    import psutil

    metrics = out / "metrics.jsonl"
    while not stop.is_set():
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_lines:
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = p.info.get("cmdline") or []
                if cmd and cmd[0].startswith(proctitle):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append((proctitle, p.info["pid"], len(metrics.read_text().splitlines())))
                    return
        time.sleep(0.005)


def test_two_node_run_survives_a_killed_rollout_worker_and_a_killed_trainer_worker(tmp_path):
    """A simulated two-node cluster (ray.cluster_utils), the trainer ranks on different nodes, and two real
    SIGKILLs: the rollout worker while it generates step 3's batch (replaced, loaded with the current weights,
    its prompts generated again) and a trainer worker in step 5's update (the group restarts from the step-4
    checkpoint, restored across nodes). The run finishes in the same job: every step logged once, full groups,
    weights verified at every sync, the data cursor exact. (It also carries the former two-node test: placement
    across nodes, a driver that joins a running cluster and leaves it running.)"""
    import ray
    from ray.cluster_utils import Cluster

    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    out = tmp_path / "run"
    ray.shutdown()   # the session's shared instance (conftest.ray_local), if one runs: this test needs its own
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    killed: list = []
    stop = threading.Event()
    killers = [threading.Thread(target=_kill_when, args=(out, 2, "ray::RolloutWorker.rollout", killed, stop)),
               threading.Thread(target=_kill_when, args=(out, 4, "ray::TrainerWorker.update", killed, stop))]
    try:
        cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
            "trainer.max_steps=6", "checkpoint.every=2", f"log.output_dir={out}", "log.progress=false",
            "resources.ray_address=auto", "resources.placement_strategy=SPREAD", "resources.trainer_cpus=1",
            f"sync.dir={tmp_path / 'shm'}", "rollout.max_restarts=1", "trainer.max_restarts=1",
            "reward.functions=[plugins_for_tests:ones]", "reward.weights=[1.0]", "sync.checksum_every=1"])
        for k in killers:
            k.start()
        d = GRPODriver(cfg)
        result = d.run()
        assert len(set(d.placement_info["trainer_nodes"])) == 2, d.placement_info   # ranks on different nodes
        assert d.placement_info["master_addr"] == ray.util.get_node_ip_address()
        assert ray.is_initialized()   # the driver joined the cluster: it leaves it running
    finally:
        stop.set()
        for k in killers:
            k.join()
        ray.shutdown()
        cluster.shutdown()
    assert [k[0] for k in killed] == ["ray::RolloutWorker.rollout", "ray::TrainerWorker.update"], killed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))               # every step logged once
    assert [r["data/cursor"] for r in rows] == [8.0 * s for s in range(1, 7)]
    assert all(r["rollout/short_groups"] == 0 for r in rows)            # every group has its n samples
    assert all(r["sync/checksum_ok"] == 1.0 for r in rows)
    kinds = [(f.kind, f.step, f.lost_steps) for f in d.faults.faults]
    assert kinds == [("rollout", 3, 0), ("trainer", 5, 0)], d.faults.history()
    assert all(f.recovery_s > 0 for f in d.faults.faults)
    assert rows[-1]["fault/restarts"] == 2.0 and rows[-1]["fault/reissued_prompts"] == 8.0
    assert result["steps"] == 6 and (Path(result["final"]) / "config.json").exists()


def _final_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow  # three 6-step runs (~4 min)
def test_a_trainer_restart_ends_where_an_uninterrupted_run_ends(tmp_path, ray_local):
    """Two uninterrupted runs with the same seed, and one whose trainer worker is SIGKILLed in step 5's update
    (restart from the step-4 checkpoint): the restarted run's final weights differ from the first run's by no
    more than the second run's do. Rollouts are reseeded per step and worker (rl.grpo.driver.rollout_seed), and
    the checkpoint restores optimizer, schedule and RNG, so all three are expected to be bit-identical here."""
    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    def run(name: str, kill: bool) -> dict:
        out = tmp_path / name
        cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
            "trainer.max_steps=6", "checkpoint.every=2", f"log.output_dir={out}", "log.progress=false",
            "resources.ray_address=local", f"sync.dir={tmp_path / 'shm'}", "trainer.max_restarts=1",
            "reward.functions=[plugins_for_tests:ones]", "reward.weights=[1.0]"])
        killed, stop = [], threading.Event()
        killer = threading.Thread(target=_kill_when, args=(out, 4, "ray::TrainerWorker.update", killed, stop))
        if kill:
            killer.start()
        d = GRPODriver(cfg)
        try:
            d.run()
        finally:
            stop.set()
            if kill:
                killer.join()
        assert len(d.faults.faults) == int(kill) and len(killed) == int(kill)
        return _final_weights(out / "final")

    a, b, c = run("a", False), run("b", False), run("restarted", True)
    diff = lambda x, y: max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
    ab, ac = diff(a, b), diff(a, c)
    print(f"max |a - b| = {ab:.3g} (two uninterrupted runs), max |a - restarted| = {ac:.3g}")
    assert ac <= ab
