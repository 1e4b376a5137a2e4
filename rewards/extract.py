"""Answer extraction: the answers a completion states after the last `</think>`.

`extract_answer` gives the last `\\boxed{...}` of the final answer region (what the format reward and the
countdown checker read). `stated_answers` gives every answer the region states, in order: each box (an empty
box is the empty answer "", never skipped) and each Minerva/MATH closing line "Final Answer: The final answer
is X. I hope it is correct." (lm-evaluation-harness's minerva_math reads that line; accepted with either its
"Final Answer:" head or its "I hope it is correct" tail). `final_answers(completion, policy)` orders them for
the grader's two policies (rewards.math): "reward" keeps every distinct answer in order of first appearance,
"eval" in order of last appearance, so that its last entry is the last answer stated.

Linear-time scanning (no backtracking regex over model output), nested braces handled. Also accepted:
`\\boxed 5` (a single token without braces, as some models write) and `\\fbox{...}`.
"""
from __future__ import annotations

import re

THINK_END = "</think>"
_BOX_CMDS = ("\\boxed", "\\fbox")


def answer_region(text: str) -> str:
    """Text after the last `</think>`, or the whole text when there is none."""
    i = text.rfind(THINK_END)
    return text[i + len(THINK_END):] if i >= 0 else text


def _match_braces(text: str, open_idx: int) -> int | None:
    """Index of the brace closing text[open_idx] == '{', or None if unbalanced."""
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in "{}":
            i += 2  # escaped brace \{ \} is content
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} in text, stripped; None when there is none."""
    best_pos, best = -1, None
    for cmd in _BOX_CMDS:
        start = text.rfind(cmd)
        while start >= 0:
            j = start + len(cmd)
            # skip a command that merely starts with the name, e.g. \boxedx
            if j < len(text) and (text[j].isalpha()):
                start = text.rfind(cmd, 0, start)
                continue
            while j < len(text) and text[j] == " ":
                j += 1
            if j < len(text) and text[j] == "{":
                end = _match_braces(text, j)
                if end is not None:
                    if start > best_pos:
                        best_pos, best = start, text[j + 1:end]
                    break
            elif cmd == "\\boxed" and j > start + len(cmd) and j < len(text):
                # "\boxed 5": the answer runs to the next space or '$'
                k = j
                while k < len(text) and text[k] not in " $\n":
                    k += 1
                if start > best_pos:
                    best_pos, best = start, text[j:k]
                break
            start = text.rfind(cmd, 0, start)
    return best.strip() if best is not None else None


def extract_answer(completion: str) -> str | None:
    """The graded answer of a completion: last boxed content after the last </think>; None if absent/empty."""
    ans = last_boxed(answer_region(completion))
    return ans if ans else None


_BOX_RE = re.compile(r"\\(?:boxed|fbox)")


_BRACE = re.compile(r"\\[{}]|[{}]")


def _brace_pairs(text: str, start: int = 0) -> dict[int, int]:
    """{index of '{': index of its closing '}'} for text[start:] in one pass over its braces (escaped \\{ \\}
    are content, as in _match_braces), so scanning many boxes stays linear."""
    pairs, stack = {}, []
    for m in _BRACE.finditer(text, start):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _box_at(text: str, start: int, cmd: str, pairs: dict[int, int]) -> tuple[str | None, int]:
    """(content, end) of the box command at `start`; content None when it is not a usable box."""
    j = start + len(cmd)
    if j < len(text) and text[j].isalpha():  # \boxedx is another command
        return None, j
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        end = pairs.get(j)
        return (text[j + 1:end], end + 1) if end is not None else (None, j + 1)
    if cmd == "\\boxed" and start + len(cmd) < j < len(text):  # "\boxed 5": up to the next space or '$'
        k = j
        while k < len(text) and text[k] not in " $\n":
            k += 1
        return text[j:k], k
    return None, j


def _boxes_at(text: str) -> list[tuple[int, str]]:
    """(position, content) of every \\boxed{...} / \\fbox{...} in text, in order, stripped; an empty box gives
    "" (a box inside a box is part of the outer one's content; a box whose whole content is another box is
    unwrapped). Linear time."""
    out, i = [], 0
    first = _BOX_RE.search(text)
    if first is None:
        return out
    pairs = _brace_pairs(text, first.start())  # braces before the first box cannot pair with a box's brace
    for m in _BOX_RE.finditer(text, first.start()):
        if m.start() < i:  # inside a box already read
            continue
        content, i = _box_at(text, m.start(), m.group(), pairs)
        if content is not None:
            out.append((m.start(), _unwrap(content.strip())))
    return out


def all_boxed(text: str) -> list[str]:
    """Contents of every non-empty box in text, in order (see `_boxes_at`)."""
    return [c for _, c in _boxes_at(text) if c]


def _unwrap(content: str) -> str:
    """`\\boxed{\\boxed{7}}` -> `7`: a box whose whole content is one box."""
    while content.startswith(_BOX_CMDS):
        cmd = next(c for c in _BOX_CMDS if content.startswith(c))
        inner, end = _box_at(content, 0, cmd, _brace_pairs(content))
        if inner is None or end != len(content):
            break
        content = inner.strip()
    return content


_FINAL_LINE = re.compile(r"(final answer:\s*)?the final answer is:?", re.IGNORECASE)
_HOPE = re.compile(r"\.?\s*I hope it is correct", re.IGNORECASE)
MAX_STATEMENT_CHARS = 200


def _closing_statements(region: str) -> list[tuple[int, str]]:
    """(position, X) of each "Final Answer: The final answer is X. I hope it is correct." line; X runs to the
    "I hope" tail or the end of its line. A line with neither the head nor the tail, or whose X holds a box
    (the box is read as a box) or is longer than MAX_STATEMENT_CHARS, states nothing."""
    out = []
    for m in _FINAL_LINE.finditer(region):
        window = min(len(region), m.end() + MAX_STATEMENT_CHARS + 32)   # keeps the scan linear
        eol = region.find("\n", m.end(), window)
        eol = window if eol < 0 else eol
        hope = _HOPE.search(region, m.end(), eol)
        if not (m.group(1) or hope):
            continue
        text = region[m.end():hope.start() if hope else eol].strip()
        text = text[:-1].rstrip() if text.endswith(".") else text
        if text and len(text) <= MAX_STATEMENT_CHARS and not _BOX_RE.search(text):
            out.append((m.start(), text))
    return out


def stated_answers(completion: str) -> tuple[str, ...]:
    """Every answer stated after the last </think>, in order: boxes ("" for an empty box) and closing lines."""
    region = answer_region(completion)
    found = _boxes_at(region) + _closing_statements(region)
    return tuple(a for _, a in sorted(found, key=lambda x: x[0]))


def final_answers(completion: str, policy: str = "reward") -> tuple[str, ...]:
    """The distinct stated answers after the last </think> (see `stated_answers`); () if none. policy "reward":
    in order of first appearance; "eval": in order of last appearance (the last entry is the final answer)."""
    answers = stated_answers(completion)
    if policy == "eval":
        answers = answers[::-1]
    seen: dict[str, None] = {}
    for a in answers:
        seen.setdefault(a, None)
    out = tuple(seen)
    return out[::-1] if policy == "eval" else out
