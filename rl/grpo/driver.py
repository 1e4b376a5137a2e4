"""The GRPO driver: one process that owns the loop and talks to Ray actors.

  prompts --(rollout workers, vLLM, async .remote)--> samples + log-probs
          --(RewardScorer: process pool with timeouts)--> rewards --(dynamic sampling)--> groups
          --> advantages (rl.algos) --> batch shards --(trainer workers, FSDP2)--> old/ref log-probs, update
          --> weight sync (trainer rank 0 writes HF safetensors; rollout workers reload in place)
          --> metrics, checkpoints (atomic), validation
Everything remote is an actor method called with `.remote()` and awaited with `ray.get(..., timeout)`; the
driver itself is sequential, so the order of events is the order of the code.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch

from rl.algos import compute_advantages
from rl.algos.distill import reverse_kl_metrics
from rl.config import check_model_path, resolve_model_path, to_dict
from rl.distill.compat import check_same_tokenizer
from rl.grpo.batching import Group, build_batch, fill_batch, shard, unshard
from rl.grpo.config import GRPOConfig
from rl.grpo.metrics_log import MetricsLog
from rl.grpo.prompts import Cursor, load_train_rows, tokenize_prompts

log = logging.getLogger("r1lab.grpo")
CKPT_PREFIX = "step_"


class WorkerDied(RuntimeError):
    """A Ray worker died; the message names it and the last intact checkpoint."""


class WeightSyncError(RuntimeError):
    """The rollout engine does not hold the trainer's weights (sync or template broken)."""


def _free_port() -> tuple[str, int]:
    s = socket.socket()
    s.bind(("", 0))
    port = s.getsockname()[1]
    s.close()
    return socket.gethostbyname(socket.gethostname()), port


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob(f"{CKPT_PREFIX}*") if (p / "DONE").exists())
    return done[-1] if done else None


