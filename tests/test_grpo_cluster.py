"""GRPO on a two-node Ray cluster simulated on this machine (ray.cluster_utils.Cluster), and the fail-fast
resource check against a cluster that is too small."""
import json
import time

import pytest

from rl.config import load_config
from rl.grpo.config import GRPOConfig
from rl.grpo.driver import GRPODriver, latest_checkpoint
from rl.grpo.placement import InsufficientResources


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_two_node_cluster_trains_syncs_checkpoints_and_resumes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        overrides = ["resources.ray_address=auto", "resources.placement_strategy=SPREAD", "resources.trainer_cpus=1",
                     "sync.checksum_every=1", "checkpoint.every=2", f"log.output_dir={tmp_path}",
                     "log.progress=false", "trainer.max_steps=2"]
        d = GRPODriver(load_config(GRPOConfig, "configs/tiny_grpo.yaml", overrides))
        d.run()
        nodes = d.placement_info["trainer_nodes"]
        assert len(set(nodes)) == 2, d.placement_info          # the two trainer ranks run on different nodes
        assert d.placement_info["master_addr"] == ray.util.get_node_ip_address()
        assert latest_checkpoint(tmp_path / "checkpoints").name == "step_000002"
        d2 = GRPODriver(load_config(GRPOConfig, "configs/tiny_grpo.yaml", overrides[:-1] + ["trainer.max_steps=3"]))
        d2.run()
        rows = _rows(tmp_path)
        assert [r["step"] for r in rows] == [1, 2, 3] and all(r["sync/checksum_ok"] == 1.0 for r in rows)
        assert [r["data/cursor"] for r in rows] == [8.0, 16.0, 24.0]
        assert ray.is_initialized()   # the driver joined the cluster: it leaves it running
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_run_that_cannot_fit_fails_at_once_naming_the_shortfall(tmp_path):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["resources.ray_address=auto", "resources.trainer_cpus=1",
                                                                 f"log.output_dir={tmp_path}"])
        t0 = time.monotonic()
        with pytest.raises(InsufficientResources, match=r"needs 3 CPU \(2 trainer workers x 1 \+ 1 rollout workers "
                                                         r"x 1\), the cluster has 2"):
            GRPODriver(cfg).run()
        assert time.monotonic() - t0 < 60
    finally:
        ray.shutdown()
