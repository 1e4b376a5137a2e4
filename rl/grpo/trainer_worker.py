"""FSDP2 trainer worker (one Ray actor per data-parallel rank).

Each worker holds a `fully_shard`-ed policy (each decoder layer sharded, then the root), an AdamW optimizer and
an LR schedule, optionally a frozen, sharded reference copy for the KL term and a frozen, sharded teacher for
on-policy distillation (`rl.algos.distill`). Collective calls
(`compute_logprobs`, `update`, `save_hf`, `save_checkpoint`, `load_checkpoint`) must be called on every
rank: FSDP all-gathers parameters in every forward, so ranks also run equal numbers of micro-batches
(short ranks run zero-weighted dummy micro-batches).
Backends: gloo on CPU, nccl on GPUs; the code path is the same.
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rl.algos import POLICY_LOSSES, agg_loss, entropy_from_logits, kl_penalty, token_logprobs
from rl.algos.distill import reverse_kl_advantages
from rl.grpo.config import GRPOConfig

Batch = dict[str, torch.Tensor]   # input_ids, attention_mask [B, L]; response_mask, rollout_logp [B, L]; adv [B]
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


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy packing of sequence indices (in order) into groups of at most max_tokens padded tokens."""
    groups: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    return groups


class TrainerWorker:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, cfg: GRPOConfig,
                 model_path: str, tokenizer_path: str | None = None) -> None:
        self.rank, self.world, self.cfg, self.model_path = rank, world_size, cfg, model_path
        # a resumed run loads weights from a checkpoint that rotation may delete later: keep the tokenizer's origin
        self.tokenizer_path = tokenizer_path or model_path
        tc = cfg.trainer
        use_cuda = torch.cuda.is_available() and tc.backend != "gloo"
        backend = tc.backend if tc.backend != "auto" else ("nccl" if use_cuda else "gloo")
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(0)  # Ray gives each actor its own CUDA_VISIBLE_DEVICES
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        self._seed(tc.seed + rank)
        self.model = self._load(trainable=True)
        self.ref = self._load(trainable=False) if cfg.algo.kl_coef > 0 else None
        self.teacher = (self._load(trainable=False, path=cfg.algo.distill_teacher)
                        if cfg.algo.distill_teacher else None)
        self.optim = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=tc.lr,
                                       betas=tuple(tc.betas),
                                       weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, lr_lambda(cfg))

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def _load(self, trainable: bool, path: str | None = None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if self.cfg.model.dtype == "bfloat16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path or self.model_path, dtype=dtype,
                                                     trust_remote_code=self.cfg.model.trust_remote_code)
        model.to(self.device)
        if trainable and self.cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        mc = self.cfg.model
        if trainable and mc.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=mc.lora_r, lora_alpha=mc.lora_alpha,
                                                     target_modules=list(mc.lora_targets), task_type="CAUSAL_LM"))
        mesh = init_device_mesh(self.device.type, (self.world,))
        layers = model.base_model.model.model.layers if trainable and mc.lora_r > 0 else model.model.layers
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if not trainable:
            model.eval()
            model.requires_grad_(False)
        return model

    # ------------------------------------------------------------------------------------------------ helpers
    def _equalize(self, n: int) -> int:
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _global_sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _forward(self, model, batch: Batch, idx: list[int] | None, temperature: float, need_entropy: bool = False):
        """Token log-probs (and entropy) of a micro-batch; idx None runs a dummy 2-token forward."""
        if idx is None:
            ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            return token_logprobs(out, ids, temperature), None, ids
        length = int(batch["attention_mask"][idx].sum(-1).max())
        ids = batch["input_ids"][idx, :length].to(self.device)
        am = batch["attention_mask"][idx, :length].to(self.device)
        logits = model(input_ids=ids, attention_mask=am).logits
        ent = entropy_from_logits(logits, temperature) if need_entropy else None
        return token_logprobs(logits, ids, temperature), ent, ids

    # ------------------------------------------------------------------------------------------------ API
    @torch.no_grad()
    def compute_logprobs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Old (current policy), reference and teacher log-probs [B, L] of this rank's shard."""
        temp = self.cfg.rollout.temperature
        lengths = batch["attention_mask"].sum(-1).tolist()
        groups = micro_batches(lengths, self.cfg.trainer.micro_batch_tokens)
        n = self._equalize(len(groups))
        models = {"old_logp": self.model, "ref_logp": self.ref, "teacher_logp": self.teacher}
        models = {k: m for k, m in models.items() if m is not None}
        out = {k: torch.zeros_like(batch["rollout_logp"]) for k in models}
        self.model.eval()
        for g in range(n):
            idx = groups[g] if g < len(groups) else None
            for key, model in models.items():
                lp, _, ids = self._forward(model, batch, idx, temp)
                if idx is not None:
                    out[key][idx, : ids.shape[1]] = lp.float().cpu()
        return out

    def update(self, batch: Batch) -> dict[str, float]:
        """PPO epochs x mini-batches over this rank's shard; one LR-schedule step. Returns rank-mean metrics."""
        cfg, a = self.cfg, self.cfg.algo
        policy_loss = POLICY_LOSSES[a.policy_loss]
        temp = cfg.rollout.temperature
        B = batch["input_ids"].shape[0]
        max_len = cfg.rollout.max_new_tokens
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        grad_norms = []
        gen = torch.Generator().manual_seed(cfg.trainer.seed * 1000003 + int(self.sched.last_epoch))
        t0 = time.perf_counter()
        for _ in range(cfg.trainer.ppo_epochs):
            perm = torch.randperm(B, generator=gen).tolist()
            for mb in range(cfg.trainer.mini_batches):
                rows = perm[mb::cfg.trainer.mini_batches]
                mask = batch["response_mask"][rows]
                n_tok, n_seq = self._global_sum(float(mask.sum()), float((mask.sum(-1) > 0).sum()))
                lengths = batch["attention_mask"][rows].sum(-1).tolist()
                groups = [[rows[i] for i in g] for g in micro_batches(lengths, cfg.trainer.micro_batch_tokens)]
                n_micro = self._equalize(len(groups))
                for g in range(n_micro):
                    idx = groups[g] if g < len(groups) else None
                    lp, ent, ids = self._forward(self.model, batch, idx, temp, need_entropy=True)
                    if idx is None:
                        (lp.sum() * 0.0).backward()  # keeps FSDP's collectives in step with other ranks
                        continue
                    L = ids.shape[1]
                    m = batch["response_mask"][idx, :L].to(lp.device)
                    old = batch["old_logp"][idx, :L].to(lp.device)
                    roll = batch["rollout_logp"][idx, :L].to(lp.device)
                    adv = batch["adv"][idx].to(lp.device)
                    if self.teacher is not None:
                        adv = reverse_kl_advantages(adv, old, batch["teacher_logp"][idx, :L].to(lp.device),
                                                    a.distill_coef, float(batch["distill_baseline"]))
                    loss, metrics = policy_loss(
                        lp, old, adv, m, clip_eps_low=a.clip_eps_low,
                        clip_eps_high=a.clip_eps_high, dual_clip_c=a.dual_clip_c or None, agg=a.loss_agg,
                        rollout_logp=roll if a.tis_cap > 0 else None, tis_cap=a.tis_cap or None,
                        num_tokens=n_tok, num_seqs=n_seq, max_len=max_len)
                    entropy = float((ent.detach() * m).sum() / m.sum().clamp(min=1))
                    metrics["actor/entropy"] = entropy
                    if a.entropy_coef > 0:
                        loss = loss - a.entropy_coef * agg_loss(ent, m, a.loss_agg, num_tokens=n_tok,
                                                                num_seqs=n_seq, max_len=max_len)
                    if self.ref is not None:
                        kl = kl_penalty(lp, batch["ref_logp"][idx, :L].to(lp.device), a.kl_estimator)
                        kl_loss = agg_loss(kl, m, a.loss_agg, num_tokens=n_tok, num_seqs=n_seq, max_len=max_len)
                        loss = loss + a.kl_coef * kl_loss
                        metrics["actor/kl"] = float((kl.detach() * m).sum() / m.sum().clamp(min=1))
                    # FSDP averages gradients over ranks; the normalisers are already global, so undo the mean
                    (loss * self.world).backward()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                if cfg.trainer.grad_clip > 0:
                    gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.trainer.grad_clip)
                else:
                    gn = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
                gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
                grad_norms.append(float(gn))
                self.optim.step()
                self.optim.zero_grad(set_to_none=True)
        self.sched.step()
        keys = sorted(sums)
        local = [sums[k] / max(count, 1) for k in keys] + [float(count > 0)]
        glob = self._global_sum(*local)
        ranks = max(glob[-1], 1.0)
        out = {k: v / ranks for k, v in zip(keys, glob[:-1])}
        out["actor/grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        out["actor/lr"] = self.sched.get_last_lr()[0]
        out["perf/update_s"] = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------------------------------------ weights
    def _full_state(self) -> dict[str, torch.Tensor]:
        """Full (gathered) HF state dict; with LoRA, the adapters merged into the base weights."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.cfg.model.lora_r > 0:
            from rl.grpo.hf_io import merge_lora_state

            state = merge_lora_state(state, self.cfg.model.lora_alpha / self.cfg.model.lora_r)
        return state

    def save_hf(self, out_dir: str, bucket_mb: int = 512, with_tokenizer: bool = True) -> dict[str, float] | None:
        """Collective. Rank 0 writes an HF checkpoint (safetensors shards of bucket_mb) atomically and returns
        the float64 sum of every saved tensor."""
        state = self._full_state()
        if self.rank != 0:
            return None
        from rl.grpo.hf_io import write_hf_checkpoint

        config = self.model.config if self.cfg.model.lora_r == 0 else self.model.base_model.model.config
        return write_hf_checkpoint(state, config, out_dir, bucket_mb,
                                   tokenizer_from=self.tokenizer_path if with_tokenizer else None)

    def save_checkpoint(self, out_dir: str) -> None:
        """Collective. Rank 0 writes model + optimizer; every rank writes its RNG and LR-schedule state.
        The caller makes the directory and renames it into place when all ranks are done."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(self.model, self.optim,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = Path(out_dir)
        if self.rank == 0:
            torch.save({"model": msd, "optim": osd}, path / "trainer.pt")
        torch.save({"python": random.getstate(), "torch": torch.get_rng_state(), "sched": self.sched.state_dict()},
                   path / f"rank{self.rank}.pt")
        dist.barrier()

    def load_checkpoint(self, ckpt_dir: str) -> int:
        """Collective: restore model, optimizer, schedule and RNG. Returns the scheduler step.

        Every rank reads the full state (the checkpoint directory must be visible to all ranks, as for saving)
        and keeps its own shards. (broadcast_from_rank0 with empty dicts on the other ranks hung with torch
        2.13 + gloo.) Very large models want torch.distributed.checkpoint's sharded format instead."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = Path(ckpt_dir)
        blob = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        set_state_dict(self.model, self.optim, model_state_dict=blob["model"], optim_state_dict=blob["optim"],
                       options=StateDictOptions(full_state_dict=True))
        rng = torch.load(path / f"rank{self.rank}.pt", weights_only=False)
        self.sched.load_state_dict(rng["sched"])
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        dist.barrier()
        return int(self.sched.last_epoch)

    def ready(self) -> dict[str, Any]:
        return {"rank": self.rank, "device": str(self.device), "params": sum(p.numel() for p in self.model.parameters())}

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
