"""Routing replay for Mixture-of-Experts policies in the trainer's HF forward (R2 / R3), and MoE metrics.

Why: an MoE layer routes each token to its top-k experts. The inference engine and the trainer disagree on a
share of those choices (different kernels, batch shapes, bf16 rounding), and one flipped expert changes the
token's hidden state, so MoE rollout log-probs and trainer log-probs drift apart far more than for dense
models. Rollout Routing Replay (R3, arXiv 2510.11370) makes the trainer's forward use the experts the engine
used; the gate weights still come from the trainer's own router logits, so the router keeps its gradient. R2
records the trainer's own choices in its old-log-prob pass and replays those in the update's forwards.

What a replayed MoE layer computes (per token; `ids` are the replayed expert ids, `z` the trainer's router
logits [E] of this token):
  - Qwen3-MoE (`Qwen3MoeTopKRouter`): p = softmax(z) in fp32; w_j = p[ids_j], divided by sum_j p[ids_j] when
    `norm_topk_prob`; cast to the logits' dtype. Exactly the model's own formula with the top-k replaced.
  - DeepSeek-V3 (`DeepseekV3TopkRouter`): s = sigmoid(z) in fp32; w_j = s[ids_j] / (sum_j s[ids_j] + 1e-20)
    when `norm_topk_prob`, times `routed_scaling_factor`. The correction bias (`e_score_correction_bias`) and
    the group limit only take part in *choosing* experts, never in the weights, so under replay they play no
    part: the replayed ids are taken as they are, even when they break the group limit.
  The experts module then runs the replayed ids with these weights (shared experts of DeepSeek are unaffected).
Difference from the paper: the paper (as we read it) writes the replayed gate as a softmax of the training
logits restricted to the replayed experts. For Qwen3-MoE with `norm_topk_prob` that is the same number; without it (and for
DeepSeek's sigmoid router) we keep the model's own weighting and only swap the selection, so that a replay of
the model's own choices is the unmodified model, bit for bit (`tests/test_routing_replay.py` checks it).
Positions that are padding (attention_mask 0) or whose ids are -1 (no record: e.g. the last sampled token,
over which the engine runs no forward) keep the trainer's own routing; they are never replayed.

API:
    with routing(model, "replay", attention_mask, ids=ids, names=sample_ids) as rec:
        logp, _ = model(input_ids, attention_mask, score_mask)     # any module that contains the routers
    loss = pg_loss + coef * rec.aux_loss                           # backward may run after the block
    rec.metrics()   # {"moe/routing_agreement", "moe/replayed_frac", "moe/expert_load_entropy", "moe/aux_loss"}
  mode "off": the model's own routing (metrics and aux loss only); "record": own routing, and `rec.ids` holds
  the chosen ids [B, T, L, k] (-1 at padding) for a later replay (R2); "replay": use `ids`.
  Layout of ids: [B, T, L, k] integer = rows x positions (the same positions as input_ids, prompt included) x
  MoE layers (in model order, dense layers skipped) x top-k slots. Build it from per-sample records with
  `pad_routing` (right-padded, like rl.grpo.batching.build_batch) and cut micro-batches with `slice_routing`
  (the same rows and positions as the trainer's input_ids[rows, :length]). `validate_routing_ids` checks what
  the engine returned (ids in range, shapes, distinct ids per token, not all zeros) and names the bad sample.
  Wiring (the trainer's): r3: both the old-log-prob pass and the update's forwards replay the engine's ids; r2:
  the old-log-prob pass runs "record" and keeps `rec.ids` (moved to the CPU batch) for the update's "replay".
  Average metrics over micro-batches weighted by `rec.n_tokens`; `metrics()` synchronises with the device, once.

Exactly once per forward: each MoE layer consumes its slice of the ids once per forward (`rec.consumed`, checked
when the block exits; a second forward in one block is an error). Under activation checkpointing
(`model.gradient_checkpointing_enable()`, HF's `GradientCheckpointingLayer`) the backward runs each router a
second time; the checkpointed function is bound, at forward time, to the session that was active then, so the
recomputation uses the experts the forward used (stored per layer), does not consume or record again, and
counts into `rec.recomputed` instead; this holds when backward runs after the block, and when two micro-batches'
forwards run before their backwards. Checkpointing by other means (torch's `checkpoint_wrapper`) would recompute
without the session, so `routing()` refuses models that contain a CheckpointWrapper. The hooks are forward hooks on the router modules of this model instance
(found by class, so they survive FSDP2's `fully_shard` of the decoder layers and PEFT wrappers); they stay
installed and do nothing outside a `routing` block.

Metrics (real tokens only, i.e. attention_mask 1):
  moe/routing_agreement: mean over replayed (token, layer) of |own top-k ∩ replayed ids| / k, where "own" is the
    trainer's router choice in this same forward (whose inputs already follow the replayed earlier layers).
  moe/replayed_frac: replayed (token, layer) / real (token, layer): below 1 when records are missing.
  moe/expert_load_entropy: per layer, the entropy of the share of (token, slot) assignments each expert gets,
    divided by log(E) (1 = perfectly balanced), averaged over layers.
  moe/aux_loss: the load-balancing loss of the experts actually used, from the router's probabilities:
    - softmax routers (Qwen3-MoE): HF's `load_balancing_loss_func` (Switch Transformer): E * sum_e f_e P_e with
      f_e = assignments to e / real tokens (sums to k) and P_e = mean router probability, both pooled over
      layers as HF pools them; a balanced router gives k. So `algo.moe_aux_coef` means what TRL's / HF's
      `router_aux_loss_coef` means.
    - sigmoid routers (DeepSeek-V3): DeepSeek-V3's complementary sequence-wise balance loss: per row and layer,
      sum_e f_e P_e with f_e = E/(k T) * assignments to e and P_e = mean of s_e / sum_j s_j over the row's T
      real tokens; averaged over rows and layers (1 when balanced). DeepSeek-V3 itself balances mainly with the
      bias (aux-loss-free, not trained by gradient) and used this loss with a tiny weight (1e-4).
  DEFAULT_AUX_COEF is 0 (as Unsloth; TRL adds 0.001 x HF's loss): RL starts from a router that pre-training
  already balanced, the RL data is far smaller than the pre-training data, and under R3 the selection is the
  engine's anyway, so the loss would mostly pull the router's probabilities away from what the policy gradient
  wants. We have not measured whether RL unbalances the experts without it: watch moe/expert_load_entropy and
  raise the coefficient if it falls. `rec.aux_loss` carries a gradient unless
  `aux_grad=False` (then it is for logging and its graph is not kept). Under reentrant checkpointing
  (`use_reentrant=True`, not HF's default) the forward runs without grad, so the aux loss has no gradient.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rl.moe import DEFAULT_AUX_COEF  # noqa: F401  (re-exported: defined beside the package, torch-free)

MODES = ("off", "record", "replay")


class RoutingError(ValueError):
    """Routing ids that cannot be replayed (bad shape, out-of-range or duplicate ids, missing forward)."""


# ------------------------------------------------------------------------------------------------ arch adapters
def _softmax_probs(router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1, dtype=torch.float)


def _softmax_weights(router: nn.Module, probs: torch.Tensor, ids: torch.Tensor, dtype) -> torch.Tensor:
    w = probs.gather(1, ids)
    if router.norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(dtype)


def _sigmoid_probs(router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits.float().sigmoid()


def _sigmoid_weights(router: nn.Module, probs: torch.Tensor, ids: torch.Tensor, dtype) -> torch.Tensor:
    w = probs.gather(1, ids)
    if router.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * router.routed_scaling_factor


@dataclass(frozen=True)
class RouterKind:
    """How one router class turns logits into probabilities and (replayed) ids into combine weights."""
    probs: Callable       # (router, logits [N, E]) -> fp32 probabilities/scores [N, E]
    weights: Callable     # (router, probs, ids [N, k], logits dtype) -> combine weights [N, k]
    aux: str              # "switch" (HF's pooled Switch loss) or "seqwise" (DeepSeek-V3's sequence-wise loss)


ROUTERS = {
    "Qwen3MoeTopKRouter": RouterKind(_softmax_probs, _softmax_weights, "switch"),
    "DeepseekV3TopkRouter": RouterKind(_sigmoid_probs, _sigmoid_weights, "seqwise"),
}


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The MoE router modules of `model`, in layer order (dense layers have none)."""
    return [m for m in model.modules() if type(m).__name__ in ROUTERS]


