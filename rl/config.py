"""Typed configs: one dataclass per stage, sections nested at most two levels (`section.key`).

Precedence: dataclass defaults < YAML file (`--config configs/x.yaml`) < CLI overrides (`section.key=value`).
Everything is validated on load, before Ray or any model starts: an unknown key lists the allowed keys, a
wrong type names the key and the expected type, and each section's `validate()` checks value ranges.

Write a field as `name: int = opt(8, "help text")`; `describe(cls)` prints the help of every key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """Invalid configuration: the message names the key (as `section.key`) and what is allowed."""


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None) -> Any:
    """A config field with help text (and optional allowed values, checked on load)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML or CLI value to the annotated type; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is Any:
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string; users write it anyway
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or cls.__name__
        hint = getattr(cls, "KEY_HINTS", {}).get(unknown[0])
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' in {where}; allowed: {sorted(fields)}"
                          + (f" ({hint})" if hint else ""))
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], f"{prefix}{name}"
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping of keys), got {value!r}")
            kwargs[name] = _build(tp, value, f"{key}.")
            continue
        value = _coerce(value, tp, key)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {list(choices)}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _merge(cls: type, base: dict, extra: dict) -> dict:
    """Overlay `extra` on `base`: sections merge key by key; any other value (a dict field such as
    data.task_knobs included) is replaced whole, so an override never mixes with the YAML's knobs."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for k, v in extra.items():
        tp = hints.get(k)
        if tp is not None and _is_section(tp) and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(tp, out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """["trainer.lr=1e-5", "model.path=Qwen/Qwen2.5-Math-1.5B"] -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. trainer.max_steps=2")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"override {item!r}: keys nest at most two levels (section.key)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults < YAML file < overrides; then every section's and the stage's `validate()`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
        data = loaded
    data = _merge(cls, data, parse_overrides(overrides))
    cfg = _build(cls, data)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Run `validate()` of each section, then of the stage itself (cross-section checks)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def describe(cls: type, prefix: str = "") -> str:
    """Help text of every key, for `--help-config`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            lines.append(f"[{prefix}{f.name}] {(tp.__doc__ or '').strip().splitlines()[0] if tp.__doc__ else ''}")
            lines.append(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        choices = f.metadata.get("choices")
        extra = f" (one of {list(choices)})" if choices else ""
        lines.append(f"  {prefix}{f.name} = {default!r}: {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)


def require(cond: bool, key: str, message: str) -> None:
    """Validation helper for `validate()` methods: raise ConfigError naming the key."""
    if not cond:
        raise ConfigError(f"{key}: {message}")


def require_known_rewards(names: Sequence[str], key: str) -> None:
    """Validation helper: every name resolves in the reward registry (or as module:function)."""
    from rewards.registry import RewardPluginError, get

    for name in names:
        try:
            get(str(name))
        except RewardPluginError as e:
            raise ConfigError(f"{key}: {e}") from None


# ------------------------------------------------------------------ sections shared by every stage
EAGER_HELP = ("start vLLM without torch.compile / CUDA graphs: a faster start, a slower decode on GPU (a tiny "
              "model on CPU: engine start 26.9 -> 10.9 s, decode the same; rl.rollout.vllm_engine.make_llm)")


@dataclasses.dataclass
class EvalSection:
    """Held-out evaluation of every model of a pipeline (launch/pipeline.py)."""
    problems: int = opt(128, "held-out problems")
    samples: int = opt(4, "samples per problem")
    temperature: float = opt(1.0, "sampling temperature")
    max_tokens: int = opt(64, "maximum response tokens")
    enforce_eager: bool = opt(False, EAGER_HELP)

    def validate(self) -> None:
        require(self.problems >= 1, "eval.problems", "must be >= 1")
        require(self.samples >= 1, "eval.samples", "must be >= 1")
        require(self.temperature > 0, "eval.temperature", "must be > 0")
        require(self.max_tokens >= 1, "eval.max_tokens", "must be >= 1")


HUB_REPO_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"


@dataclasses.dataclass
class LogSection:
    """Experiment trackers (rl/tracking.py) and the hub upload of the exported model (rl/model_card.py)."""
    report_to: list = opt(["tensorboard"], "trackers that get the metrics, the resolved config, the plots and the "
                          "summary: any of tensorboard, wandb, mlflow, trackio, swanlab (offline by default: under "
                          "the output directory, trackio in its local store; pip install 'r1lab[trackers]'); [] = "
                          "none (GRPO's metrics.jsonl is always written)")
    project: str = opt("r1lab", "tracker project (W&B / trackio / SwanLab project, MLflow experiment)")
    run_name: str = opt("", "tracker run name (empty: the output directory's name)")
    push_to_hub: str = opt("", "after the run, upload the final HF export (with its model card) to this hub repo "
                           "(owner/name; created private when missing; needs `hf auth login` or HF_TOKEN)")

    def validate(self) -> None:
        import re

        from rl.tracking import report_to_problem

        problem = report_to_problem(list(self.report_to))
        require(problem is None, "log.report_to", problem or "")
        require(not self.push_to_hub or re.match(HUB_REPO_ID, self.push_to_hub) is not None, "log.push_to_hub",
                f"{self.push_to_hub!r} is not a hub repo id (owner/name, e.g. me/qwen2.5-1.5b-grpo)")


@dataclasses.dataclass
class StageRef:
    """Another stage's config, run from this one: its YAML file plus overrides (section.key=value)."""
    config: str = opt("", "YAML config of the stage (configs/*.yaml)")
    overrides: list = opt([], "overrides applied on top of the YAML (section.key=value)")

    def load(self, cls: type[T], extra: Sequence[str] = ()) -> T:
        """The stage's validated config; `extra` overrides (set by the caller) win over `overrides`."""
        return load_config(cls, self.config or None, list(self.overrides) + list(extra))


