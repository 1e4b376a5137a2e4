"""The one math grader, shared by GRPO rewards and evaluation. Three outcomes: correct, wrong, failed.

`grade(completion, gold, policy=...) -> Verdict` (and `grade_batch`) judges the answers stated after the last
`</think>` (`rewards.extract.stated_answers`: every box, an empty box as the empty answer, and a Minerva/MATH
closing line "Final Answer: The final answer is X. I hope it is correct.") against the gold answer, under one of
two hedging policies:
  - "reward" (REWARD_POLICY; the accuracy reward and `RewardScorer` use it): every stated answer must be right.
    With a one-part gold, a completion that states several different answers (`\\boxed{10} ... actually
    \\boxed{12}`, a box then a different closing line) has not given one answer, and rewarding any of them
    would teach the policy to hedge; an empty box is a stated answer with nothing in it, so it is wrong too.
    Repeating the answer or writing it in two forms (`15\\frac{39}{40}` and `\\frac{639}{40}`) stays right.
  - "eval" (EVAL_POLICY; the default of `grade`/`verify`, and the evaluation harness): the last stated answer
    decides, as math-verify, lm-evaluation-harness and the R1 evaluation read a completion, so that published
    numbers compare; an empty last box is no answer (wrong), an empty box before the last one is ignored.
Under both, a gold with several parts ("2, 3", "(2,2),(6,2)", "\\{1,2\\}", `$$\\{1, 2\\}$$`) may be answered
by several boxes read together as one list ("\\boxed{2} and \\boxed{3}" answers "2, 3").
Each answer is compared with the gold in three tiers, cheapest first:
  1. string tier: both sides normalised (spaces, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, `$`, `\\[..\\]`,
     `\\text{}` wrappers, thousands separators (a space between groups of three digits too, SI style, as
     `10\\,000` is; digits spaced any other way, "1 2", are no number and compare as text only, where math-verify
     would read a product), trailing units/degrees/percent ("percent", "percentage", "per cent", "pct"),
     currency; a chained inequality in one variable becomes its interval, `2 \\le x < 5` -> `[2, 5)`) and
     compared; plain numbers (ints, decimals, fractions a/b, scientific notation) compare exactly as
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
in it; an answer identical to such a gold as a string still matches). A completion that states no answer is
wrong whatever its gold, and so is one with more than MAX_BOXES different answers. `verify` / `verify_batch`
keep a bool API for convenience and raise `GradingFailed` (a `RewardFailed`) for a failed item; `GRADER_STATS` counts calls, slow-path items,
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
    "points?|ways?|apples?|coins?|marbles?|pages?|books?|boxes|eggs?|times|percentage\\s?points?|percentages?|percent|per\\s?cent|pct"
)
_TEXT_UNIT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{\s*(?:" + _UNIT_WORDS + r")(?:\^?\{?[23]\}?)?\s*\}(\^\{?[23]\}?)?")
_TRAILING_UNIT = re.compile(r"(?<=[\d}])\s*(?:" + _UNIT_WORDS + r")(\^\{?[23]\}?)?\.?$", re.IGNORECASE)
_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_FRAC = re.compile(r"^([+-]?)\\frac\{?(\d+)\}?\{?(\d+)\}?$")
_SLASH = re.compile(r"^([+-]?\d+)/(\d+)$")
_SCI = re.compile(r"^([+-]?\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|\*|x)\s*10\^\{?([+-]?\d+)\}?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_SPACING = re.compile(r"(?<!\\)\\([!,; ])")
_BRACED_COMMA = re.compile(r"(?<=\d) ?\{ ?, ?\} ?(?=\d)")   # 1{,}000 and 14 {, }916
_MC = re.compile(r"^\(?([A-Ea-e])\)?$")


_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{(.*)\}", re.DOTALL)
_TEXT_ANSWER = re.compile(r"[A-Za-z][A-Za-z '\-]*[A-Za-z]")
_EQUATION_LHS = re.compile(r"^[a-zA-Z]\s*=\s*(?=[^=]+$)")
_SPACES = re.compile(r"\s+")


_DISPLAY = (("\\[", "\\]"), ("\\(", "\\)"))


def _strip_wrappers(s: str) -> str:
    """Outer `$`/`$$`, `\\[...\\]`, `\\(...\\)`, `\\text{...}`-like wrappers and a sentence's final period."""
    s = s.strip()
    for _ in range(3):
        m = _WRAPPER.fullmatch(s)
        if m and "}" not in m.group(1).replace("{", "").rstrip("}"):
            s = m.group(1).strip()
        s = s.strip().strip("$").strip()
        for a, b in _DISPLAY:
            if s.startswith(a) and s.endswith(b):
                s = s[len(a):-len(b)].strip()
        if s.endswith(".") and s[-2:-1] in ("}", ")", "]", "$"):
            s = s[:-1].rstrip()
    return s


