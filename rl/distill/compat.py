"""Can a teacher score a student's tokens? (On-policy distillation reads log q at the student's token ids.)"""
from __future__ import annotations

import json
from pathlib import Path

from rl.config import ConfigError


def _vocab_size(path: str) -> int | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    return data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")


def check_same_tokenizer(student: str, teacher: str, key: str = "algo.distill_teacher") -> None:
    """Raise ConfigError naming `key` unless both tokenizers map every token to the same id and the teacher's
    embedding covers every student id."""
    from transformers import AutoTokenizer

    ts, tt = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(teacher)
    vs, vt = ts.get_vocab(), tt.get_vocab()
    hint = ("On-policy distillation scores the student's sampled token ids with the teacher, so both must use "
            "the same tokenizer; for a teacher with another tokenizer use off-policy distillation "
            "(launch/distill.py), which trains on the teacher's text.")
    if vs != vt:
        diff = sorted(set(vs.items()) ^ set(vt.items()), key=lambda kv: kv[1])
        tok = diff[0][0] if diff else "?"
        raise ConfigError(f"{key}={teacher}: its tokenizer differs from the student's ({student}): "
                          f"{len(vs)} vs {len(vt)} tokens; e.g. {tok!r} is id {vs.get(tok)} in the student and "
                          f"{vt.get(tok)} in the teacher. {hint}")
    for name in ("eos_token", "pad_token", "bos_token"):
        if getattr(ts, name) != getattr(tt, name):
            raise ConfigError(f"{key}={teacher}: {name} differs from the student's ({getattr(ts, name)!r} vs "
                              f"{getattr(tt, name)!r}). {hint}")
    n_teacher = _vocab_size(teacher)
    if n_teacher is not None and n_teacher < len(vs):
        raise ConfigError(f"{key}={teacher}: the teacher's embedding has {n_teacher} rows but the tokenizer has "
                          f"{len(vs)} tokens")
