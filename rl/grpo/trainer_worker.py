"""FSDP2 trainer worker: one data-parallel rank of the policy update.

A plain class: the GRPO driver runs it as a Ray actor (`ray.remote(TrainerWorker)`), and `launch/train_step.py`
runs it without Ray under `torchrun` (one process per rank; `TrainerWorker.from_env`). Each worker holds
  - the policy (`rl.grpo.fsdp_model`): fp32 master weights sharded with FSDP2, compute in `model.dtype`,
    fp32 gradient reduction; its forward returns log-probs of the response tokens only, computed in chunks;
  - AdamW over the fp32 masters and an LR schedule;
  - optionally a frozen KL reference (always the run's *base* model, also after a resume) and a frozen
    on-policy-distillation teacher, both in the compute dtype.
Collective methods (every rank must call them, in the same order): compute_logprobs, update, push_weights,
export_hf, save_checkpoint, load_checkpoint, master_sums. FSDP all-gathers parameters in every forward, so ranks
also run equal numbers of micro-batches (a short rank runs zero-weighted dummy micro-batches).
Micro-batches (`rl.grpo.microbatch.plan_micro_batches`): length-sorted padded rows [rows, L] with an attention
mask, or with `trainer.packing` one packed row per micro-batch (`rl.packing.PackedLayout`: sequences back to back,
first-fit-decreasing up to the token budget); either way the log-probs come back in the batch's [B, L] layout, so
the loss, its global normalisers and the metrics are the same code. `trainer.sequence_parallel: k` groups k
consecutive ranks (`rl.grpo.sequence_parallel`): the ranks of a group get the same rows (the driver sends them the
same shard), each holds 1/k of every packed row's tokens, and all of them compute the group's loss; group sums
(normalisers, metrics) are therefore divided by k, and FSDP still shards over (and averages over) every rank.
Mixture-of-Experts policies: every policy forward runs under `rl.moe.trainer_routing` (algo.routing_replay: the
trainer's own routing, R2's record/replay or R3's replay of the engine's experts; moe/* metrics; the router's
load-balancing loss with algo.moe_aux_coef).
Backends: gloo on CPU, nccl on GPUs; the code path is the same. Collectives time out after
`trainer.collective_timeout_s`; every collective method, micro-batch and bucket is a check-in point
(`rl.grpo.collective_watch`), so a timed-out collective raises `CollectiveTimeout` naming the rank that did not
arrive.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import random
import time
from typing import Any

import torch
import torch.distributed as dist

from rl.algos.assemble import LossTerms, Normalisers, assemble_loss
from rl.grpo.attention_kernel import training_sdpa
from rl.grpo.collective_watch import CheckIn, collective
from rl.grpo.config import GRPOConfig
from rl.grpo.fsdp_model import compute_dtype, load_model
from rl.grpo.microbatch import computed_tokens, plan_micro_batches
from rl.grpo.sequence_parallel import check_heads, make_sp_group
from rl.heap import keep_freed_heap, release_free_heap
from rl.moe.trainer_routing import RECORD_KEY, TrainerRouting, finish_weighted, packed_mask, record_of
from rl.packing import PackedLayout

Batch = dict[str, torch.Tensor]   # input_ids, attention_mask, response_mask, rollout_logp [B, L]; adv [B]
                                  # (+ old_logp, ref_logp, teacher_logp [B, L] from compute_logprobs)


def lr_lambda(cfg: GRPOConfig):
    t = cfg.trainer

    def f(step: int) -> float:
        if t.lr_schedule == "multistep":
            return t.gamma ** sum(step >= m for m in t.milestones)
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        if t.lr_schedule == "constant":
            return warm
        progress = min(1.0, max(0.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)))
        cos = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return warm * cos if step >= t.warmup_steps else warm
    return f


class TrainerWorker:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, cfg: GRPOConfig,
                 model_path: str, base_path: str | None = None, sync_spec: dict | None = None,
                 local_rank: int = 0) -> None:
        """model_path: the weights to start from; base_path: the run's model (tokenizer, KL reference)."""
        self.rank, self.world, self.cfg = rank, world_size, cfg
        self.base_path = base_path or model_path
        tc = cfg.trainer
        use_cuda = torch.cuda.is_available() and tc.backend != "gloo"
        backend = tc.backend if tc.backend != "auto" else ("nccl" if use_cuda else "gloo")
        self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        self.heap = "n/a"
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=tc.collective_timeout_s))
        self.checkin = CheckIn.for_default_group(rank, world_size, tc.collective_timeout_s)
        with self.checkin.section("start-up (device mesh, model loading)"):
            self._build(model_path, cfg)
        self.transport = None
        self.local_shards = bool(sync_spec) and sync_spec.get("writers", 1) > 1   # sync.shards=local
        if sync_spec is not None and (rank == 0 or self.local_shards):
            from rl.grpo.sync import make_transport

            self.transport = make_transport(sync_spec)
            if rank == 0:
                self.swept = self.transport.open_writer()   # also removes sync directories of dead runs
                self.transport.check_room(self.transport.max_inflight * self._largest_bucket(cfg.sync.bucket_mb))
        if self.device.type == "cpu":   # last: a start-up that failed leaves its caller's glibc alone
            # glibc's heap trimmed during each backward, or kept for reuse from step to step (rl/heap.py)
            self.heap = "trimmed" if tc.release_heap else keep_freed_heap()
            if self.heap.startswith("skipped"):   # said, as a CPU engine logs its own heap policy's verdict
                print(f"[r1lab] trainer rank {rank}: trainer.release_heap=false is not applied ({self.heap}); the "
                      "update runs with the allocator's own policy", flush=True)

    def _build(self, model_path: str, cfg: GRPOConfig) -> None:
        """Device mesh, policy (+ frozen reference / teacher), optimizer and schedule."""
        from torch.distributed.device_mesh import init_device_mesh

        from transformers import AutoConfig

        tc, rank = cfg.trainer, self.rank
        self.packing, self.sp_size = tc.packing, tc.sequence_parallel
        check_heads(AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code), self.sp_size)
        self.mesh = init_device_mesh(self.device.type, (self.world,))   # FSDP: every rank (dp x sp)
        self.sp = make_sp_group(self.world, rank, self.sp_size)
        random.seed(tc.seed + rank)
        torch.manual_seed(tc.seed + rank)
        self.dtype = compute_dtype(cfg.model.dtype)
        kw = dict(packing=self.packing, sp=self.sp)
        self.model = load_model(model_path, cfg.model, self.device, self.mesh, trainable=True,
                                release_heap=cfg.trainer.release_heap, **kw)
        frozen = lambda p: load_model(p, cfg.model, self.device, self.mesh, trainable=False, **kw)  # noqa: E731
        self.ref = frozen(self.base_path) if cfg.algo.kl_coef > 0 else None
        self.teacher = frozen(cfg.algo.distill_teacher) if cfg.algo.distill_teacher else None
        # fused AdamW (one kernel per parameter, DTensor-aware): 0.36 s vs 2.2 s per step for 244M fp32 params
        # on one CPU thread, single-tensor loop vs fused (the default picks the loop on CPU)
        self.optim = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=tc.lr,
                                       betas=tuple(tc.betas), weight_decay=tc.weight_decay, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, lr_lambda(cfg))
        self.terms = LossTerms.from_algo(cfg.algo)
        # MoE policies: routing replay (algo.routing_replay) and moe/* metrics (rl.moe.trainer_routing); None: dense
        self.routing = TrainerRouting.build(self.model, cfg.algo.routing_replay, cfg.algo.moe_aux_coef)
        self.n_params = sum(p.numel() for p in self.model.parameters())   # DTensor numel: the global count

    @classmethod
    def from_env(cls, cfg: GRPOConfig, model_path: str, **kw) -> TrainerWorker:
        """Under torchrun: rank, world size, master address and local rank from the environment."""
        env = os.environ
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), env["MASTER_ADDR"], int(env["MASTER_PORT"]), cfg,
                   model_path, local_rank=int(env.get("LOCAL_RANK", 0)), **kw)

    # ------------------------------------------------------------------------------------------------ helpers
    def _max(self, n: int) -> int:
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _sum(self, *values: float) -> list[float]:
        """Sums over the data-parallel groups: the ranks of a sequence-parallel group hold the same rows, so the
        all-rank sum counts each group sp_size times."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.sp_size).tolist()

    def _route(self, model, phase: str | None, batch: Batch, idx: list[int] | None, mask, **kw):
        """The routing context of a policy forward (MoE, rl.moe.trainer_routing); yields the RoutingSession, or
        None for dense policies, other models (reference, teacher) and dummy forwards."""
        if self.routing is None or model is not self.model or phase is None or idx is None:
            return contextlib.nullcontext()
        return self.routing.forward(phase, batch, idx, mask, collect=phase == "update", **kw)

    def _score(self, model, batch: Batch, idx: list[int] | None, with_entropy: bool = False,
               phase: str | None = None):
        """(logp, entropy or None, length, routing session or None) of a micro-batch's response tokens,
        [len(idx), length] each; idx None: a dummy forward. phase ("old" | "update"): a policy forward whose
        MoE routing follows algo.routing_replay."""
        temp = self.cfg.rollout.temperature
        if self.packing:
            return self._score_packed(model, batch, idx, temp, with_entropy, phase)
        if idx is None:
            ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
            score = torch.tensor([[0, 1]], device=self.device)
            lp, ent = model(ids, torch.ones_like(ids), score, temp, with_entropy)
            return lp, ent, 2, None
        length = int(batch["attention_mask"][idx].sum(-1).max())
        ids = batch["input_ids"][idx, :length].to(self.device)
        am = batch["attention_mask"][idx, :length].to(self.device)
        score = batch["response_mask"][idx, :length].to(self.device)
        with self._route(model, phase, batch, idx, am) as rec:
            lp, ent = model(ids, am, score, temp, with_entropy)
        return lp, ent, length, rec

    def _score_packed(self, model, batch: Batch, idx: list[int] | None, temp: float, with_entropy: bool,
                      phase: str | None = None):
        """_score with the micro-batch packed into one row (padded to a multiple of sequence_parallel); the
        row's log-probs are laid back out as [len(idx), length]."""
        k, dev = self.sp_size, self.device
        if idx is None:
            layout = PackedLayout.of([2 * k])
            ids, score = torch.zeros(1, 2 * k, dtype=torch.long), torch.zeros(1, 2 * k)
            score[0, 1] = 1
        else:
            layout = PackedLayout.of(batch["attention_mask"][idx].sum(-1).tolist(), multiple=k)
            L = layout.max_len
            ids = layout.pack(batch["input_ids"][idx, :L])   # tail pad: token 0, a sequence of its own, unscored
            score = layout.pack(batch["response_mask"][idx, :L])
        n = layout.width // k                     # this rank's slice of the row (what its routers see)
        lo = self.sp.rank * n if k > 1 else 0
        route = self._route(model, phase, batch, idx, packed_mask(layout, lo, n, dev), layout=layout, lo=lo)
        with route as rec:
            lp, ent = model(ids.to(dev), None, score.to(dev), temp, with_entropy,
                            position_ids=layout.position_ids(dev), cu_seqlens=layout.cu_seqlens(dev))
        if idx is None:
            return lp, ent, 2 * k, None
        return layout.unpack(lp), (layout.unpack(ent) if ent is not None else None), layout.max_len, rec

    # ------------------------------------------------------------------------------------------------ API
    @torch.no_grad()
    @collective("compute_logprobs")
    def compute_logprobs(self, batch: Batch, old: bool = True) -> dict[str, Any]:
        """Old (current policy; unless `old` is False), reference and teacher log-probs [B, L] of this rank's
        shard; with algo.routing_replay=r2 also the policy's own expert ids (RECORD_KEY, [B, L, layers, k]) for
        the update to replay."""
        lengths = batch["attention_mask"].sum(-1).tolist()
        groups = plan_micro_batches(lengths, self.cfg.trainer.micro_batch_tokens, self.packing, self.sp_size)
        n = self._max(len(groups))
        models = {"old_logp": self.model if old else None, "ref_logp": self.ref, "teacher_logp": self.teacher}
        models = {k: m for k, m in models.items() if m is not None}
        out: dict[str, Any] = {k: torch.zeros_like(batch["rollout_logp"]) for k in models}
        record = old and self.routing is not None and self.routing.replay == "r2"
        self.model.eval()
        t0 = time.perf_counter()
        for g in range(n):
            self.checkin.mark(f"compute_logprobs micro-batch {g}")
            idx = groups[g] if g < len(groups) else None
            for key, model in models.items():
                with self._sdpa(lengths, idx, backward=False):   # the kernel the update will use for these rows
                    lp, _, length, rec = self._score(model, batch, idx, phase="old" if key == "old_logp" else None)
                if idx is not None:
                    out[key][idx, :length] = lp.float().cpu()
                if record and rec is not None:
                    ids = record_of(rec, PackedLayout.of(batch["attention_mask"][idx].sum(-1).tolist())
                                    if self.packing else None)
                    if RECORD_KEY not in out:
                        shape = (*batch["input_ids"].shape, *ids.shape[2:])
                        out[RECORD_KEY] = torch.full(shape, -1, dtype=torch.int16)
                    out[RECORD_KEY][idx, :ids.shape[1]] = ids
        out["seconds"] = time.perf_counter() - t0
        return out

    def _sdpa(self, lengths: list[int], group: list[int] | None, backward: bool):
        """SDPA's kernel for the padded rows `group` (indices into `lengths`; None: no rows) on CPU
        (rl/grpo/attention_kernel.py); packed rows are one long row: PyTorch's choice."""
        hf = self.model.hf.config
        length = 0 if group is None or self.packing else max(lengths[i] for i in group)
        layers = getattr(hf, "num_hidden_layers", 1)
        held = layers if backward and not self.cfg.model.gradient_checkpointing else 1
        return training_sdpa(length, self.device, self.cfg.trainer.math_attention_below,
                             rows=len(group or ()), heads=getattr(hf, "num_attention_heads", 1), layers_held=held)

    @collective("update")
    def update(self, batch: Batch) -> dict[str, float]:
        """PPO epochs x mini-batches over this rank's shard; one LR-schedule step. Returns metrics (the same
        on every rank): loss terms are the real mini-batch losses, averaged over the optimizer steps."""
        cfg = self.cfg
        B = batch["input_ids"].shape[0]
        self.model.train()
        sums: dict[str, float] = {}
        grad_norms, real, padded, steps = [], 0, 0, 0
        gen = torch.Generator().manual_seed(cfg.trainer.seed * 1000003 + int(self.sched.last_epoch))
        t0 = time.perf_counter()
        for _ in range(cfg.trainer.ppo_epochs):
            perm = torch.randperm(B, generator=gen).tolist()
            for mb in range(cfg.trainer.mini_batches):
                rows = perm[mb::cfg.trainer.mini_batches]
                r, p = self._mini_batch(batch, rows, sums)
                real, padded = real + r, padded + p
                grad_norms.append(self._optimizer_step())
                steps += 1
        self.sched.step()
        gathered: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(gathered, sums)   # the ranks of a sequence-parallel group report the same sums
        out = {k: sum(g.get(k, 0.0) for g in gathered) / (steps * self.sp_size) for k in set().union(*gathered)}
        real_g, padded_g = self._sum(real, padded)
        out["actor/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        out["actor/lr"] = self.sched.get_last_lr()[0]
        out["perf/update_s"] = time.perf_counter() - t0
        out["perf/padding_frac"] = 1.0 - real_g / padded_g if padded_g else 0.0
        # model FLOPs of the update (forward + backward = 6 x params per token, padding excluded, every epoch
        # and rank)
        out["perf/train_flops"] = 6.0 * self.n_params * real_g
        return finish_weighted(out)   # moe/*: token-weighted means over micro-batches and ranks

    def _mini_batch(self, batch: Batch, rows: list[int], sums: dict[str, float]) -> tuple[int, int]:
        """Forward/backward of one mini-batch's rows in length-sorted micro-batches; adds metrics to `sums`."""
        cfg = self.cfg
        mask = batch["response_mask"][rows]
        n_tok, n_seq, n_real = self._sum(float(mask.sum()), float((mask.sum(-1) > 0).sum()),
                                         float(batch["attention_mask"][rows].sum()))
        norm = Normalisers(n_tok, n_seq, cfg.rollout.max_new_tokens)
        lengths = batch["attention_mask"][rows].sum(-1).tolist()
        local = plan_micro_batches(lengths, cfg.trainer.micro_batch_tokens, self.packing, self.sp_size)
        real, padded = computed_tokens(lengths, local, self.packing, self.sp_size)
        groups = [[rows[i] for i in g] for g in local]
        need_entropy = True  # logged always; it costs no memory in the chunked scorer, a graph only if entropy_coef
        for g in range(self._max(len(groups))):
            self.checkin.mark(f"update micro-batch {g}")
            idx = groups[g] if g < len(groups) else None
            rows_here = local[g] if idx is not None else None   # indices into `lengths`, for SDPA's kernel
            with self._sdpa(lengths, rows_here, backward=True):
                lp, ent, L, rec = self._score(self.model, batch, idx, with_entropy=need_entropy, phase="update")
            if idx is None:
                (lp.sum() * 0.0).backward()  # keeps FSDP's collectives in step with other ranks
                continue
            if ent is not None and self.terms.entropy_coef == 0:
                ent = ent.detach()
            part = {k: batch[k][idx, :L].to(lp.device) if batch[k].dim() == 2 else batch[k][idx].to(lp.device)
                    for k in ("response_mask", "old_logp", "rollout_logp", "adv", "ref_logp", "teacher_logp")
                    if k in batch}
            extra = {}
            if "old_logp" not in part:  # strictly on-policy: this forward runs the weights that sampled
                part["old_logp"] = lp.detach()
                m = part["response_mask"]
                extra["rollout/logprob_diff"] = float(((lp.detach() - part["rollout_logp"]).abs() * m).sum()) / max(n_tok, 1.0)
            loss, metrics = assemble_loss(
                lp, part["response_mask"], part["adv"], part["old_logp"], part["rollout_logp"], self.terms, norm,
                entropy=ent, ref_logp=part.get("ref_logp"), teacher_logp=part.get("teacher_logp"),
                distill_baseline=float(batch["distill_baseline"]) if "distill_baseline" in batch else 0.0,
                moe_aux_loss=rec.aux_loss if rec is not None and self.terms.moe_aux_coef > 0 else None,
                moe_aux_share=self.routing.aux_share(rec, n_real) if rec is not None else 1.0)
            if self.device.type == "cpu" and cfg.trainer.release_heap:
                release_free_heap()   # the forward's freed blocks, before the backward allocates (rl/heap.py)
            # FSDP averages gradients over ranks; the normalisers are already global, so undo the mean. With
            # sequence parallelism every rank of a group holds this same loss, but its backward reaches only the
            # rank's own tokens (rl.grpo.sequence_parallel.gather_seq): the group's ranks add up to one gradient
            with self._sdpa(lengths, rows_here, backward=True):
                (loss * self.world).backward()
            metrics.update(extra)
            if self.routing is not None:
                metrics.update(self.routing.metrics.take())   # moe/*: value x weight, and the weights
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        return real, padded

    def _optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.trainer.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.trainer.grad_clip)
        else:
            gn = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return float(gn)

    # ------------------------------------------------------------------------------------------------ weights
    def _largest_bucket(self, bucket_mb: float) -> int:
        """Bytes of the largest bucket a weight sync sends (all writers' pieces together)."""
        from rl.grpo.sync.gather import largest_bucket_bytes

        tied = bool(getattr(self.model.hf.config, "tie_word_embeddings", False))
        return largest_bucket_bytes(self.model, self._engine_dtype(), max(1, int(bucket_mb * 2**20)), tied_head=tied)

    def _hf_tensors(self, dtype: torch.dtype | None = None):
        from rl.grpo.sync import iter_full_tensors

        mc = self.cfg.model
        return iter_full_tensors(self.model, dtype or self.dtype, lora_scaling=(mc.lora_alpha / mc.lora_r) if mc.lora_r else None,
                                 tied_head=bool(getattr(self.model.hf.config, "tie_word_embeddings", False)))

    def _engine_dtype(self) -> torch.dtype:
        """What the rollout engines compute in (rl.rollout.quantization.engine_dtype): the sync sends that."""
        from rl.rollout.quantization import engine_dtype

        name = engine_dtype(str(self.dtype).removeprefix("torch."), self.cfg.rollout.quantization,
                            gpu=self.cfg.resources.rollout_gpus > 0)
        return getattr(torch, name)

    @collective("push_weights")
    def push_weights(self, version: int, bucket_mb: float, checksum: bool, readers: list[int] | None = None,
                     reader_calls: dict[int, Any] | None = None, sharing: int = 0) -> dict[str, Any] | None:
        """Collective. Stream the policy, cast to the engine's dtype, bucket by bucket through the transport.
        sync.shards=gather: every rank takes part in the all-gathers, rank 0 writes full tensors. local: every
        rank writes its own FSDP pieces, nothing is gathered (rl.grpo.sync.gather.iter_local_shards). Rank 0
        returns the bucket count, bytes and seconds; every writing rank returns the float64 sums of what it
        wrote when `checksum` (the driver adds them up in rank order). `readers`: the rollout readers this
        transfer addresses (default all); `reader_calls`: reader -> the Ray ref of its load call, so that writer 0
        stops waiting for a reader whose call failed (rl.grpo.recovery.stopped_readers); `sharing`: the transfer's
        processes on this node, which share its cores meanwhile (rl.grpo.sync.threads)."""
        from rl.grpo.sync.threads import sync_threads, torch_threads

        with torch_threads(sync_threads(self.cfg.sync.threads, sharing)):
            return self._push_weights(version, bucket_mb, checksum, readers, reader_calls)

    def _push_weights(self, version: int, bucket_mb: float, checksum: bool, readers: list[int] | None,
                      reader_calls: dict[int, Any] | None) -> dict[str, Any] | None:
        from rl.grpo.recovery import stopped_readers
        from rl.grpo.sync import buckets, iter_local_shards, local_buckets, tensor_sums

        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        k = nbytes = 0
        gather_s = send_s = 0.0       # all-gather + cast (the bucket generator) vs writing into the transport
        size = max(1, int(bucket_mb * 2**20))
        if self.local_shards:
            tied = bool(getattr(self.model.hf.config, "tie_word_embeddings", False))
            stream = local_buckets(iter_local_shards(self.model, self._engine_dtype(), tied_head=tied), size, self.rank)
        else:
            stream = buckets(self._hf_tensors(self._engine_dtype()), size)
        writes = self.rank == 0 or self.local_shards
        if self.rank == 0 and self.transport is not None:
            self.transport.begin(readers, stopped_readers(reader_calls) if reader_calls else None)
        while True:
            t = time.perf_counter()
            bucket = next(stream, None)
            gather_s += time.perf_counter() - t
            if bucket is None:
                break
            self.checkin.mark(f"push_weights bucket {k}")
            if writes:
                if checksum:
                    sums.update(tensor_sums(bucket))
                t = time.perf_counter()
                self.transport.send(version, k, bucket, writer=self.rank if self.local_shards else 0)
                send_s += time.perf_counter() - t
                nbytes += sum(t.numel() * t.element_size() for t in bucket.values())
            k += 1
            del bucket
        if self.rank == 0:
            t = time.perf_counter()
            self.transport.finish(version, k)
            return {"sums": sums if checksum else None, "buckets": k, "bytes": nbytes, "gather_s": gather_s,
                    "send_s": send_s, "finish_s": time.perf_counter() - t, "seconds": time.perf_counter() - t0}
        return {"sums": sums if checksum else None, "bytes": nbytes} if writes else None

    @collective("export_hf")
    def export_hf(self, out_dir: str, bucket_mb: float = 512, with_tokenizer: bool = True) -> str | None:
        """Collective. Rank 0 writes the policy as an HF model directory (compute dtype), atomically. MoE expert
        weights are written per expert (the checkpoint format of `save_pretrained`, which vLLM's DeepSeek-V3
        loader needs: rl.moe.expert_layout), not as transformers 5's fused tensors."""
        from rl.grpo.hf_io import HFExportWriter
        from rl.grpo.sync import buckets
        from rl.moe.expert_layout import split_experts

        writer = HFExportWriter(out_dir) if self.rank == 0 else None
        hidden = self.model.hf.config.get_text_config().hidden_size
        try:
            for k, bucket in enumerate(buckets(self._hf_tensors(), max(1, int(bucket_mb * 2**20)))):
                self.checkin.mark(f"export_hf bucket {k}")
                if writer is not None:
                    writer.add({n: t for name, full in bucket.items() for n, t in split_experts(name, full, hidden)})
            path = writer.finish(self.model.hf.config, self.base_path if with_tokenizer else None) if writer else None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        dist.barrier()
        return str(path) if path else None

    @collective("master_sums")
    def master_sums(self) -> dict[str, float]:
        """Collective: float64 sums of the fp32 master weights (HF names, LoRA unmerged), for tests."""
        out = {}
        for name, p in self.model.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = float(full.detach().double().sum())
            out[name + ":dtype"] = str(full.dtype)
        return out

    @collective("state_sums")
    def state_sums(self) -> dict[str, float]:
        """Collective: float64 sums of every master weight and AdamW moment, and the schedule step (what a
        restored checkpoint must reproduce exactly, whatever the world size)."""
        out: dict[str, float] = {"sched_step": float(self.sched.last_epoch)}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out["param:" + names[id(p)]] = float(full.detach().double().sum())
            for k, v in self.optim.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() > 0:
                    v = v.full_tensor() if hasattr(v, "full_tensor") else v
                    out[f"{k}:{names[id(p)]}"] = float(v.double().sum())
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints
    @collective("save_checkpoint")
    def save_checkpoint(self, out_dir: str) -> None:
        """Collective. Sharded: each rank writes its own shards of the model and optimizer (DCP)."""
        from rl.grpo.checkpoint import save_trainer_state

        save_trainer_state(self.model, self.optim, self.sched, self.rank, out_dir)

    @collective("load_checkpoint")
    def load_checkpoint(self, ckpt_dir: str) -> int:
        """Collective. Restores model, optimizer (resharded to this world size), schedule and RNG."""
        from rl.grpo.checkpoint import load_trainer_state

        return load_trainer_state(self.model, self.optim, self.sched, self.rank, ckpt_dir, self.cfg.trainer.seed)

    def ready(self) -> dict[str, Any]:
        return {"rank": self.rank, "device": str(self.device), "node_ip": _node_ip(), "node_id": _node_id(),
                "params": sum(p.numel() for p in self.model.parameters()), "swept": getattr(self, "swept", []),
                "heap": self.heap}

    def peak_rss_mb(self) -> dict[str, float]:
        """This process's peak resident memory (VmHWM) and current RSS, in MB."""
        return process_memory_mb()

    def shutdown(self) -> None:
        if self.transport is not None and self.rank == 0:   # writer 0 removes the run's directory, on its node
            self.transport.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.heap == "applied":   # a worker in its caller's process (tests, tools): glibc's thresholds back
                                     # near its defaults (rl.heap.release)
            from rl.heap import release

            release()
            self.heap = "released"


def process_memory_mb() -> dict[str, float]:
    out = {}
    for line in open("/proc/self/status"):
        for key in ("VmHWM", "VmRSS"):
            if line.startswith(key + ":"):
                out[key] = int(line.split()[1]) / 1024
    return {"peak_mb": out.get("VmHWM", 0.0), "rss_mb": out.get("VmRSS", 0.0), "pid": os.getpid()}


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
