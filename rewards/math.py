"""The one math grader, shared by GRPO rewards and evaluation.

`verify(completion, gold)` takes the last `\\boxed{...}` after the last `</think>` and decides equivalence with
the gold answer. Three tiers, cheapest first:
  1. string tier: both sides normalised (spaces, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`, `$`, `\\text{}`
     wrappers, thousands separators, trailing units/degrees/percent/currency) and compared; plain numbers
     (ints, decimals, fractions a/b, scientific notation) are compared exactly as rationals;
  2. math-verify (sympy) on the normalised LaTeX: fractions, radicals, pi/e, sets, tuples, intervals,
     matrices, equations (`x = 5` vs `5`);
  3. text answers (`\\text{Evelyn}`, multiple-choice letters) compare as case-folded words, so a product of
     symbols never passes for an anagram.
Tiers 1 and 3 run in-process in linear time. Tier 2 can hang on adversarial input (sympy), so `verify` runs
it in a process pool with a hard timeout; a timeout scores as wrong and is counted in `GRADER_STATS`.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from fractions import Fraction
from typing import Any

from rewards.extract import extract_answer

DEFAULT_TIMEOUT_S = 5.0
GRADER_STATS = {"calls": 0, "slow_path": 0, "timeouts": 0, "errors": 0}

# -------------------------------------------------------------------------------------------- normalise
_UNIT_WORDS = (
    "units?|cm|centimeters?|m|meters?|km|kilometers?|mm|inches|inch|in|feet|foot|ft|yards?|yd|miles?|mi|"
    "square|sq|cubic|degrees?|deg|radians?|rad|seconds?|sec|s|minutes?|min|hours?|hr|hrs|days?|weeks?|months?|"
    "years?|dollars?|cents?|grams?|g|kg|kilograms?|pounds?|lbs?|ounces?|oz|liters?|l|ml|mph|people|students?|"
    "points?|ways?|apples?|coins?|marbles?|pages?|books?|boxes|eggs?|times"
)
_TEXT_UNIT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{\s*(?:" + _UNIT_WORDS + r")(?:\^?\{?[23]\}?)?\s*\}(\^\{?[23]\}?)?")
_TRAILING_UNIT = re.compile(r"(?<=[\d}])\s*(?:" + _UNIT_WORDS + r")(\^\{?[23]\}?)?$", re.IGNORECASE)
_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_FRAC = re.compile(r"^([+-]?)\\frac\{?(\d+)\}?\{?(\d+)\}?$")
_SLASH = re.compile(r"^([+-]?\d+)/(\d+)$")
_SCI = re.compile(r"^([+-]?\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|\*|x)\s*10\^\{?([+-]?\d+)\}?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_SPACING = re.compile(r"(?<!\\)\\([!,; ])")
_MC = re.compile(r"^\(?([A-Ea-e])\)?$")


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    for _ in range(3):
        m = re.fullmatch(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{(.*)\}", s, flags=re.S)
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
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=[^=]+$)", "", s)  # "x = 5" -> "5" (single variable, single '=')
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return re.sub(r"\s+", "", s)


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
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z '\-]*[A-Za-z]", s)) and not re.fullmatch(r"[a-zA-Z]", s)


def fast_verdict(pred: str, gold: Any) -> bool | None:
    """Linear-time decision when possible (True/False), None when math-verify must decide."""
    p, g = normalize(pred), normalize(gold)
    if not p:
        return False
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


def _mv_parse(text: str):
    from math_verify import parse

    # math-verify warns that its signal-based timeout is off: we bound it from outside (process pool).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return parse(f"${text}$", parsing_timeout=None)


def grade_answer(pred: str, gold: Any) -> bool:
    """Full, unbounded comparison of an extracted answer with the gold answer (runs inside a worker)."""
    fast = fast_verdict(pred, gold)
    if fast is not None:
        return fast
    from math_verify import verify as mv_verify

    g, p = normalize(gold), normalize(pred)
    gold_parsed, pred_parsed = _mv_parse(g), _mv_parse(p)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(mv_verify(gold_parsed, pred_parsed, timeout_seconds=None))


def grade_completion(completion: str, gold: Any) -> bool:
    """Unbounded `verify` (for use inside a pool worker)."""
    pred = extract_answer(completion)
    return pred is not None and grade_answer(pred, gold)


# -------------------------------------------------------------------------------------------- bounded API
_POOL = None
_POOL_LOCK = threading.Lock()


def grader_pool():
    """The process-wide grader pool (started on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from rewards.pool import HardTimeoutPool

            _POOL = HardTimeoutPool(num_workers=int(os.environ.get("R1LAB_GRADER_WORKERS", "0")) or None)
        return _POOL


def verify_batch(completions: list[str], golds: list[Any], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[bool]:
    """Grade many completions; math-verify items go through the pool with a hard per-item timeout."""
    if len(completions) != len(golds):
        raise ValueError(f"verify_batch: {len(completions)} completions but {len(golds)} gold answers")
    verdicts: list[bool | None] = []
    slow: list[int] = []
    for i, (c, g) in enumerate(zip(completions, golds)):
        GRADER_STATS["calls"] += 1
        pred = extract_answer(c)
        v = False if pred is None else fast_verdict(pred, g)
        verdicts.append(v)
        if v is None:
            slow.append(i)
    if slow:
        GRADER_STATS["slow_path"] += len(slow)
        if os.environ.get("R1LAB_IN_GRADER_WORKER"):
            for i in slow:
                verdicts[i] = grade_completion(completions[i], golds[i])
        else:
            results = grader_pool().map(grade_completion, [(completions[i], golds[i]) for i in slow], timeout_s)
            for i, r in zip(slow, results):
                GRADER_STATS["timeouts"] += r.status == "timeout"
                GRADER_STATS["errors"] += r.status == "error"
                verdicts[i] = bool(r.value) if r.status == "ok" else False
    return [bool(v) for v in verdicts]


def verify(completion: str, gold: Any, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Is the completion's final boxed answer equivalent to `gold`? Bounded by `timeout_s` (then False)."""
    return verify_batch([completion], [gold], timeout_s=timeout_s)[0]