def fused_sums(hf_sums: dict[str, float], engine_sums: dict[str, float]) -> list[str]:
    """Names whose engine-side sum differs from the trainer's (vLLM fuses q/k/v and gate/up projections)."""
    bad = []
    for name, s in engine_sums.items():
        parts = [name]
        if ".qkv_proj." in name:
            parts = [name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
        elif ".gate_up_proj." in name:
            parts = [name.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")]
        if not all(p in hf_sums for p in parts):
            continue
        want = sum(hf_sums[p] for p in parts)
        if abs(want - s) > 1e-4 * max(1.0, abs(want)):
            bad.append(f"{name}: engine {s:.6g} vs trainer {want:.6g}")
    return bad


class GRPODriver:
    def __init__(self, cfg: GRPOConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.out = Path(cfg.log.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        self.model_path = resolve_model_path(cfg.model.path)
        self.tok = AutoTokenizer.from_pretrained(self.model_path)
        if cfg.algo.distill_teacher:  # before Ray starts: a wrong teacher is a config error, not a crash later
            cfg.algo.distill_teacher = check_model_path(cfg.algo.distill_teacher, "algo.distill_teacher")
            check_same_tokenizer(self.model_path, cfg.algo.distill_teacher)
        self.train_rows, self.heldout_rows = load_train_rows(cfg.data)
        self.prompt_ids = tokenize_prompts(self.train_rows, self.tok, cfg.data, cfg.data.source)
        self.cursor = Cursor(cfg.trainer.seed, len(self.train_rows))
        self.step = 0
        self.ckpt_root = self.out / "checkpoints"
        self.sync_root = Path(cfg.sync.dir) / f"r1lab-sync-{os.getpid()}-{int(time.time())}"
        self.trainers: list[Any] = []
        self.rollouts: list[Any] = []
        self.scorer = None
        self.checked_logprobs = False
        self.last_ckpt: Path | None = None
        self._started_ray = False

    # ------------------------------------------------------------------------------------------------ setup
    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        self._started_ray = True  # ours to shut down at close()
        env = {"env_vars": {k: os.environ[k] for k in ("R1LAB_CACHE_DIR", "PYTHONPATH") if k in os.environ}}
        r = self.cfg.resources
        need = r.trainer_cpus * self.cfg.trainer.num_workers + r.rollout_cpus * self.cfg.rollout.num_workers
        local_cpus = max(int(need + 1), os.cpu_count() or 1)  # logical CPUs a local instance must offer
        addr = r.ray_address
        if addr == "local":  # always a fresh private instance (tests)
            ray.init(address="local", num_cpus=local_cpus, runtime_env=env, include_dashboard=False,
                     log_to_driver=True)
            return
        if addr != "auto" or os.environ.get("RAY_ADDRESS"):
            ray.init(address=None if addr == "auto" else addr, runtime_env=env, log_to_driver=True)
            return
        try:
            ray.init(address="auto", runtime_env=env, log_to_driver=True)
        except ConnectionError:
            ray.init(num_cpus=local_cpus, runtime_env=env, include_dashboard=False, log_to_driver=True)

    def start(self, init_path: str | None = None) -> None:
        """Ray, a placement group, trainer and rollout actors (from init_path or the model)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rewards.scorer import RewardScorer
        from rl.grpo.rollout_worker import RolloutWorker
        from rl.grpo.trainer_worker import TrainerWorker

        self._start_ray()
        cfg, r = self.cfg, self.cfg.resources
        nt, nr = cfg.trainer.num_workers, cfg.rollout.num_workers
        bundles = [{"CPU": r.trainer_cpus, **({"GPU": r.trainer_gpus} if r.trainer_gpus else {})}] * nt
        if not r.colocate:
            bundles += [{"CPU": r.rollout_cpus, **({"GPU": r.rollout_gpus} if r.rollout_gpus else {})}] * nr
        self.pg = placement_group(bundles, strategy=r.placement_strategy)
        ray.get(self.pg.ready(), timeout=600)
        strat = lambda i: PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)  # noqa: E731
        addr, port = ray.get(ray.remote(_free_port).options(num_cpus=0, scheduling_strategy=strat(0)).remote())
        T = ray.remote(TrainerWorker)
        self.trainers = [T.options(num_cpus=r.trainer_cpus, num_gpus=r.trainer_gpus, scheduling_strategy=strat(i),
                                   name=None).remote(i, nt, addr, port, cfg, init_path or self.model_path,
                                                     self.model_path)
                         for i in range(nt)]
        R = ray.remote(RolloutWorker)
        self.rollouts = [R.options(num_cpus=r.rollout_cpus if not r.colocate else 0,
                                   num_gpus=r.rollout_gpus, scheduling_strategy=strat(i if r.colocate else nt + i)
                                   ).remote(init_path or self.model_path, cfg, cfg.trainer.seed + 17 * i)
                         for i in range(nr)]
        self._get([w.ready.remote() for w in self.trainers + self.rollouts], 900, "start-up")
        self.scorer = RewardScorer(cfg.reward.functions, cfg.reward.weights, timeout_s=cfg.reward.timeout_s,
                                   batch_timeout_s=cfg.reward.batch_timeout_s)

    def _get(self, refs, timeout: float, what: str):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return ray.get(refs, timeout=timeout)
        except RayActorError as e:
            where = f"the last intact checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"
            who = self._actor_names().get(getattr(e, "actor_id", None) or "", "a Ray worker")
            raise WorkerDied(f"{who} died during {what} at step {self.step + 1}. Stopping; {where}; rerun with "
                             f"checkpoint.resume=auto to continue. Ray said: {e}") from None
        except GetTimeoutError:
            raise WorkerDied(f"{what} timed out after {timeout}s at step {self.step + 1}") from None

    def _actor_names(self) -> dict[str, str]:
        names = {w._actor_id.hex(): f"trainer worker {i} (TrainerWorker)" for i, w in enumerate(self.trainers)}
        names.update({w._actor_id.hex(): f"rollout worker {i} (RolloutWorker)" for i, w in enumerate(self.rollouts)})
        return names

    # ------------------------------------------------------------------------------------------------ rollout
    def _make_groups(self, k: int) -> list[Group]:
        idx = self.cursor.take(k)
        cfg = self.cfg
        prompts = [self.prompt_ids[i] for i in idx]
        nr = len(self.rollouts)
        chunks = [list(range(j, len(idx), nr)) for j in range(nr)]
        seed = cfg.trainer.seed * 7919 + self.step * 104729 + self.cursor.epoch * 1_000_003 + self.cursor.pos
        refs = [w.generate.remote([prompts[i] for i in ch], cfg.rollout.n, seed + 9973 * j)
                for j, (w, ch) in enumerate(zip(self.rollouts, chunks))]
        outs = self._get(refs, 3600, "rollout")
        groups: list[Group | None] = [None] * len(idx)
        for ch, res in zip(chunks, outs):
            for i, samples in zip(ch, res):
                groups[i] = Group(self.train_rows[idx[i]], prompts[i], samples)
        groups_ = [g for g in groups if g is not None]
        texts, samples_meta = [], []
        for g in groups_:
            for s in g.samples:
                texts.append(s["text"])
                samples_meta.append({**g.row, "completion_tokens": len(s["token_ids"]),
                                     "max_tokens": cfg.rollout.max_new_tokens,
                                     "overlong_buffer": cfg.reward.overlong_buffer})
        res = self.scorer.score(texts, samples_meta)
        self._reward_metrics.append(res.metrics)
        it = iter(res.rewards)
        for g in groups_:
            g.rewards = [next(it) for _ in g.samples]
        return groups_

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self._reward_metrics: list[dict] = []
        groups, m = fill_batch(self._make_groups, cfg.rollout.batch_prompts, cfg.rollout.dynamic_sampling,
                               cfg.rollout.max_gen_batches)
        t_roll = time.perf_counter() - t0
        rewards = torch.tensor([r for g in groups for r in g.rewards])
        gids = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples])
        adv, adv_m = compute_advantages(cfg.algo.advantage, rewards, gids)
        batch = build_batch(groups, adv, self.tok.pad_token_id, cfg.algo.overlong_filter)
        shards, parts = shard(batch, len(self.trainers))
        t1 = time.perf_counter()
        lps = self._get([w.compute_logprobs.remote(s) for w, s in zip(self.trainers, shards)], 3600, "log-probs")
        for s, lp in zip(shards, lps):
            s.update(lp)
        old = unshard([lp["old_logp"] for lp in lps], parts, rewards.numel())
        mask = batch["response_mask"].bool()
        if cfg.algo.distill_teacher:
            teacher = unshard([lp["teacher_logp"] for lp in lps], parts, rewards.numel())
            m.update(reverse_kl_metrics(old, teacher, mask))
            for s in shards:  # the baseline of the reverse-KL advantage: one constant for the whole batch
                s["distill_baseline"] = torch.tensor(m["distill/reverse_kl"])
        diff = (old - batch["rollout_logp"]).abs()[mask]
        m["rollout/logprob_diff"] = float(diff.mean()) if diff.numel() else 0.0
        m["rollout/logprob_diff_max"] = float(diff.max()) if diff.numel() else 0.0
        if not self.checked_logprobs:
            self.checked_logprobs = True
            if m["rollout/logprob_diff"] > cfg.algo.logprob_check_tol:
                raise WeightSyncError(
                    f"step {self.step + 1}: trainer and rollout log-probs differ by {m['rollout/logprob_diff']:.4f} "
                    f"on average (> algo.logprob_check_tol={cfg.algo.logprob_check_tol}). The engine does not run "
                    "the trainer's model (broken weight sync, dtype or chat template); refusing to train on it.")
        metrics_list = self._get([w.update.remote(s) for w, s in zip(self.trainers, shards)], 3600, "update")
        t_train = time.perf_counter() - t1
        t2 = time.perf_counter()
        sync_m = self.sync_weights(check=self._check_due())
        t_sync = time.perf_counter() - t2
        lengths = torch.tensor([len(s["token_ids"]) for g in groups for s in g.samples], dtype=torch.float)
        truncated = sum(s["finish_reason"] == "length" for g in groups for s in g.samples)
        tokens = float(batch["attention_mask"].sum())
        out = {**m, **adv_m, **metrics_list[0], **sync_m,
               "rollout/reward_mean": float(rewards.mean()), "rollout/reward_std": float(rewards.std()),
               "rollout/response_length_mean": float(lengths.mean()),
               "rollout/response_length_max": float(lengths.max()),
               "rollout/truncated_frac": truncated / max(1, lengths.numel()),
               "perf/rollout_s": t_roll, "perf/train_s": t_train, "perf/sync_s": t_sync,
               "perf/step_s": time.perf_counter() - t0,
               "perf/tokens_per_s": tokens / max(1e-9, time.perf_counter() - t0)}
        out.update(_mean_dicts(self._reward_metrics))
        out["data/epoch"], out["data/cursor"] = float(self.cursor.epoch), float(self.cursor.pos)
        out.setdefault("actor/kl", 0.0)
        return out

    def _check_due(self) -> bool:
        every = self.cfg.sync.checksum_every
        return self.step == 0 or (every > 0 and (self.step + 1) % every == 0)

    def sync_weights(self, check: bool) -> dict[str, float]:
        """Trainer rank 0 writes safetensors buckets to a RAM disk; every rollout engine reloads in place."""
        path = self.sync_root / f"step{self.step + 1}"
        refs = [w.save_hf.remote(str(path), self.cfg.sync.bucket_mb, False) for w in self.trainers]
        sent = self._get(refs, self.cfg.sync.timeout_s, "weight sync (save)")[0]
        got = self._get([w.load_weights.remote(str(path)) for w in self.rollouts], self.cfg.sync.timeout_s,
                        "weight sync (load)")
        for old in self.sync_root.glob("step*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        out = {"perf/sync_load_s": max(g["seconds"] for g in got)}
        if check:
            for j, g in enumerate(got):
                missing = sorted(set(sent) - set(g["sums"]))
                wrong = [k for k in sent if k in g["sums"] and g["sums"][k] != sent[k]]
                engine = self._get(self.rollouts[j].engine_param_sums.remote(), 120, "checksum")
                bad = fused_sums(sent, engine)
                if missing or wrong or bad:
                    raise WeightSyncError(f"rollout worker {j}: synced weights differ from the trainer's: missing "
                                          f"{missing[:5]}, changed in transit {wrong[:5]}, engine mismatch {bad[:5]}")
            out["sync/checksum_ok"] = 1.0
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Atomic: everything goes to step_N.tmp, then DONE, then rename; old ones beyond `keep` removed."""
        final = self.ckpt_root / f"{CKPT_PREFIX}{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._get([w.save_checkpoint.remote(str(tmp)) for w in self.trainers], 3600, "checkpoint")
        self._get([w.save_hf.remote(str(tmp / "hf"), self.cfg.sync.bucket_mb, True) for w in self.trainers], 3600,
                  "checkpoint (hf)")
        (tmp / "driver.json").write_text(json.dumps({"step": self.step, "cursor": self.cursor.state()}))
        (tmp / "DONE").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        kept = sorted(p for p in self.ckpt_root.glob(f"{CKPT_PREFIX}*") if (p / "DONE").exists())
        for old in kept[: -max(1, self.cfg.checkpoint.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        self.last_ckpt = final
        return final

    def _resume_point(self) -> Path | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        if mode == "auto":
            return latest_checkpoint(self.ckpt_root)
        p = Path(mode)
        if not (p / "DONE").exists():
            raise FileNotFoundError(f"checkpoint.resume={mode}: not a complete checkpoint (no DONE file)")
        return p

    # ------------------------------------------------------------------------------------------------ run
    def validate(self) -> dict[str, float]:
        lc = self.cfg.log
        bench = lc.val_benchmark
        if not bench:
            bench = str(self.out / "heldout.jsonl")
            if not Path(bench).exists():
                from data.tasks import write_problems_jsonl

                write_problems_jsonl(self.heldout_rows, bench)
        res = self._get(self.rollouts[0].validate.remote(bench, lc.val_problems, lc.val_samples, lc.val_temperature,
                                                        self.cfg.rollout.max_new_tokens, self.cfg.trainer.seed), 3600,
                        "validation")
        name = Path(bench).stem if bench.endswith(".jsonl") else bench
        return {f"val/{name}/{k}": v for k, v in res.items() if not k.endswith(("_low", "_high"))}

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        resume = self._resume_point()
        start_step = 0
        if resume is not None:
            state = json.loads((resume / "driver.json").read_text())
            start_step = state["step"]
            self.cursor.epoch, self.cursor.pos = state["cursor"]["epoch"], state["cursor"]["pos"]
            print(f"resuming from {resume} at step {start_step + 1}", flush=True)
        self.start(init_path=str(resume / "hf") if resume else None)
        if resume is not None:
            self._get([w.load_checkpoint.remote(str(resume)) for w in self.trainers], 3600, "resume")
            self.last_ckpt = resume
        self.step = start_step
        mlog = MetricsLog(self.out, cfg.log.tensorboard, cfg.log.progress, cfg.trainer.max_steps, start_step)
        try:
            if self.heldout_rows and cfg.log.val_every and start_step == 0:
                mlog.log(0, self.validate())
            while self.step < cfg.trainer.max_steps:
                metrics = self.train_step()
                self.step += 1
                if cfg.log.val_every and self.step % cfg.log.val_every == 0:
                    metrics.update(self.validate())
                mlog.log(self.step, metrics)
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or self.step == cfg.trainer.max_steps:
                    self.save_checkpoint()
            final = self.out / "final"
            self._get([w.save_hf.remote(str(final), cfg.sync.bucket_mb, True) for w in self.trainers], 3600, "export")
            return {"final": str(final), "steps": self.step}
        finally:
            mlog.close()
            self.close()

    def close(self) -> None:
        import ray

        shutil.rmtree(self.sync_root, ignore_errors=True)
        if self.scorer is not None:
            self.scorer.close()
        for w in self.trainers:
            try:
                ray.get(w.shutdown.remote(), timeout=30)
            except Exception:
                pass
        for w in self.trainers + self.rollouts:
            try:
                ray.kill(w)
            except Exception:
                pass
        if getattr(self, "pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in set().union(*ds) if ds else []:
        vals = [d[k] for d in ds if k in d]
        out[k] = sum(vals) if k in ("reward/timeouts", "reward/errors") else sum(vals) / len(vals)
    return out