# chained inequalities in one variable are intervals: `2 \le x < 5` is [2, 5), `x > 0` is (0, \infty)
_REL = re.compile(r"\\(?:leqslant|geqslant|leq|geq|le|ge|lt|gt)(?![A-Za-z])|<=|>=|≤|≥|<|>")
_VARIABLE = re.compile(r"[A-Za-z]")
_IN_SET = re.compile(r"^[A-Za-z]\s*\\in\s*")


def _as_interval(s: str) -> str:
    """`a \\le x \\le b` -> `[a, b]` (open ends for strict relations), `x \\ge a` -> `[a, \\infty)`, ...; `x \\in S`
    -> `S`; anything else unchanged."""
    s = _IN_SET.sub("", s)
    ops = [(m.group(), m.start(), m.end()) for m in _REL.finditer(s)]
    if not ops or len(ops) > 2:
        return s
    cuts = [0] + [x for _, a, b in ops for x in (a, b)] + [len(s)]
    terms = [s[cuts[i]:cuts[i + 1]].strip() for i in range(0, len(cuts), 2)]
    less = ["<" in o or "\\l" in o or "≤" in o for o, _, _ in ops]
    closed = ["=" in o or "\\le" in o or "\\ge" in o or o in "≤≥" for o, _, _ in ops]
    if not all(terms) or len(set(less)) != 1:
        return s
    if not less[0]:  # b >= x >= a: read right to left
        terms, closed = terms[::-1], closed[::-1]
    if len(ops) == 2 and _VARIABLE.fullmatch(terms[1]) and not _VARIABLE.fullmatch(terms[0]):
        lo, hi, lc, hc = terms[0], terms[2], closed[0], closed[1]
    elif len(ops) == 1 and _VARIABLE.fullmatch(terms[0]) and not _VARIABLE.fullmatch(terms[1]):
        lo, hi, lc, hc = "-\\infty", terms[1], False, closed[0]      # x < b
    elif len(ops) == 1 and _VARIABLE.fullmatch(terms[1]) and not _VARIABLE.fullmatch(terms[0]):
        lo, hi, lc, hc = terms[0], "\\infty", closed[0], False       # a < x
    else:
        return s
    return f"{'[' if lc else '('}{lo}, {hi}{']' if hc else ')'}"


# digits separated by spaces: a thousands grouping ("10 000", SI style, like `10\\,000`) is one number; any other
# spacing ("1 2") is ambiguous and compares as text only (math-verify would read it as a product)
_SPACED_THOUSANDS = re.compile(r"[+-]?\d{1,3}( \d{3})+(\.\d+)?")
_DIGIT_SPACE_DIGIT = re.compile(r"(\d)\s+(?=\d)")
AMBIGUOUS_SPACE = "\u2423"   # marks "1 2": never a number, never handed to math-verify


