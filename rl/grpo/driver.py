"""The GRPO driver: one process that owns the loop and talks to Ray actors.

  prompts --(rollout workers: vLLM, rewards scored per group as it finishes)--> groups
          --(dynamic sampling; failed rewards left out)--> advantages (rl.algos) --> batch shards
          --(trainer workers, FSDP2)--> old/ref log-probs (skipped when strictly on-policy), update
          --> weight sync (rl.grpo.sync: trainers stream buckets, engines load them as they arrive)
          --> metrics (with a time breakdown), checkpoints (sharded, atomic), validation
Failures (rl.grpo.recovery): a dead or hung rollout worker is replaced and its prompts generated again; a dead or
stalled trainer worker restarts the trainer group from the last checkpoint, inside the same run.
What is asynchronous: every actor call is `.remote()`; the driver waits on it with `ray.get(..., timeout)`
right away, except rollouts launched ahead of training when `rollout.async_steps` > 0 (rl.grpo.rollout_queue)
and the weight push/load pair, which run concurrently by design.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from rl.algos.distill import reverse_kl_metrics
from rl.config import check_model_path, resolve_model_path, to_dict
from rl.distill.compat import check_same_tokenizer
from rl.grpo import checkpoint as ckpt
from rl.grpo.batching import Group, build_batch, fill_batch, group_advantages, pad_id_of, shard, unshard
from rl.grpo.config import GRPOConfig
from rl.grpo.metrics_log import MetricsLog
from rl.grpo.placement import plan_placement
from rl.grpo.prompts import Cursor, load_train_rows, tokenize_prompts
from rl.grpo.recovery import (
    FaultLog,
    TrainerStalled,
    WorkerDied,
    call_rollout,
    collect_rollouts,
    gather_loads,
    recover,
    replace_rollout,
)
from rl.grpo.rewards_check import FailureWatch, merge_reward_metrics
from rl.grpo.rollout_queue import RolloutQueue
from rl.grpo.sync.threads import participants
from rl.model_card import CardInfo, write_model_card

log = logging.getLogger("r1lab.grpo")
latest_checkpoint = ckpt.latest_checkpoint  # re-exported: tests and users look for it here
__all__ = ["GRPODriver", "TrainerStalled", "WeightSyncError", "WorkerDied", "latest_checkpoint"]


class WeightSyncError(RuntimeError):
    """The rollout engine does not hold the trainer's weights (sync or template broken)."""


RENDEZVOUS_TRIES = 3   # trainer-group starts when the rendezvous port was taken under us (start_trainers)


def _rank0_address() -> tuple[str, int]:
    """Runs on trainer rank 0's node: the node's address as Ray knows it (not gethostbyname, which is
    127.0.1.1 on stock Debian/Ubuntu) and a free port outside the ephemeral range (rl.ports.rendezvous_port)."""
    import ray

    from rl.ports import rendezvous_port

    return ray.util.get_node_ip_address(), rendezvous_port("")


def _init_error(e: Exception) -> str | None:
    """'<ExceptionType>: <message>' of the exception an actor's constructor raised (Ray keeps only its text), else
    None (the actor died otherwise: killed, out of memory, its node lost)."""
    if not getattr(e, "actor_init_failed", getattr(e, "_actor_init_failed", False)):
        return None
    for line in reversed([ln.strip() for ln in str(e).splitlines()]):
        m = re.match(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)\w*): (.+)$", line)
        if m:
            return f"{m[1]}: {m[2]}"
    return None


def _import_path() -> list[str]:
    """The driver's import directories (not the interpreter's own), for the actors that load reward plugins."""
    import sys
    import sysconfig

    skip = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return [os.path.abspath(p or ".") for p in sys.path if os.path.isdir(p or ".") and os.path.abspath(p or ".") not in skip]


def fused_sums(hf_sums: dict[str, float], engine_sums: dict[str, float]) -> list[str]:
    """Names whose engine-side sum differs from the trainer's, across vLLM's fused layouts (q/k/v, gate/up,
    MLA's fused_qkv_a_proj, MoE experts' w13/w2: rl.grpo.sync.checksum)."""
    from rl.grpo.sync.checksum import match_engine_sums

    return match_engine_sums(hf_sums, engine_sums)[1]


def validation_sampling(cfg: GRPOConfig):
    """The eval harness's sampling for in-loop validation: the run's prompt template and <think> forcing."""
    from rl.eval.harness import Sampling

    lc = cfg.log
    r = cfg.rollout
    return Sampling(temperature=lc.val_temperature, top_p=1.0, n=lc.val_samples, max_tokens=r.max_new_tokens,
                    seed=cfg.trainer.seed, template=cfg.data.template, force_think=cfg.data.force_think,
                    tools=r.tools, tool=r.tool_spec())


def rollout_seed(seed: int, step: int, round_: int, worker: int) -> int:
    """The sampling seed of one rollout call: trainer.seed, the step (0-based) it trains, the dynamic-sampling
    round and the worker."""
    return (seed * 1_000_003 + step * 10_007 + round_ * 101 + worker) % (2**31 - 1)


