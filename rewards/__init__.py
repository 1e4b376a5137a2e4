"""r1lab rewards: one math grader shared by training and evaluation, rule-based rewards, plugins, scorer."""
from rewards.extract import extract_answer, last_boxed
from rewards.math import verify, verify_batch
from rewards.registry import RewardPluginError, get, known, register

__all__ = ["extract_answer", "last_boxed", "verify", "verify_batch", "register", "get", "known",
           "RewardPluginError"]
