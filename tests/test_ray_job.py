"""`ray start --head` + `ray job submit ... launch/grpo.py` prints the metric names to the job log (slow)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def test_ray_job_submit_prints_metric_names(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus", "6", "--disable-usage-stats"], env=env,
                   check=True, capture_output=True)
    try:
        out = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "launch/grpo.py", "--config",
             "configs/tiny_grpo.yaml", "trainer.max_steps=2", "log.progress=false", f"log.output_dir={tmp_path}"],
            env=env, capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    names = next(line for line in out.stdout.splitlines() if line.startswith("metrics: "))
    for name in ["rollout/reward_mean", "rollout/response_length_mean", "actor/pg_loss", "actor/kl",
                 "actor/entropy", "actor/clipfrac", "actor/grad_norm", "perf/rollout_s", "perf/train_s",
                 "perf/sync_s", "perf/tokens_per_s"]:
        assert name in names
    assert "step 2 " in out.stdout
