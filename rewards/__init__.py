"""r1lab rewards: one math grader shared by training and evaluation, rule-based rewards, plugins, scorer.

Every grade and reward has three outcomes: correct, wrong, and failed (`rewards.outcome`)."""
from rewards.extract import extract_answer, final_answers, last_boxed
from rewards.math import GradingFailed, Verdict, grade, grade_batch, verify, verify_batch
from rewards.outcome import Failed, RewardFailed, ScoredBatch, is_failed
from rewards.pool import GraderUnavailable
from rewards.registry import RewardPluginError, get, known, register

__all__ = ["Failed", "GraderUnavailable", "GradingFailed", "RewardFailed", "RewardPluginError", "ScoredBatch",
           "Verdict", "extract_answer", "final_answers", "get", "grade", "grade_batch", "is_failed", "known",
           "last_boxed", "register", "verify", "verify_batch"]
