"""Tiny-model factory: a locally trained tokenizer and tiny Qwen2/Llama models in HF format, cached.

No model can be downloaded here (nor in CI), so tests and the demo build their models on the spot. Artifacts
are cached under `$R1LAB_CACHE_DIR` (default `~/.cache/r1lab`) keyed by a hash of everything that defines
them, and written atomically (temporary directory, then rename), so concurrent test workers and interrupted
builds never see a half-written model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rl.tiny.models import TinyModelSpec, build_model
from rl.tiny.tokenizer import corpus_extra, pad_tokenizer, train_tokenizer

FACTORY_VERSION = 1

# Real models' dimensions (random init), for measuring memory and speed at the sizes users run.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                         vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                         max_position_embeddings=32768, dtype="bfloat16"),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                         vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                         max_position_embeddings=32768, dtype="bfloat16"),
}  # bump when the build recipe changes, to invalidate caches


def cache_root() -> Path:
    return Path(os.environ.get("R1LAB_CACHE_DIR", Path.home() / ".cache" / "r1lab"))


def _key(payload: dict) -> str:
    blob = json.dumps({"v": FACTORY_VERSION, **payload}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _cached_build(kind: str, payload: dict, build) -> Path:
    final = cache_root() / kind / _key(payload)
    if (final / "DONE").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / "r1lab_spec.json").write_text(json.dumps(payload, indent=2, sort_keys=True))
        (tmp / "DONE").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def default_corpus(n_per_task: int = 2000, seed: int = 0) -> list[str]:
    """Problems and worked traces of every synthetic task, plus template text."""
    from data.tasks import TASKS, make_task

    texts = corpus_extra()
    for name in TASKS:
        ds = make_task(name, n_per_task, split="train", seed=seed)
        texts += [f"{p}\n{s}" for p, s in zip(ds["problem"], ds["solution"])]
    return texts


def build_tokenizer(vocab_size: int = 512, n_per_task: int = 2000, seed: int = 0) -> Path:
    """Cached path of the tiny tokenizer (HF format)."""
    payload = {"vocab_size": vocab_size, "n_per_task": n_per_task, "seed": seed}
    return _cached_build("tokenizer", payload,
                         lambda d: train_tokenizer(default_corpus(n_per_task, seed), d, vocab_size=vocab_size))


def base_corpus_for_tokenizer(n_docs: int = 4000, seed: int = 0) -> list[str]:
    """What a base tokenizer is trained on: the base model's pretraining text (data.pretrain) plus plain
    English (the instruction words a prompt may use); never think tags."""
    from data.pretrain import base_corpus

    english = ["A conversation between a user and an assistant. The user asks a question, and the assistant "
               "solves it. The assistant first thinks about the reasoning process in the mind and then "
               "provides the answer. Please reason step by step, and put your final answer within a box.",
               "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 + - * / = ( ) [ ] { } , . ? ! : ;"
               " < > ^ _ $ % # & ' \" \\ | ~ `"]
    from data.pretrain import GLOSSARY, TAG_WORDS
    # ordinary words a real BPE vocabulary has whole (tag names; "think" is an English word like any other)
    # (one per line: the word token without a leading space, as it follows "<" or "</" in markup)
    words = "\n".join(dict.fromkeys(TAG_WORDS + tuple(GLOSSARY) + ("reasoning",)))
    return base_corpus(n_docs, seed) + english * 50 + [words] * 1000


def build_base_tokenizer(vocab_size: int = 1280, seed: int = 0) -> Path:
    """Cached path of a base model's tokenizer (no think tokens, no chat template; see train_tokenizer)."""
    payload = {"vocab_size": vocab_size, "seed": seed, "kind": "base", "corpus": 5}
    return _cached_build("tokenizer-base", payload,
                         lambda d: train_tokenizer(base_corpus_for_tokenizer(seed=seed), d, vocab_size=vocab_size,
                                                   base=True))


def build_tiny_model(spec: TinyModelSpec | None = None, tokenizer_dir: str | Path | None = None, **spec_kw) -> Path:
    """Cached path of a tiny model (HF format, with its tokenizer). spec_kw override TinyModelSpec fields."""
    spec = spec or TinyModelSpec(**spec_kw)
    if tokenizer_dir is None:
        tokenizer_dir = build_base_tokenizer() if spec.tokenizer == "base" else build_tokenizer()
    tokenizer_dir = Path(tokenizer_dir)
    if spec.vocab_size:
        tokenizer_dir = padded_tokenizer(tokenizer_dir, spec.vocab_size)
    tok_hash = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]
    payload = {"spec": spec.to_dict(), "tokenizer": tok_hash}
    return _cached_build(f"model-{spec.arch}", payload, lambda d: build_model(spec, tokenizer_dir, d))


def padded_tokenizer(tokenizer_dir: str | Path, vocab_size: int) -> Path:
    """Cached copy of a tokenizer padded with unused filler tokens up to vocab_size (see pad_tokenizer)."""
    src = Path(tokenizer_dir)
    digest = hashlib.sha256((src / "tokenizer.json").read_bytes()).hexdigest()[:16]
    return _cached_build("tokenizer-padded", {"source": digest, "vocab_size": vocab_size},
                         lambda d: pad_tokenizer(src, d, vocab_size))


@dataclass(frozen=True)
class TinyArtifacts:
    tokenizer: Path
    qwen2: Path
    llama: Path


def build_tiny(**spec_kw) -> TinyArtifacts:
    """Tokenizer plus a tiny Qwen2 and a tiny Llama sharing it."""
    tok = build_tokenizer()
    return TinyArtifacts(tok, build_tiny_model(TinyModelSpec(arch="qwen2", **spec_kw), tok),
                         build_tiny_model(TinyModelSpec(arch="llama", **spec_kw), tok))


__all__ = ["SHAPES", "TinyModelSpec", "build_base_tokenizer", "TinyArtifacts", "build_tokenizer", "build_tiny_model", "build_tiny", "cache_root"]
