"""The fail-fast resource check against a cluster that is too small. (GRPO on a simulated two-node cluster runs
in tests/test_recovery.py, with its faults.)"""
import time

import pytest

from rl.config import load_config
from rl.grpo.config import GRPOConfig
from rl.grpo.driver import GRPODriver
from rl.grpo.placement import InsufficientResources


def test_a_run_that_cannot_fit_fails_at_once_naming_the_shortfall(tmp_path):
    import ray

    ray.shutdown()   # the session's shared instance (conftest.ray_local), if one runs: this test needs its own
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
