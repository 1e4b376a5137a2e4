"""The math grader: a table of equivalent and non-equivalent pairs covering every answer form we accept, several
boxed answers, and the third outcome (failed: unparsable gold, timeout)."""
import json
import time

import pytest

from rewards.extract import extract_answer, final_answers, last_boxed
from rewards.math import (
    CORRECT,
    FAILED,
    GRADER_STATS,
    WRONG,
    GradingFailed,
    grade,
    grade_batch,
    verify,
    verify_batch,
)

B = "\\boxed{{{}}}"

# (model's boxed answer, gold, expected verdict, form)
TABLE = [
    # fractions / decimals / mixed numbers
    ("\\frac{1}{2}", "0.5", True, "fraction-decimal"),
    ("0.5", "\\frac{1}{2}", True, "decimal-fraction"),
    ("1/2", "\\frac12", True, "slash-fraction"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True, "dfrac"),
    ("\\tfrac{3}{4}", "0.75", True, "tfrac"),
    ("1\\frac{1}{2}", "\\frac{3}{2}", True, "mixed number"),
    ("\\frac{2}{4}", "\\frac{1}{2}", True, "unreduced fraction"),
    ("\\frac{1}{3}", "0.3", False, "fraction vs rounded decimal"),
    ("\\frac{1}{2}", "\\frac{1}{3}", False, "different fractions"),
    ("-\\frac{1}{2}", "\\frac{1}{2}", False, "sign"),
    # radicals, pi, e
    ("2\\sqrt{2}", "\\sqrt{8}", True, "radical"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True, "radical fraction"),
    ("\\sqrt{2}", "1.414", False, "radical vs truncated decimal"),
    ("\\sqrt{3}", "\\sqrt{2}", False, "different radicals"),
    ("\\pi/2", "\\frac{\\pi}{2}", True, "pi"),
    ("2\\pi", "\\pi", False, "pi multiple"),
    ("e^2", "e^{2}", True, "e power"),
    # powers, scientific notation
    ("2^{10}", "1024", True, "power"),
    ("1.5\\times10^{3}", "1500", True, "scientific latex"),
    ("1.5e3", "1500", True, "scientific e-notation"),
    ("1.5\\times 10^{4}", "1500", False, "wrong exponent"),
    # sets, tuples, intervals, matrices
    ("\\{1,2\\}", "\\{2,1\\}", True, "set order"),
    ("\\{1,3\\}", "\\{1,2\\}", False, "different sets"),
    ("(1,2)", "(1, 2)", True, "tuple spacing"),
    ("\\left(3,\\frac{\\pi}{2}\\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", True, "left/right tuple"),
    ("(2,1)", "(1,2)", False, "ordered pair order"),
    ("[0,1)", "[0, 1)", True, "half-open interval"),
    ("(0,1]", "[0,1)", False, "interval endpoints"),
    ("(-\\infty, 3]", "(-\\infty,3]", True, "infinite interval"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True, "matrix"),
    ("\\begin{pmatrix}1\\\\3\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", False, "different matrix"),
    # equations
    ("x = 5", "5", True, "equation vs value"),
    ("x=5", "x = 5", True, "equation vs equation"),
    ("y = 2x+1", "2x+1", True, "line equation"),
    ("x = 6", "5", False, "wrong equation value"),
    # thousands separators, leading zeros
    ("1,000", "1000", True, "thousands separator"),
    ("1000", "1,000", True, "gold with separator"),
    ("1{,}000", "1000", True, "latex thousands separator"),
    ("007", "7", True, "leading zeros"),
    ("25", "025", True, "AIME zero-padded gold"),
    ("1,001", "1000", False, "separator wrong value"),
    # units, degrees, percent, currency
    ("5\\text{ cm}", "5", True, "text unit"),
    ("5 \\text{ meters}", "5", True, "spelled unit"),
    ("12 cm^2", "12", True, "bare unit squared"),
    ("30^\\circ", "30", True, "degrees"),
    ("30^{\\circ}", "30", True, "degrees braced"),
    ("31^\\circ", "30", False, "wrong degrees"),
    ("50\\%", "50", True, "percent"),
    ("50\\%", "50\\%", True, "percent both"),
    ("\\$5.00", "5", True, "currency"),
    ("\\$18", "18", True, "currency int"),
    ("\\$17", "18", False, "currency wrong"),
    # text answers and multiple choice
    ("\\text{Evelyn}", "\\text{Evelyn}", True, "text answer"),
    ("Evelyn", "\\text{Evelyn}", True, "bare text answer"),
    ("Nevely", "\\text{Evelyn}", False, "anagram is not equal"),
    ("\\text{east}", "\\text{East}", True, "text case"),
    ("(A)", "A", True, "multiple choice parens"),
    ("\\text{(C)}", "C", True, "multiple choice text"),
    ("B", "A", False, "multiple choice wrong"),
    ("\\textbf{(D)}", "(D)", True, "multiple choice bold"),
    # latex noise
    ("\\left[ 1, 2 \\right]", "[1,2]", True, "left/right brackets"),
    ("\\displaystyle\\frac{5}{6}", "\\frac56", True, "displaystyle"),
    ("3\\!", "3", True, "negative thin space"),
    ("\\varnothing", "\\emptyset", True, "empty set spelling"),
    # numbers as gold (AMC floats, AIME ints)
    ("27", 27.0, True, "float gold"),
    ("27", 27, True, "int gold"),
    ("-1", -1.0, True, "negative float gold"),
    ("26", 27.0, False, "float gold wrong"),
    ("10", "10.0", True, "decimal zero"),
    ("3", "4", False, "plain wrong"),
    # algebra
    ("x^2+2x+1", "(x+1)^2", True, "polynomial expanded"),
    ("x^2+1", "(x+1)^2", False, "polynomial wrong"),
    # several parts: a list of solutions is unordered, a tuple inside it is not
    ("3, 2", "2, 3", True, "solution list reordered"),
    ("2 \\text{ and } 3", "2, 3", True, "solutions joined by and"),
    ("x = 2 \\text{ or } x = 3", "2, 3", True, "solutions as equations with or"),
    ("x=2, x=3", "2, 3", True, "solutions as equations with commas"),
    ("x = 3 or x = 2", "2, 3", True, "solutions with bare or, reordered"),
    ("\\{3, 2\\}", "2, 3", True, "set vs solution list"),
    ("\\frac{1}{2}, -3", "-3, 0.5", True, "solution list with a fraction"),
    ("(6,2),(2,2)", "(2,2),(6,2)", True, "list of pairs reordered"),
    ("(2,2),(6,2)", "\\{(2,2),(6,2)\\}", True, "list of pairs vs set of pairs"),
    ("y = 3, x = 2", "x = 2, y = 3", True, "named values reordered"),
    ("(2,6),(2,2)", "(2,2),(6,2)", False, "pair reversed inside a list"),
    ("2", "2, 3", False, "one solution of two"),
    ("2, 3, 4", "2, 3", False, "extra solution"),
    ("2, 3", "2", False, "list for a single answer"),
    ("2 \\text{ or } 3", "3", False, "hedged single answer"),
    ("x = 2 \\text{ or } x = 4", "2, 3", False, "one wrong solution"),
    ("x = 3, y = 2", "x = 2, y = 3", False, "named values swapped"),
    ("2, 2", "2, 3", False, "repeated solution"),
    ("1,000", "1, 0", False, "thousands separator is not a list"),
    # percent words
    ("28 percent", "28", True, "percent word"),
    ("28 per cent", "28\\%", True, "per cent words vs percent sign"),
    ("28 pct", "28", True, "pct"),
    ("28\\text{ percent}", "28\\%", True, "text percent"),
    ("28\\%", "28 percent", True, "percent word in gold"),
    ("29 percent", "28", False, "wrong percent"),
    ("28 percent", "0.29", False, "percent vs other decimal"),
]

