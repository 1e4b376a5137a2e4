"""Routing replay in the GRPO trainer: which routing each forward of the policy runs, the expert ids it replays
(cut to the forward's micro-batch, padded or packed), and the moe/* metrics averaged over micro-batches.

The trainer worker (`rl.grpo.trainer_worker`) only wraps its policy forwards in `TrainerRouting.forward`; what
happens there is decided here, per `algo.routing_replay` and the forward's phase:

    replay   phase "old" (old-log-prob pass)        phase "update" (the update's forwards)
    off      own routing                              own routing
    r2       own routing, recorded (RECORD_KEY)       replay RECORD_KEY (own routing when there was no old
                                                      pass: strictly on policy, the same weights route the same)
    r3       replay the engine's ids (ENGINE_KEY)     replay the engine's ids (ENGINE_KEY)

Batch keys (per-token, aligned with input_ids [B, L]; -1 = no record: never replayed):
    ENGINE_KEY "routed_experts": [B, L, MoE layers, top-k] int16, the rollout engine's choices
        (rollout.return_routed_experts; built by rl.grpo.batching.build_batch with rl.moe.replay.pad_routing).
    RECORD_KEY "routing_ids": the same layout, the trainer's own choices in the old-log-prob pass (r2), returned by
        compute_logprobs and put into the update's batch by the driver.
Layouts of one forward: padded rows `input_ids[idx, :length]` -> ids[idx, :length]; a packed row
(`rl.packing.PackedLayout`) -> `layout.pack(ids[idx, :max_len], fill=-1)`, of which a sequence-parallel rank runs
the slice [lo, lo + n) (its routers see only those tokens). Packing's tail pad is masked: never replayed.

Metrics (update phase; each micro-batch's value weighted by its real tokens, `rec.n_tokens`, over micro-batches,
mini-batches, epochs and ranks): moe/expert_load_entropy, moe/aux_loss, and moe/routing_agreement: the trainer's
own top-k vs the ids replayed (r3: the engine's; r2: its old pass's) or, without replay (off, or r2 without an old
pass), vs the engine's when the batch has them (rollout.return_routed_experts); there the trainer's earlier
layers routed on their own, so disagreements compound over layers. moe/replayed_frac with replay.
Sums travel as `key` (value x weight) and `key@w` (weight), so any additive reduction (the trainer's all-gather
of metric sums) keeps the weighted mean; `finish_weighted` divides them.

The load-balancing loss: each micro-batch's `rec.aux_loss` enters the loss (rl.algos.assemble) with the share
`rec.n_tokens / (real tokens of the mini-batch over all ranks)`, so the summed gradient is that of the
token-weighted mean of the micro-batches' losses. DeepSeek's sequence-wise loss is per row, so under packing it is
computed per packed row (several sequences), not per sequence.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch

from rl.moe.replay import RoutingError, find_routers, routing, slice_routing

ENGINE_KEY = "routed_experts"
RECORD_KEY = "routing_ids"
REPLAYS = ("off", "r2", "r3")
WEIGHT_SUFFIX = "@w"


def forward_mode(replay: str, phase: str, batch_keys: Sequence[str] | Mapping) -> tuple[str, str | None]:
    """(rl.moe.replay mode, batch key of the replayed ids or None) of one policy forward (table above)."""
    if replay not in REPLAYS:
        raise RoutingError(f"algo.routing_replay must be one of {REPLAYS}, got {replay!r}")
    if phase not in ("old", "update"):
        raise ValueError(f"phase must be 'old' or 'update', got {phase!r}")
    if replay == "r3":
        if ENGINE_KEY not in batch_keys:
            raise RoutingError("algo.routing_replay=r3: the batch has no engine routing ('routed_experts'); set "
                               "rollout.return_routed_experts=true")
        return "replay", ENGINE_KEY
    if replay == "r2":
        if phase == "old":
            return "record", None
        return ("replay", RECORD_KEY) if RECORD_KEY in batch_keys else ("record", None)
    return "off", None


def micro_ids(ids: torch.Tensor, idx: Sequence[int], length: int, layout=None, lo: int = 0,
              n: int | None = None) -> torch.Tensor:
    """ids [B, W, L, k] -> the forward's ids (long): padded [len(idx), length, L, k], or with `layout` (a
    PackedLayout of rows idx) the packed row's tokens [lo, lo + n) as [1, n, L, k] (-1 in the pad tail)."""
    if layout is None:
        return slice_routing(ids, idx, length).long()
    packed = layout.pack(slice_routing(ids, idx, layout.max_len).long(), fill=-1)
    return packed[:, lo:lo + (n if n is not None else layout.width)]


def packed_mask(layout, lo: int = 0, n: int | None = None, device=None) -> torch.Tensor:
    """[1, n] 1 at the real tokens of the packed row's slice [lo, lo + n), 0 in the pad tail."""
    n = layout.width if n is None else n
    return (torch.arange(lo, lo + n, device=device) < layout.real).long()[None]


