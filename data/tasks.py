"""Synthetic, verifiable reasoning tasks with seeded generators and difficulty knobs.

Every task returns a `datasets.Dataset` with at least:
  task      str  task name ("arithmetic", "chain_sum", "countdown")
  problem   str  the question in plain text (no instruction; `data.prompts` adds the R1 instruction)
  answer    str  the gold answer (for countdown: the target; the checker evaluates the model's expression)
  solution  str  a worked chain-of-thought trace in R1 format: "<think>\\n...\\n</think>\\n\\boxed{...}"
  prompt    list the problem as chat messages with the R1 instruction (TRL's conversational format)
plus task-specific columns (countdown: `numbers`, `target`).

Train and held-out splits are disjoint by construction: a problem belongs to the held-out split iff a hash of
its canonical key falls in the held-out bucket, independent of the seed. Two calls with different seeds
therefore never leak a held-out problem into training.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:                      # imported where used: `datasets` takes ~2 s, launchers check input first
    from datasets import Dataset

from data.prompts import build_messages

HELDOUT_PERCENT = 20  # share of the problem space reserved for the held-out split


def split_of(key: str, heldout_percent: int = HELDOUT_PERCENT) -> str:
    """Deterministic split assignment of a problem key ("train" or "test")."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return "test" if h % 100 < heldout_percent else "train"


def _trace(steps: list[str], answer: str) -> str:
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\\boxed{" + answer + "}"


# ---------------------------------------------------------------- arithmetic
def _column_add(a: int, b: int, slip: random.Random | None = None, slip_rate: float = 0.0) -> tuple[list[str], int]:
    """Right-to-left column addition steps ('7+8+0=15'), and the sum they arrive at.

    With slip_rate > 0 a carry is dropped with that probability (a sloppy teacher), and the trace arrives at
    the wrong sum, as written."""
    steps, carry, total = [], 0, 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        total += (s % 10) * 10**i
        carry = s // 10
        if carry and slip is not None and slip.random() < slip_rate:
            carry = 0
        elif carry and i == max(len(da), len(db)) - 1:
            total += 10 ** (i + 1)
    if carry:
        steps.append(f"carry {carry}")
    return steps, total


def tool_trace(expression: str, answer: str) -> str:
    """A tool-integrated trace (rl.rollout.tools' protocol): the model writes a python block, the rollout
    inserts its output, the model answers from it."""
    return _trace([f"```python\nprint({expression})\n```", f"```output\n{answer}\n```"], answer)


def _arithmetic_row(rng: random.Random, min_digits: int, max_digits: int, ops: str,
                    slip_rate: float = 0.0) -> dict[str, Any]:
    op = rng.choice(ops)
    da, db = rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)
    a = rng.randint(10 ** (da - 1) if da > 1 else 0, 10**da - 1)
    b = rng.randint(10 ** (db - 1) if db > 1 else 0, 10**db - 1)
    shown = None
    if op == "+":
        # the slip draw comes from the problem itself, so the problems drawn do not depend on slip_rate
        slip = random.Random(f"slip:{a}+{b}") if slip_rate > 0 else None
        steps, shown = _column_add(a, b, slip, slip_rate)
        ans = a + b
        steps.append(f"{a}+{b}={shown}")
    elif op == "-":
        a, b = max(a, b), min(a, b)
        ans, steps = a - b, [f"{a}-{b}={a - b}"]
    elif op == "*":
        ans = a * b
        parts = [(int(d) * 10**i) for i, d in enumerate(str(b)[::-1]) if d != "0"]
        steps = [f"{a}*{p}={a * p}" for p in parts] + [f"{a}*{b}={ans}"]
    else:
        raise ValueError(f"arithmetic: unknown op {op!r}; allowed: + - *")
    problem = f"What is {a} {op} {b}?"
    shown = ans if shown is None else shown
    return {"key": f"arith:{a}{op}{b}", "problem": problem, "answer": str(ans), "solution": _trace(steps, str(shown))}


