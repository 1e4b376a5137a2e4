"""Where actors run (placement plans, fail-fast resource checks, GPU colocation on logical GPUs), the overlapped
rollout schedule, and the reward-failure stop. Ray is used only with logical resources (no models)."""
import time

import pytest

from rl.config import load_config
from rl.grpo.config import GRPOConfig
from rl.grpo.placement import InsufficientResources, check_fits, plan_placement
from rl.grpo.rewards_check import FailureWatch, RewardFailureError, merge_reward_metrics
from rl.grpo.rollout_queue import RolloutQueue


def _cfg(*overrides):
    return load_config(GRPOConfig, "configs/tiny_grpo.yaml", list(overrides))


def test_a_run_too_big_for_the_cluster_fails_naming_need_and_supply():
    p = plan_placement(_cfg("resources.trainer_cpus=1"))
    with pytest.raises(InsufficientResources, match=r"^the run needs 3 CPU \(2 trainer workers x 1 \+ 1 rollout "
                                                     r"workers x 1\), the cluster has 2 \(1 node\(s\)\): lower "
                                                     r"resources.trainer_cpus"):
        check_fits(p, [{"CPU": 2.0}])
    check_fits(plan_placement(_cfg()), [{"CPU": 2.0}])          # the tiny config fits a 2-core machine
    gpu = plan_placement(_cfg("resources.trainer_gpus=1", "resources.rollout_gpus=1"))
    with pytest.raises(InsufficientResources, match=r"needs 3 GPU .* the cluster has 2"):
        check_fits(gpu, [{"CPU": 8.0, "GPU": 2.0}])
    with pytest.raises(InsufficientResources, match=r"bundle \d \{'CPU': 4.0\} fits on no node"):
        check_fits(plan_placement(_cfg("resources.trainer_cpus=4")), [{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 3.0}])
    with pytest.raises(InsufficientResources, match="STRICT_PACK"):
        check_fits(plan_placement(_cfg("resources.placement_strategy=STRICT_PACK")), [{"CPU": 1.0}, {"CPU": 1.0}])


def test_gpu_colocation_plans_fractional_shares_of_one_bundle():
    p = plan_placement(_cfg("resources.colocate=true", "resources.trainer_gpus=1", "rollout.num_workers=2",
                            "resources.rollout_gpu_share=0.25"))
    assert p.bundles == [{"CPU": 1.5, "GPU": 1.0}, {"CPU": 1.5, "GPU": 1.0}]
    assert [b for b, _ in p.trainer] == [0, 1] and [b for b, _ in p.rollout] == [0, 1]
    assert all(o["num_gpus"] == 0.75 for _, o in p.trainer) and all(o["num_gpus"] == 0.25 for _, o in p.rollout)
    check_fits(p, [{"CPU": 4.0, "GPU": 2.0}])
    with pytest.raises(InsufficientResources, match=r"needs 2 GPU .*has 1"):
        check_fits(p, [{"CPU": 4.0, "GPU": 1.0}])