def moe_layout(model: nn.Module) -> tuple[int, int, int]:
    """(MoE layers, experts per layer, top-k) of `model`; RoutingError when it has no supported router."""
    routers = find_routers(model)
    if not routers:
        named = sorted({type(m).__name__ for m in model.modules() if "router" in type(m).__name__.lower()})
        raise RoutingError("routing replay: the model has no supported MoE router"
                           + (f" (found {', '.join(named)}; supported: {', '.join(ROUTERS)})" if named else ""))
    r = routers[0]
    return len(routers), r.num_experts, r.top_k


# ------------------------------------------------------------------------------------------------ validation
def _who(b: int, names: Sequence | None) -> str:
    return f"sample {names[b]} (row {b})" if names is not None else f"row {b}"


def _first(mask: torch.Tensor) -> tuple[int, ...] | None:
    hit = mask.nonzero()
    return tuple(hit[0].tolist()) if len(hit) else None


def validate_routing_ids(ids: torch.Tensor, attention_mask: torch.Tensor, *, num_layers: int, num_experts: int,
                         top_k: int, names: Sequence | None = None) -> None:
    """Check routed expert ids [B, T, L, k] against the tokens [B, T]; RoutingError naming the first bad row.

    Only real positions (attention_mask 1) are checked: padding is never replayed. At a real position a
    (token, layer) holds k distinct ids in [0, E), or k times -1 (no record: not replayed)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise RoutingError(f"routing replay: expert ids must be an integer tensor [B, T, L, k], got "
                           f"{type(ids).__name__}{'' if not isinstance(ids, torch.Tensor) else ' ' + str(ids.dtype)}")
    want = (*attention_mask.shape, num_layers, top_k)
    if tuple(ids.shape) != want:
        raise RoutingError(f"routing replay: expert ids have shape {tuple(ids.shape)}, the batch needs "
                           f"{want} (rows, positions, MoE layers, top-k)")
    real = attention_mask.to(ids.device).bool()[..., None, None]
    ids = ids.long()
    bad = _first(((ids < -1) | (ids >= num_experts)) & real)
    if bad:
        b, t, l, _ = bad
        raise RoutingError(f"routing replay: {_who(b, names)}: expert id {int(ids[bad])} at position {t}, MoE layer "
                           f"{l} is out of range [0, {num_experts}) (-1 marks a token without a record)")
    recorded = ((ids >= 0) & real).flatten(1)
    zeros = _first((recorded.sum(1) >= 2) & ~((ids.flatten(1) != 0) & recorded).any(1))
    if zeros:
        raise RoutingError(f"routing replay: {_who(zeros[0], names)}: every recorded expert id is 0 (a capture "
                           "buffer that was never filled?)")
    bad = _first(((ids < 0).any(-1) & (ids >= 0).any(-1)) & real[..., 0])
    if bad:
        b, t, l = bad
        raise RoutingError(f"routing replay: {_who(b, names)}: position {t}, MoE layer {l} mixes -1 and expert ids "
                           f"{ids[b, t, l].tolist()}")
    s = ids.sort(dim=-1).values
    bad = _first(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any(-1) & real[..., 0])
    if bad:
        b, t, l = bad
        raise RoutingError(f"routing replay: {_who(b, names)}: position {t}, MoE layer {l} repeats an expert: "
                           f"{ids[b, t, l].tolist()}")


# ------------------------------------------------------------------------------------------------ batch layout
def pad_routing(records: Sequence[torch.Tensor | None], lengths: Sequence[int], width: int,
                names: Sequence | None = None) -> torch.Tensor:
    """Right-padded ids [B, width, L, k] (-1 where there is no record) from per-sample records [n_i, L, k].

    Sample i has lengths[i] tokens (prompt + response, as in build_batch); its record covers its first n_i
    tokens, n_i = lengths[i] or lengths[i] - 1 (the engine never runs the last sampled token); None: no record."""
    shapes = {tuple(r.shape[1:]) for r in records if r is not None}
    if len(shapes) != 1:
        raise RoutingError(f"routing replay: records disagree on (MoE layers, top-k): {sorted(shapes)}"
                           if shapes else "routing replay: no sample has a routing record")
    out = torch.full((len(records), width, *shapes.pop()), -1, dtype=torch.long)
    for b, (r, n) in enumerate(zip(records, lengths)):
        if r is None:
            continue
        if r.dim() != 3 or not n - 1 <= r.shape[0] <= n:
            raise RoutingError(f"routing replay: {_who(b, names)} has {n} tokens but a routing record of shape "
                               f"{tuple(r.shape)} (expected [{n - 1} or {n}, layers, top-k])")
        out[b, : r.shape[0]] = r.long()
    return out


def slice_routing(ids: torch.Tensor, rows: Sequence[int] | torch.Tensor, length: int) -> torch.Tensor:
    """The ids of a micro-batch: the same rows and first `length` positions as input_ids[rows, :length]."""
    return ids[torch.as_tensor(rows, dtype=torch.long), :length]


# ------------------------------------------------------------------------------------------------ one forward
class RoutingSession:
    """The state of one forward under `routing(...)` (the `rec` of the with-block)."""

    def __init__(self, mode: str, attention_mask: torch.Tensor, ids: torch.Tensor | None, kind: RouterKind,
                 layout: tuple[int, int, int], aux_grad: bool) -> None:
        self.mode, self.kind, self.aux_grad = mode, kind, aux_grad
        self.num_layers, self.num_experts, self.top_k = layout
        self.shape = tuple(attention_mask.shape)
        self._real = attention_mask.reshape(-1).bool()
        self._target = ids.reshape(-1, self.num_layers, self.top_k).long() if ids is not None else None
        self.consumed = [0] * self.num_layers      # forward passes through each MoE layer
        self.recomputed = [0] * self.num_layers    # activation-checkpointing recomputations of each MoE layer
        self._used: list[torch.Tensor | None] = [None] * self.num_layers    # ids the forward ran [N, k]
        self._stats: list[dict | None] = [None] * self.num_layers
        self._moved: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(real [N], target [N, L, k] or None) on `device`, moved once."""
        if device not in self._moved:
            t = self._target.to(device) if self._target is not None else None
            self._moved[device] = (self._real.to(device), t)
        return self._moved[device]

    # -- called by the router hook
    def choose(self, layer: int, own: torch.Tensor, recompute: bool) -> torch.Tensor:
        """The expert ids [N, k] this layer runs: replayed at real recorded positions, else the router's own."""
        n = own.shape[0]
        if n != self._real.numel():
            raise RoutingError(f"routing replay: MoE layer {layer} routed {n} tokens but the attention_mask given to "
                               f"routing() covers {self.shape[0]} x {self.shape[1]}: pass the forward's own mask")
        if recompute:
            if self._used[layer] is None:
                raise RuntimeError(f"routing replay: MoE layer {layer} recomputed before its forward")
            self.recomputed[layer] += 1
            return self._used[layer]
        self.consumed[layer] += 1
        if self.consumed[layer] > 1:
            raise RuntimeError(f"routing replay: MoE layer {layer} ran twice in one routing() block: one block "
                               "per forward")
        chosen = own
        if self.mode == "replay":
            real, target = self._on(own.device)
            target = target[:, layer]
            chosen = torch.where((real & (target[:, 0] >= 0))[:, None], target, own)
        self._used[layer] = chosen.detach()
        return chosen

    def observe(self, layer: int, own: torch.Tensor, chosen: torch.Tensor, probs: torch.Tensor,
                recompute: bool) -> None:
        """Per-row loads and probability sums of the real tokens (the aux loss and the metrics)."""
        B, T = self.shape
        real, target = self._on(probs.device)
        with torch.set_grad_enabled(self.aux_grad and torch.is_grad_enabled()):
            aux_p = probs if self.kind.aux == "switch" else probs / probs.sum(-1, keepdim=True)
            prob = (aux_p * real[:, None]).view(B, T, -1).sum(1)           # [B, E]; graph when aux_grad
        if recompute:
            return                                  # the same ops as the forward (checkpoint), nothing stored
        with torch.no_grad():
            load = nn.functional.one_hot(chosen, self.num_experts).sum(1).float() * real[:, None]
            st = {"prob": prob, "load": load.view(B, T, -1).sum(1), "n": real.view(B, T).sum(1).float()}
            if self.mode == "replay":
                target = target[:, layer]
                replay = real & (target[:, 0] >= 0)
                hits = (own[:, :, None] == target[:, None, :]).any(-1).float().sum(-1) / self.top_k
                st.update(agree=hits[replay].sum(), replayed=replay.sum())     # tensors: no sync per layer
        self._stats[layer] = st

    # -- results
    @property
    def ids(self) -> torch.Tensor:
        """The expert ids the forward ran [B, T, L, k] (recorded ones in "record" mode), -1 at padding."""
        if any(u is None for u in self._used):
            raise RuntimeError("routing replay: no complete forward ran in this routing() block")
        out = torch.stack(self._used, dim=1).clone()
        out[~self._real.to(out.device)] = -1
        return out.view(*self.shape, self.num_layers, self.top_k)

    @property
    def n_tokens(self) -> int:
        """Real tokens of this forward (weight its metrics by this when averaging over micro-batches)."""
        return int(self._real.sum())

    @property
    def aux_loss(self) -> torch.Tensor:
        """The load-balancing loss (see the module docstring), a scalar with gradient unless aux_grad=False."""
        st = self._complete()
        prob = torch.stack([s["prob"] for s in st])                        # [L, B, E]
        load = torch.stack([s["load"] for s in st]).to(prob.device)
        n = st[0]["n"].to(prob.device)                                      # [B]
        E, k = self.num_experts, self.top_k
        if self.kind.aux == "switch":
            rows = n.sum().clamp(min=1) * len(st)
            return E * ((load.sum((0, 1)) / rows) * (prob.sum((0, 1)) / rows)).sum()
        has = n > 0
        nb = n.clamp(min=1)[None, :, None]
        per = ((load * E / (k * nb)) * (prob / nb)).sum(-1)                 # [L, B]
        return per[:, has].mean() if bool(has.any()) else prob.sum() * 0.0

    def metrics(self) -> dict[str, float]:
        st = self._complete()
        load = torch.stack([s["load"].sum(0) for s in st])                 # [L, E]
        share = load / load.sum(-1, keepdim=True).clamp(min=1)
        ent = -(share * share.clamp(min=1e-30).log()).sum(-1) / math.log(self.num_experts)
        out = {"moe/expert_load_entropy": float(ent.mean()), "moe/aux_loss": float(self.aux_loss.detach())}
        if self.mode == "replay":
            replayed = int(sum(s["replayed"] for s in st))
            out["moe/replayed_frac"] = replayed / max(1, self.n_tokens * self.num_layers)
            if replayed:
                out["moe/routing_agreement"] = float(sum(s["agree"] for s in st)) / replayed
        return out

    def check(self) -> None:
        """Every MoE layer consumed its ids exactly once (called when the with-block exits)."""
        bad = [i for i, c in enumerate(self.consumed) if c != 1]
        if bad:
            raise RuntimeError(f"routing replay: MoE layers {bad} ran {[self.consumed[i] for i in bad]} times in "
                               "this routing() block; each must run exactly once (one forward per block)")

    def _complete(self) -> list[dict]:
        if any(s is None for s in self._stats):
            raise RuntimeError("routing replay: no complete forward ran in this routing() block")
        return self._stats  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ hooks
