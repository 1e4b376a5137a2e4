"""Threads during a weight sync (rl.grpo.sync.threads): the share, where it applies, and that the trainer's push
and the engine's load run with it and restore their thread counts."""
import threading
from types import SimpleNamespace

import pytest
import torch

from rl.config import ConfigError, load_config
from rl.grpo.config import GRPOConfig
from rl.grpo.sync.threads import participants, share, sync_threads, torch_threads


@pytest.fixture
def two_threads():
    """At least two torch threads for the test (restored after), so that a share of one is a change."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def test_share_and_setting():
    assert share(2, cores=2) == 1 and share(3, cores=2) == 1 and share(2, cores=16) == 8 and share(1, cores=6) == 6
    assert share(0, cores=4) == 4                       # no participants counted: the whole node
    assert sync_threads(3, 5) == 3 and sync_threads(3, 0) == 3   # an explicit count, wherever the run is
    assert sync_threads(-1, 5) == 0                     # -1: leave the counts alone
    assert sync_threads(0, 0) == 0                      # auto, not a one-node CPU transfer: unchanged
    assert sync_threads(0, 2) == share(2)


def test_participants_count_the_processes_of_a_transfer_per_node():
    nodes_t, nodes_r = ["a", "a"], ["a", "b", "a"]
    on_t, on_r = participants(True, nodes_t, nodes_r, [0, 1, 2])
    assert on_t == [4, 4] and on_r == {0: 4, 1: 1, 2: 4}
    on_t, on_r = participants(True, nodes_t, nodes_r, [1])     # a replacement engine loaded alone
    assert on_t == [2, 2] and on_r == {1: 1}
    assert participants(False, nodes_t, nodes_r, [0, 2]) == ([0, 0], {0: 0, 2: 0})   # GPUs: never touched


def test_torch_threads_restores_the_count_also_on_errors_and_past_a_no_op_set_num_threads(two_threads, monkeypatch):
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == two_threads
    with torch_threads(0) as n, torch_threads(two_threads + 4) as m:   # 0 / more than now: unchanged
        assert n == m == two_threads == torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)       # vLLM's CPU worker does this
    with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == two_threads


def test_config_refuses_a_negative_thread_count_below_minus_one():
    with pytest.raises(ConfigError, match="sync.threads"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["sync.threads=-2"])
    assert load_config(GRPOConfig, "configs/tiny_grpo.yaml", []).sync.threads == 0


def test_the_trainers_push_runs_with_its_share_and_restores_its_threads(two_threads):
    """TrainerWorker.push_weights around the streaming (`_push_weights`): sync.threads=0 with two processes
    sharing this node's cores -> the share; sync.threads=-1 -> untouched."""
    from rl.grpo.trainer_worker import TrainerWorker

    seen = []
    fake = SimpleNamespace(checkin=None, _push_weights=lambda *a: seen.append(torch.get_num_threads()) or {"ok": 1})
    for setting, sharing in ((0, 2 * two_threads), (-1, 2 * two_threads), (0, 0), (1, 0)):
        fake.cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [f"sync.threads={setting}"])
        assert TrainerWorker.push_weights(fake, 1, 1.0, False, sharing=sharing) == {"ok": 1}
        assert torch.get_num_threads() == two_threads
    assert seen == [min(two_threads, share(2 * two_threads)), two_threads, two_threads, 1]   # never raised


def test_the_engines_load_runs_with_the_threads_it_is_given(two_threads, tmp_path):
    """RolloutWorker.load_weights passes its share to the engine's `r1lab_load_stream`, which reloads what the
    transport streams with that many threads and restores the count."""
    from rl.grpo.rollout_worker import RolloutWorker
    from rl.grpo.sync.transport import FileTransport
    from rl.rollout.worker_ext import R1WorkerExtension

    calls = []
    fake = SimpleNamespace(cfg=load_config(GRPOConfig, "configs/tiny_grpo.yaml", []),
                           llm=SimpleNamespace(collective_rpc=lambda m, args: calls.append((m, args)) or [None],
                                               reset_prefix_cache=lambda: None))
    RolloutWorker.load_weights(fake, {"kind": "file"}, 3, 0, False, sharing=2 * two_threads)
    assert calls == [("r1lab_load_stream", ({"kind": "file"}, 3, 0, False, share(2 * two_threads)))]

    writer = FileTransport(str(tmp_path), "t", readers=1, timeout_s=30)
    writer.open_writer()
    weights = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.weight": torch.ones(4)}
    sender = threading.Thread(target=lambda: (writer.send(1, 0, weights), writer.finish(1, 1)))
    sender.start()
    loaded = []

    def reload(tensors, checksum, verify=None):
        loaded.append((torch.get_num_threads(), {n: t.clone() for n, t in tensors}))

    engine = SimpleNamespace(_r1lab_reload=reload)
    assert R1WorkerExtension.r1lab_load_stream(engine, writer.spec(), 1, 0, False, 1) is None
    sender.join(timeout=30)
    assert torch.get_num_threads() == two_threads and not sender.is_alive()
    assert loaded[0][0] == 1 and set(loaded[0][1]) == set(weights)
    assert all(torch.equal(loaded[0][1][n], t) for n, t in weights.items())
    writer.close()


