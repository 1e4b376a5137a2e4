"""Model paths: `tiny:` specs, local HF directories and hub ids, resolved and checked before any work starts.

Every launcher (sft, grpo, distill, eval, pipeline) calls `check_model_path(path, key)` for each model it will
load, before Ray, vLLM or TRL start, so that the most common mistake (a typo in a path, a checkpoint directory
instead of its export, a hub id on an offline machine) is one line naming the config key or flag, exit code 2,
in seconds, instead of a chain of tracebacks from huggingface_hub after a minute of retries:

  - `tiny:<arch>[:key=value,...]`: the spec is parsed and the tiny model built (cached; `rl.tiny`);
  - an existing path must be a directory with config.json (valid JSON), weights (*.safetensors or
    pytorch_model*.bin) and tokenizer files; a run directory whose `final/` or `hf/` is the model is named;
  - anything else that is a valid hub id: the local HF cache first (a complete snapshot is accepted; when the
    hub cannot be reached the snapshot's local directory is returned: nothing downstream tries the network);
    then, unless HF_HUB_OFFLINE is set, one HTTP probe of the hub with a few seconds' timeout (never the
    retries of a download): unreachable -> "offline: download it elsewhere and pass a local directory";
    not found -> "no such model on the hub (or private/gated: log in)".

`resolve_model_path` is the resolution alone (tiny specs build; anything else passes through).
ConfigError lives in rl.config, which re-exports both functions; it is imported lazily here so that either
module can be imported first.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 5.0
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")
FORMS = "a model path is an HF model directory, a hub id such as Qwen/Qwen2.5-0.5B, or tiny:qwen2"


class BadModelPath(Exception):
    """Why a path is not a loadable model (the caller adds the key and the path)."""


def _config_error(msg: str) -> Exception:
    from rl.config import ConfigError

    return ConfigError(msg)


# ------------------------------------------------------------------------------------------------ tiny specs
def _tiny(path: str) -> str:
    """Build (or reuse) the tiny model of a 'tiny:<arch>[:key=value,...]' spec; BadModelPath on a bad spec."""
    import dataclasses as dc

    import yaml

    from rl.tiny import SHAPES, TinyModelSpec, build_tiny_model
    from rl.tiny.models import ARCHS

    _, arch, *rest = path.split(":", 2)
    if arch not in ARCHS:
        raise BadModelPath(f"unknown tiny architecture {arch!r}; known: {list(ARCHS)} (e.g. tiny:qwen2)")
    fields = {f.name: f.type for f in dc.fields(TinyModelSpec)}
    kw: dict[str, Any] = {}
    for item in filter(None, (rest[0].split(",") if rest else [])):
        key, _, raw = item.partition("=")
        if key == "shape":
            if raw not in SHAPES:
                raise BadModelPath(f"unknown shape {raw!r}; known: {sorted(SHAPES)}")
            kw = {**SHAPES[raw], **kw}
            continue
        if key not in fields or key == "arch" or not raw:
            raise BadModelPath(f"{item!r} is not key=value of a tiny-model field; allowed: "
                               f"{sorted(k for k in fields if k != 'arch')} or shape=NAME")
        value = raw if fields[key] in (str, "str") else yaml.safe_load(raw)
        if not isinstance(value, (int, float, bool, str)):
            raise BadModelPath(f"{key}={raw!r} must be a number, true/false or a name")
        kw[key] = value
    try:
        return str(build_tiny_model(TinyModelSpec(arch=arch, **kw)))
    except (ValueError, TypeError) as e:
        raise BadModelPath(str(e)) from None


def resolve_model_path(path: str) -> str:
    """'tiny:<arch>[:key=value,...]' builds (or reuses from cache) a tiny model; anything else passes through.

    The optional part overrides `rl.tiny.TinyModelSpec` fields, e.g. a smaller student:
    'tiny:llama:hidden_size=64,num_heads=2,num_kv_heads=1,intermediate_size=128'. `shape=NAME` starts from a
    real model's dimensions at random init (`rl.tiny.SHAPES`: qwen2.5-0.5b, qwen2.5-1.5b; with Qwen2.5's
    151,936-token vocabulary, the local tokenizer padded with unused tokens), e.g.
    'tiny:qwen2:shape=qwen2.5-0.5b'."""
    if not path.startswith("tiny:"):
        return path
    try:
        return _tiny(path)
    except BadModelPath as e:
        raise _config_error(f"model path {path!r}: {e}") from None


# ------------------------------------------------------------------------------------------------ local dirs
def local_model_problem(p: Path) -> str | None:
    """None when `p` holds an HF model (config, weights, tokenizer), else what is missing."""
    if not p.is_dir():
        return f"{p} is a file, not a model directory"
    cfg = p / "config.json"
    if not cfg.is_file():
        inner = [d.name for d in (p / "final", p / "hf") if (d / "config.json").is_file()]
        hint = f" (the model is in {p / inner[0]})" if inner else ""
        return f"{p} is not an HF model directory: no config.json{hint}"
    try:
        json.loads(cfg.read_text())
    except (ValueError, OSError) as e:
        return f"{cfg} is not valid JSON ({e})"
    if not any(next(p.glob(g), None) for g in WEIGHT_GLOBS):
        return f"{p} has no weights (*.safetensors or pytorch_model*.bin)"
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        return f"{p} has no tokenizer ({', '.join(TOKENIZER_FILES)})"
    return None


# ------------------------------------------------------------------------------------------------ hub ids
def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (now, or when huggingface_hub was imported)."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def cached_snapshot(repo_id: str) -> Path | None:
    """The local HF cache's snapshot directory of `repo_id` when it holds a complete model, else None."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(hit, str):
        return None
    snap = Path(hit).parent
    return snap if local_model_problem(snap) is None else None


