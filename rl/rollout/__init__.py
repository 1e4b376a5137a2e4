"""Rollout side: a thin, version-tolerant layer over vLLM (engine creation, generation, weight reload:
`vllm_engine.py`) and multi-turn tool rollouts on top of it (`tools.py`)."""