def test_a_reloaded_engine_keeps_its_whole_heap(monkeypatch):
    """make_llm(keep_heap=True) (rollout.keep_heap, GRPO's rollout workers' default) asks the engine's worker for the reload policy: mmap
    threshold 2 GiB - 1 and no trimming, where other engines get the step-buffer threshold."""
    from rl import heap
    from rl.rollout.worker_ext import R1WorkerExtension

    asked = []
    monkeypatch.setattr(heap, "keep_step_buffers", lambda t, trim=None: asked.append((t, trim)) or "applied")
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=64),
                          model_config=SimpleNamespace(get_vocab_size=lambda: 1000))
    engine = SimpleNamespace(vllm_config=cfg)
    assert R1WorkerExtension.r1lab_keep_step_buffers(engine, True) == "applied"
    assert R1WorkerExtension.r1lab_keep_step_buffers(engine) == "applied"
    assert asked == [(heap.MAX_THRESHOLD, heap.NEVER_TRIM), (heap.threshold_bytes(64, 1000), None)]


def test_the_driver_gives_each_process_of_a_transfer_its_nodes_count(monkeypatch):
    """GRPODriver.transfer_weights: every trainer rank's push and every reading engine's load is told how many
    of the transfer's processes share its node (two trainer ranks and engine 0 on node a, engine 1 on node b)."""
    import rl.grpo.driver as drv

    pushes, loads = [], []

    def actor(record, result):
        return SimpleNamespace(**{("push_weights" if record is pushes else "load_weights"): SimpleNamespace(
            remote=lambda *a: record.append(a) or result)})

    sent = {"buckets": 1, "bytes": 8, "gather_s": 0.0, "send_s": 0.0, "finish_s": 0.0, "sums": None}
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [])
    d = SimpleNamespace(cfg=cfg, transfers=0, sync_writers=1, sync_spec=lambda: {"kind": "shm"},
                        placement_info={"trainer_nodes": ["a", "a"], "rollout_nodes": ["a", "b"]},
                        trainers=[actor(pushes, sent), actor(pushes, None)],
                        rollouts=[actor(loads, "ref0"), actor(loads, "ref1")], _get=lambda refs, t, what: refs)
    monkeypatch.setattr(drv, "gather_loads", lambda d_, load, t: ({j: {"seconds": 0.1} for j in load}, {}))
    drv.GRPODriver.transfer_weights(d, False)
    assert [a[-1] for a in pushes] == [3, 3] and [a[-1] for a in loads] == [3, 1]
    pushes.clear(), loads.clear()
    drv.GRPODriver.transfer_weights(d, False, readers=[1])          # a replacement engine, loaded alone
    assert [a[-1] for a in pushes] == [2, 2] and [a[-1] for a in loads] == [1]   # alone on node b
    cfg.resources.trainer_gpus = 1
    pushes.clear(), loads.clear()
    drv.GRPODriver.transfer_weights(d, False)                       # GPU trainers: nothing shared
    assert [a[-1] for a in pushes] == [0, 0] and [a[-1] for a in loads] == [0, 0]


@pytest.mark.parametrize("keep", [True, False])
def test_rollout_keep_heap_reaches_the_engine(keep, monkeypatch):
    """rollout.keep_heap is what GRPO's rollout worker asks make_llm for (keep_heap=...), which passes it to the
    engine's worker (`r1lab_keep_step_buffers(whole)`, above)."""
    import rl.rollout.vllm_engine as vllm_engine
    from rl.grpo.rollout_worker import RolloutWorker

    asked = {}

    def fake_make_llm(path, **kw):
        asked.update(kw)
        return SimpleNamespace()

    monkeypatch.setattr(vllm_engine, "make_llm", fake_make_llm)
    monkeypatch.setattr("rl.grpo.rollout_worker.set_engine_threads", lambda n: None)
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [f"rollout.keep_heap={str(keep).lower()}"])
    RolloutWorker("unused-path", cfg, seed=0)
    assert asked["keep_heap"] is keep and asked["in_process"] is True
