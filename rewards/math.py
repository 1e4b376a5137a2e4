"""The one math grader, shared by GRPO rewards and evaluation. Three outcomes: correct, wrong, failed.

`grade(completion, gold) -> Verdict` (and `grade_batch`) judges the boxed answers after the last `</think>`
(`rewards.extract.final_answers`) against the gold answer:
  - one boxed answer: that answer (as before);
  - several different boxes and a gold with several parts ("2, 3", "(2,2),(6,2)", "\\{1,2\\}"): the boxes
    are read together as one list ("\\boxed{2} and \\boxed{3}" answers "2, 3");
  - several different boxes and a one-part gold: correct only when EVERY box is equivalent to the gold. A
    completion that boxes several different final answers has not given one answer; taking the last box (or
    any box that matches) would reward hedging. Repeating the answer ("\\boxed{5} ... so \\boxed{5}") or
    writing it twice in two forms (`15\\frac{39}{40}` and `\\frac{639}{40}`) stays correct.
Each answer is compared with the gold in three tiers, cheapest first:
  1. string tier: both sides normalised (spaces, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, `$`, `\\text{}`
     wrappers, thousands separators, trailing units/degrees/percent, "percent"/"per cent"/"pct", currency)
     and compared; plain numbers (ints, decimals, fractions a/b, scientific notation) compare exactly as
     rationals; multi-part answers compare part by part as an unordered list (`rewards.parts`: "3, 2" equals
     "2, 3", "x = 2 or x = 3" equals "2, 3", but the ordered pair "(1,2)" never equals "(2,1)");
  2. math-verify (sympy) on the normalised LaTeX: fractions, radicals, pi/e, sets, tuples, intervals,
     matrices, equations (`x = 5` vs `5`);
  3. text answers (`\\text{Evelyn}`, multiple-choice letters) compare as case-folded words, so a product of
     symbols never passes for an anagram.
Tiers 1 and 3 run in-process in linear time. Tier 2 can hang on adversarial input, so it runs in the grader
pool (`rewards.pool`: worker processes of their own, hard per-item timeouts).

A verdict is FAILED, never silently wrong, when the item could not be judged: the grader timed out or its
worker died, or an answer meets a gold answer that does not parse (empty, or math-verify finds no expression
in it; an answer identical to such a gold as a string still matches). A completion without any boxed answer
is wrong whatever its gold, and so is one with more than MAX_BOXES different boxes. `verify` / `verify_batch` keep a bool API for convenience
and raise `GradingFailed` (a `RewardFailed`) for a failed item; `GRADER_STATS` counts calls, slow-path items,
timeouts, errors and failed items.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rewards.extract import final_answers
from rewards.outcome import RewardFailed
from rewards.parts import labelled, match_parts, split_parts

DEFAULT_TIMEOUT_S = 5.0
MAX_BOXES = 32
GRADER_STATS = {"calls": 0, "slow_path": 0, "timeouts": 0, "errors": 0, "failed": 0}
CORRECT, WRONG, FAILED = "correct", "wrong", "failed"


@dataclass(frozen=True)
class Verdict:
    """correct / wrong / failed (+ why it failed; `timeout` says the grader ran out of time)."""
    status: str
    reason: str | None = None
    timeout: bool = False

    @property
    def correct(self) -> bool:
        return self.status == CORRECT

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def __bool__(self) -> bool:
        raise TypeError("a Verdict is not a bool (it may be 'failed'): use .correct and .failed")


RIGHT_VERDICT, WRONG_VERDICT = Verdict(CORRECT), Verdict(WRONG)


class GradingFailed(RewardFailed):
    """An item could not be graded (timeout, dead worker, unparsable gold): it is neither right nor wrong."""


# -------------------------------------------------------------------------------------------- normalise
_UNIT_WORDS = (
    "units?|cm|centimeters?|m|meters?|km|kilometers?|mm|inches|inch|in|feet|foot|ft|yards?|yd|miles?|mi|"
    "square|sq|cubic|degrees?|deg|radians?|rad|seconds?|sec|s|minutes?|min|hours?|hr|hrs|days?|weeks?|months?|"
    "years?|dollars?|cents?|grams?|g|kg|kilograms?|pounds?|lbs?|ounces?|oz|liters?|l|ml|mph|people|students?|"
    "points?|ways?|apples?|coins?|marbles?|pages?|books?|boxes|eggs?|times|percent|per\\s?cent|pct"
)
_TEXT_UNIT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{\s*(?:" + _UNIT_WORDS + r")(?:\^?\{?[23]\}?)?\s*\}(\^\{?[23]\}?)?")
_TRAILING_UNIT = re.compile(r"(?<=[\d}])\s*(?:" + _UNIT_WORDS + r")(\^\{?[23]\}?)?\.?$", re.IGNORECASE)
_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_FRAC = re.compile(r"^([+-]?)\\frac\{?(\d+)\}?\{?(\d+)\}?$")
_SLASH = re.compile(r"^([+-]?\d+)/(\d+)$")
_SCI = re.compile(r"^([+-]?\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|\*|x)\s*10\^\{?([+-]?\d+)\}?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_SPACING = re.compile(r"(?<!\\)\\([!,; ])")
_MC = re.compile(r"^\(?([A-Ea-e])\)?$")


_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{(.*)\}", re.DOTALL)
_TEXT_ANSWER = re.compile(r"[A-Za-z][A-Za-z '\-]*[A-Za-z]")
_EQUATION_LHS = re.compile(r"^[a-zA-Z]\s*=\s*(?=[^=]+$)")
_SPACES = re.compile(r"\s+")


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    for _ in range(3):
        m = _WRAPPER.fullmatch(s)
        if m and "}" not in m.group(1).replace("{", "").rstrip("}"):
            s = m.group(1).strip()
        s = s.strip().strip("$").strip()
    return s


def normalize(s: Any) -> str:
    """Canonical text of an answer: the string tier compares these for equality."""
    if isinstance(s, float) and s.is_integer():
        s = int(s)
    s = str(s).strip()
    s = _SPACING.sub(lambda m: " " if m.group(1) == " " else "", s)  # \! \, \; \ (but not a \\ row break)
    s = s.replace("{,}", ",").replace("\\left", "")
    s = s.replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = s.replace("\\varnothing", "\\emptyset").replace("\\le ", "\\leq ").replace("\\ge ", "\\geq ")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "").replace("$", "").replace("dfrac", "frac")
    s = _TEXT_UNIT.sub("", s)
    s = _TRAILING_UNIT.sub("", s.strip())
    s = _strip_wrappers(s)
    if s.endswith(".") and not re.search(r"\d\.$", s[:-1] + "x"):
        s = s[:-1]
    s = _EQUATION_LHS.sub("", s)  # "x = 5" -> "5" (single variable, single '=')
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return _SPACES.sub("", s)


def as_rational(s: str) -> Fraction | None:
    """Exact value of a plain number: 12, -0.5, 1.5e3, 3/4, \\frac{3}{4}, 1.5\\times10^{3}; else None."""
    try:
        if _NUM.match(s):
            return Fraction(s)
        m = _FRAC.match(s)
        if m:
            return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) == "-" else 1)
        m = _SLASH.match(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
        m = _SCI.match(s)
        if m:
            return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _is_text_answer(s: str) -> bool:
    """Words (a name, a direction, 'yes'): compare as text, never as a product of symbols."""
    return bool(_TEXT_ANSWER.fullmatch(s))


def _fast_pair(p: str, g: str) -> bool | None:
    """Linear-time decision on two normalised answers (True/False), None when math-verify must decide."""
    if p == g:
        return True
    pr, gr = as_rational(p), as_rational(g)
    if pr is not None and gr is not None:
        return pr == gr or (gr.denominator != 1 and abs(float(pr - gr)) <= 1e-6 * max(1.0, abs(float(gr))))
    pm, gm = _MC.match(p), _MC.match(g)
    if gm and len(g) <= 3:
        return bool(pm) and pm.group(1).upper() == gm.group(1).upper()
    if _is_text_answer(g) or _is_text_answer(p):
        return p.lower() == g.lower()
    return None


# -------------------------------------------------------------------------------------------- judge
def _mv_parse(text: str):
    from math_verify import parse

    # math-verify warns that its signal-based timeout is off: we bound it from outside (process pool).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return parse(f"${text}$", parsing_timeout=None)


def _mv_compare(p: str, g: str, gold: Any) -> Verdict:
    """Tier 2 on normalised answers; a gold in which math-verify finds no expression is a failed item."""
    from math_verify import verify as mv_verify

    gold_parsed = _mv_parse(g)
    if all(isinstance(x, str) for x in gold_parsed):
        return Verdict(FAILED, f"gold answer {str(gold)[:200]!r} does not parse (math-verify finds no expression)")
    pred_parsed = _mv_parse(p)
    if not pred_parsed:
        return WRONG_VERDICT
    return RIGHT_VERDICT if mv_verify(gold_parsed, pred_parsed, timeout_seconds=None) else WRONG_VERDICT


_SEPARATOR_HINT = re.compile(r"[,;]|or|and|quad")


def _parts_verdict(pred: str, gold: str, slow: bool) -> bool | None:
    """Multi-part comparison (see rewards.parts); False when neither side has several parts."""
    if not (_SEPARATOR_HINT.search(gold) or _SEPARATOR_HINT.search(pred)):
        return False
    gp, pp = split_parts(_strip_wrappers(gold)), split_parts(_strip_wrappers(pred))
    if len(gp) < 2 and len(pp) < 2:
        return False

    def equal(a: str, b: str) -> bool | None:
        v = _compare(a, b, slow, parts=False)
        return None if v is None else v.correct

    return match_parts(labelled(pp), labelled(gp), equal)


def _compare(pred: str, gold: Any, slow: bool, parts: bool = True, g: str | None = None) -> Verdict | None:
    """One answer against the gold (`g`: its normalised text, when known); None (only when slow=False) means
    math-verify must decide."""
    p, g = normalize(pred), normalize(gold) if g is None else g
    if not g:
        return Verdict(FAILED, f"gold answer {str(gold)[:200]!r} is empty")
    if not p:
        return WRONG_VERDICT
    fast = _fast_pair(p, g)
    by_parts = _parts_verdict(pred, str(gold), False) if parts and fast is not True else False
    if by_parts is None and slow:  # some pair of parts needs math-verify
        by_parts = _parts_verdict(pred, str(gold), True)
    if fast is True or by_parts is True:
        return RIGHT_VERDICT
    if fast is False and by_parts is False:
        return WRONG_VERDICT
    if not slow:
        return None
    return WRONG_VERDICT if fast is False else _mv_compare(p, g, gold)


def judge(answers: Sequence[str], gold: Any, *, slow: bool = True) -> Verdict | None:
    """The verdict on a completion's boxed answers (`final_answers`) against the gold answer, unbounded (runs
    in a pool worker). With slow=False only the linear-time tiers run and None means 'needs math-verify'."""
    if not answers or len(answers) > MAX_BOXES:  # no answer is wrong whatever the gold (and cannot be failed)
        return WRONG_VERDICT
    g = normalize(gold)
    if not g:
        return Verdict(FAILED, f"gold answer {str(gold)[:200]!r} is empty")
    if len(answers) == 1 or len(split_parts(_strip_wrappers(str(gold)))) > 1:
        return _compare(", ".join(answers), gold, slow, g=g)
    verdicts = []
    for a in answers:  # several boxes, one-part gold: every box must be the answer
        v = _compare(a, gold, slow, g=g)
        if v is not None and v.status == WRONG:
            return WRONG_VERDICT
        verdicts.append(v)
    failed = [v for v in verdicts if v is not None and v.failed]
    if failed:
        return failed[0]
    return None if any(v is None for v in verdicts) else RIGHT_VERDICT


def warm_up() -> None:
    """Import and exercise math-verify once (pool workers call this before taking work)."""
    judge(("x^2+2x+1",), "(x+1)^2")


# -------------------------------------------------------------------------------------------- bounded API
_POOL = None
_POOL_LOCK = threading.Lock()


def grader_pool():
    """The process-wide grader pool (started on first use; $R1LAB_GRADER_WORKERS sets its size)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from rewards.pool import HardTimeoutPool

            _POOL = HardTimeoutPool(num_workers=int(os.environ.get("R1LAB_GRADER_WORKERS", "0")) or None)
        return _POOL


