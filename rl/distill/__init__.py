"""Distillation: off-policy (teacher traces -> student SFT) and on-policy (reverse KL in the GRPO loop)."""
