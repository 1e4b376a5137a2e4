"""One model-path check for every launcher: a bad path is one line on stderr naming the key or flag and the
path, exit code 2, no traceback, in seconds (before Ray, vLLM or TRL start)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# launcher -> (argv before the model path, how the path is passed, the key the error names)
LAUNCHERS = {
    "sft": (["launch/sft.py", "--config", "configs/tiny_sft.yaml"], "model.path={}", "model.path"),
    "grpo": (["launch/grpo.py", "--config", "configs/tiny_grpo.yaml"], "model.path={}", "model.path"),
    "grpo-teacher": (["launch/grpo.py", "--config", "configs/tiny_grpo.yaml", "reward.weights=[0,0]"],
                     "algo.distill_teacher={}", "algo.distill_teacher"),
    "distill": (["launch/distill.py", "--config", "configs/tiny_distill.yaml"], "teacher.path={}", "teacher.path"),
    "distill-student": (["launch/distill.py", "--config", "configs/tiny_distill.yaml", "teacher.path=tiny:qwen2"],
                        "student.overrides=['model.path={}']", "student model.path"),
    "eval": (["launch/eval.py", "--benchmark", "math500", "--output", "OUT/r.json", "--model"], "{}", "--model"),
    "pipeline": (["launch/pipeline.py", "--config", "configs/demo.yaml"], "sft.overrides=['model.path={}']",
                 "sft stage model.path"),
}


def bad_paths(tmp: Path) -> dict[str, tuple[str, str]]:
    """kind -> (path, a phrase its error line must contain)."""
    (tmp / "empty").mkdir(exist_ok=True)
    run = tmp / "run" / "final"           # a run directory instead of its export
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text("{}")
    weightless = tmp / "weightless"
    weightless.mkdir(exist_ok=True)
    (weightless / "config.json").write_text('{"model_type": "qwen2"}')
    return {"missing": (str(tmp / "no-such-model"), "no such model directory"),
            "not-a-model": (str(tmp / "empty"), "not an HF model directory: no config.json"),
            "run-dir": (str(tmp / "run"), f"no config.json (the model is in {run})"),
            "no-weights": (str(weightless), "has no weights"),
            "hub-offline": ("Qwen/Qwen2.5-0.5B", "this machine is offline (HF_HUB_OFFLINE is set)"),
            "bad-tiny": ("tiny:qwen2:hidden=3", "is not key=value of a tiny-model field")}


def run_launcher(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 60):
    env = {**os.environ, **(env_extra or {})}
    t0 = time.time()
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.time() - t0


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return bad_paths(tmp_path_factory.mktemp("paths"))


KINDS = ["missing", "not-a-model", "run-dir", "no-weights", "hub-offline", "bad-tiny"]
# every launcher with every kind; a launcher's second key (GRPO's teacher, the distilled student) with three
CASES = [(la, k) for la in sorted(LAUNCHERS) for k in KINDS
         if not la.endswith(("-teacher", "-student")) or k in ("missing", "not-a-model", "hub-offline")]


@pytest.mark.parametrize(("launcher", "kind"), CASES)
def test_each_launcher_reports_a_bad_model_path_in_one_line(launcher, kind, paths, tmp_path):
    head, how, key = LAUNCHERS[launcher]
    path, phrase = paths[kind]
    args = [a.replace("OUT", str(tmp_path)) for a in head] + [how.format(path)]
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    p, took = run_launcher(args, env)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(("error: ", "input error: ")) and f"{key}={path}: " in lines[0]
    assert phrase in lines[0]
    assert took < 60


def test_unreachable_hub_is_named_offline_within_seconds(tmp_path):
    """No HF_HUB_OFFLINE, a hub that refuses connections: one probe, not a minute of download retries."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    env_clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    t0 = time.time()
    p = subprocess.run([sys.executable, "launch/sft.py", "--config", "configs/tiny_sft.yaml",
                        "model.path=Qwen/Qwen2.5-0.5B"], cwd=REPO, env={**env_clean, **env}, capture_output=True,
                       text=True, timeout=60)
    took = time.time() - t0
    (line,) = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert line.startswith("error: model.path=Qwen/Qwen2.5-0.5B: ")
    assert "the hub (http://127.0.0.1:9) cannot be reached" in line and "pass the local directory" in line
    assert took < 20


def test_probe_gives_up_after_its_timeout():
    """A hub that accepts the connection but never answers: the probe returns after its timeout."""
    from rl.model_path import probe_hub

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{srv.getsockname()[1]}"
    try:
        t0 = time.time()
        status, reason = probe_hub("Qwen/Qwen2.5-0.5B", timeout_s=0.5)
        assert status is None and reason and time.time() - t0 < 3
    finally:
        del os.environ["HF_ENDPOINT"]
        srv.close()


def test_a_cached_hub_model_loads_offline_from_its_snapshot(tiny, tmp_path):
    """A hub id found complete in the local HF cache passes offline, and the check hands back the snapshot."""
    snap = tmp_path / "hub" / "models--me--tiny-r1" / "snapshots" / "0123abc"
    shutil.copytree(tiny.qwen2, snap)
    (tmp_path / "hub" / "models--me--tiny-r1" / "refs").mkdir()
    (tmp_path / "hub" / "models--me--tiny-r1" / "refs" / "main").write_text("0123abc")
    code = "from rl.model_path import check_model_path; print(check_model_path('me/tiny-r1', 'model.path'))"
    p, _ = run_launcher(["-c", code], {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == str(snap)


def test_good_paths_pass_and_resolve(tiny):
    from rl.config import check_model_path

    assert check_model_path(str(tiny.qwen2), "model.path") == str(tiny.qwen2)
    assert check_model_path("tiny:qwen2", "model.path") == str(tiny.qwen2)