def probe_hub(repo_id: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[int | None, str]:
    """One HEAD request for the model's API page, bounded by `timeout_s` (DNS included, in a daemon thread).

    Returns (HTTP status, "") when the hub answered, or (None, reason) when it could not be reached."""
    import urllib.error
    import urllib.request

    url = f"{hub_endpoint()}/api/models/{repo_id}"
    headers = {"User-Agent": "r1lab-model-check"}
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    result: list[tuple[int | None, str]] = []

    def go() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD", headers=headers),
                                        timeout=timeout_s) as r:
                result.append((r.status, ""))
        except urllib.error.HTTPError as e:
            result.append((e.code, ""))
        except Exception as e:  # noqa: BLE001  URLError (DNS, refused), timeout, TLS: hub not reachable
            reason = getattr(e, "reason", e)
            result.append((None, f"{type(reason).__name__}: {reason}"))

    t = threading.Thread(target=go, daemon=True, name="r1lab-hub-probe")
    t.start()
    t.join(timeout_s + 0.5)
    return result[0] if result else (None, f"no answer within {timeout_s:.0f} s")


def _hub_problem(repo_id: str) -> tuple[str | None, str]:
    """(problem or None, the path to use): cache first, then the offline switch, then one probe."""
    from huggingface_hub import constants

    snap = cached_snapshot(repo_id)
    offline = hub_offline()
    if snap is not None:  # cached: from the cache, unless the hub answers (then the hub id, for every node)
        return None, repo_id if not offline and probe_hub(repo_id)[0] is not None else str(snap)
    advice = (f"download it where the hub is reachable (`hf download {repo_id} --local-dir DIR`), copy DIR "
              f"to this machine and pass the local directory")
    not_cached = f"not in the local HF cache ({constants.HF_HUB_CACHE})"
    where = f"no such local directory, and the hub model {repo_id} is {not_cached}"
    if offline:
        return f"{where}; this machine is offline (HF_HUB_OFFLINE is set): {advice}", repo_id
    status, reason = probe_hub(repo_id)
    hub = hub_endpoint()
    if status is None:
        return (f"{where}; the hub ({hub}) cannot be reached ({reason}), so this machine looks offline: "
                f"{advice}"), repo_id
    if status in (401, 403, 404):
        return (f"no such local directory, and no model {repo_id} on the hub ({hub} answered {status}; a "
                "private or gated model needs `hf auth login` or HF_TOKEN)"), repo_id
    if status >= 400:
        return f"{where}; the hub ({hub}) answered {status}: try again later, or {advice}", repo_id
    return None, repo_id


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def check_model_path(path: str, key: str) -> str:
    """Resolve `path` and check that it is a loadable model, before any work starts; returns the path to load
    (a tiny spec's built directory, a local directory, a hub id, or an offline machine's cached snapshot).

    Raises ConfigError with one line: `<key>=<path>: <what is wrong and what to do>`."""
    try:
        if not path:
            raise BadModelPath(f"empty ({FORMS})")
        if path.startswith("tiny:"):
            return _tiny(path)
        p = Path(path).expanduser()
        if p.exists():
            problem = local_model_problem(p)
            if problem:
                raise BadModelPath(problem)
            return str(p)
        if _looks_local(path) or not HUB_ID.match(path) or ".." in path or "--" in path:
            raise BadModelPath(f"no such model directory ({FORMS})")
        problem, use = _hub_problem(path)
        if problem:
            raise BadModelPath(problem)
        return use
    except BadModelPath as e:
        raise _config_error(f"{key}={path}: {e}") from None


def preflight(checks: list[tuple[str, str]], push_to_hub: str = "") -> dict[str, str] | int:
    """For launchers: check every (path, key), and that an upload asked for by log.push_to_hub can happen;
    returns {key: path to load}, or prints the first problem as one line on stderr and returns exit code 2."""
    from rl.config import ConfigError
    from rl.model_card import check_push

    out = {}
    try:
        for path, key in checks:
            out[key] = check_model_path(path, key)
        check_push(push_to_hub)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return out