def normalize(s: Any) -> str:
    """Canonical text of an answer: the string tier compares these for equality."""
    if isinstance(s, float) and s.is_integer():
        s = int(s)
    s = str(s).strip()
    s = _SPACING.sub(lambda m: " " if m.group(1) == " " else "", s)  # \! \, \; \ (but not a \\ row break)
    s = _BRACED_COMMA.sub(",", s).replace("{,}", ",").replace("\\left", "")
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
    s = _as_interval(s)
    if _DIGIT_SPACE_DIGIT.search(s):
        s = s.replace(" ", "") if _SPACED_THOUSANDS.fullmatch(s.strip()) else _DIGIT_SPACE_DIGIT.sub(
            lambda m: m.group(1) + AMBIGUOUS_SPACE, s)
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
    if AMBIGUOUS_SPACE in p or AMBIGUOUS_SPACE in g:
        return False
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


REWARD_POLICY, EVAL_POLICY = "reward", "eval"
POLICIES = (REWARD_POLICY, EVAL_POLICY)


def judge(answers: Sequence[str], gold: Any, policy: str = "eval", *, slow: bool = True) -> Verdict | None:
    """The verdict on a completion's stated answers (`final_answers(completion, policy)`) against the gold
    answer, unbounded (runs in a pool worker). With slow=False only the linear-time tiers run and None means
    'needs math-verify'. See the module docstring for the two policies."""
    if policy not in POLICIES:
        raise ValueError(f"grading policy {policy!r} unknown; allowed: {POLICIES}")
    if not answers or len(answers) > MAX_BOXES:  # no answer is wrong whatever the gold (and cannot be failed)
        return WRONG_VERDICT
    g = normalize(gold)
    if not g:
        return Verdict(FAILED, f"gold answer {str(gold)[:200]!r} is empty")
    multi_part = len(split_parts(_strip_wrappers(str(gold)))) > 1
    if policy == "eval":
        return _judge_last(answers, gold, g, multi_part, slow)
    if "" in answers:  # an empty box is a stated answer with nothing in it: never the right one
        return WRONG_VERDICT
    if len(answers) == 1 or multi_part:
        return _compare(", ".join(answers), gold, slow, g=g)
    verdicts = []
    for a in answers:  # several answers, one-part gold: every one must be the answer
        v = _compare(a, gold, slow, g=g)
        if v is not None and v.status == WRONG:
            return WRONG_VERDICT
        verdicts.append(v)
    return _first_failed_or(verdicts, RIGHT_VERDICT)


def _judge_last(answers: Sequence[str], gold: Any, g: str, multi_part: bool, slow: bool) -> Verdict | None:
    """The evaluation policy: the last stated answer decides (an empty last box is no answer); with a gold of
    several parts, the answers read together as one list also count (`\\boxed{1}, \\boxed{2}` for {1, 2})."""
    if not answers[-1]:
        return WRONG_VERDICT
    last = _compare(answers[-1], gold, slow, g=g)
    filled = [a for a in answers if a]
    if not multi_part or len(filled) < 2 or (last is not None and last.correct):
        return last
    together = _compare(", ".join(filled), gold, slow, g=g)
    if together is not None and together.correct:
        return RIGHT_VERDICT
    return _first_failed_or([last, together], WRONG_VERDICT)


def graded_text(answers: Sequence[str], gold: Any, policy: str = "eval") -> str | None:
    """The answer as `judge` reads it, for reports: the last answer (eval policy, one-part gold), or every
    answer read together as a list; None when nothing was stated."""
    filled = [a for a in answers if a]
    if not filled or (policy == EVAL_POLICY and not answers[-1]):
        return None
    if policy == EVAL_POLICY and len(split_parts(_strip_wrappers(str(gold)))) < 2:
        return answers[-1]
    return ", ".join(filled)


def _first_failed_or(verdicts: list[Verdict | None], otherwise: Verdict) -> Verdict | None:
    """A failed verdict among them, else None when one is undecided (slow=False), else `otherwise`."""
    failed = [v for v in verdicts if v is not None and v.failed]
    if failed:
        return failed[0]
    return None if any(v is None for v in verdicts) else otherwise


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


