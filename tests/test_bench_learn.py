"""The pieces `bench/grpo_vs_trl.py --learn` maps onto TRL: r1lab's scorer as one TRL reward function, and
r1lab's schedule as TRL's scheduler (HF's own warm-up starts at lr 0, r1lab's at lr / warmup_steps)."""
from __future__ import annotations

import math

import pytest
import torch

from bench.trl_learn import make_reward
from bench.trl_side import _with_lr_lambda
from rl.grpo.config import GRPOConfig
from rl.grpo.trainer_worker import lr_lambda


def test_reward_is_the_weighted_scorer_sum_per_completion():
    fn = make_reward(["accuracy", "format"], [1.0, 0.1])
    comps = ["<think>7+5=12</think> \\boxed{12}", "<think>7+5=13</think> \\boxed{13}", "no think, \\boxed{12}"]
    got = fn(prompts=["p"] * 3, completions=comps, answer=["12", "12", "12"], task=["arithmetic"] * 3,
             completion_ids=[[1], [2], [3]])
    assert got == pytest.approx([1.1, 0.1, 1.0])


def test_reward_failed_item_is_none_not_zero():
    """An item the scorer cannot grade (here: a gold answer that does not parse) is None for TRL (NaN, left out of
    its group statistics), never 0; the others keep their values."""
    fn = make_reward(["accuracy"], [1.0])
    got = fn(prompts=["p"] * 2, completions=["\\boxed{3}"] * 2, answer=["(((", "3"], task=["arithmetic"] * 2)
    assert got == [None, 1.0]


@pytest.mark.parametrize("warmup", [1, 5])
def test_trl_follows_r1lab_schedule(warmup):
    class Base:
        def __init__(self):
            self.lr_scheduler = None
            self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

        def create_scheduler(self, num_training_steps, optimizer=None):  # HF's schedule, which it replaces
            raise AssertionError("the given schedule must be used")

    cfg = GRPOConfig()
    cfg.trainer.warmup_steps, cfg.trainer.max_steps = warmup, 10
    ours = lr_lambda(cfg)
    t = _with_lr_lambda(Base, ours)()
    sched = t.create_scheduler(10)
    for k in range(8):
        assert math.isclose(t.optimizer.param_groups[0]["lr"], 0.5 * ours(k)), k
        t.optimizer.step()
        sched.step()