@dataclasses.dataclass
class ModelConfig:
    """The policy / student model."""
    KEY_HINTS: typing.ClassVar[dict[str, str]] = {
        k: "this stage has no LoRA keys under model; SFT uses the lora section (lora.enabled=true, lora.r, "
           "lora.alpha, lora.target_modules)" for k in ("lora_r", "lora_alpha", "lora_targets")}
    path: str = opt("tiny:qwen2", "HF model path or hub id (e.g. Qwen/Qwen2.5-Math-1.5B); 'tiny:qwen2' or "
                    "'tiny:llama' builds a tiny model locally")
    dtype: str = opt("float32", "compute dtype: forward/backward run in it, the rollout engine and HF exports use "
                     "it; master weights and optimizer state stay fp32 (mixed precision)",
                     choices=["float32", "bfloat16"])
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = opt(False, "allow model code from the hub (only for models you trust)")

    def validate(self) -> None:
        require(bool(self.path), "model.path", "must be set (an HF path, a hub id or tiny:qwen2)")


@dataclasses.dataclass
class PolicyModelConfig(ModelConfig):
    """The policy model of RL stages (full fine-tune or LoRA)."""
    lora_r: int = opt(0, "train LoRA adapters of this rank (0 = full fine-tune); vLLM gets merged weights")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_targets: list = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                             "modules that get LoRA adapters")

    def validate(self) -> None:
        super().validate()
        require(self.lora_r >= 0, "model.lora_r", "must be >= 0")


@dataclasses.dataclass
class DataConfig:
    """Training / evaluation problems."""
    source: str = opt("synthetic:chain_sum", "JSONL/Parquet path, hub dataset id, or synthetic:<task>")
    split: str = opt("train", "split to read (hub datasets; synthetic tasks use train/test)")
    field_map: dict = opt({}, "rename fields: {problem: question, answer: final_answer}")
    template: str = opt("chat", "prompt template", choices=["chat", "r1_zero", "plain"])
    force_think: bool = opt(False, "append '<think>\\n' to every prompt")
    max_prompt_tokens: int = opt(256, "prompts longer than this are rejected with an error naming the row")
    task_knobs: dict = opt({}, "keyword arguments of the synthetic task generator (difficulty)")
    num_train: int = opt(2000, "synthetic tasks: number of training problems")
    num_eval: int = opt(200, "synthetic tasks: number of held-out problems")
    seed: int = opt(0, "data seed")

    def validate(self) -> None:
        require(self.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be > 0")
        require(self.num_train > 0 and self.num_eval >= 0, "data.num_train", "must be > 0 (num_eval >= 0)")


def cli_config(cls: type[T], description: str, argv: Sequence[str] | None = None) -> T | int:
    """`--config FILE [section.key=value ...]` (and `--help-config`) for a stage's entry point.

    Returns the validated config, or an exit code (0 after --help-config, 2 on a config error, printed)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (configs/*.yaml)")
    ap.add_argument("--help-config", action="store_true", help="print every config key with its help")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    if args.help_config:
        print(describe(cls))
        return 0
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


# the model path check (rl/model_path.py), re-exported where every stage has always imported it
from rl.model_path import check_model_path, resolve_model_path  # noqa: F401
