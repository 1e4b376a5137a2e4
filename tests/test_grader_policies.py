"""The grader's answer classes beyond a single box (intervals as inequalities, percent words, sets spread over
several boxes, the Minerva closing line, spaced thousands) and its two hedging policies: rewards (every stated
answer must be right) and evaluation (the last answer decides, as math-verify and the R1 evaluation do)."""
import pytest

from rewards.extract import final_answers, stated_answers
from rewards.math import CORRECT, WRONG, grade, grade_batch

# (completion, gold, expected under the evaluation policy, form); the completions are written for these tests
CLASSES = [
    # an interval gold answered as a chained inequality in one variable (and the reverse)
    ("So $\\boxed{-3 \\leq x \\leq 2}$.", "[-3, 2]", True, "closed interval as inequality"),
    ("\\boxed{-\\frac{1}{2} < x \\le 4}", "\\left(-\\frac{1}{2}, 4\\right]", True, "half-open, fraction bound"),
    ("\\boxed{x \\geq 5}", "[5, \\infty)", True, "one-sided >="),
    ("\\boxed{x<-1}", "(-\\infty,-1)", True, "one-sided <"),
    ("\\boxed{3 \\ge x \\ge -1}", "[-1,3]", True, "descending chain"),
    ("\\boxed{1 \\leqslant t \\leqslant 7}", "[1,7]", True, "leqslant"),
    ("\\boxed{1 ≤ y ≤ 4}", "[1,4]", True, "unicode relations"),
    ("\\boxed{[2,5]}", "2 \\le x \\le 5", True, "gold written as inequality"),
    ("\\boxed{x \\in \\left[2, 5\\right)}", "[2,5)", True, "membership"),
    ("\\boxed{2 < x \\le 5}", "[2,5]", False, "open end vs closed end"),
    ("\\boxed{2 \\le x \\le 6}", "[2,5]", False, "wrong bound"),
    ("\\boxed{2 < 5}", "[2,5]", False, "inequality without a variable"),
    # percent with a unit word
    ("\\boxed{28 percentage}", "28\\%", True, "percentage"),
    ("\\boxed{28 percentage points}", "28", True, "percentage points"),
    ("\\boxed{28\\text{ percentage}}", "28 percent", True, "text percentage"),
    ("\\boxed{29 percentage}", "28\\%", False, "wrong percentage"),
    # a set gold in display math, the prediction spread over several boxes
    ("\\boxed{1} and \\boxed{2}", "$$\\{1, 2\\}$$", True, "display set, and"),
    ("\\boxed{2}, \\boxed{1}", "$$\\{1,2\\}$$", True, "display set, commas, reordered"),
    ("\\boxed{x=1} and \\boxed{x=2}", "$$\\{1, 2\\}$$", True, "display set, boxed equations"),
    ("$\\boxed{-2}$ and $\\boxed{3}$", "$$\\{-2,3\\}.$$", True, "display set with a period"),
    ("\\boxed{\\frac{1}{2}}, \\boxed{-1}", "\\[\\left\\{-1,\\tfrac12\\right\\}\\]", True, "bracket display math"),
    ("\\boxed{4}, \\boxed{5}, \\boxed{6}", "{4, 5, 6}", True, "plain braces"),
    ("\\boxed{1} and \\boxed{3}", "$$\\{1, 2\\}$$", False, "display set, one wrong"),
    ("\\boxed{1}, \\boxed{2}, \\boxed{3}", "$$\\{1, 2\\}$$", False, "display set, one extra"),
    ("\\boxed{1}", "$$\\{1, 2\\}$$", False, "display set, one missing"),
    # the Minerva/MATH closing line after an intermediate boxed value
    ("First $n=\\boxed{5}$.\nFinal Answer: The final answer is $12$. I hope it is correct.", "12", True,
     "closing line after a box"),
    ("Final Answer: The final answer is \\frac{3}{4}. I hope it is correct.", "0.75", True, "closing line alone"),
    ("The final answer is 9. I hope it is correct.", "9", True, "closing line without its head"),
    ("Final Answer: The final answer is $\\boxed{12}$. I hope it is correct.", "12", True, "closing line with a box"),
    ("We see that the final answer is 12 apples", "12", False, "a sentence is not a closing line"),
    ("\\boxed{12}\nFinal Answer: The final answer is 11. I hope it is correct.", "12", False,
     "closing line overrides a box"),
    # thousands separated by spaces (SI style, as 10\,000): a three-digit grouping is one number
    ("\\boxed{10 000}", "10000", True, "spaced thousands"),
    ("\\boxed{1 000 000}", "1,000,000", True, "spaced millions vs commas"),
    ("\\boxed{12 345.5}", "12345.5", True, "spaced thousands with decimals"),
    ("\\boxed{10\\ 000}", "10000", True, "latex control space"),
    ("\\boxed{1 2}", "12", False, "two digits with a space are not a number"),
    ("\\boxed{1 2}", "2", False, "nor a product"),
    ("\\boxed{100 00}", "10000", False, "a grouping that is not of three"),
]

