"""Run logging: JSONL metrics (the source of truth), the trackers of log.report_to (rl.tracking: TensorBoard by
default), and a progress bar with ETA."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, out_dir: Path, report_to: list[str] | None = None, progress: bool = True, total_steps: int = 0,
                 start_step: int = 0, config: dict[str, Any] | None = None, project: str = "r1lab",
                 run_name: str = "") -> None:
        from rl.tracking import Trackers

        self.path = out_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.trackers = Trackers(["tensorboard"] if report_to is None else report_to, out_dir, config or {},
                                 project=project, run_name=run_name, start_step=start_step)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="grpo", unit="step", dynamic_ncols=True)
        self._names_printed = False
        self.last: dict[str, float] = {}  # the latest value of every metric: the run's summary

    def rewind(self, step: int) -> None:
        """A trainer restart from the checkpoint at `step` (rl.grpo.recovery): the steps after it are trained
        again, so their lines go (the trackers keep what they were sent; TensorBoard shows both)."""
        self._truncate_after(step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint, so the stream continues without repeats."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.trackers.log(step, metrics)
        self.last.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        if not self._names_printed:  # the job log shows every metric name once
            print("metrics: " + ", ".join(sorted(metrics)), flush=True)
            self._names_printed = True
        summary = (f"step {step} reward {metrics.get('rollout/reward_mean', 0):.3f} "
                   f"acc {metrics.get('reward/accuracy_mean', 0):.3f} len {metrics.get('rollout/response_length_mean', 0):.1f} "
                   f"pg {metrics.get('actor/pg_loss', 0):+.4f} kl {metrics.get('actor/kl', 0):.4f}")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(summary.split(" ", 2)[2])
        else:
            print(summary, flush=True)

    def finish(self, pngs: dict[str, Path], summary: dict[str, Any]) -> None:
        """The run's plots (name -> PNG path) and summary, to every tracker."""
        self.trackers.images(pngs)
        self.trackers.summary(summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.trackers.close()
