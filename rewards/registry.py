"""Reward plugin registry.

Contract: `fn(completion: str, sample: Mapping[str, Any]) -> float`, where `sample` is the dataset row
(`problem`, `answer`, task-specific fields). A batch form `fn(completions, samples) -> list` may be
registered with `batched=True` (or, for `module:function` plugins, by setting `fn.r1lab_batched = True`).
An item whose reward cannot be computed is *failed*, not 0 (`rewards.outcome`): a per-item function raises
(`RewardFailed` says so on purpose); a batched one returns `Failed(reason)` for that item, and may return a
`ScoredBatch(values, metrics)` whose metrics the scorer logs as `reward/<name>/<key>`.

Configs name a plugin by registry name (`accuracy`) or as `module:function` (`my_pkg.rewards:brevity`).
Installed packages register through the entry-point group `r1lab.rewards`:

    [project.entry-points."r1lab.rewards"]
    brevity = "my_pkg.rewards:brevity"
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "r1lab.rewards"


class RewardPluginError(ValueError):
    """A reward plugin that cannot be found or loaded; the message names it."""


@dataclass(frozen=True)
class RewardFn:
    name: str
    fn: Callable[..., Any]
    batched: bool = False
    # builtin rewards are pure, linear-time Python and run in-process; anything else runs in the pool
    trusted: bool = False


_REGISTRY: dict[str, RewardFn] = {}
_ENTRY_POINTS_LOADED = False


def register(name: str, *, batched: bool = False, trusted: bool = False) -> Callable:
    """Decorator: register a reward function under `name`. A duplicate name is rejected."""
    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise RewardPluginError(f"reward {name!r} is already registered (by {_REGISTRY[name].fn.__module__}); "
                                    f"known rewards: {sorted(_REGISTRY)}")
        _REGISTRY[name] = RewardFn(name, fn, batched, trusted)
        return fn
    return deco


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue  # the package registered itself on import
        try:
            fn = ep.load()
        except Exception as e:
            raise RewardPluginError(f"reward plugin {ep.name!r} (entry point {ep.value!r}) failed to load: {e}") from e
        _REGISTRY[ep.name] = RewardFn(ep.name, fn)


def _builtins() -> None:
    import rewards.code  # noqa: F401  (registers the builtins)
    import rewards.functions  # noqa: F401


def known() -> list[str]:
    _builtins()

    _load_entry_points()
    return sorted(_REGISTRY)


def get(spec: str) -> RewardFn:
    """Resolve a registry name or `module:function`; errors name the plugin and list the known names."""
    _builtins()

    if spec in _REGISTRY:
        return _REGISTRY[spec]
    _load_entry_points()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(module)
        except Exception as e:
            raise RewardPluginError(f"reward plugin {spec!r}: cannot import module {module!r}: {e}") from e
        fn = getattr(mod, attr, None)
        if not callable(fn):
            raise RewardPluginError(f"reward plugin {spec!r}: module {module!r} has no function {attr!r}")
        return RewardFn(spec, fn, batched=bool(getattr(fn, "r1lab_batched", False)))
    raise RewardPluginError(f"unknown reward {spec!r}; known rewards: {known()} (or use 'module:function')")