def agreement(own: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """own, target [B, T, L, k] expert ids, mask [B, T]: (sum over real (token, layer) with a target record of
    |own ∩ target| / k, number of such (token, layer))."""
    target = target.to(own.device).long()
    rec = mask.to(own.device).bool()[..., None] & (target[..., 0] >= 0)        # [B, T, L]
    hits = (own.long()[..., :, None] == target[..., None, :]).any(-1).float().mean(-1)
    return float(hits[rec].sum()), int(rec.sum())


class WeightedMetrics:
    """moe/* metrics as weighted sums: add(key, value, weight); as_sums() for additive reductions."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, key: str, value: float, weight: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.sums[key + WEIGHT_SUFFIX] = self.sums.get(key + WEIGHT_SUFFIX, 0.0) + weight

    def take(self) -> dict[str, float]:
        out, self.sums = self.sums, {}
        return out


def finish_weighted(metrics: dict[str, float]) -> dict[str, float]:
    """Replace each `key` / `key@w` pair of summed metrics by the weighted mean; in place, and returned."""
    for wk in [k for k in metrics if k.endswith(WEIGHT_SUFFIX)]:
        key, w = wk[: -len(WEIGHT_SUFFIX)], metrics.pop(wk)
        if key in metrics:
            metrics[key] = metrics[key] / w if w > 0 else 0.0
    return metrics


class TrainerRouting:
    """One trainer worker's routing: the policy model, algo.routing_replay, and the update's metrics."""

    def __init__(self, model: torch.nn.Module, replay: str, aux_coef: float) -> None:
        self.model, self.replay, self.aux_coef = model, replay, aux_coef
        self.metrics = WeightedMetrics()

    @classmethod
    def build(cls, model: torch.nn.Module, replay: str, aux_coef: float) -> TrainerRouting | None:
        """None for a dense policy (RoutingError when it asks for r2/r3 or a load-balancing loss)."""
        if find_routers(model):
            return cls(model, replay, aux_coef)
        if replay != "off" or aux_coef > 0:
            key = "algo.routing_replay" if replay != "off" else "algo.moe_aux_coef"
            raise RoutingError(f"{key}: the policy has no Mixture-of-Experts router this trainer supports "
                               "(Qwen3-MoE, DeepSeek-V3): routing replay and the load-balancing loss are for MoE "
                               "policies; set algo.routing_replay=off and algo.moe_aux_coef=0")
        return None

    @contextlib.contextmanager
    def forward(self, phase: str, batch: Mapping[str, torch.Tensor], idx: Sequence[int], mask: torch.Tensor, *,
                layout=None, lo: int = 0, collect: bool = True) -> Iterator:
        """Wrap one policy forward of rows `idx`. mask: the routers' token mask, padded [rows, length] (the
        forward's attention mask) or, with `layout`, [1, n] for the packed row's slice [lo, lo + n). Yields the
        rl.moe.replay RoutingSession; with `collect`, its metrics are added after the forward."""
        mode, key = forward_mode(self.replay, phase, batch)
        n = mask.shape[1]
        cut = lambda ids: micro_ids(ids, idx, n, layout, lo, n)  # noqa: E731
        ids = cut(batch[key]) if key else None
        names = [f"shard row {i}" for i in idx] if layout is None else [f"packed shard rows {list(idx)}"]
        grad = self.aux_coef > 0 and phase == "update"
        with routing(self.model, mode, mask, ids=ids, names=names, aux_grad=grad) as rec:
            yield rec
        if collect:
            self._collect(rec, mode, cut(batch[ENGINE_KEY]) if mode != "replay" and ENGINE_KEY in batch else None,
                          mask)

    def _collect(self, rec, mode: str, engine: torch.Tensor | None, mask: torch.Tensor) -> None:
        w = rec.n_tokens
        if w == 0:
            return
        metrics = rec.metrics()
        for k, v in metrics.items():
            # the agreement is a ratio over the (token, layer) pairs with a record: weighted by their number, the
            # mean over micro-batches (and sequence-parallel slices) is the ratio over the whole batch
            weight = metrics["moe/replayed_frac"] * w if k == "moe/routing_agreement" else w
            self.metrics.add(k, v, weight)
        if engine is not None:
            hits, count = agreement(rec.ids, engine, mask)
            if count:
                self.metrics.add("moe/routing_agreement", hits / count, count / rec.num_layers)

    def aux_share(self, rec, mini_batch_tokens: float) -> float:
        """The micro-batch's weight of its aux loss: its real tokens over the mini-batch's (all ranks)."""
        return rec.n_tokens / max(mini_batch_tokens, 1.0)


def record_of(rec, layout=None) -> torch.Tensor:
    """The ids a "record" forward ran, in the batch's padded layout [rows, length, L, k] (int16, -1 at padding);
    `layout`: the forward was one packed row (no sequence parallelism)."""
    ids = rec.ids
    if layout is not None:
        ids = layout.unpack(ids, fill=-1)
    return ids.to("cpu", torch.int16)
