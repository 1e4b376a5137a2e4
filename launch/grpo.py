"""GRPO training on Ray (vLLM rollout workers + FSDP2 trainer workers).

  python launch/grpo.py --config configs/tiny_grpo.yaml [section.key=value ...]
  ray job submit --working-dir . -- python launch/grpo.py --config configs/tiny_grpo.yaml trainer.max_steps=2

Joins a running Ray cluster when there is one (RAY_ADDRESS or `ray start`), else starts a local instance.
The config is validated before Ray starts; `--help-config` lists every key.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from rl.config import ConfigError, describe, load_config
    from rl.grpo.config import GRPOConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (configs/*.yaml)")
    ap.add_argument("--help-config", action="store_true", help="print every config key with its help")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    if args.help_config:
        print(describe(GRPOConfig))
        return 0
    try:
        cfg = load_config(GRPOConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from rl.grpo.driver import GRPODriver

    result = GRPODriver(cfg).run()
    print(f"done: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
