"""The README's Ray commands, verbatim, with token authentication on (slow): `ray start --head` on this machine
(all its CPUs, nothing more), `ray job submit ... launch/grpo.py --config configs/tiny_grpo.yaml
trainer.max_steps=2` succeeds, and a job needing more CPUs than the cluster has fails within 60 s, naming the
shortfall."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[str]:
    block = README.read_text().split("## Running on a Ray cluster", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_ray_commands_work_with_token_auth(tmp_path):
    cmds = _readme_commands()
    assert cmds[1] == "export RAY_AUTH_MODE=token" and cmds[2] == "ray start --head"
    submit = cmds[3]
    assert submit.startswith("ray job submit --working-dir . -- python launch/grpo.py")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["ray", "start", "--head", "--disable-usage-stats"], env=env, check=True, capture_output=True)
    try:
        extra = ["log.progress=false", f"log.output_dir={tmp_path / 'ok'}"]
        ok = subprocess.run(submit.split() + extra, env=env, capture_output=True, text=True, timeout=900)
        t0 = time.monotonic()
        big = subprocess.run(submit.split() + ["resources.trainer_cpus=4", f"log.output_dir={tmp_path / 'big'}"],
                             env=env, capture_output=True, text=True, timeout=300)
        big_s = time.monotonic() - t0
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "step 2 " in ok.stdout and "done: {'final'" in ok.stdout
    assert big.returncode != 0 and big_s < 60, (big_s, big.stdout[-2000:])
    assert re.search(r"error: the run needs 9 CPU \(2 trainer workers x 4 \+ 1 rollout workers x 1\), the cluster "
                     r"has \d+", big.stdout + big.stderr), big.stdout[-3000:]