# (completion's answer text after </think>, gold, verdict under the reward policy, under the eval policy, form):
# several boxes. Rewards: every stated answer must be right (hedging never pays); evaluation: the last answer
# decides, as math-verify and the R1 evaluation do (rewards.math).
MULTI_BOX = [
    ("\\boxed{2} and \\boxed{3}", "2, 3", True, True, "two boxes for two solutions"),
    ("\\boxed{3} and \\boxed{2}", "2, 3", True, True, "two boxes reordered"),
    ("\\boxed{x = 2} or \\boxed{x = 3}", "2, 3", True, True, "two boxed equations"),
    ("\\boxed{(2, 2)} and \\boxed{(6, 2)}", "(2,2),(6,2)", True, True, "two boxed pairs"),
    ("\\boxed{(2, 2)} and \\boxed{(6, 2)}", "\\{(2,2),(6,2)\\}", True, True, "two boxed pairs vs set"),
    ("\\boxed{(2, 2)} and \\boxed{(2, 6)}", "(2,2),(6,2)", False, False, "two boxed pairs, one reversed"),
    ("\\boxed{2} and \\boxed{3}", "2, 3, 4", False, False, "two boxes for three solutions"),
    ("\\boxed{2} or maybe \\boxed{3}", "3", False, True, "hedge: last box right"),
    ("\\boxed{2} or maybe \\boxed{3}", "2", False, False, "hedge: first box right"),
    ("\\boxed{5}. So the answer is \\boxed{5}.", "5", True, True, "repeated box"),
    ("\\boxed{15\\frac{39}{40}}, or \\boxed{\\frac{639}{40}}", "\\frac{639}{40}", True, True, "two forms of one answer"),
    ("\\boxed{\\frac{1}{2}} = \\boxed{0.5}", "0.5", True, True, "two equal numbers"),
]

