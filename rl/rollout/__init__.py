"""Rollout side: a thin, version-tolerant layer over vLLM (engine creation, generation, weight reload)."""