def test_colocated_trainer_and_rollout_actors_share_a_logical_gpu():
    """On a local Ray with 2 logical GPUs (no hardware): each trainer and its rollout worker land in the same
    bundle and are given the same GPU; a config needing more GPUs is refused before any actor starts."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rl.grpo.placement import cluster_nodes

    ray.shutdown()   # the session's shared instance (conftest.ray_local), if one runs: this test needs its own
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False)
    try:
        @ray.remote
        class Probe:
            def where(self):
                return ray.get_gpu_ids(), ray.get_runtime_context().get_node_id()

        cfg = _cfg("resources.colocate=true", "resources.trainer_gpus=1", "rollout.num_workers=2")
        p = plan_placement(cfg)
        check_fits(p, cluster_nodes())
        pg = placement_group(p.bundles, strategy=p.strategy)
        ray.get(pg.ready(), timeout=60)
        s = lambda b: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b)  # noqa: E731
        trainers = [Probe.options(scheduling_strategy=s(b), **o).remote() for b, o in p.trainer]
        rollouts = [Probe.options(scheduling_strategy=s(b), **o).remote() for b, o in p.rollout]
        t = ray.get([a.where.remote() for a in trainers], timeout=60)
        r = ray.get([a.where.remote() for a in rollouts], timeout=60)
        assert [g for g, _ in t] == [g for g, _ in r] and sorted(g[0] for g, _ in t) == [0, 1]
        remove_placement_group(pg)
        too_big = plan_placement(_cfg("resources.colocate=true", "resources.trainer_gpus=1", "trainer.num_workers=3"))
        with pytest.raises(InsufficientResources, match=r"needs 3 GPU"):
            check_fits(too_big, cluster_nodes())
    finally:
        ray.shutdown()


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_overlapped_rollouts_are_never_more_than_async_steps_stale(ahead):
    q = RolloutQueue(ahead)
    cursor = {"epoch": 0, "pos": 0}
    version, trained_with = 0, []
    for step in range(8):
        q.fill(step, version, lambda: dict(cursor), lambda s: f"batch{s}")
        p = q.pop(step)
        assert p.handle == f"batch{step}"
        trained_with.append(step - p.version)     # policy version at training - version that generated it
        version = step + 1                         # the sync after the update
    assert max(trained_with) == ahead and all(0 <= s <= ahead for s in trained_with)
    assert trained_with[ahead:] == [ahead] * (8 - ahead)


def test_reward_failures_stop_the_run_after_consecutive_bad_steps_naming_the_function():
    w = FailureWatch(0.2, 3, ["accuracy", "plugins:flaky", "logged"], [1.0, 0.5, 0.0])
    bad = {"reward/accuracy/failed_frac": 0.0, "reward/plugins.flaky/failed_frac": 0.3,
           "reward/logged/failed_frac": 1.0, "reward/example": "reward 'plugins:flaky' error: boom"}
    w.check(bad, 1)
    w.check({**bad, "reward/plugins.flaky/failed_frac": 0.1}, 2)    # a good step resets the streak
    w.check(bad, 3)
    w.check(bad, 4)
    with pytest.raises(RewardFailureError, match=r"'plugins.flaky' failed on 30% .* step 5.*3 steps in a row.*boom"):
        w.check(bad, 5)


def test_group_scores_merge_into_step_metrics():
    nan = float("nan")
    parts = [{"rewards": [1.0, nan], "failed": [False, True], "components": {"a": [1.0, nan], "b": [0.5, 0.5]},
              "failed_by_fn": {"a": [False, True], "b": [False, False]}, "error_example": "x failed",
              "metrics": {"reward/timeouts": 1.0, "reward/latency_ms": 3.0}},
             {"rewards": [0.0, 0.0], "failed": [False, False], "components": {"a": [0.0, 0.0], "b": [1.0, 0.0]},
              "failed_by_fn": {"a": [False, False], "b": [False, False]}, "error_example": None,
              "metrics": {"reward/timeouts": 0.0, "reward/latency_ms": 2.0}}]
    m = merge_reward_metrics(parts, ["a", "b"], [1.0, 1.0])
    assert m["reward/a_mean"] == pytest.approx(1 / 3) and m["reward/a/failed_frac"] == 0.25
    assert m["reward/b_mean"] == 0.5 and m["reward/failed_frac"] == 0.25
    assert m["reward/timeouts"] == 1.0 and m["reward/latency_ms"] == 5.0 and m["reward/example"] == "x failed"


def test_rendezvous_port_is_below_the_ephemeral_range_and_free():
    import socket

    from rl.ports import ephemeral_range, rendezvous_port

    lo, hi = ephemeral_range()
    assert 1024 < lo < hi
    for _ in range(5):
        port = rendezvous_port()
        assert 20000 <= port < lo
        with socket.socket() as s:
            s.bind(("", port))                  # free when returned


def test_wait_ready_raises_a_failure_without_waiting_for_the_rest(ray_local):
    """A worker that failed while its peers still wait (a rank that died before the rendezvous) is reported at
    once, not when the others give up (their rendezvous timeout is 30 minutes)."""
    import ray

    from rl.grpo.placement import wait_ready

    @ray.remote(num_cpus=0)
    def fails():
        raise RuntimeError("rank 0 could not listen: EADDRINUSE")

    @ray.remote(num_cpus=0)
    def waits():
        time.sleep(60)

    slow = waits.remote()
    t0 = time.monotonic()
    with pytest.raises(Exception, match="EADDRINUSE"):
        wait_ready([fails.remote(), slow], ["rank 0", "rank 1"], 120, "starting workers", log=lambda *a, **k: None)
    assert time.monotonic() - t0 < 5
    ray.cancel(slow, force=True)
    reports = []                                    # and answers that all succeed come back, reported meanwhile
    ok = ray.remote(num_cpus=0)(lambda x: (time.sleep(x), x)[1])
    assert wait_ready([ok.remote(0.0), ok.remote(1.5)], ["a", "b"], 60, "starting", report_every_s=0.5,
                      log=lambda msg, **k: reports.append(msg)) == [0.0, 1.5]
    assert reports and all("waiting for ['b']" in r for r in reports)


def test_a_worker_whose_constructor_raised_is_reported_by_its_error_without_resume_advice(ray_local):
    """A worker whose __init__ raised (a full sync.dir, a model it cannot load) stops the run with that error's
    type and message in one line, not "died ... rerun with checkpoint.resume=auto" (a resume cannot mend it); a
    worker killed while running keeps the resume advice."""
    from types import SimpleNamespace

    import ray

    from rl.grpo.driver import GRPODriver, WorkerDied, _init_error
    from rl.grpo.sync.transport import SyncError

    @ray.remote(num_cpus=0)
    class Broken:
        def __init__(self):
            raise SyncError("weight sync: sync.dir=/dev/shm has no room for bucket 0 (512 MB; 64 MB free of 64 MB)")

        def ready(self):
            return True

    @ray.remote(num_cpus=0)
    class Alive:
        def ready(self):
            return True

    broken, alive = Broken.remote(), Alive.remote()
    ray.get(alive.ready.remote())
    ray.kill(alive)
    errors = []
    for actor in (broken, alive):
        try:
            ray.get(actor.ready.remote(), timeout=60)
        except Exception as e:
            errors.append(e)
    assert _init_error(errors[0]) == ("SyncError: weight sync: sync.dir=/dev/shm has no room for bucket 0 (512 MB; "
                                      "64 MB free of 64 MB)")
    assert _init_error(errors[1]) is None
    fake = SimpleNamespace(last_ckpt=None, step=0, _actor_names=lambda: {
        broken._actor_id.hex(): ("trainer worker 0 (TrainerWorker)", "trainer", 0),
        alive._actor_id.hex(): ("rollout worker 0 (RolloutWorker)", "rollout", 0)})
    with pytest.raises(WorkerDied, match=r"^trainer worker 0 \(TrainerWorker\) failed to start at step 1: SyncError: "
                                         r"weight sync: sync.dir=/dev/shm has no room.*\(its traceback is above\)$"):
        GRPODriver._raise_worker_error(fake, errors[0], "start-up")
    with pytest.raises(WorkerDied, match=r"^rollout worker 0 \(RolloutWorker\) died during start-up at step 1\. "
                                         r"Stopping; no checkpoint was written yet; rerun with checkpoint.resume=auto"):
        GRPODriver._raise_worker_error(fake, errors[1], "start-up")