@pytest.mark.parametrize("pred,gold,expected,form", TABLE, ids=[t[3] for t in TABLE])
def test_equivalence_table(pred, gold, expected, form):
    completion = f"<think>\nwork\n</think>\nThe answer is $\\boxed{{{pred}}}$."
    assert verify(completion, gold) is expected


@pytest.mark.parametrize("answer,gold,reward,evaluation,form", MULTI_BOX, ids=[t[4] for t in MULTI_BOX])
def test_several_boxes(answer, gold, reward, evaluation, form):
    completion = f"<think>\nwork \\boxed{{7}}\n</think>\n{answer}"  # boxes inside the thinking never count
    v = grade(completion, gold, policy="reward")
    assert v.status == (CORRECT if reward else WRONG), v
    v = grade(completion, gold)  # the default is the evaluation policy
    assert v.status == (CORRECT if evaluation else WRONG), v


def test_table_is_large_and_balanced():
    assert len(TABLE) >= 60
    assert sum(t[2] for t in TABLE) >= 30 and sum(not t[2] for t in TABLE) >= 20


def test_batch_grading_agrees_with_single_items():
    comps = [f"\\boxed{{{p}}}" for p, _, _, _ in TABLE] + [f"</think>{a}" for a, *_ in MULTI_BOX]
    golds = [g for _, g, _, _ in TABLE] + [g for _, g, *_ in MULTI_BOX]
    expected = [CORRECT if e else WRONG for _, _, e, _ in TABLE] + [CORRECT if e else WRONG for *_, e, _ in MULTI_BOX]
    assert [v.status for v in grade_batch(comps, golds)] == expected
    assert verify_batch(comps, golds) == [e == CORRECT for e in expected]


@pytest.mark.parametrize("gold", ["", "   ", "$$", "\\frac{", "???"])
def test_gold_that_does_not_parse_is_failed_not_wrong(gold):
    before = GRADER_STATS["failed"]
    v = grade("<think>x</think>\\boxed{1/2}", gold)
    assert v.status == FAILED and not v.correct and "gold answer" in v.reason, v
    assert GRADER_STATS["failed"] == before + 1
    with pytest.raises(GradingFailed, match="gold answer"):
        verify("<think>x</think>\\boxed{1/2}", gold)
    with pytest.raises(GradingFailed, match=r"1 of 2 items could not be graded \(items \[1\]\)"):
        verify_batch(["\\boxed{1}", "\\boxed{1}"], ["1", gold])


