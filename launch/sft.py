"""Cold-start SFT with TRL's SFTTrainer.

  python launch/sft.py --config configs/tiny_sft.yaml [section.key=value ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from rl.config import cli_config
    from rl.sft.config import SFTStageConfig

    cfg = cli_config(SFTStageConfig, __doc__, argv)
    if isinstance(cfg, int):
        return cfg
    from rl.model_path import preflight

    if isinstance(rc := preflight([(cfg.model.path, "model.path")], cfg.log.push_to_hub), int):  # before TRL starts
        return rc
    from rl.sft.train import run_sft

    s = run_sft(cfg)
    loss = f", loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}" if s["first_loss"] is not None else ""
    print(f"done: {s['steps']} steps{loss}, model at {s['final']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