def strictly_on_policy(cfg: GRPOConfig) -> bool:
    """One epoch, one mini-batch, no rollouts ahead of training, no teacher: the update's own forward gives
    the old log-probs (same weights), so the separate forward is redundant."""
    t = cfg.trainer
    return t.ppo_epochs == 1 and t.mini_batches == 1 and cfg.rollout.async_steps == 0 and not cfg.algo.distill_teacher


def check_model_config(cfg: GRPOConfig, model_path: str) -> None:
    """Before Ray starts: the model's heads split over trainer.sequence_parallel ranks, and its context holds
    rollout.max_model_len (vLLM refuses a longer one unless VLLM_ALLOW_LONG_MAX_MODEL_LEN is set)."""
    from transformers import AutoConfig

    from rl.config import ConfigError
    from rl.grpo.sequence_parallel import check_heads

    hf = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    hf = getattr(hf, "text_config", None) or hf
    check_heads(hf, cfg.trainer.sequence_parallel)
    check_moe_config(cfg, hf)
    ctx = getattr(hf, "max_position_embeddings", None)
    if ctx and cfg.rollout.max_model_len > ctx and not os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len} exceeds the context of {cfg.model.path} "
                          f"(max_position_embeddings={ctx}): lower it, or use a model with a longer context")


def check_moe_config(cfg: GRPOConfig, hf_config) -> None:
    """Routing replay and routed-experts capture need a Mixture-of-Experts policy: refuse them on a dense one."""
    from rl.config import ConfigError
    from rl.moe.routing_capture import moe_shape

    if moe_shape(hf_config) is not None:
        return
    for key, on in (("algo.routing_replay", cfg.algo.routing_replay != "off"),
                    ("rollout.return_routed_experts", cfg.rollout.return_routed_experts),
                    ("algo.moe_aux_coef", cfg.algo.moe_aux_coef > 0)):
        if on:
            raise ConfigError(f"{key}: {cfg.model.path} is a dense model (no Mixture-of-Experts layers); routing "
                              "replay, routed-experts capture and the load-balancing loss are for MoE policies: "
                              "set algo.routing_replay=off, rollout.return_routed_experts=false, algo.moe_aux_coef=0")


def ray_runtime_env() -> dict:
    """The runtime environment every Ray instance the driver starts or joins gets: the tiny-model cache and the
    import path of the submitting shell (reward plugins), so that actors resolve what the driver resolves; and
    glibc's malloc tunables (`malloc_tunables`)."""
    env = {k: os.environ[k] for k in ("R1LAB_CACHE_DIR", "PYTHONPATH") if k in os.environ}
    env["GLIBC_TUNABLES"] = malloc_tunables(os.environ.get("GLIBC_TUNABLES", ""))
    return {"env_vars": env}


def malloc_tunables(current: str) -> str:
    """GLIBC_TUNABLES for the actors: `current` plus glibc.malloc.hugetlb=1 (transparent huge pages for malloc's
    large chunks, glibc >= 2.35; older glibc and THP=never ignore it), unless `current` sets it already.
    Why: every step allocates buffers of hundreds of MB afresh (FSDP's all-gather and reduce-scatter buffers,
    fp32 gradient casts, the LM head's gradient) and first touches them page by page: at Qwen2.5-0.5B's shape
    page faults cost ~30% of a trainer rank's update (system time), and fresh 545 MB buffers fill 8x faster
    with huge pages (README "Throughput")."""
    if "glibc.malloc.hugetlb" in current:
        return current
    return ":".join(x for x in (current, "glibc.malloc.hugetlb=1") if x)