def arithmetic(rng: random.Random, *, min_digits: int = 1, max_digits: int = 3, ops: str = "+-*",
               slip_rate: float = 0.0, tool: bool = False) -> dict:
    """Two-operand arithmetic. Difficulty: number of digits and operators.

    slip_rate: share of carries the worked trace drops (a sloppy teacher's cold-start data: the trace and its
    boxed answer are then wrong, the gold `answer` stays right). RL with the verifier can unlearn the slip.
    tool: the trace computes with the python tool (`tool_trace`) instead of by hand; problems and answers are
    the same either way."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"arithmetic: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if not 0.0 <= slip_rate <= 1.0:
        raise ValueError(f"arithmetic: slip_rate must be in [0, 1], got {slip_rate}")
    row = _arithmetic_row(rng, min_digits, max_digits, ops, slip_rate)
    if tool:
        row["solution"] = tool_trace(row["problem"][len("What is "):-1], row["answer"])
    return row


# ---------------------------------------------------------------- chain sums
def chain_sum(rng: random.Random, *, min_terms: int = 2, max_terms: int = 4, min_value: int = 1,
              max_value: int = 99, allow_minus: bool = False) -> dict:
    """a + b - c + ... : running-total trace. Difficulty: number of terms and their size."""
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"chain_sum: need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    n = rng.randint(min_terms, max_terms)
    terms = [rng.randint(min_value, max_value) for _ in range(n)]
    signs = ["+"] + [rng.choice("+-") if allow_minus else "+" for _ in range(n - 1)]
    total, steps = terms[0], []
    for s, t in zip(signs[1:], terms[1:]):
        new = total + t if s == "+" else total - t
        steps.append(f"{total}{s}{t}={new}")
        total = new
    expr = str(terms[0]) + "".join(f"{s}{t}" for s, t in zip(signs[1:], terms[1:]))
    return {"key": f"chain:{expr}", "problem": f"Compute {expr}.", "answer": str(total),
            "solution": _trace(steps, str(total))}


# ---------------------------------------------------------------- countdown
def countdown(rng: random.Random, *, n_numbers: int = 3, max_number: int = 20, max_target: int = 200,
              ops: str = "+-*") -> dict:
    """Reach `target` using every given number exactly once with + - * (and parentheses).

    The generator builds a random left-to-right expression, so at least one solution exists; the gold
    `answer` is the target and the checker (`rewards.countdown`) evaluates the model's expression.
    """
    if n_numbers < 2:
        raise ValueError(f"countdown: n_numbers must be >= 2, got {n_numbers}")
    for _ in range(1000):
        nums = [rng.randint(1, max_number) for _ in range(n_numbers)]
        order = nums[:]
        rng.shuffle(order)
        expr, value, steps = str(order[0]), order[0], []
        for x in order[1:]:
            op = rng.choice(ops)
            new = value + x if op == "+" else value - x if op == "-" else value * x
            steps.append(f"{value}{op}{x}={new}")
            expr = f"({expr}){op}{x}" if op == "*" and any(c in expr for c in "+-") else f"{expr}{op}{x}"
            value = new
        if 0 < value <= max_target:
            break
    else:
        raise ValueError(f"countdown: no target in 1..{max_target} found for these knobs")
    shown = sorted(nums)
    problem = (f"Using the numbers {', '.join(map(str, shown))}, each exactly once, with + - * and "
               f"parentheses, make {value}. Give the expression.")
    return {"key": f"countdown:{shown}->{value}", "problem": problem, "answer": str(value),
            "solution": _trace(steps, expr), "numbers": shown, "target": value}


TASKS: dict[str, Callable[..., dict]] = {"arithmetic": arithmetic, "chain_sum": chain_sum, "countdown": countdown}


def make_task(name: str, n: int, *, split: str = "train", seed: int = 0, heldout_percent: int = HELDOUT_PERCENT,
              force_think: bool = False, **knobs: Any) -> Dataset:
    """Generate `n` unique problems of task `name` from `split` ("train" or "test").

    Knobs are the generator's keyword arguments (difficulty). Raises ValueError naming the task when the
    problem space is too small to give `n` unique problems in that split.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    gen = TASKS[name]
    rng = random.Random(f"{name}:{seed}:{split}")
    rows, seen, attempts = [], set(), 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"task {name!r}: only {len(rows)} unique {split} problems found for knobs "
                             f"{knobs}; widen the difficulty knobs or ask for fewer than {n}")
        row = gen(rng, **knobs)
        key = row.pop("key")
        if key in seen or split_of(key, heldout_percent) != split:
            continue
        seen.add(key)
        row["task"] = name
        row["prompt"] = build_messages(row["problem"])
        rows.append(row)
    from datasets import Dataset

    return Dataset.from_list(rows)


def make_mixture(spec: dict[str, dict[str, Any]], *, split: str = "train", seed: int = 0) -> Dataset:
    """Concatenate several tasks: spec = {task_name: {"n": count, **knobs}}. Rows are shuffled by seed."""
    from datasets import concatenate_datasets

    parts = []
    for name, knobs in spec.items():
        knobs = dict(knobs)
        n = knobs.pop("n")
        parts.append(make_task(name, n, split=split, seed=seed, **knobs))
    # countdown rows carry extra columns; fill them for the other tasks so the schemas concatenate
    cols = set().union(*(p.column_names for p in parts))
    for i, p in enumerate(parts):
        if "numbers" in cols and "numbers" not in p.column_names:
            p = p.add_column("numbers", [[] for _ in range(len(p))])
            p = p.add_column("target", [-1 for _ in range(len(p))])
        parts[i] = p
    return concatenate_datasets(parts).shuffle(seed=seed)


def make_synthetic(name: str, n: int, *, split: str = "train", seed: int = 0,
                   knobs: dict[str, Any] | None = None) -> Dataset:
    """The rows of a `synthetic:<name>` data source.

    One task: n problems with `knobs` as its difficulty. `mixture`: knobs = {task: {"n": count, **knobs}};
    the train split uses those counts, the held-out split takes n problems spread evenly over the tasks."""
    knobs = dict(knobs or {})
    if name == "mixture":
        spec = knobs if split == "train" else {k: {**v, "n": max(1, n // len(knobs))} for k, v in knobs.items()}
        return make_mixture(spec, split=split, seed=seed)
    return make_task(name, n, split=split, seed=seed, **knobs)


def write_problems_jsonl(rows, path) -> str:
    """Problems as a JSONL benchmark file (the chat-format `prompt` column left out): the eval harness reads it."""
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "prompt"}) + "\n")
    return str(path)
