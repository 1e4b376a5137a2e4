"""Dataset loading shared by all stages: local JSONL / JSON / Parquet files or a hub dataset id.

Rows are mapped to r1lab's field names (`problem`, `answer`, ...) through `field_map`
({our_name: their_name}); a row missing a required field fails with an error naming the file, the row and the
field, before any training starts.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:                      # `datasets` takes ~2 s to import: launchers check their input first
    from datasets import Dataset

from data.prompts import build_messages


class DataError(ValueError):
    """Bad input data: the message names the file (or dataset id), the row and the field."""


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int]]:
    """JSON-object rows and their 1-based line numbers; a bad line fails with the file and line."""
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            lines.append(lineno)
    return rows, lines


def load_rows(source: str | os.PathLike, *, split: str = "train") -> tuple[list[dict[str, Any]], str, list[int] | None]:
    """Raw rows, a human-readable origin ("file.jsonl" or "hub:id[split]") and, for JSONL, each row's line
    number, for error messages."""
    path = Path(source)
    if path.exists():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows, lines = read_jsonl(path)
            return rows, str(path), lines
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of objects")
            return data, str(path), None
        if suffix == ".parquet":
            from datasets import Dataset

            return Dataset.from_parquet(str(path)).to_list(), str(path), None
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if not _looks_like_hub(source):
        raise DataError(f"{source}: file not found (and not a hub dataset id like 'owner/name')")
    import datasets

    try:
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as e:
        raise DataError(f"hub dataset {source!r} (split {split!r}) could not be loaded: {e}") from e
    return ds.to_list(), f"hub:{source}[{split}]", None


def _looks_like_hub(source: Any) -> bool:
    s = str(source)
    return (s.count("/") <= 1 and not s.startswith((".", "/", "~"))
            and not s.endswith((".jsonl", ".json", ".parquet")))


def map_fields(rows: Sequence[Mapping[str, Any]], origin: str, *, required: Sequence[str] = ("problem", "answer"),
               field_map: Mapping[str, str] | None = None, keep_extra: bool = True,
               lines: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Rename fields to r1lab names and check the required ones are present and non-empty.

    field_map: {our_name: their_name}, e.g. {"problem": "question"}. Unmapped fields keep their names.
    Numbers as answers (AIME/AMC files store ints/floats) are accepted and kept as they are.
    """
    field_map = dict(field_map or {})
    out = []
    for i, row in enumerate(rows):
        new = dict(row) if keep_extra else {}
        for ours, theirs in field_map.items():
            new[ours] = row.get(theirs)  # a mapped field comes from its source name only
        for name in required:
            src = field_map.get(name, name)
            value = new.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                have = ", ".join(sorted(row)) or "no fields"
                where = f"row {i}" + (f" (line {lines[i]})" if lines else "")
                raise DataError(f"{origin}: {where}: missing required field {src!r}"
                                + (f" (mapped to {name!r})" if src != name else "") + f"; the row has: {have}")
        out.append(new)
    return out


def load_dataset(source: str | os.PathLike, *, split: str = "train", required: Sequence[str] = ("problem", "answer"),
                 field_map: Mapping[str, str] | None = None, limit: int | None = None,
                 add_prompt: bool = True) -> Dataset:
    """Load a problem set as a `datasets.Dataset` with r1lab field names.

    Adds `prompt` (chat messages with the R1 instruction) unless the data already has one. Answers are kept
    as given; `rewards.math.verify` accepts int/float gold answers.
    """
    rows, origin, lines = load_rows(source, split=split)
    if not rows:
        raise DataError(f"{origin}: no rows")
    rows = map_fields(rows, origin, required=required, field_map=field_map, lines=lines)
    if limit is not None:
        rows = rows[:limit]
    for r in rows:
        if "answer" in r and not isinstance(r["answer"], str):
            r["answer"] = _answer_text(r["answer"])
        if add_prompt and "prompt" not in r and "problem" in r:
            r["prompt"] = build_messages(str(r["problem"]))
    from datasets import Dataset

    return Dataset.from_list(rows)


def _answer_text(value: Any) -> str:
    """Numbers arrive as int/float in some benchmarks (AMC: 27.0); keep their exact value as text."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
