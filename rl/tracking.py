"""Experiment trackers: `log.report_to: [tensorboard, wandb, mlflow, trackio, swanlab]`.

Every stage logs through `Trackers`: the same metric names as metrics.jsonl (GRPO) or TensorBoard (SFT, as
transformers names them: train/loss, ...), the resolved config once at the start, the run's plots (the PNG
files it writes, e.g. timing.png) as images, and the run's summary at the end. Each tracker is imported only
when it is asked for (`pip install 'r1lab[trackers]'` installs them all); a name that is not installed is a
config error naming the key and the extra, found when the config is validated, before any work starts.

Everything works offline and lands under the run's output_dir, unless the tracker's own environment variable
says otherwise:

| tracker | where (default) | to go online |
|---|---|---|
| tensorboard | `<output_dir>/tensorboard` | `tensorboard --logdir ...` |
| wandb | offline run in `<output_dir>/wandb` | `WANDB_MODE=online`, or `wandb sync <run dir>` |
| mlflow | file store `file://<output_dir>/mlruns` | `MLFLOW_TRACKING_URI=http://server:5000` |
| trackio | its local store (`TRACKIO_DIR`; ~/.cache/huggingface/trackio) | `TRACKIO_SPACE_ID=user/space` |
| swanlab | offline run in `<output_dir>/swanlog` | `SWANLAB_MODE=cloud` (`swanlab login`); `swanlab sync` |

MLflow does not accept '@' in a metric name: `val/heldout/pass@1` is logged there as `val/heldout/pass_at_1`
(every other character MLflow refuses becomes '_'); the other trackers get the names unchanged. A tracker that
fails while logging is reported once and left out for the rest of the run: metrics.jsonl stays the record.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("r1lab.tracking")

# name -> (module imported, pip package)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny"), "trackio": ("trackio", "trackio"),
            "swanlab": ("swanlab", "swanlab")}
EXTRA = "pip install 'r1lab[trackers]'"


def report_to_problem(names: list) -> str | None:
    """Why `names` is not a valid report_to list (unknown, repeated or not installed), or None. No imports."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        return f"{unknown[0]!r} is not a tracker; allowed: {list(TRACKERS)}"
    if len(set(names)) != len(names):
        return f"{names} names a tracker twice"
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n][0]) is None]
    if missing:
        pkg = TRACKERS[missing[0]][1]
        return f"{missing[0]} is not installed: {EXTRA} (all trackers) or pip install {pkg}"
    return None


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries (bools and strings are not metrics)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    flat = flatten(summary)
    rows = "".join(f"| {k} | {v if isinstance(v, str) else json.dumps(v)} |\n" for k, v in flat.items())
    return "| key | value |\n|---|---|\n" + rows


