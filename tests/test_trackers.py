"""log.report_to: every tracker writes its offline run (under the output dir; trackio in TRACKIO_DIR) with the
run's metric names, the resolved config, the plots as images and the summary; bad names are config errors.

The CI install carries all four trackers (scripts/install.sh installs r1lab[trackers]), so nothing here is
skipped when a package is missing: a missing tracker fails its test."""
from __future__ import annotations

import glob
import json
import os
import sqlite3
import struct
import tempfile
from pathlib import Path

import pytest

# trackio fixes its store when it is first imported: point it at a scratch directory before that
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="r1lab-trackio-"))

from rl.config import ConfigError, load_config  # noqa: E402
from rl.tracking import Trackers  # noqa: E402

METRICS = ["rollout/reward_mean", "actor/pg_loss", "val/heldout/pass@1"]
CONFIG = {"model": {"path": "tiny:qwen2", "dtype": "float32"}, "trainer": {"lr": 1e-5, "max_steps": 3}}


def fake_run(out: Path, names: list[str], project: str = "r1lab-test") -> dict:
    """Three steps of metrics, a plot and a summary, as a GRPO run logs them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = out / "timing.png"
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.bar([1, 2, 3], [1.0, 2.0, 1.5])
    fig.savefig(png)
    plt.close(fig)
    t = Trackers(names, out, CONFIG, project=project, run_name="unit")
    try:
        for step in (1, 2, 3):
            t.log(step, {"rollout/reward_mean": 0.1 * step, "actor/pg_loss": -0.01 * step,
                         "val/heldout/pass@1": 0.5 + 0.1 * step, "note": "strings are not metrics"})
        t.images({"plots/timing": png})
        t.summary({"final": str(out / "final"), "steps": 3})
        assert set(t.active) == set(names), f"a tracker failed during the run and was left out: {names}"
    finally:
        t.close()
    return {"png": png}


def test_report_to_names_are_validated_with_one_line_errors(monkeypatch):
    from rl.grpo.config import GRPOConfig
    from rl.sft.config import SFTStageConfig

    with pytest.raises(ConfigError, match=r"log\.report_to: 'neptune' is not a tracker; allowed: \['tensorboard'"):
        load_config(GRPOConfig, None, ["log.report_to=[neptune]"])
    with pytest.raises(ConfigError, match=r"log\.report_to: .* names a tracker twice"):
        load_config(SFTStageConfig, None, ["log.report_to=[wandb, wandb]"])
    with pytest.raises(ConfigError, match=r"unknown key 'log\.tensorboard'.*log\.report_to=\[\]"):
        load_config(GRPOConfig, None, ["log.tensorboard=false"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "swanlab" else real(name, *a))
    from rl.distill.config import DistillConfig

    with pytest.raises(ConfigError, match=r"log\.report_to: swanlab is not installed: pip install "
                                          r"'r1lab\[trackers\]' \(all trackers\) or pip install swanlab"):
        load_config(DistillConfig, None, ["teacher.path=x", "log.report_to=[tensorboard, swanlab]"])


def test_tensorboard_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fake_run(tmp_path, ["tensorboard"])
    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    assert set(METRICS) <= set(tags["scalars"])
    assert [e.value for e in ea.Scalars("val/heldout/pass@1")] == pytest.approx([0.6, 0.7, 0.8])
    assert "plots/timing" in tags["images"]
    assert {"config/text_summary", "summary/text_summary"} <= set(tags["tensors"])


def _wandb_records(path: str):
    """Records of a W&B transaction log (.wandb: LevelDB-log framing of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = Path(path).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    fake_run(tmp_path, ["wandb"])
    (log,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, summary, config, kinds = [], {}, {}, []
    for rec in _wandb_records(log):
        kind = rec.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in rec.summary.update if i.key})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    steps = {h["_step"]: h for h in history}
    internal = Path(log).parent / "logs" / "debug-internal.log"
    why = f"records {kinds}; wandb-core said: {internal.read_text()[-3000:] if internal.exists() else '-'}"
    assert sorted(steps) == [1, 2, 3] and all(set(METRICS) <= set(h) for h in steps.values()), why
    assert steps[3]["val/heldout/pass@1"] == pytest.approx(0.8)
    assert steps[3]["plots/timing/_type"] == "image-file"
    assert summary["steps"] == 3 and summary["final"].endswith("final")
    assert config["model"] == {"path": "tiny:qwen2", "dtype": "float32"}