def test_accuracy_reward_raises_for_a_failed_item():
    from rewards.functions import accuracy
    from rewards.outcome import RewardFailed

    assert accuracy("\\boxed{3, 2}", {"answer": "2, 3"}) == 1.0
    assert accuracy("\\boxed{4}", {"answer": "2, 3"}) == 0.0
    with pytest.raises(RewardFailed, match="does not parse"):
        accuracy("\\boxed{4}", {"answer": "\\frac{"})


def test_verdict_is_not_a_bool():
    v = grade("\\boxed{2}", "2")
    assert v.correct and not v.failed
    with pytest.raises(TypeError, match="use .correct and .failed"):
        bool(v)


def test_extraction_rules():
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer("<think>\\boxed{3}</think>\\boxed{4}") == "4"
    assert extract_answer("<think>\\boxed{3}</think> no answer after thinking") is None
    assert extract_answer("no box at all: 42") is None
    assert extract_answer("\\boxed{}") is None and extract_answer("\\boxed{  }") is None
    assert extract_answer("first \\boxed{1} then \\boxed{2}") == "2"
    assert extract_answer("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_answer("unbalanced \\boxed{1") is None
    assert final_answers("<think>\\boxed{1}</think> \\boxed{2}, \\boxed{3} and \\boxed{2}") == ("2", "3")
    assert final_answers("<think>\\boxed{1}</think> \\boxed{2}, \\boxed{3} and \\boxed{2}", "eval") == ("3", "2")
    # an empty box is an answer with nothing in it (""), never skipped
    assert final_answers("\\boxed{\\boxed{7}} \\fbox{8} \\boxed 9 \\boxedx{1} \\boxed{}") == ("7", "8", "9", "")
    assert final_answers("\\boxed{2} \\boxed{3") == ("2",) and final_answers("no box") == ()


def test_missing_or_empty_box_is_wrong():
    assert not verify("the answer is 5", "5")
    assert not verify("\\boxed{}", "5")
    assert not verify("<think>\\boxed{5}</think>", "5")  # boxed only inside the thinking


def test_math500_reference_solutions_all_verify(shared_data):
    rows = [json.loads(line) for line in open("data/benchmarks/math500.jsonl")]
    verdicts = verify_batch([r["solution"] for r in rows], [r["answer"] for r in rows], timeout_s=10)
    failed = [(r["unique_id"], r["answer"]) for r, v in zip(rows, verdicts) if not v]
    assert not failed, failed


def test_math500_answers_against_each_other_are_mostly_wrong():
    # The grader must not be trivially permissive: shift answers by one problem.
    rows = [json.loads(line) for line in open("data/benchmarks/math500.jsonl")][:120]
    golds = [r["answer"] for r in rows]
    shifted = golds[1:] + golds[:1]
    verdicts = verify_batch([f"\\boxed{{{a}}}" for a in shifted], golds, timeout_s=10)
    same = sum(a == b for a, b in zip(shifted, golds))
    assert sum(verdicts) <= same + 3  # only identical-looking answers (e.g. two problems answering 2) pass


def test_slow_path_is_bounded_and_counted():
    # A gigantic power makes sympy work for a long time: it must be cut off, reported failed (never wrong)
    # and counted; the next item is graded as usual.
    before = GRADER_STATS["timeouts"]
    bomb = "\\boxed{(x+1)^{99999}-(x+2)^{99998}}"
    t0 = time.perf_counter()
    v = grade(bomb, "(x+1)^{99999}", timeout_s=1.0)
    assert time.perf_counter() - t0 < 10
    assert v.status == FAILED and v.timeout and "timeout" in v.reason, v
    assert GRADER_STATS["timeouts"] == before + 1
    with pytest.raises(GradingFailed, match="timeout"):
        verify(bomb, "(x+1)^{99999}", timeout_s=1.0)
    assert verify("\\boxed{x^2+2x+1}", "(x+1)^2") is True
