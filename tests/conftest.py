"""Shared fixtures: tiny artifacts built once per machine (cached), one vLLM engine per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("R1LAB_CACHE_DIR", str(REPO / ".cache" / "r1lab"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED_DATA = REPO.parent / "shared" / "data"


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

    llm = make_llm(str(tiny.qwen2), max_model_len=1024)
    yield llm
    shutdown(llm)
