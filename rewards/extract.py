"""Answer extraction: the last `\\boxed{...}` after the last `</think>`.

Linear-time scanning (no backtracking regex over model output), nested braces handled. Also accepted:
`\\boxed 5` (a single token without braces, as some models write) and `\\fbox{...}`.
"""
from __future__ import annotations

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