def judge_bounded(items: Sequence[tuple[Sequence[str], Any]], *, policy: str = "eval",
                  timeout_s: float = DEFAULT_TIMEOUT_S, deadline_s: float | None = None, pool=None) -> list[Verdict]:
    """`judge` for (answers, gold) items in the grader pool: each item bounded by timeout_s, the call by
    deadline_s. Raises rewards.pool.GraderUnavailable when the pool cannot run at all."""
    if not items:
        return []
    if os.environ.get("R1LAB_IN_GRADER_WORKER"):  # already inside a worker: the pool around us is the bound
        return [judge(a, g, policy) for a, g in items]  # type: ignore[misc]
    results = (pool or grader_pool()).map(judge, [(tuple(a), g, policy) for a, g in items], timeout_s, deadline_s)
    return [_verdict_of(r) for r in results]


def grade_answers(items: Sequence[tuple[Sequence[str], Any]], *, policy: str = "eval",
                  timeout_s: float = DEFAULT_TIMEOUT_S, deadline_s: float | None = None, pool=None) -> list[Verdict]:
    """Verdicts for (stated answers, gold) items: fast tiers in-process, the rest through `judge_bounded`."""
    out: list[Verdict | None] = [judge(a, g, policy, slow=False) for a, g in items]
    slow = [i for i, v in enumerate(out) if v is None]
    GRADER_STATS["calls"] += len(items)
    GRADER_STATS["slow_path"] += len(slow)
    for i, v in zip(slow, judge_bounded([items[i] for i in slow], policy=policy, timeout_s=timeout_s,
                                        deadline_s=deadline_s, pool=pool)):
        out[i] = v
    GRADER_STATS["failed"] += sum(v.failed for v in out)  # type: ignore[union-attr]
    return out  # type: ignore[return-value]


def grade_batch(completions: Sequence[str], golds: Sequence[Any], *, policy: str = "eval",
                timeout_s: float = DEFAULT_TIMEOUT_S, deadline_s: float | None = None, pool=None) -> list[Verdict]:
    """One Verdict per completion: its stated answers after the last </think> against its gold answer, under
    `policy` ("eval": the last answer decides; "reward": every answer must be right)."""
    if len(completions) != len(golds):
        raise ValueError(f"grade_batch: {len(completions)} completions but {len(golds)} gold answers")
    return grade_answers([(final_answers(c, policy), g) for c, g in zip(completions, golds)], policy=policy,
                         timeout_s=timeout_s, deadline_s=deadline_s, pool=pool)


def grade(completion: str, gold: Any, *, policy: str = "eval", timeout_s: float = DEFAULT_TIMEOUT_S) -> Verdict:
    """Is the completion's final answer equivalent to `gold`? correct / wrong / failed (with the reason)."""
    return grade_batch([completion], [gold], policy=policy, timeout_s=timeout_s)[0]


def verify_batch(completions: Sequence[str], golds: Sequence[Any], *, policy: str = "eval",
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> list[bool]:
    """`grade_batch` as bools; raises GradingFailed (naming the items) when any item could not be graded."""
    verdicts = grade_batch(completions, golds, policy=policy, timeout_s=timeout_s)
    failed = [(i, v.reason) for i, v in enumerate(verdicts) if v.failed]
    if failed:
        i, reason = failed[0]
        raise GradingFailed(f"{len(failed)} of {len(verdicts)} items could not be graded (items "
                            f"{[j for j, _ in failed][:20]}); item {i}: {reason}")
    return [v.correct for v in verdicts]


def verify(completion: str, gold: Any, *, policy: str = "eval", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True/False for correct/wrong; raises GradingFailed when the item could not be graded (see `grade`)."""
    v = grade(completion, gold, policy=policy, timeout_s=timeout_s)
    if v.failed:
        raise GradingFailed(f"grading failed: {v.reason}")
    return v.correct