class _Controller:
    """Forward hooks on one model's routers, and the binding of sessions to checkpointed layers."""

    def __init__(self, model: nn.Module) -> None:
        self.layout = moe_layout(model)
        self.routers = find_routers(model)
        kinds = {type(r).__name__ for r in self.routers}
        if len(kinds) != 1:
            raise RoutingError(f"routing replay: expected one router class, found {sorted(kinds)}")
        self.kind = ROUTERS[kinds.pop()]
        self.session: RoutingSession | None = None
        self.recompute = False
        for i, r in enumerate(self.routers):
            r.register_forward_hook(self._hook(i))
            r._r1lab_routing = self

    def _hook(self, layer: int):
        def hook(module: nn.Module, args, output):
            s = self.session
            if s is None:
                return None
            logits, _, own = output
            chosen = s.choose(layer, own, self.recompute)
            probs = self.kind.probs(module, logits)
            s.observe(layer, own, chosen, probs, self.recompute)
            return logits, self.kind.weights(module, probs, chosen, logits.dtype), chosen
        return hook

    @contextlib.contextmanager
    def bind(self, session: RoutingSession | None, recompute: bool) -> Iterator[None]:
        prev = self.session, self.recompute
        self.session, self.recompute = session, recompute
        try:
            yield
        finally:
            self.session, self.recompute = prev

    def wrap_checkpointing(self, model: nn.Module) -> None:
        """Bind each checkpointed layer's function to the session active at its forward (idempotent; re-run at
        every block, since gradient_checkpointing_enable() replaces the function)."""
        mine = {id(r) for r in self.routers}
        if any(type(m).__name__ == "CheckpointWrapper" for m in model.modules()):
            raise RoutingError("routing replay: the model is wrapped by torch's checkpoint_wrapper, whose "
                               "recomputation cannot replay; use model.gradient_checkpointing_enable()")
        for m in model.modules():
            fn = getattr(m, "_gradient_checkpointing_func", None)
            if fn is None or getattr(fn, "_r1lab_routing", False) or not any(id(r) in mine for r in m.modules()):
                continue
            m._gradient_checkpointing_func = self._bound_checkpoint(fn)

    def _bound_checkpoint(self, checkpoint_fn: Callable) -> Callable:
        def run(fn, *args, **kwargs):
            session, calls = self.session, [0]
            if session is None:
                return checkpoint_fn(fn, *args, **kwargs)

            def bound(*a, **k):
                calls[0] += 1
                with self.bind(session, recompute=calls[0] > 1):
                    return fn(*a, **k)
            return checkpoint_fn(bound, *args, **kwargs)
        run._r1lab_routing = True
        return run


