"""Collectives that cannot hang forever: a stalled trainer rank is named within the timeout."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.grpo.collective_watch import CheckIn, CollectiveTimeout, collective, is_collective_failure

REPO = Path(__file__).resolve().parents[1]
GLOO_TIMEOUT = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation")


class FakeStore:
    """The part of a c10d store the check-ins use; `down` makes every call fail like a dead store host."""

    def __init__(self):
        self.data, self.down = {}, False

    def set(self, key, value):
        if self.down:
            raise RuntimeError("Broken pipe")
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        if self.down:
            raise RuntimeError("Broken pipe")
        return self.data[key]

    def check(self, keys):
        if self.down:
            raise RuntimeError("Broken pipe")
        return all(k in self.data for k in keys)


def _group(world, store=None, grace=0.3):
    store = store or FakeStore()
    return store, [CheckIn(store, r, world, timeout_s=3, grace=grace) for r in range(world)]


def test_a_rank_that_never_reached_the_collective_is_named_at_once():
    _, (r0, r1, r2) = _group(3, grace=5.0)
    for c in (r0, r1, r2):
        c.mark("update")
    r2.mark("update micro-batch 0")
    r2._write("failed")                                     # rank 2 reached the collective and timed out too
    assert is_collective_failure(GLOO_TIMEOUT)              # (imports torch.distributed before the clock starts)
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout) as e, r0.section("update micro-batch 0"):   # rank 1 never gets here
        raise GLOO_TIMEOUT
    assert time.monotonic() - t0 < 1.0                      # nobody to wait for: no grace spent
    assert e.value.stalled == [1] and e.value.rank == 0 and e.value.point == "update micro-batch 0"
    assert "trainer rank(s) [1] did not arrive (rank 1 last seen at 'update'" in str(e.value)
    assert "collective_timeout_s=3" in str(e.value) and "Timed out waiting 3000ms" in str(e.value)


def test_a_rank_stalled_inside_the_stretch_is_named_after_the_grace_and_learns_it_was_late():
    _, (r0, r1, r2) = _group(3, grace=2.0)
    for c in (r0, r1, r2):
        c.mark("update micro-batch 1")                      # all checked in; rank 1 then stalls in its forward
    r2._write("failed")                                     # rank 2 waited in the collective and gave up too
    t0 = time.monotonic()
    err = r0.diagnose(GLOO_TIMEOUT)
    waited = time.monotonic() - t0
    assert err.stalled == [1] and 2.0 <= waited < 3.0       # rank 1 might have been waiting too: the grace
    assert "trainer rank(s) [1] did not arrive (rank 1 last seen at 'update micro-batch 1'" in str(err)
    late = r1.diagnose(RuntimeError("Connection closed by peer [127.0.0.1]:2345"))   # rank 1 arrives at last
    assert late.stalled == [] and "every rank reached it; rank(s) [0, 2] gave up waiting first" in str(late)


def test_only_collective_failures_are_converted_and_a_dead_store_still_gives_an_error():
    store, (r0, _) = _group(2)
    assert is_collective_failure(GLOO_TIMEOUT) and not is_collective_failure(ValueError("bad batch"))

    class Worker:
        checkin = r0

        @collective("update")
        def update(self, exc):
            raise exc
    with pytest.raises(ValueError, match="bad batch"):      # a bug is not a timeout
        Worker().update(ValueError("bad batch"))
    with pytest.raises(CollectiveTimeout, match="could not read the other ranks' check-ins") as e, \
            r0.section("update"):
        store.down = True                                   # rank 0's process (the store's host) died
        raise GLOO_TIMEOUT
    assert e.value.stalled == []
    with pytest.raises(CollectiveTimeout, match="cannot check in at 'update micro-batch 0': the process group's store"):
        r0.mark("update micro-batch 0")



def test_a_store_that_never_answers_names_rank_0_instead_of_hanging():
    """Trainer rank 0's process hosts the store: when rank 0 is the one that stalled (SIGSTOP, a hung kernel), a
    store read can block forever; the diagnosis gives up after the grace plus store_wait_s (bench/chaos.py)."""
    import threading

    store, (_, r1) = _group(2, grace=0.2)
    r1.store_wait_s = 0.5
    r1.mark("update")
    store.check = lambda keys: threading.Event().wait()   # never answers
    t0 = time.monotonic()
    err = r1.diagnose(GLOO_TIMEOUT)
    assert time.monotonic() - t0 < 2.0
    assert err.stalled == [0] and "did not answer within 0.7 s, so rank 0 is the one that stalled" in str(err)


CHILD = r"""
import json, os, sys, time
sys.path[:0] = [sys.argv[4], sys.argv[5]]
from rl.config import load_config
from rl.grpo.collective_watch import CollectiveTimeout
from rl.grpo.config import GRPOConfig
from rl.grpo.trainer_worker import TrainerWorker
rank, port, model, sync = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[6]
TIMEOUT_S = float(sys.argv[7])
cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["trainer.threads=1",
                                                         f"trainer.collective_timeout_s={TIMEOUT_S}",
                                                         "sync.timeout_s=5"])
