"""GRPO on Ray: config, rollout and trainer workers, weight sync, the driver loop."""
