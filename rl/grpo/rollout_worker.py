"""vLLM rollout worker (one Ray actor per engine): sampling with per-token log-probs, weight reload,
validation through the eval harness."""
from __future__ import annotations

import time
from typing import Any

from rl.grpo.config import GRPOConfig


class RolloutWorker:
    def __init__(self, model_path: str, cfg: GRPOConfig, seed: int) -> None:
        from rl.rollout.vllm_engine import make_llm

        r = cfg.rollout
        kw: dict[str, Any] = {}
        if r.gpu_memory_utilization > 0:
            kw["gpu_memory_utilization"] = r.gpu_memory_utilization
        self.llm = make_llm(model_path, max_model_len=r.max_model_len, seed=seed,
                            enforce_eager=True if r.enforce_eager else None, **kw)
        self.cfg = cfg

    def ready(self) -> bool:
        return True

    def generate(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[dict[str, Any]]]:
        """n samples per prompt: token ids, text, sampled-token log-probs, finish reason."""
        from rl.rollout.vllm_engine import generate, sampling_params

        r = self.cfg.rollout
        params = [sampling_params(n=n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens,
                                  seed=seed + i) for i in range(len(prompt_ids))]
        outs = generate(self.llm, prompt_ids, params)
        return [[{"token_ids": s.token_ids, "text": s.text, "logprobs": s.logprobs, "finish_reason": s.finish_reason}
                 for s in samples] for samples in outs]

    def load_weights(self, path: str) -> dict[str, Any]:
        """Reload from an HF safetensors directory; returns the sums of the tensors fed to the engine."""
        t0 = time.perf_counter()
        (sums,) = self.llm.collective_rpc("r1lab_load_from_dir", args=(path,))[:1]
        self.llm.reset_prefix_cache()
        return {"sums": sums, "seconds": time.perf_counter() - t0}

    def engine_param_sums(self) -> dict[str, float]:
        return self.llm.collective_rpc("r1lab_param_sums")[0]

    def validate(self, benchmark: str, problems: int, samples: int, temperature: float, max_tokens: int,
                 seed: int) -> dict[str, float]:
        from rl.eval.harness import Sampling, evaluate

        res = evaluate(benchmark, llm=self.llm, limit=problems, quiet=True,
                       sampling=Sampling(temperature=temperature, top_p=1.0, n=samples, max_tokens=max_tokens,
                                         seed=seed))
        return res["metrics"]