def test_mlflow_file_store_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake_run(tmp_path, ["mlflow"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("r1lab-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "unit" and run.info.status == "FINISHED"
    names = {"rollout/reward_mean", "actor/pg_loss", "val/heldout/pass_at_1"}  # MLflow refuses '@'
    assert names <= set(run.data.metrics)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/heldout/pass_at_1")] == \
        pytest.approx([0.6, 0.7, 0.8])
    assert run.data.params["trainer.lr"] == "1e-05" and run.data.tags["summary.steps"] == "3"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"config.json", "summary.json", "plots/timing.png"} <= arts


def test_trackio_local_run(tmp_path):
    import trackio.utils

    fake_run(tmp_path, ["trackio"], project="r1lab-test")
    db = Path(trackio.utils.TRACKIO_DIR) / "r1lab-test.db"
    with sqlite3.connect(db) as con:
        rows = [(s, json.loads(m)) for s, m in con.execute(
            "select step, metrics from metrics where run_name = 'unit' order by id")]
        (config,) = [json.loads(c) for (c,) in con.execute("select config from configs where run_name = 'unit'")]
    scalars = {s: m for s, m in rows if "rollout/reward_mean" in m}
    assert sorted(scalars) == [1, 2, 3] and all(set(METRICS) <= set(m) for m in scalars.values())
    assert any(m.get("plots/timing", {}).get("_type") == "trackio.image" for _, m in rows)
    assert any("| steps | 3 |" in m.get("summary", {}).get("_value", "") for _, m in rows)
    assert config["model"]["path"] == "tiny:qwen2"


def test_swanlab_offline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    fake_run(tmp_path, ["swanlab"])
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (log,) = glob.glob(str(tmp_path / "swanlog" / "run-*" / "run-*.swanlab"))
    reader = DataStoreReader()
    reader.open(log)
    scalars, media = {}, {}
    for data in reader:
        rec = Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "scalar":
            scalars.setdefault(rec.scalar.key, {})[rec.scalar.step] = rec.scalar.value.number
        elif kind == "media":
            media[rec.media.key] = rec.media.type
    reader.close()
    assert set(METRICS) <= set(scalars) and sorted(scalars["val/heldout/pass@1"]) == [1, 2, 3]
    assert scalars["val/heldout/pass@1"][3] == pytest.approx(0.8)
    assert {"plots/timing", "summary"} <= set(media)
    (cfg_file,) = glob.glob(str(tmp_path / "swanlog" / "run-*" / "files" / "config.yaml"))
    assert "tiny:qwen2" in Path(cfg_file).read_text()


def test_grpo_metrics_log_feeds_every_tracker(tmp_path, monkeypatch):
    """The GRPO driver's MetricsLog: metrics.jsonl stays the record, the trackers get the same names, and a
    tracker that breaks mid-run is dropped without stopping the run."""
    from rl.grpo.metrics_log import MetricsLog

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlog = MetricsLog(tmp_path, ["tensorboard", "mlflow"], progress=False, total_steps=2, config=CONFIG,
                      project="r1lab-grpo-test")
    mlog.log(1, {"rollout/reward_mean": 0.25, "val/heldout/pass@1": 0.5})
    mlog.trackers.active["tensorboard"].log = None  # breaks: TypeError on the next call
    mlog.log(2, {"rollout/reward_mean": 0.5, "val/heldout/pass@1": 0.75})
    mlog.finish({}, {"steps": 2, **mlog.last})
    mlog.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/reward_mean"] for r in rows] == [0.25, 0.5]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("r1lab-grpo-test").experiment_id])
    assert run.data.metrics["rollout/reward_mean"] == 0.5 and run.data.tags["summary.steps"] == "2"


def test_a_tracker_that_cannot_start_is_one_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "not-a-mode")
    with pytest.raises(ConfigError, match=r"^log\.report_to: wandb could not start \("):
        Trackers(["wandb"], tmp_path, CONFIG)