def _controller(model: nn.Module) -> _Controller:
    routers = find_routers(model)
    ctl = getattr(routers[0], "_r1lab_routing", None) if routers else None
    return ctl if ctl is not None and ctl.routers[0] is routers[0] else _Controller(model)   # not a deepcopy's


@contextlib.contextmanager
def routing(model: nn.Module, mode: str, attention_mask: torch.Tensor, *, ids: torch.Tensor | None = None,
            names: Sequence | None = None, aux_grad: bool = True) -> Iterator[RoutingSession]:
    """Run one forward of `model` (an HF MoE model, or a wrapper/FSDP module containing it) under routing
    mode "off" | "record" | "replay"; yields the RoutingSession. attention_mask [B, T] is the forward's mask;
    ids [B, T, L, k] (replay only) are validated first (names: per-row sample names for errors)."""
    if mode not in MODES:
        raise RoutingError(f"routing replay: mode must be one of {MODES}, got {mode!r}")
    ctl = _controller(model)
    if (ids is None) != (mode != "replay"):
        raise RoutingError("routing replay: ids are required in replay mode and only there")
    if ids is not None:
        L, E, k = ctl.layout
        validate_routing_ids(ids, attention_mask, num_layers=L, num_experts=E, top_k=k, names=names)
    if ctl.session is not None:
        raise RuntimeError("routing replay: routing() blocks do not nest")
    ctl.wrap_checkpointing(model)
    session = RoutingSession(mode, attention_mask, ids, ctl.kind, ctl.layout, aux_grad)
    with ctl.bind(session, recompute=False):
        yield session
    session.check()
