"""GRPO training on Ray (vLLM rollout workers + FSDP2 trainer workers).

  python launch/grpo.py --config configs/tiny_grpo.yaml [section.key=value ...]
  ray job submit --working-dir . -- python launch/grpo.py --config configs/tiny_grpo.yaml trainer.max_steps=2

Joins a running Ray cluster when there is one (RAY_ADDRESS or `ray start`), else starts a local instance.
The config is validated before Ray starts; `--help-config` lists every key.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from rl.config import cli_config
    from rl.grpo.config import GRPOConfig

    cfg = cli_config(GRPOConfig, __doc__, argv)
    if isinstance(cfg, int):
        return cfg
    from rl.model_path import preflight

    models = [(cfg.model.path, "model.path")] + [(cfg.algo.distill_teacher, "algo.distill_teacher")] * bool(
        cfg.algo.distill_teacher)
    if isinstance(rc := preflight(models, cfg.log.push_to_hub), int):  # before Ray, vLLM or the trainers start
        return rc
    from data.loading import DataError
    from rl.config import ConfigError
    from rl.grpo.driver import GRPODriver, WeightSyncError, WorkerDied
    from rl.grpo.placement import InsufficientResources
    from rl.grpo.rewards_check import RewardFailureError

    try:
        result = GRPODriver(cfg).run()
    except (ConfigError, DataError, InsufficientResources) as e:   # nothing was trained: fix the input
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (WorkerDied, WeightSyncError, RewardFailureError) as e:  # stopped on purpose, with the reason
        print(f"stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"done: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