# (answer text, gold, reward policy, eval policy, form): where the two policies differ, and empty boxes
HEDGING = [
    ("First I thought \\boxed{10} but actually it is \\boxed{12}", "12", False, True, "corrected answer"),
    ("First I thought \\boxed{10} but actually it is \\boxed{12}", "10", False, False, "first of two"),
    ("\\boxed{12} or \\boxed{10} or \\boxed{12}", "12", False, True, "last repeats the first"),
    ("\\boxed{10} or \\boxed{12} or \\boxed{10}", "12", False, False, "right one in the middle"),
    ("\\boxed{5}\nFinal Answer: The final answer is 12. I hope it is correct.", "12", False, True,
     "box then closing line"),
    ("\\boxed{1/4} \\boxed{}", "1/4", False, False, "empty last box"),
    ("\\boxed{} \\boxed{1/4}", "1/4", False, True, "empty first box"),
    ("\\boxed{}", "1/4", False, False, "only an empty box"),
    ("\\boxed{ }", "1/4", False, False, "a box of spaces"),
    ("\\boxed{1/4}. So \\boxed{0.25}", "1/4", True, True, "two forms of the answer"),
    ("\\boxed{2} and \\boxed{3}", "2, 3", True, True, "parts of a multi-part gold"),
]


@pytest.mark.parametrize("completion,gold,expected,form", CLASSES, ids=[c[3] for c in CLASSES])
def test_answer_classes(completion, gold, expected, form):
    v = grade(f"<think>\nwork\n</think>\n{completion}", gold)
    assert v.status == (CORRECT if expected else WRONG), v


@pytest.mark.parametrize("answer,gold,reward,evaluation,form", HEDGING, ids=[h[4] for h in HEDGING])
def test_hedging_policies(answer, gold, reward, evaluation, form):
    completion = f"<think>\n\\boxed{{{gold}}} maybe\n</think>\n{answer}"  # boxes in the thinking never count
    assert grade(completion, gold, policy="reward").status == (CORRECT if reward else WRONG)
    assert grade(completion, gold, policy="eval").status == (CORRECT if evaluation else WRONG)


def test_rewards_use_the_reward_policy_and_evaluation_the_eval_policy():
    from rewards.functions import accuracy
    from rewards.scorer import RewardScorer
    from rl.eval.harness import _math_outcomes

    hedge = "</think>First \\boxed{10}, actually \\boxed{12}"
    assert accuracy(hedge, {"answer": "12"}) == 0.0
    scored = RewardScorer(["accuracy"], [1.0]).score([hedge, "</think>\\boxed{12}"], [{"answer": "12"}] * 2)
    assert list(scored.rewards) == [0.0, 1.0]
    (answer, status, _), = _math_outcomes([hedge], [{"answer": "12"}], timeout_s=5)
    assert (answer, status) == ("12", CORRECT)  # the evaluation grades the last answer, and reports it


def test_policy_is_checked():
    with pytest.raises(ValueError, match="grading policy 'lenient' unknown"):
        grade_batch(["\\boxed{1}"], ["1"], policy="lenient")


def test_stated_answers_keep_order_empties_and_closing_lines():
    text = "<think>\\boxed{9}</think>a \\boxed{3} b \\boxed{} c \\boxed{3}\nFinal Answer: The final answer is 4. I hope it is correct."
    assert stated_answers(text) == ("3", "", "3", "4")
    assert final_answers(text) == ("3", "", "4")
    assert final_answers(text, "eval") == ("", "3", "4")


def test_closing_line_scan_is_linear():
    import time

    text = "</think>" + "the final answer is " * 20000 + "\n" + "Final Answer: The final answer is 1" * 5000
    t0 = time.perf_counter()
    stated_answers(text)
    assert time.perf_counter() - t0 < 2.0
