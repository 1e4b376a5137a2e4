"""Cold-start SFT with TRL's SFTTrainer.

  python launch/sft.py --config configs/tiny_sft.yaml [section.key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from rl.config import ConfigError, describe, load_config
    from rl.sft.config import SFTStageConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--help-config", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.help_config:
        print(describe(SFTStageConfig))
        return 0
    try:
        cfg = load_config(SFTStageConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from rl.sft.train import run_sft

    s = run_sft(cfg)
    print(f"done: {s['steps']} steps, loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}, model at {s['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
