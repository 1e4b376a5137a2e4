"""Surviving failures inside one run (rl.grpo.recovery): the fault log and its budgets, a weight transfer that
does not wait for a dead reader, a reader that notices a dead writer, and a real GRPO run on Ray whose rollout
worker is SIGKILLed mid-generation and whose trainer worker is SIGKILLed mid-update, and which finishes."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rl.grpo.recovery import FaultLog, RecoveryExhausted
from rl.grpo.sync.shm import ShmTransport
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


def test_a_trainer_restart_closes_the_failures_it_interrupted():
    lines = []
    log = FaultLog(max_rollout=3, max_trainer=3, log=lambda *a, **k: lines.append(a[0]))
    open_one = log.admit("rollout", 1, "rollout worker 1 died while generating", 3)   # its replacement's load ...
    restart = log.admit("trainer", 1, "trainer worker 1 died during weight sync", 3)  # ... broken off by this
    log.absorb(restart)
    log.done(restart, 4.0)
    assert open_one.recovery_s == 0.0 and restart.recovery_s == 4.0
    assert log.metrics()["fault/restarts"] == 2.0 and "(not recovered)" not in log.history()
    assert "[r1lab] step 3: the rollout failure is recovered with the trainer restart" in lines


def test_recover_restarts_again_when_the_restart_fails_the_same_way(monkeypatch):
    from rl.grpo import recovery

    calls = []

    def restart(d, err):
        calls.append(err.kind)
        if len(calls) == 1:   # e.g. the node the group restarted on is declared dead meanwhile
            raise recovery.WorkerDied("trainer worker 0 died during start-up", "trainer", 0)

    monkeypatch.setattr(recovery, "restart_trainers", restart)
    recovery.recover(None, recovery.NodeLost("rollout worker 1's node is gone"))
    assert calls == ["node", "trainer"]
    for err in (recovery.WorkerDied("rollout worker 0 died", "rollout", 0),
                recovery.RecoveryExhausted("trainer.max_restarts=2 restarts already used", "trainer", 1)):
        with pytest.raises(type(err)):
            recovery.recover(None, err)
    assert len(calls) == 2


def _write(t: FileTransport, version: int, n: int, readers, gone):
    t.begin(readers, gone)
    for k in range(n):
        t.send(version, k, {f"w{k}": torch.full((4,), float(k))})
    t.finish(version, n)


@pytest.mark.parametrize("cls", [FileTransport, ShmTransport], ids=["file", "shm"])
def test_writer_does_not_wait_for_a_stopped_reader(tmp_path, cls):
    t = cls(str(tmp_path), "run", readers=2, timeout_s=30, max_inflight=1)
    t.open_writer()
    got = []
    reader = threading.Thread(target=lambda: got.extend(n for n, _ in t.receive(1, 0)))
    reader.start()
    t0 = time.monotonic()
    _write(t, 1, 4, None, lambda: {1})        # reader 1 is dead: nobody marks its buckets
    reader.join(10)
    assert time.monotonic() - t0 < 5 and got == ["w0", "w1", "w2", "w3"]
    assert not list(t.dir.glob("*" + t.SUFFIX))               # buckets deleted once the live reader has them
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


@pytest.mark.parametrize("cls", [FileTransport, ShmTransport], ids=["file", "shm"])
def test_reader_fails_at_once_when_the_writer_died(tmp_path, cls):
    t = cls(str(tmp_path), "run", readers=1, timeout_s=60)
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
        assert d.sync_method == "file"   # sync.method=auto across nodes: files in sync.dir
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


def test_a_rollout_worker_whose_node_is_gone_ends_in_node_lost(monkeypatch):
    """Its bundle not placed again within resources.wait_s: NodeLost (the driver re-places the run), with the
    rollout failure recorded as handled."""
    from types import SimpleNamespace as NS

    import ray

    from rl.grpo import placement, recovery

    asked = []
    monkeypatch.setattr(placement, "wait_for_bundles", lambda pg, b, t, what, **k: asked.append((b, t)) or set())
    monkeypatch.setattr(ray, "kill", lambda actor, **k: None)   # the engine is a string here: no Ray needed
    d = NS(cfg=NS(resources=NS(wait_s=7.0)), faults=FaultLog(5, 5, log=lambda *a, **k: None), step=4, pg=None,
           rollouts=["engine 0", "engine 1"], plan=NS(rollout=[(2, {}), (3, {})]))
    with pytest.raises(recovery.NodeLost, match=r"rollout worker 1's node is gone: its bundle 3 found no other "
                                                r"node within resources.wait_s=7s") as e:
        recovery.replace_rollout(d, 1, "rollout worker 1 died while generating (ActorDiedError)")
    assert e.value.kind == "node" and asked == [([3], 7.0)]
    f = d.faults.faults[-1]
    assert (f.kind, f.worker, f.step) == ("rollout", 1, 5) and f.recovery_s >= 0


def test_shrink_plan_keeps_the_placed_workers_in_a_renumbered_group():
    from types import SimpleNamespace as NS

    from rl.grpo.placement import InsufficientResources, plan_placement, shrink_plan

    def cfg(nt, nr, colocate=False):
        return NS(resources=NS(trainer_cpus=2.0, trainer_gpus=1.0, rollout_cpus=1.0, rollout_gpus=1.0,
                               colocate=colocate, rollout_gpu_share=0.3, placement_strategy="SPREAD"),
                  trainer=NS(num_workers=nt), rollout=NS(num_workers=nr))

    p = plan_placement(cfg(4, 2))                    # bundles 0-3 trainers, 4-5 rollout workers
    s = shrink_plan(p, {0, 1, 3, 5}, sequence_parallel=2, min_trainers=1, min_rollouts=1)
    assert s.bundles == [p.bundles[0], p.bundles[1], p.bundles[5]] and s.strategy == "SPREAD"
    assert s.trainer == [(0, p.trainer[0][1]), (1, p.trainer[1][1])]   # 3 placed, cut to a multiple of 2
    assert s.rollout == [(2, p.rollout[1][1])]
    s = shrink_plan(p, {0, 1, 2, 3, 4, 5}, 1, 4, 2)                     # nothing lost: the same plan
    assert (s.bundles, s.trainer, s.rollout) == (p.bundles, p.trainer, p.rollout)
    with pytest.raises(InsufficientResources, match=r"1 of the 4 trainer workers lost their node.*2 worker\(s\) "
                                                    r"would be left.*< trainer.min_workers=3"):
        shrink_plan(p, {0, 1, 3, 4, 5}, 2, 3, 1)
    with pytest.raises(InsufficientResources, match=r"1 of the 2 rollout workers lost.*1 left < "
                                                    r"rollout.min_workers=2"):
        shrink_plan(p, {0, 1, 2, 3, 5}, 1, 1, 2)
    c = plan_placement(cfg(3, 2, colocate=True))     # rollout worker j shares trainer j's bundle
    s = shrink_plan(c, {1, 2}, 1, 1, 1)
    assert s.bundles == [c.bundles[1], c.bundles[2]]
    assert s.trainer == [(0, c.trainer[1][1]), (1, c.trainer[2][1])] and s.rollout == [(0, c.rollout[1][1])]


def test_wait_for_bundles_reports_and_returns_what_is_placed(monkeypatch):
    from rl.grpo import placement

    polls = iter([{0}, {0}, {0, 1}])
    monkeypatch.setattr(placement, "placed_bundles", lambda pg: next(polls))
    lines = []
    t0 = time.monotonic()
    got = placement.wait_for_bundles(None, [0, 1], 30, "restarting", log=lambda s, **k: lines.append(s), poll_s=0.01)
    assert got == {0, 1} and time.monotonic() - t0 < 5     # placed again (a node came back): stop waiting
    assert "bundle(s) [1] lost their node" in lines[0] and "resources.wait_s" in lines[0]
    monkeypatch.setattr(placement, "placed_bundles", lambda pg: {0})
    t0 = time.monotonic()
    assert placement.wait_for_bundles(None, [0, 1], 0.3, "restarting", log=lambda *a, **k: None, poll_s=0.05) == {0}
    assert 0.29 < time.monotonic() - t0 < 3                 # gives up after timeout_s with the placed subset


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


@pytest.mark.slow  # a simulated cluster, two engines, a lost node, restarts (~1-1.5 min each)
@pytest.mark.parametrize("node_c", [False, True], ids=["no-capacity-back", "node-c-joins"])
def test_a_lost_node_re_places_the_run_on_the_node_left(tmp_path, capsys, node_c):
    """A simulated two-node cluster, each node with one trainer rank and one rollout worker (SPREAD), and node B
    removed from the cluster once the step-2 checkpoint is committed (its raylet and every worker process on it
    killed). With no capacity coming back, after resources.wait_s the run is placed again on node A alone (a new
    placement group: one trainer rank, one engine) and the trainer group restarts from the step-2 checkpoint
    written by two ranks (DCP reshards). When node C joins instead, Ray moves node B's bundles there and the run
    goes on with both ranks and both engines, node B's on node C. Either way the run finishes in the same job with
    every step logged once, nothing trained lost, full groups and verified weights. Which rank and which engine
    node B held is Ray's choice."""
    import ray
    from ray.cluster_utils import Cluster

    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    out = tmp_path / "run"
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    node_b = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    removed: list = []
    stop = threading.Event()

    def remove_b_after_step_2():
        step_2 = out / "checkpoints" / "step_000002"   # renamed into place once committed
        while not stop.is_set():
            if step_2.exists():
                cluster.remove_node(node_b)
                if node_c:   # a raylet joining the cluster (Cluster.add_node needs the main thread)
                    removed.append(subprocess.Popen(
                        [str(Path(sys.executable).parent / "ray"), "start", "--address", cluster.address,
                         "--num-cpus=2", "--block"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                        start_new_session=True))
                else:
                    removed.append(None)
                return
            time.sleep(0.005)

    remover = threading.Thread(target=remove_b_after_step_2)
    try:
        cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
            "trainer.max_steps=5", "checkpoint.every=2", f"log.output_dir={out}", "log.progress=false",
            "resources.ray_address=auto", "resources.placement_strategy=SPREAD", "resources.trainer_cpus=1",
            "rollout.num_workers=2", f"resources.wait_s={120 if node_c else 5}", f"sync.dir={tmp_path / 'shm'}",
            "reward.functions=[plugins_for_tests:ones]", "reward.weights=[1.0]", "sync.checksum_every=1"])
        remover.start()
        d = GRPODriver(cfg)
        starts: list[dict] = []
        note = d.note_placement
        d.note_placement = lambda answers: (note(answers), starts.append(json.loads(json.dumps(d.placement_info))))
        result = d.run()
        first, info = starts[0], d.placement_info
        known = {cluster.head_node.node_id, node_b.node_id}
        joined = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in known]
    finally:
        stop.set()
        remover.join()
        ray.shutdown()
        if removed and removed[0] is not None:
            os.killpg(removed[0].pid, signal.SIGTERM)   # node C's raylet and workers
            removed[0].wait(60)
        cluster.shutdown()
    assert removed, "node B was never removed"
    b_id = node_b.node_id
    assert sorted(n == b_id for n in first["trainer_nodes"]) == [False, True], first   # one rank per node
    assert sorted(n == b_id for n in first["rollout_nodes"]) == [False, True], first   # one engine per node
    said = capsys.readouterr().out
    with capsys.disabled():   # the recovery's own account, in the test log
        print("\n".join(line for line in said.splitlines() if line.startswith("[r1lab]")))
    if node_c:   # node B's rank and engine now run on node C, the others where they were
        [c_id] = joined
        assert info["trainer_nodes"] == [c_id if n == b_id else n for n in first["trainer_nodes"]], info
        assert info["rollout_nodes"] == [c_id if n == b_id else n for n in first["rollout_nodes"]], info
        assert "the run goes on with" not in said and len(starts) == 1
    else:
        assert len(info["trainer_nodes"]) == len(info["rollout_nodes"]) == 1, info   # re-placed ...
        assert b_id not in info["trainer_nodes"] + info["rollout_nodes"], info        # ... on node A
        assert "the run goes on with 1 of 2 trainer workers" in said and "1 of 2 rollout workers" in said
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 6))               # every step logged once
    assert [r["data/cursor"] for r in rows] == [8.0 * s for s in range(1, 6)]
    assert all(r["rollout/short_groups"] == 0 for r in rows)            # every group has its n samples
    assert all(r["sync/checksum_ok"] == 1.0 for r in rows)
    faults = d.faults.faults
    assert all(f.step == 3 and f.recovery_s >= 0 for f in faults), d.faults.history()   # during step 3, handled
    assert [f.kind for f in faults].count("trainer") == 1, d.faults.history()   # one restart on the node left
    assert rows[-1]["fault/lost_steps"] == 0.0                          # it restored the step-2 checkpoint
    assert result["steps"] == 5 and (Path(result["final"]) / "config.json").exists()
