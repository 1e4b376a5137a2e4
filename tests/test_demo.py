"""`make demo` end to end (slow: about 8 minutes on 2 CPU cores in a fast phase; its time is reported in docs/demo.md, not asserted): the miniature R1 pipeline learns.

This is issue 7's acceptance check and the product's integration test: tiny Qwen2 -> cold-start SFT -> GRPO on
Ray -> distillation into a smaller Llama student -> held-out evaluation, with the numbers read from the run.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_meets_its_targets(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "launch/pipeline.py", "--config", "configs/demo.yaml", "--fresh",
                           f"output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["grpo"]["accuracy"] - s["sft"]["accuracy"] >= 0.15, s          # GRPO learned
    assert s["distill"]["accuracy"] >= 0.8 * s["grpo"]["accuracy"], s        # the student kept >= 80%
    r1z = s["r1zero"]                                                     # R1-Zero: no SFT, rewards only
    assert r1z["accuracy"] - r1z["base_accuracy"] >= 0.30 and r1z["format_rate"] >= 0.9, r1z
    assert r1z["base_format_rate"] < 0.2 and (out / "r1zero" / "r1zero_curves.png").stat().st_size > 0
    assert (out / "curves.png").stat().st_size > 0 and (out / "grpo" / "metrics.jsonl").exists()
    assert list((out / "grpo" / "tensorboard").glob("events.*"))
    ds = json.loads((out / "distill" / "dataset_summary.json").read_text())
    assert 0 < ds["acceptance_rate"] <= 1 and ds["kept"] == s["distill_dataset"]["kept"]
    row = json.loads((out / "distill" / "dataset.jsonl").read_text().splitlines()[0])
    assert row["provenance"]["teacher"].endswith("grpo/final") and row["provenance"]["rewards"]["accuracy"] == 1.0
    student = json.loads((out / "distill" / "student" / "final" / "config.json").read_text())
    assert student["model_type"] == "llama" and student["hidden_size"] < 128   # a smaller Llama student
    assert "summary at" in proc.stdout and "distill" in proc.stdout
