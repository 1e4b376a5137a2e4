"""Countdown checker: the model's expression must use each given number exactly once and equal the target.

Evaluation walks a whitelisted AST (numbers, + - * /, parentheses, unary minus); no `eval`, so a completion
cannot run code, and huge powers are impossible because `**` is not allowed.
"""
from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from rewards.extract import extract_answer

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
MAX_EXPR_CHARS = 200


def _eval(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left, used), _eval(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, used)
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def normalize_expression(expr: str) -> str:
    """LaTeX-ish operators to Python: \\times, \\cdot, x-as-times, \\div, unicode minus; drop '= target'."""
    e = expr.strip().strip("$")
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("\\div", "/"), ("÷", "/"), ("−", "-"),
                 ("\\left", ""), ("\\right", ""), ("{", "("), ("}", ")")):
        e = e.replace(a, b)
    if "=" in e:
        e = e.split("=")[0]
    return e.strip()


def check_expression(expr: str, numbers: Sequence[int], target: int | str) -> bool:
    """True iff `expr` uses exactly the multiset `numbers` and evaluates to `target`."""
    e = normalize_expression(expr)
    if not e or len(e) > MAX_EXPR_CHARS:
        return False
    try:
        used: list[int] = []
        value = _eval(ast.parse(e, mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    return Counter(used) == Counter(int(n) for n in numbers) and value == Fraction(int(target))


def check_completion(completion: str, sample: Mapping[str, Any]) -> bool:
    """A countdown row's verdict: the completion's final boxed expression checked against its numbers/target.
    Never a failed item (evaluation is bounded by MAX_EXPR_CHARS and has no powers); a row without its
    numbers/target is a data error and raises, naming the missing fields."""
    missing = [k for k in ("numbers", "target") if k not in sample]
    if missing:
        raise KeyError(f"countdown row without {missing} (fields: {sorted(sample)})")
    expr = extract_answer(completion)
    return expr is not None and check_expression(expr, sample["numbers"], sample["target"])