# ------------------------------------------------------------------------------------------------ backends
class TensorBoard:
    def __init__(self, out: Path, run_name: str, config: dict, start_step: int, **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        import yaml

        text = "    " + yaml.safe_dump(config, sort_keys=False).replace("\n", "\n    ")  # markdown code block
        self.w.add_text("config", text, start_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def images(self, step: int, pngs: dict[str, Path]) -> None:
        from matplotlib.image import imread

        for name, p in pngs.items():
            self.w.add_image(name, imread(str(p))[..., :3], step, dataformats="HWC")

    def summary(self, step: int, summary: dict) -> None:
        self.w.add_text("summary", summary_markdown(summary), step)

    def close(self) -> None:
        self.w.close()


class _RunTracker:
    """Trackers with a run object: `run.log(dict, step=)`, `lib.Image(path)`, `run.finish()` (W&B, trackio and
    SwanLab share this API); subclasses set `self.lib` and `self.run` and say how the summary is kept."""
    lib: Any
    run: Any

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def images(self, step: int, pngs: dict[str, Path]) -> None:
        self.run.log({name: self.lib.Image(str(p)) for name, p in pngs.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class WandB(_RunTracker):
    def __init__(self, out: Path, run_name: str, config: dict, project: str, **_: Any) -> None:
        import wandb

        self.lib = wandb
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=project, name=run_name, dir=str(out), mode=mode, config=config,
                              reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

    def summary(self, step: int, summary: dict) -> None:
        self.run.summary.update(summary)

    def close(self) -> None:
        """`run.finish()` returns before wandb-core has flushed the run's transaction log (its finish message
        to the service is fire-and-forget; on a slow machine the .wandb file then lacks the history when
        finish returns: CI saw it). `wandb.teardown()` waits for the service process to exit, which closes
        and flushes every stream: the offline run is complete on disk when this returns."""
        self.run.finish()
        self.lib.teardown()


class MLflow:
    BAD = re.compile(r"[^\w.\- :/]")

    def __init__(self, out: Path, run_name: str, config: dict, project: str, **_: Any) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch (maintenance mode)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric, self.client = Metric, MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(project)
        eid = exp.experiment_id if exp else self.client.create_experiment(project)
        self.run_id = self.client.create_run(eid, run_name=run_name).info.run_id
        params = [Param(k[:250], str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    @classmethod
    def name(cls, key: str) -> str:
        return cls.BAD.sub("_", key.replace("@", "_at_"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        ms = int(time.time() * 1000)
        batch = [self.Metric(self.name(k), v, ms, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def images(self, step: int, pngs: dict[str, Path]) -> None:
        for p in pngs.values():
            self.client.log_artifact(self.run_id, str(p), "plots")

    def summary(self, step: int, summary: dict) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")
        for k, v in flatten(summary).items():
            self.client.set_tag(self.run_id, f"summary.{self.name(k)}"[:250], str(v)[:5000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackio(_RunTracker):
    def __init__(self, out: Path, run_name: str, config: dict, project: str, **_: Any) -> None:
        import trackio

        self.lib = trackio
        self.run = trackio.init(project=project, name=run_name, config=config, embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)

    def summary(self, step: int, summary: dict) -> None:
        self.run.log({"summary": self.lib.Markdown(summary_markdown(summary))}, step=step)


class SwanLab(_RunTracker):
    def __init__(self, out: Path, run_name: str, config: dict, project: str, **_: Any) -> None:
        import swanlab

        self.lib = swanlab
        mode = os.environ.get("SWANLAB_MODE") or "offline"
        settings = swanlab.Settings(terminal={"proxy_type": "none"}, probe={"hardware": False})
        self.run = swanlab.init(project=project, name=run_name, config=config, mode=mode,
                                log_dir=str(out / "swanlog"), reinit=True, settings=settings)

    def summary(self, step: int, summary: dict) -> None:
        self.run.log({"summary": self.lib.Text(summary_markdown(summary))}, step=step)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio,
            "swanlab": SwanLab}


class Trackers:
    """The trackers of one run, fed together. Construction starts every run (a tracker that cannot start is a
    ConfigError naming `key`); `log`, `images`, `summary` fan out; `close` ends them (always call it)."""

    def __init__(self, names: list[str], out_dir: str | Path, config: dict[str, Any], *,
                 project: str = "r1lab", run_name: str = "", start_step: int = 0,
                 key: str = "log.report_to") -> None:
        from rl.config import ConfigError

        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.step = start_step
        self.active: dict[str, Any] = {}
        problem = report_to_problem(list(names))
        if problem:
            raise ConfigError(f"{key}: {problem}")
        name = run_name or self.out.name
        if start_step:
            name += f"-resumed-{start_step}"
        for n in names:
            try:
                self.active[n] = BACKENDS[n](self.out, run_name=name, config=config, project=project,
                                             start_step=start_step)
            except Exception as e:  # noqa: BLE001  one that cannot start: say which and why, in one line
                self.close()
                why = " ".join(str(e).split())[:300]
                raise ConfigError(f"{key}: {n} could not start ({type(e).__name__}: {why})") from None

    def _each(self, what: str, *args: Any) -> None:
        for n, t in list(self.active.items()):
            try:
                getattr(t, what)(*args)
            except Exception as e:  # noqa: BLE001  never stops training: metrics.jsonl is the record
                log.warning("tracker %s failed (%s: %s); it is left out for the rest of the run", n,
                            type(e).__name__, e)
                self.active.pop(n, None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        nums = {k: v for k, v in numbers(metrics).items() if math.isfinite(v)}
        self.step = max(self.step, step)
        if nums:
            self._each("log", step, nums)

    def images(self, pngs: dict[str, str | Path], step: int | None = None) -> None:
        """Log PNG files (name -> path) that exist, e.g. {"plots/timing": out / "timing.png"}."""
        found = {k: Path(p) for k, p in pngs.items() if p and Path(p).is_file()}
        if found:
            self._each("images", self.step if step is None else step, found)

    def summary(self, summary: dict[str, Any]) -> None:
        self._each("summary", self.step, summary)

    def close(self) -> None:
        for n, t in list(self.active.items()):
            try:
                t.close()
            except Exception as e:  # noqa: BLE001
                log.warning("tracker %s did not close cleanly: %s", n, e)
        self.active = {}


def hf_callback(trackers: Trackers):
    """A transformers TrainerCallback that sends the Trainer's logs to `trackers` under the names that
    transformers' TensorBoard callback uses (train/loss, train/learning_rate, eval/..., ...)."""
    from transformers import TrainerCallback

    class TrackersCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if state.is_world_process_zero and logs:
                trackers.log(state.global_step, {
                    ("eval/" + k[5:] if k.startswith("eval_") else "test/" + k[5:] if k.startswith("test_")
                     else "train/" + k): v for k, v in logs.items()})

    return TrackersCallback()
