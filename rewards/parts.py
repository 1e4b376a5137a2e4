"""Answers with several parts: "2, 3", "x = 2 or x = 3", "\\{(2,2),(6,2)\\}", or several boxed answers.

`split_parts(answer)` cuts an answer at its top-level separators (commas, semicolons, "or"/"and" as words or
`\\text{ or }`, `\\quad`) after dropping outer set braces `\\{...\\}`. What stays ONE part, because its order or
its digits matter: anything in parentheses, brackets or `\\langle...\\rangle` (an ordered pair, an interval, a
vector: "(1,2)" is never the list 1, 2), anything with a `\\begin{...}` environment (matrices), and a number
with thousands separators ("1,000" is one thousand, not the list 1, 000).

`labelled(parts)` reads "x = 2" as the value 2 of variable x. When all parts name the same variable (or none),
they are solutions of one unknown and the labels are dropped ("x = 2 or x = 3" is the list 2, 3); when they
name different variables ("x = 2, y = 3") the labels are kept and must match the gold's.

`match_parts(pred, gold, equal)` is an unordered one-to-one matching (a list of solutions is a set): every
predicted part must be equivalent to its own gold part, with the same count. It only ever says yes, no or
"undecided" (when `equal` is undecided for some pair); the caller keeps the whole-answer comparison as well.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

MAX_PARTS = 12
_CONNECTIVES = re.compile(r"\\(?:text|mbox|textrm|mathrm)\{\s*(?:or|and)\s*\}|\\q?quad(?![A-Za-z])|"
                          r"(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])|[,;]")
_OPENERS = ("\\langle", "(", "[", "{")
_CLOSERS = ("\\rangle", ")", "]", "}")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_LABEL = re.compile(r"^\s*([A-Za-z])\s*=\s*([^=]+)$", re.DOTALL)

Label = str | None


def _outer_set(s: str) -> str:
    """`\\{1, 2\\}` -> `1, 2` when the outer set braces enclose the whole answer; so do plain braces `{1, 2}`
    (LaTeX grouping: they render as the list 1, 2, and math-verify reads them as a set)."""
    for opener, closer in (("\\{", "\\}"), ("{", "}")):
        if not (s.startswith(opener) and s.endswith(closer)) or len(s) < 2 * len(opener):
            continue
        depth, i = 0, 0
        while i < len(s) - len(closer):
            if s.startswith(opener, i):
                depth += 1
            elif s.startswith(closer, i):
                depth -= 1
                if depth == 0:
                    return s  # "\{1\} \cup \{2\}": the first set closes before the end
            i += 1 if opener == "{" or not s.startswith(("\\{", "\\}"), i) else 2
        return s[len(opener):-len(closer)].strip()
    return s


def _top_level_split(s: str) -> list[str]:
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        opener = next((t for t in _OPENERS if s.startswith(t, i)), None)
        closer = None if opener else next((t for t in _CLOSERS if s.startswith(t, i)), None)
        if opener or closer:
            depth += 1 if opener else -1
            i += len(opener or closer)  # type: ignore[arg-type]
            continue
        sep = _CONNECTIVES.match(s, i) if depth == 0 else None
        if sep:
            parts.append(s[start:i])
            start = i = sep.end()
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts if p.strip()]


def split_parts(answer: str) -> list[str]:
    """The top-level parts of an answer (one part when it has no top-level separator)."""
    s = answer.strip().strip("$").replace("\\left", "").replace("\\right", "").strip()
    if "\\begin" in s or _THOUSANDS.match(s.replace(" ", "")):
        return [s]
    s = _outer_set(s)
    return _top_level_split(s) or [s]


def labelled(parts: Sequence[str]) -> list[tuple[Label, str]]:
    """(variable or None, value) per part; see the module docstring for when labels are kept."""
    found = [_LABEL.match(p) for p in parts]
    names = {m.group(1) for m in found if m}
    if len(names) <= 1:
        return [(None, m.group(2).strip() if m else p) for m, p in zip(found, parts)]
    return [(m.group(1), m.group(2).strip()) if m else (None, p) for m, p in zip(found, parts)]


def match_parts(pred: Sequence[tuple[Label, str]], gold: Sequence[tuple[Label, str]],
                equal: Callable[[str, str], bool | None]) -> bool | None:
    """True: a one-to-one matching of equivalent parts exists; False: none does; None: `equal` was undecided
    for a pair that could have completed it. Greedy, which is exact for an equivalence relation."""
    if len(pred) != len(gold) or len(gold) > MAX_PARTS:
        return False
    used = [False] * len(gold)
    undecided = False
    for label, p in pred:
        for j, (glabel, g) in enumerate(gold):
            if used[j] or label != glabel:
                continue
            v = equal(p, g)
            if v is True:
                used[j] = True
                break
            undecided |= v is None
        else:
            return None if undecided else False
    return True