def _verdict_of(result) -> Verdict:
    """A pool ItemResult as a verdict: a timeout or a crash is a failed item, never a wrong one."""
    if result.status == "ok":
        return result.value
    if result.status == "timeout":
        GRADER_STATS["timeouts"] += 1
        return Verdict(FAILED, f"grader timeout: {result.error}", timeout=True)
    GRADER_STATS["errors"] += 1
    return Verdict(FAILED, f"grader error: {(result.error or '').strip()[:1000]}")


def judge_bounded(items: Sequence[tuple[Sequence[str], Any]], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                  deadline_s: float | None = None, pool=None) -> list[Verdict]:
    """`judge` for (answers, gold) items in the grader pool: each item bounded by timeout_s, the call by
    deadline_s. Raises rewards.pool.GraderUnavailable when the pool cannot run at all."""
    if not items:
        return []
    if os.environ.get("R1LAB_IN_GRADER_WORKER"):  # already inside a worker: the pool around us is the bound
        return [judge(a, g) for a, g in items]  # type: ignore[misc]
    results = (pool or grader_pool()).map(judge, [(tuple(a), g) for a, g in items], timeout_s, deadline_s)
    return [_verdict_of(r) for r in results]


def grade_answers(items: Sequence[tuple[Sequence[str], Any]], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                  deadline_s: float | None = None, pool=None) -> list[Verdict]:
    """Verdicts for (boxed answers, gold) items: fast tiers in-process, the rest through `judge_bounded`."""
    out: list[Verdict | None] = [judge(a, g, slow=False) for a, g in items]
    slow = [i for i, v in enumerate(out) if v is None]
    GRADER_STATS["calls"] += len(items)
    GRADER_STATS["slow_path"] += len(slow)
    for i, v in zip(slow, judge_bounded([items[i] for i in slow], timeout_s=timeout_s, deadline_s=deadline_s,
                                        pool=pool)):
        out[i] = v
    GRADER_STATS["failed"] += sum(v.failed for v in out)  # type: ignore[union-attr]
    return out  # type: ignore[return-value]