open(os.path.join(sync, f"ready{rank}"), "w").close()   # imports done: start together (the timeout also
while not os.path.exists(os.path.join(sync, "go")):      # bounds the rendezvous and the start-up collectives)
    time.sleep(0.05)
if rank == 1:   # stalls in its first training forward, after checking in at micro-batch 0
    score = TrainerWorker._score
    def stalled(self, model, batch, idx, with_entropy=False, **kw):
        if kw.get("phase") == "update":
            time.sleep(120)
        return score(self, model, batch, idx, with_entropy, **kw)
    TrainerWorker._score = stalled
w = TrainerWorker(rank, 2, "127.0.0.1", port, cfg, model)
from test_trainer_worker import _batch
batch = _batch(w)
t0 = time.monotonic()
try:
    w.update(batch)
    out = {"ok": True}
except CollectiveTimeout as e:
    out = {"message": str(e), "stalled": e.stalled, "rank": e.rank, "point": e.point}
out["seconds"] = time.monotonic() - t0
print("RESULT " + json.dumps(out), flush=True)
"""


STALL_TIMEOUT_S = 15.0


def test_a_stalled_trainer_rank_is_named_within_the_timeout(tiny, tmp_path):
    """Two gloo trainer workers (no Ray), trainer.collective_timeout_s=15: rank 1 stalls inside its update; rank 0
    raises CollectiveTimeout naming rank 1 after the timeout plus the grace (1.5 s), not after gloo's 30 minutes.
    (15 s, not less: on a loaded CI machine the healthy collectives before the stall took over 4 s.)"""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(port), str(tiny.qwen2), str(REPO), str(REPO / "tests"), str(tmp_path), str(STALL_TIMEOUT_S)]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(r), *args], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "go").touch()
        out, _ = procs[0].communicate(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert lines, out[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res.get("stalled") == [1] and res["rank"] == 0 and res["point"] == "update micro-batch 0", res
    assert "trainer rank(s) [1] did not arrive (rank 1 last seen at 'update micro-batch 0'" in res["message"]
    assert f"collective_timeout_s={STALL_TIMEOUT_S:g}" in res["message"]
    assert STALL_TIMEOUT_S <= res["seconds"] < STALL_TIMEOUT_S + 1.0 + 10.0, res["seconds"]


def test_the_driver_stops_with_the_stalled_rank_and_the_last_intact_checkpoint(tmp_path):
    """What the driver makes of a trainer's CollectiveTimeout as Ray delivers it (no Ray started)."""
    import pickle

    from ray.exceptions import RayTaskError

    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver, TrainerStalled, WorkerDied

    d = GRPODriver(load_config(GRPOConfig, "configs/tiny_grpo.yaml", [f"log.output_dir={tmp_path}"]))
    d.step, d.last_ckpt = 6, tmp_path / "checkpoints" / "step_000006"
    cause = CollectiveTimeout("trainer rank 0: a collective at 'update micro-batch 0' failed (...): trainer "
                              "rank(s) [1] did not arrive", rank=0, stalled=[1], point="update micro-batch 0")
    cause = pickle.loads(pickle.dumps(cause))   # as Ray carries it from the trainer (the chaos bench found this)
    with pytest.raises(TrainerStalled) as e:
        d._raise_worker_error(RayTaskError("TrainerWorker.update", "Traceback ...", cause).as_instanceof_cause(),
                              "update")
    assert isinstance(e.value, WorkerDied) and e.value.stalled == [1]
    assert str(e.value).startswith("update at step 7: trainer rank 0: a collective at 'update micro-batch 0'")
    assert f"the last intact checkpoint is {d.last_ckpt}; rerun with checkpoint.resume=auto" in str(e.value)