class GRPODriver:
    def __init__(self, cfg: GRPOConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.out = Path(cfg.log.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        self.model_path = resolve_model_path(cfg.model.path)
        check_model_config(cfg, self.model_path)
        self.tok = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = pad_id_of(self.tok)
        self.peak_flops = cfg.trainer.peak_tflops * 1e12
        if cfg.algo.distill_teacher:  # before Ray starts: a wrong teacher is a config error, not a crash later
            cfg.algo.distill_teacher = check_model_path(cfg.algo.distill_teacher, "algo.distill_teacher")
            check_same_tokenizer(self.model_path, cfg.algo.distill_teacher)
        self.train_rows, self.heldout_rows = load_train_rows(cfg.data)
        self.prompt_ids = tokenize_prompts(self.train_rows, self.tok, cfg.data, cfg.data.source)
        self.cursor = Cursor(cfg.trainer.seed, len(self.train_rows))
        self.step = 0
        self.version = 0          # weight version the engines hold (= steps trained when they last loaded)
        self.sync_writers = 1     # trainer ranks writing a sync (sync.shards, decided at start())
        self.sync_method: str | None = None   # the transport (sync.method, decided at start(), kept after)
        self.ckpt_root = self.out / "checkpoints"
        self.run_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.trainers: list[Any] = []
        self.rollouts: list[Any] = []
        self.queue = RolloutQueue(cfg.rollout.async_steps)
        tool_fn = ["tool"] if cfg.rollout.tools else []   # sandbox outages of tool calls fail items too
        self.failures = FailureWatch(cfg.reward.max_failed_frac, cfg.reward.max_failed_steps,
                                     list(cfg.reward.functions) + tool_fn, list(cfg.reward.weights) + [1.0] * len(tool_fn))
        self.checked_logprobs = False
        self.last_ckpt: Path | None = None
        self._started_ray = False
        self.pg = None
        self.plan = None
        self.init_path: str | None = None        # the weights the actors start from (base model or resume/hf)
        self.faults = FaultLog(cfg.rollout.max_restarts, cfg.trainer.max_restarts)   # rl.grpo.recovery
        self.transfers = 0         # weight transfers so far: each one's id in the transport
        self.reissued_prompts = 0  # prompts generated again after their rollout worker was lost
        self.start_step, self.start_cursor = 0, self.cursor.state()
        self.mlog: MetricsLog | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        env = ray_runtime_env()
        addr = self.cfg.resources.ray_address
        # a private local instance exists only for this run: it offers at least the logical CPUs the run asks for
        need = sum(b.get("CPU", 0.0) for b in plan_placement(self.cfg).bundles)
        local = dict(num_cpus=max(math.ceil(need), os.cpu_count() or 1), include_dashboard=False)
        self._started_ray = True  # ours to shut down at close() (a job's driver only disconnects)
        if addr == "local":  # always a fresh private instance (tests)
            ray.init(address="local", runtime_env=env, log_to_driver=True, **local)
        elif addr != "auto" or os.environ.get("RAY_ADDRESS"):
            ray.init(address=None if addr == "auto" else addr, runtime_env=env, log_to_driver=True)
        else:
            try:
                ray.init(address="auto", runtime_env=env, log_to_driver=True)
            except ConnectionError:
                ray.init(runtime_env=env, log_to_driver=True, **local)

    def sync_spec(self) -> dict:
        from rl.grpo.sync.shm import ShmTransport
        from rl.grpo.sync.transport import FileTransport

        sc = self.cfg.sync
        cls = ShmTransport if self.sync_method == "shm" else FileTransport
        return cls(sc.dir, self.run_id, len(self.plan.rollout), timeout_s=sc.timeout_s, writers=self.sync_writers).spec()

    def _choose_sync(self, nodes: int, trainers: int) -> None:
        """sync.shards: local -> every trainer rank writes its own pieces (writers = trainer ranks); gather -> rank
        0 writes gathered tensors. auto = local when the whole run is on one node (every rank and engine then
        sees sync.dir), the model has no LoRA adapters (merged from full tensors) and no sequence parallelism.
        sync.method: auto = shm (rl.grpo.sync.shm) on one node, file across nodes; decided once: a run that lost
        nodes keeps its transport (its sync.dir was chosen for it)."""
        cfg = self.cfg
        mode = cfg.sync.shards
        if mode == "auto":
            mode = "local" if nodes == 1 and not cfg.model.lora_r and cfg.trainer.sequence_parallel == 1 else "gather"
        self.sync_writers = trainers if mode == "local" and trainers > 1 else 1
        method = cfg.sync.method
        if self.sync_method is None:
            self.sync_method = ("shm" if nodes == 1 else "file") if method == "auto" else method

    def _check_sync_nodes(self) -> None:
        """sync.method=shm maps memory of one node: every trainer rank and engine must be on it."""
        from rl.config import ConfigError

        info = self.placement_info
        used = set(info["trainer_nodes"]) | set(info["rollout_nodes"])
        if self.sync_method == "shm" and len(used) > 1:
            raise ConfigError(f"sync.method=shm: the run's workers are on {len(used)} nodes, and shared memory is "
                              "one node's; use sync.method=file with a sync.dir every node sees (or "
                              "sync.method=auto, which picks it across nodes)")

    def start(self, init_path: str | None = None) -> None:
        """Ray, a placement group checked against the cluster, trainer and rollout actors."""
        from ray.util.placement_group import placement_group

        from rl.grpo.placement import check_fits, cluster_nodes, wait_ready

        self._start_ray()
        cfg = self.cfg
        self.plan = plan = plan_placement(cfg)
        nodes = cluster_nodes()
        check_fits(plan, nodes)   # fail now, naming the shortfall, instead of waiting forever
        self._choose_sync(len(nodes), len(plan.trainer))
        self.pg = placement_group(plan.bundles, strategy=plan.strategy)
        wait_ready([self.pg.ready()], ["placement group " + str(plan.bundles)], cfg.resources.wait_s,
                   "reserving resources")
        self.init_path = init_path or self.model_path
        self.rollouts = [self.make_rollout(j) for j in range(len(plan.rollout))]
        self.note_placement(self.start_trainers(also=self.rollouts))
        self._check_sync_nodes()

    def note_placement(self, info: list[dict]) -> None:
        """Where each worker runs (the workers' ready() answers, trainers first): `placement_info`."""
        nt = len(self.trainers)
        self.placement_info = {"trainer_nodes": [i["node_id"] for i in info[:nt]],
                               "rollout_nodes": [i["node_id"] for i in info[nt:]],
                               "master_addr": self._master_addr}

    def _strategy(self, bundle: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)

    def make_rollout(self, j: int):
        """Rollout worker j in its bundle, starting from the run's initial weights (not waited for)."""
        import ray

        from rl.grpo.rollout_worker import RolloutWorker

        b, opts = self.plan.rollout[j]
        return ray.remote(RolloutWorker).options(scheduling_strategy=self._strategy(b), **opts).remote(
            self.init_path, self.cfg, self.cfg.trainer.seed + 17 * j, _import_path())

    def rendezvous_address(self) -> tuple[str, int]:
        """(address, port) for the trainer group's rendezvous, chosen on trainer rank 0's node."""
        import ray

        return ray.get(ray.remote(_rank0_address).options(num_cpus=0, scheduling_strategy=self._strategy(
            self.plan.trainer[0][0])).remote())

    def start_trainers(self, also: list[Any] = (), restart: bool = False) -> list[dict]:
        """The trainer group in its bundles, with a fresh rendezvous port; waits until it (and `also`) is ready.
        Returns the workers' ready() answers, trainers first. A port taken between its choice and rank 0's bind
        (EADDRINUSE: another process on that node bound it) starts the group again on a new port, at most
        RENDEZVOUS_TRIES times in all."""
        import ray

        from rl.grpo.placement import wait_ready
        from rl.grpo.trainer_worker import TrainerWorker

        cfg, plan = self.cfg, self.plan
        spec = self.sync_spec()
        nt = len(plan.trainer)
        names = [f"trainer worker {i}" for i in range(nt)] + [f"rollout worker {j}" for j in range(len(also))]
        for attempt in range(1, RENDEZVOUS_TRIES + 1):
            addr, port = self.rendezvous_address()
            self._master_addr = addr
            self.trainers = [ray.remote(TrainerWorker).options(scheduling_strategy=self._strategy(b), **opts).remote(
                i, nt, addr, port, cfg, self.model_path, self.model_path, spec)
                for i, (b, opts) in enumerate(plan.trainer)]
            try:
                info = wait_ready([w.ready.remote() for w in self.trainers + list(also)], names, 900,
                                  "starting workers")
                break
            except Exception as e:
                if attempt == RENDEZVOUS_TRIES or "EADDRINUSE" not in str(e):
                    self._raise_worker_error(e, "start-up")
                print(f"[r1lab] the trainer group's rendezvous port {addr}:{port} was taken before rank 0 could "
                      f"listen on it (EADDRINUSE); starting the group again on a new port ({attempt}/"
                      f"{RENDEZVOUS_TRIES})", flush=True)
                for w in self.trainers:
                    ray.kill(w, no_restart=True)
        swept = info[0].get("swept") or []
        if swept and not restart:   # at a restart it is the previous trainer group's own directory
            print(f"[r1lab] removed sync directories of dead runs: {swept}", flush=True)
        return info

    def _get(self, refs, timeout: float, what: str):
        """ray.get that fails as soon as one call failed (a rank that died or timed out), not when the last
        answers: the other ranks of a collective may never return."""
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            if not (isinstance(refs, list) and len(refs) > 1):
                return ray.get(refs, timeout=timeout)
            deadline = time.monotonic() + timeout
            got: dict[Any, Any] = {}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    raise GetTimeoutError(f"{what}: {len(pending)} call(s) not back within {timeout:g}s")
                got[done[0]] = ray.get(done[0])   # raises the first failure now
            return [got[r] for r in refs]
        except Exception as e:
            self._raise_worker_error(e, what)

    def _raise_worker_error(self, e: Exception, what: str):
        from ray.exceptions import GetTimeoutError, RayActorError

        from rl.grpo.collective_watch import CollectiveTimeout

        where = (f"the last intact checkpoint is {self.last_ckpt}" if self.last_ckpt
                 else "no checkpoint was written yet")
        if isinstance(e, CollectiveTimeout):   # raised in a trainer: Ray's error is also an instance of it
            cause = getattr(e, "cause", None) or e
            raise TrainerStalled(f"{what} at step {self.step + 1}: {cause}. Stopping; {where}; rerun with "
                                 "checkpoint.resume=auto to continue", list(getattr(cause, "stalled", []))) from None
        if isinstance(e, RayActorError):
            who, kind, index = self._actor_names().get(getattr(e, "actor_id", None) or "", ("a Ray worker", None, None))
            why = _init_error(e)
            if why:   # its constructor raised (a full sync.dir, a model it cannot load): no resume will mend that
                raise WorkerDied(f"{who} failed to start at step {self.step + 1}: {why} (its traceback is above)",
                                 kind, index) from None
            raise WorkerDied(f"{who} died during {what} at step {self.step + 1}. Stopping; {where}; rerun with "
                             f"checkpoint.resume=auto to continue. Ray said: {e}", kind, index) from None
        if isinstance(e, GetTimeoutError):
            raise WorkerDied(f"{what} timed out at step {self.step + 1}") from None
        raise e

    def _actor_names(self) -> dict[str, tuple[str, str, int]]:
        """actor id -> (name, kind, index)."""
        names = {w._actor_id.hex(): (f"trainer worker {i} (TrainerWorker)", "trainer", i)
                 for i, w in enumerate(self.trainers)}
        names.update({w._actor_id.hex(): (f"rollout worker {i} (RolloutWorker)", "rollout", i)
                      for i, w in enumerate(self.rollouts)})
        return names

    # ------------------------------------------------------------------------------------------------ rollout
    def _launch(self, k: int, step: int, round_: int = 0) -> dict[str, Any]:
        """Take k prompts and start generating (and scoring) them on every rollout worker; returns handles.
        The sampling seed of each call is a function of (trainer.seed, the step it trains, the dynamic-sampling
        round, the worker), so a regenerated call (a replaced worker, a restarted trainer group) draws the same
        samples as the lost one would have (rl.grpo.rollout_worker.RolloutWorker.rollout)."""
        idx = self.cursor.take(k)
        nr = len(self.rollouts)
        chunks = [list(range(j, len(idx), nr)) for j in range(nr)]
        seeds = [rollout_seed(self.cfg.trainer.seed, step, round_, j) for j in range(nr)]
        refs = [self.rollout_call(j, idx, ch, seeds[j]) for j, ch in enumerate(chunks)]
        return {"idx": idx, "chunks": chunks, "refs": refs, "version": self.version, "workers": list(self.rollouts),
                "seeds": seeds}

    def rollout_call(self, j: int, idx: list[int], chunk: list[int], seed: int):
        """Rollout worker j generates (and scores) the prompts idx[i] for i in chunk, with the weights it holds."""
        return self.rollouts[j].rollout.remote([self.prompt_ids[idx[i]] for i in chunk],
                                               [self.train_rows[idx[i]] for i in chunk], self.version, seed)

    def _collect(self, handle: dict[str, Any]) -> list[Group]:
        t0 = time.perf_counter()
        outs = collect_rollouts(self, handle)   # replaces dead or hung workers, generates their prompts again
        self._timing["rollout_wait_s"] += time.perf_counter() - t0
        idx = handle["idx"]
        groups: list[Group | None] = [None] * len(idx)
        for ch, res in zip(handle["chunks"], outs):
            self._timing["gen_s"] = max(self._timing["gen_s"], res["gen_s"])
            self._timing["reward_wait_s"] = max(self._timing["reward_wait_s"], res["reward_wait_s"])
            for i, g in zip(ch, res["groups"]):
                self._reward_parts.append(g)
                groups[i] = Group(self.train_rows[idx[i]], self.prompt_ids[idx[i]], g["samples"], g["rewards"],
                                  g["failed"], res["version"])
        return [g for g in groups if g is not None]

    def _next_groups(self) -> tuple[list[Group], dict[str, float]]:
        """This step's groups: the batch launched for it (now, or ahead of time in async mode), then dynamic
        sampling's extra rounds with the current weights."""
        cfg = self.cfg
        self.queue.fill(self.step, self.version, self.cursor.state,
                        lambda s: self._launch(cfg.rollout.batch_prompts, s))
        first = [self.queue.pop(self.step).handle]
        rounds = [0]

        def make(k: int) -> list[Group]:
            rounds[0] += 1
            return self._collect(first.pop() if first else self._launch(k, self.step, rounds[0] - 1))
        return fill_batch(make, cfg.rollout.batch_prompts, cfg.rollout.dynamic_sampling, cfg.rollout.max_gen_batches)

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self._timing = {"rollout_wait_s": 0.0, "gen_s": 0.0, "reward_wait_s": 0.0}
        self._reward_parts: list[dict] = []
        groups, m = self._next_groups()
        reward_m = merge_reward_metrics(self._reward_parts, cfg.reward.functions, cfg.reward.weights)
        self.failures.check(reward_m, self.step + 1)   # named error after too many steps of failed rewards
        if not groups:
            log.warning("step %d: dynamic sampling kept no group in %d rounds (all rewards equal or failed); "
                        "no update this step", self.step + 1, m["rollout/gen_rounds"])
            return {**m, **reward_m, "train/skipped": 1.0, **self._cursor_metrics(),
                    "perf/step_s": time.perf_counter() - t0}
        adv, adv_m = group_advantages(cfg.algo.advantage, groups)
        batch = build_batch(groups, adv, self.pad_id, cfg.algo.overlong_filter)
        shards, parts = shard(batch, len(self.trainers) // cfg.trainer.sequence_parallel)   # one per dp group
        train_m, t_lp, t_up = self._train(batch, shards, parts, adv.numel(), m)
        self._sleep_engines(False)
        t2 = time.perf_counter()
        sync_m = self.sync_weights(check=self._check_due())
        t_sync = time.perf_counter() - t2
        out = {**m, **adv_m, **reward_m, **train_m, **sync_m, **self._rollout_metrics(groups, batch)}
        step_s = time.perf_counter() - t0
        busy = self._timing["rollout_wait_s"] + t_lp + t_up + t_sync
        out.update({"perf/rollout_s": self._timing["rollout_wait_s"], "perf/gen_s": self._timing["gen_s"],
                    "perf/reward_s": self._timing["reward_wait_s"], "perf/logprobs_s": t_lp, "perf/update_s": t_up,
                    "perf/sync_s": t_sync, "perf/idle_s": max(0.0, step_s - busy), "perf/step_s": step_s,
                    "perf/tokens_per_s": float(batch["attention_mask"].sum()) / max(1e-9, step_s),
                    "perf/train_s": t_lp + t_up, **self._cursor_metrics()})
        if "perf/train_flops" in out and self.peak_flops:
            out["perf/mfu"] = out["perf/train_flops"] / max(1e-9, t_up) / (self.peak_flops * len(self.trainers))
        out.setdefault("actor/kl", 0.0)
        return out

    def _train(self, batch, shards, parts, n: int, m: dict) -> tuple[dict[str, float], float, float]:
        """Old/ref/teacher log-probs (when needed), the safety check, the update. Returns (metrics, t_lp, t_up).
        `shards`: one per data-parallel group; the trainer.sequence_parallel ranks of a group get the same one."""
        cfg = self.cfg
        sp = cfg.trainer.sequence_parallel
        per_rank = [shards[i // sp] for i in range(len(self.trainers))]   # the same dicts: updates below reach all
        skip_old = strictly_on_policy(cfg) and self.checked_logprobs
        t1 = time.perf_counter()
        if not skip_old or cfg.algo.kl_coef > 0:
            lps = self._get([w.compute_logprobs.remote(s, not skip_old) for w, s in zip(self.trainers, per_rank)],
                            3600, "log-probs")[::sp]   # the ranks of a group return the same
            for s, lp in zip(shards, lps):
                s.update({k: v for k, v in lp.items() if k != "seconds"})
        if not skip_old:
            old = unshard([lp["old_logp"] for lp in lps], parts, n)
            mask = batch["response_mask"].bool()
            if cfg.algo.distill_teacher:
                teacher = unshard([lp["teacher_logp"] for lp in lps], parts, n)
                m.update(reverse_kl_metrics(old, teacher, mask))
                for s in shards:  # the baseline of the reverse-KL advantage: one constant for the whole batch
                    s["distill_baseline"] = torch.tensor(m["distill/reverse_kl"])
            diff = (old - batch["rollout_logp"]).abs()[mask]
            m["rollout/logprob_diff"] = float(diff.mean()) if diff.numel() else 0.0
            m["rollout/logprob_diff_max"] = float(diff.max()) if diff.numel() else 0.0
            self._check_logprobs(m)
        t_lp = time.perf_counter() - t1
        self._sleep_engines(True)
        t2 = time.perf_counter()
        metrics_list = self._get([w.update.remote(s) for w, s in zip(self.trainers, per_rank)], 3600, "update")
        out = dict(metrics_list[0])
        out["train/old_logprobs_skipped"] = float(skip_old)
        return out, t_lp, time.perf_counter() - t2

    def _check_logprobs(self, m: dict) -> None:
        if self.checked_logprobs:
            return
        self.checked_logprobs = True
        tol = self.cfg.logprob_tol()
        if m["rollout/logprob_diff"] > tol:
            raise WeightSyncError(
                f"step {self.step + 1}: trainer and rollout log-probs differ by {m['rollout/logprob_diff']:.4f} on "
                f"average (> algo.logprob_check_tol={tol}, rollout.quantization={self.cfg.rollout.quantization}). "
                "The engine does not run the trainer's model (broken "
                "weight sync, dtype, sampling temperature or chat template); refusing to train on it.")

    def _rollout_metrics(self, groups: list[Group], batch) -> dict[str, float]:
        lengths = torch.tensor([len(s["token_ids"]) for g in groups for s in g.samples], dtype=torch.float)
        truncated = sum(s["finish_reason"] == "length" for g in groups for s in g.samples)
        stale = (self.step - batch["version"]).float()
        n = self.cfg.rollout.n
        out = {"rollout/short_groups": float(sum(len(g.samples) < n for g in groups)),   # lost samples: always 0
               "rollout/response_length_mean": float(lengths.mean()),
               "rollout/response_length_max": float(lengths.max()),
               "rollout/truncated_frac": truncated / max(1, lengths.numel()),
               "rollout/staleness_mean": float(stale.mean()), "rollout/staleness_max": float(stale.max())}
        if self.cfg.rollout.tools:
            from rl.rollout.tools import tool_metrics

            out.update(tool_metrics([s for g in groups for s in g.samples]))
        return out

    def _cursor_metrics(self) -> dict[str, float]:
        c = self.queue.resume_cursor() or self.cursor.state()
        return {"data/epoch": float(c["epoch"]), "data/cursor": float(c["pos"])}

    def _check_due(self) -> bool:
        every = self.cfg.sync.checksum_every
        return self.step == 0 or (every > 0 and (self.step + 1) % every == 0)

    def _sleep_engines(self, sleep: bool) -> None:
        """Colocated on GPUs: engines free the device while the trainers update, and wake before the sync."""
        r = self.cfg.resources
        if r.colocate and r.trainer_gpus > 0:
            self._get([(w.sleep if sleep else w.wake_up).remote() for w in self.rollouts], 600, "vLLM sleep/wake")

    def sync_weights(self, check: bool) -> dict[str, float]:
        """After an update: every engine loads the new weights (version step + 1)."""
        out = self.transfer_weights(check)
        self.version = self.step + 1
        return out

    def transfer_weights(self, check: bool, readers: list[int] | None = None) -> dict[str, float]:
        """Trainers stream their weights bucket by bucket; the engines `readers` (default all) load them as they
        arrive. An engine that dies meanwhile does not hold the trainers (rl.grpo.recovery.stopped_readers) and
        is replaced after the transfer (which sends it the same weights)."""
        readers = list(range(len(self.rollouts))) if readers is None else readers
        self.transfers += 1
        tid = self.transfers   # the transfer's id in the transport (a re-send to one engine gets its own)
        bucket = self.cfg.sync.bucket_mb
        spec = self.sync_spec()
        res, info = self.cfg.resources, self.placement_info
        on_trainer, on_engine = participants(res.trainer_gpus == 0 and res.rollout_gpus == 0, info["trainer_nodes"],
                                             info["rollout_nodes"], readers)   # processes sharing each one's cores
        load = {j: self.rollouts[j].load_weights.remote(spec, tid, j, check, on_engine[j]) for j in readers}
        push = [w.push_weights.remote(tid, bucket, check, readers, load if i == 0 else None, on_trainer[i])
                for i, w in enumerate(self.trainers)]
        pushed = self._get(push, self.cfg.sync.timeout_s * 2, "weight sync (trainers)")
        sent = dict(pushed[0])
        if self.sync_writers > 1:   # every rank wrote its pieces: bytes add up; sums of the parts, in rank order
            sent["bytes"] = sum((r or {}).get("bytes", 0) for r in pushed)
            if check:
                sums: dict[str, float] = {}
                for r in pushed:
                    for name, v in (r or {}).get("sums", {}).items():
                        sums[name] = sums.get(name, 0.0) + v
                sent["sums"] = sums
        got, dead = gather_loads(self, load, self.cfg.sync.timeout_s)
        out = {"perf/sync_load_s": max([g["seconds"] for g in got.values()], default=0.0),
               "sync/buckets": float(sent["buckets"]),
               "sync/mb": sent["bytes"] / 2**20, "perf/sync_gather_s": sent["gather_s"],
               "perf/sync_send_s": sent["send_s"], "perf/sync_finish_s": sent["finish_s"]}
        if check:
            for j, g in got.items():
                missing = sorted(set(sent["sums"]) - set(g["sums"]))
                wrong = [k for k in sent["sums"] if k in g["sums"] and g["sums"][k] != sent["sums"][k]]
                engine = self._get(self.rollouts[j].engine_param_sums.remote(), 120, "checksum")
                bad = fused_sums(sent["sums"], engine)
                if missing or wrong or bad:
                    raise WeightSyncError(f"rollout worker {j}: synced weights differ from the trainer's: missing "
                                          f"{missing[:5]}, changed in transit {wrong[:5]}, engine mismatch {bad[:5]}")
            out["sync/checksum_ok"] = 1.0
        for j, why in dead.items():   # the replacement is sent these same weights before it serves
            replace_rollout(self, j, why)
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Sharded trainer state + HF export + the driver's cursor, written atomically; old ones rotated."""
        tmp, final = ckpt.begin(self.ckpt_root, self.step)
        self._get([w.save_checkpoint.remote(str(tmp)) for w in self.trainers], 3600, "checkpoint")
        self._get([w.export_hf.remote(str(tmp / "hf"), self.cfg.sync.bucket_mb, True) for w in self.trainers],
                  3600, "checkpoint (hf)")
        write_model_card(tmp / "hf", dataclasses.replace(self.card_info(), name=f"{self.out.name}-step{self.step}"),
                         final_dir=final / "hf")
        cursor = self.queue.resume_cursor() or self.cursor.state()
        state = {"step": self.step, "cursor": cursor, "trainer_workers": len(self.trainers)}
        self.last_ckpt = ckpt.commit(tmp, final, state, self.cfg.checkpoint.keep)
        return self.last_ckpt

    def _resume_point(self) -> Path | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        verify = self.cfg.checkpoint.verify
        if mode == "auto":   # damaged ones are renamed step_N.damaged, with a warning naming the bad file
            return ckpt.latest_intact_checkpoint(self.ckpt_root, verify_files=verify)
        return ckpt.check_resume_path(Path(mode), verify_files=verify)

    # ------------------------------------------------------------------------------------------------ run
    def validate(self) -> dict[str, float]:
        lc = self.cfg.log
        bench = lc.val_benchmark
        if not bench:
            bench = str(self.out / "heldout.jsonl")
            if not Path(bench).exists():
                from data.tasks import write_problems_jsonl

                write_problems_jsonl(self.heldout_rows, bench)
        res = call_rollout(self, 0, "validate", bench, lc.val_problems, validation_sampling(self.cfg),
                           what="validation")
        name = Path(bench).stem if bench.endswith(".jsonl") else bench
        return {f"val/{name}/{k}": v for k, v in res.items() if not k.endswith(("_low", "_high"))}

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        resume = self._resume_point()
        start_step = 0
        if resume is not None:
            state = ckpt.read_driver_state(resume)
            start_step = state["step"]
            self.cursor.epoch, self.cursor.pos = state["cursor"]["epoch"], state["cursor"]["pos"]
            print(f"resuming from {resume} at step {start_step + 1}", flush=True)
        lc = cfg.log  # the trackers start before Ray does: one that cannot start fails the run at once
        mlog = MetricsLog(self.out, lc.report_to, lc.progress, cfg.trainer.max_steps, start_step, to_dict(cfg),
                          lc.project, lc.run_name)
        result: dict[str, Any] = {}
        self.mlog, self.start_step, self.start_cursor = mlog, start_step, self.cursor.state()
        try:
            self.start(init_path=str(resume / "hf") if resume else None)
            if resume is not None:
                self._get([w.load_checkpoint.remote(str(resume)) for w in self.trainers], 3600, "resume")
                self.last_ckpt = resume
            self.step = self.version = start_step
            if (self.heldout_rows or cfg.log.val_benchmark) and cfg.log.val_every and start_step == 0:
                mlog.log(0, self.validate())
            while self.step < cfg.trainer.max_steps:
                try:
                    self._step_log_save(mlog)
                except WorkerDied as e:   # a trainer died or stalled, or a node was lost: restart from the last
                    recover(self, e)      # checkpoint (on the nodes left); RecoveryExhausted past max_restarts
            final = self.out / "final"
            self._get([w.export_hf.remote(str(final), cfg.sync.bucket_mb, True) for w in self.trainers], 3600, "export")
            write_model_card(final, self.card_info())
            result = {"final": str(final), "steps": self.step}
        finally:
            self.close()
            timing = None
            try:
                from rl.grpo.plots import plot_timing

                if (self.out / "metrics.jsonl").exists():   # a run that stopped before its first step has none
                    timing = plot_timing(self.out / "metrics.jsonl", self.out / "timing.png")
            except Exception as e:  # a plot must never hide the run's own outcome
                log.warning("could not plot the time breakdown: %s", e)
            mlog.finish({"plots/timing": timing} if timing else {}, {**result, **mlog.last})
            mlog.close()
        if lc.push_to_hub:
            from rl.model_card import push_to_hub

            result["hub_url"] = push_to_hub(result["final"], lc.push_to_hub)
            print(f"uploaded {result['final']} to {result['hub_url']}", flush=True)
        return result

    def _step_log_save(self, mlog: MetricsLog) -> None:
        """One training step, its validation, its metrics line and its checkpoint."""
        cfg = self.cfg
        metrics = self.train_step()
        self.step += 1
        if cfg.log.val_every and self.step % cfg.log.val_every == 0:
            metrics.update(self.validate())
        metrics.update(self.faults.metrics())
        metrics["fault/reissued_prompts"] = float(self.reissued_prompts)
        mlog.log(self.step, metrics)
        every = cfg.checkpoint.every
        if (every and self.step % every == 0) or self.step == cfg.trainer.max_steps:
            self.save_checkpoint()

    def card_info(self) -> CardInfo:
        """The model card of this run's exports (final and every checkpoint's hf/)."""
        cfg = self.cfg
        a, r = cfg.algo, cfg.rollout
        details = {"algorithm": f"{a.advantage} advantages, {a.policy_loss} loss ({a.loss_agg}), KL coef "
                                f"{a.kl_coef:g}",
                   "rollouts": f"{r.batch_prompts} prompts x {r.n} samples per step, T={r.temperature:g}, up to "
                               f"{r.max_new_tokens} new tokens" + (f", tool: {r.tools}" if r.tools else ""),
                   "learning rate": f"{cfg.trainer.lr:g} ({cfg.trainer.lr_schedule})"}
        if a.distill_teacher:
            details["on-policy distillation"] = f"teacher `{a.distill_teacher}`, coef {a.distill_coef:g}"
        return CardInfo(stage="grpo", started_from=cfg.model.path, config=to_dict(cfg), datasets=[cfg.data.source],
                        steps=self.step, rewards=list(zip(cfg.reward.functions, map(float, cfg.reward.weights))),
                        details=details, name=self.out.name)

    def close(self) -> None:
        import ray

        for w in self.trainers + self.rollouts:   # trainer rank 0 removes its sync directory on its node
            try:
                ray.get(w.shutdown.remote(), timeout=30)
            except Exception:
                pass
        for w in self.trainers + self.rollouts:
            try:
                ray.kill(w)
            except Exception:
                pass
        self.trainers, self.rollouts = [], []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
