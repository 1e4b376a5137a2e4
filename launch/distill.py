"""Distillation: a teacher's verified traces -> a student of any architecture (TRL SFT) -> held-out eval.

  python launch/distill.py --config configs/tiny_distill.yaml [section.key=value ...]
  python launch/distill.py --config configs/tiny_distill.yaml teacher.path=runs/demo/grpo/final

Writes under output_dir: traces.jsonl (every candidate and its verdict), dataset.jsonl (kept traces with
provenance), dataset_summary.json (acceptance rate, rejection reasons), student/ (SFT run, student/final),
eval_teacher.json / eval_student.json and summary.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from data.loading import DataError
    from rl.config import ConfigError, cli_config
    from rl.distill.config import DistillConfig

    cfg = cli_config(DistillConfig, __doc__, argv)
    if isinstance(cfg, int):
        return cfg
    from rl.model_path import preflight

    if isinstance(rc := preflight([(cfg.teacher.path, "teacher.path")], cfg.log.push_to_hub), int):  # student: run
        return rc
    from rl.distill.run import run_distill

    try:
        s = run_distill(cfg)
    except (ConfigError, DataError) as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    d = s["dataset"]
    print(f"dataset: kept {d['kept']}/{d['candidates']} traces (acceptance {d['acceptance_rate']:.3f}) "
          f"-> {d['dataset']}")
    for name, acc in s["accuracy"].items():
        print(f"{name:<8} pass@1 {acc:.3f}")
    if s["student_over_teacher"] is not None:
        print(f"student / teacher = {s['student_over_teacher']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
