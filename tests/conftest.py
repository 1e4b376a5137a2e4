"""Shared fixtures: tiny artifacts built once per machine (cached), one vLLM engine per test session."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("R1LAB_CACHE_DIR", str(REPO / ".cache" / "r1lab"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_sessionfinish(session, exitstatus):
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():   # the shared instance of `ray_local`
        sys.modules["ray"].shutdown()


@pytest.fixture
def ray_local():
    """A local Ray instance shared by the tests that run the GRPO driver in this process: the driver joins an
    initialised Ray and leaves it running, which saves ~9 s of start and shutdown per run. Tests that need a Ray
    of another shape (logical GPUs, a simulated cluster) shut it down first; the next user starts it again."""
    import ray

    from rl.grpo.driver import ray_runtime_env

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env=ray_runtime_env(), log_to_driver=True)


@contextmanager
def build_lock(path: Path):
    """An exclusive lock beside a cached build, so that two test runs at once (make test beside make
    test-slow) build it once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached_sft(out: Path, config: str | None, overrides: list[str]) -> Path:
    """An SFT run into `out` (under the cache), done once per cache; returns its export."""
    with build_lock(out):
        if not (out / "summary.json").exists():
            from rl.config import load_config
            from rl.sft.config import SFTStageConfig
            from rl.sft.train import run_sft

            run_sft(load_config(SFTStageConfig, config, overrides + [f"output_dir={out}", "train.resume=never"]))
    return out / "final"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark files beside the checkout (../shared/data), as CI has them."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny():
    from rl.tiny import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def vllm_engine(tiny):
    """The session's only vLLM engine (~20 s to start on CPU), serving the tiny Qwen2 architecture.

    Tests that need other weights of the same shape load them with `reload_weights` first, as GRPO does.
    """
    from rl.rollout.vllm_engine import make_llm, shutdown

    llm = make_llm(str(tiny.qwen2), max_model_len=1024, enforce_eager=True, kv_cache_gb=0.25)
    yield llm
    shutdown(llm)


SFT_OVERRIDES = ["model.path=tiny:qwen2", "data.source=synthetic:chain_sum", "data.num_train=700",
                 "data.task_knobs={min_terms: 2, max_terms: 2, min_value: 1, max_value: 30}",
                 "train.max_steps=300", "train.batch_size=32", "train.lr=0.003", "train.lr_schedule=cosine",
                 "train.warmup_ratio=0.05", "train.logging_steps=20"]


@pytest.fixture(scope="session")
def tiny_sft(tiny):
    """A tiny Qwen2 after cold-start SFT on chain sums (built once per cache, ~15 s): (final dir, summary)."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(SFT_OVERRIDES).encode() + tiny.qwen2.name.encode()).hexdigest()[:12]
    final = cached_sft(Path(os.environ["R1LAB_CACHE_DIR"]) / "sft" / key, None, SFT_OVERRIDES)
    return final, json.loads((final.parent / "summary.json").read_text())


@pytest.fixture(scope="session")
def heldout_file():
    return write_heldout


def heap_fault_probe(code: str, modes: tuple[str, ...]) -> dict[str, list[str]]:
    """Run `code` (a heap test's page-fault probe: it prints its heap verdict and fault counts, one per line) in a
    fresh process per mode (`sys.argv[1]`), with glibc's tunables cleared. Skips where its fault counts mean
    nothing (transparent huge pages always on: far fewer faults than one per 4 KiB page in any mode) or where
    another allocator is loaded (the "keep" mode's verdict)."""
    import subprocess
    import sys

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: far fewer faults than one per 4 KiB page in any mode")
    out = {}
    for mode in modes:
        run = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "GLIBC_TUNABLES": ""})
        assert run.returncode == 0, run.stderr
        out[mode] = run.stdout.splitlines()   # a verdict may hold spaces
    if out["keep"][0].startswith("skipped: lib"):
        pytest.skip(f"another allocator is loaded: {out['keep']}")
    return out


def write_heldout(path: Path, n: int = 128, **knobs) -> str:
    """Held-out chain-sum problems as a JSONL benchmark file."""
    from data.tasks import make_task, write_problems_jsonl

    knobs = knobs or {"min_terms": 2, "max_terms": 2, "min_value": 1, "max_value": 30}
    return write_problems_jsonl(make_task("chain_sum", n, split="test", seed=0, **knobs), path)


@pytest.fixture(scope="session")
def weak_sft(tiny):
    """A tiny Qwen2 after a *short* cold start (30 SFT steps): it half-follows the R1 format, so GRPO has
    something to learn within a few dozen steps on CPU."""
    return cached_sft(Path(os.environ["R1LAB_CACHE_DIR"]) / "sft" / f"weak-{tiny.qwen2.name}", "configs/tiny_sft.yaml",
                      ["train.max_steps=30", "train.lr_schedule=constant"])