def grade_batch(completions: Sequence[str], golds: Sequence[Any], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                deadline_s: float | None = None, pool=None) -> list[Verdict]:
    """One Verdict per completion: its boxed answers after the last </think> against its gold answer."""
    if len(completions) != len(golds):
        raise ValueError(f"grade_batch: {len(completions)} completions but {len(golds)} gold answers")
    return grade_answers([(final_answers(c), g) for c, g in zip(completions, golds)], timeout_s=timeout_s,
                         deadline_s=deadline_s, pool=pool)


def grade(completion: str, gold: Any, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Verdict:
    """Is the completion's final answer equivalent to `gold`? correct / wrong / failed (with the reason)."""
    return grade_batch([completion], [gold], timeout_s=timeout_s)[0]


def verify_batch(completions: Sequence[str], golds: Sequence[Any], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[bool]:
    """`grade_batch` as bools; raises GradingFailed (naming the items) when any item could not be graded."""
    verdicts = grade_batch(completions, golds, timeout_s=timeout_s)
    failed = [(i, v.reason) for i, v in enumerate(verdicts) if v.failed]
    if failed:
        i, reason = failed[0]
        raise GradingFailed(f"{len(failed)} of {len(verdicts)} items could not be graded (items "
                            f"{[j for j, _ in failed][:20]}); item {i}: {reason}")
    return [v.correct for v in verdicts]


def verify(completion: str, gold: Any, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True/False for correct/wrong; raises GradingFailed when the item could not be graded (see `grade`)."""
    v = grade(completion, gold, timeout_s=timeout_s)
    if v.failed:
        raise GradingFailed(f"grading failed: {v.reason}")
    return v.correct
