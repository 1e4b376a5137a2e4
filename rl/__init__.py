"""r1lab RL core: configs, GRPO algorithms, Ray actors (rollout / trainer), tiny-model factory."""
__version__ = "0.1.0"
