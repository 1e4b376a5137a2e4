"""The TRL side of bench/grpo_vs_trl.py: one GRPO workload through TRL's `GRPOTrainer`, timed per phase.

    from bench.trl_side import run_trl, TRLModeUnavailable
    res = run_trl(model_dir, prompts, answers, mode="default", steps=3, warmup=1, n=8, prompts_per_step=8,
                  max_new_tokens=256, lr=1e-5, bf16=True, seed=0, out_dir="/tmp/trl_bench")

`steps` are the measured optimizer steps; `warmup` more run first and are not reported (total = warmup + steps).
One optimizer step = one generated batch of prompts_per_step x n completions (see `trl_config` for the knobs).

Phases of one step (wall time = on_step_end to on_step_end, so everything the trainer does is in some phase):
  generation  TRL's own profiling context around `model.generate` / `LLM.generate`
  reward      TRL's own profiling context around the reward function
  update      the policy forward + backward of every micro-batch (training_step minus its _prepare_inputs),
              grad clip, optimizer.step, lr-scheduler step and zero_grad
  other       the rest: tokenising/chat template, padding, decoding, advantages, TRL's metric logging, the
              vLLM weight sync (details.weight_sync) and, if enabled, the no-grad log-prob recompute
              (details.logprob_recompute)
TRL's `profiling/Time taken: ...` timings are only sent to wandb/mlflow/trackio; with report_to=[] they are
dropped, so `ProfilingContext._log_metrics` is wrapped for the duration of the run to collect them here.

mode="vllm_colocate" raises `TRLModeUnavailable` (message: the observed error) when TRL cannot start or run
colocated vLLM on this machine's vLLM build.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from typing import Any

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")


class TRLModeUnavailable(RuntimeError):
    """The requested TRL generation mode cannot run here; str(exc) says why (the error observed)."""


def _reward_contains_answer(prompts, completions, answer, **kwargs) -> list[float]:
    out = []
    for c, a in zip(completions, answer):
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(1.0 if str(a) in text else 0.0)
    return out


def trl_config(*, mode: str, steps: int, warmup: int, n: int, prompts_per_step: int, max_new_tokens: int,
               lr: float, bf16: bool, seed: int, out_dir: str, micro_batch_size: int,
               gradient_checkpointing: bool, vllm_is_correction: bool, overrides: dict | None) -> dict[str, Any]:
    """The GRPOConfig kwargs (see the comments for why each knob)."""
    batch = prompts_per_step * n
    if batch % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} must divide prompts_per_step*n={batch}")
    gas = batch // micro_batch_size
    kw: dict[str, Any] = dict(  # noqa: C408 (keyword form reads like GRPOConfig(...))
        output_dir=out_dir,
        # --- one optimizer step per generated batch of prompts_per_step*n completions ---
        # GRPOConfig.__post_init__: steps_per_generation defaults to gradient_accumulation_steps and
        # generation_batch_size = per_device_train_batch_size * world_size(1) * steps_per_generation = batch.
        # The dataloader yields one generation batch (batch rows = prompts_per_step prompts x n repeats) per
        # micro-step; _prepare_inputs generates when _step % steps_per_generation == 0 and hands out slices, so
        # each of the `gas` micro-steps of one optimizer step trains on a different slice of the same batch.
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=gas,
        num_generations=n,
        num_iterations=1,            # mu = 1: each batch is used for exactly one optimizer step
        max_steps=warmup + steps,    # Trainer steps = optimizer steps
        shuffle_dataset=False,       # prompts consumed in the given order: step k uses prompts[k*pps:(k+1)*pps]
        # --- generation: exactly max_new_tokens per completion ---
        max_completion_length=max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        # --- loss: no reference model, TRL defaults otherwise (loss_type="dapo" = token mean over the batch,
        # scale_rewards="group", epsilon=0.2) ---
        beta=0.0,
        # --- optimizer: torch.optim.AdamW (non-fused, as r1lab), no weight decay, constant lr, clip 1.0 ---
        learning_rate=lr, optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        # --- precision: fp32 weights (model_init_kwargs dtype float32, also TRL's default), bf16 autocast via
        # accelerate's mixed_precision="bf16" on CPU ---
        use_cpu=True, bf16=bf16, fp16=False, model_init_kwargs={"dtype": "float32"},
        # TRL turns gradient checkpointing on by default (base_config); off unless asked, like r1lab's default
        gradient_checkpointing=gradient_checkpointing,
        # --- no saving, no external logging; log every step so TRL's own metrics (completion lengths,
        # step_time) are captured by a callback ---
        save_strategy="no", report_to=[], logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        log_completions=False, eval_strategy="no", dataloader_num_workers=0,
        seed=seed, data_seed=seed,
    )
    if mode == "default":
        # transformers generate: GenerationConfig(**generation_kwargs); min_new_tokens makes
        # MinNewTokensLengthLogitsProcessor set every eos id's logit to -inf until max_new_tokens are out, so no
        # completion ends early (same distribution as ignoring EOS, and TRL's eos masking finds no EOS)
        kw.update(use_vllm=False, generation_kwargs={"min_new_tokens": max_new_tokens})
    elif mode == "vllm_colocate":
        # vLLM SamplingParams(**generation_kwargs): min_tokens = max_tokens blocks EOS/stop ids (the same
        # logits masking as min_new_tokens); ignore_eos=True for good measure
        kw.update(use_vllm=True, vllm_mode="colocate",
                  generation_kwargs={"min_tokens": max_new_tokens, "ignore_eos": True},
                  # TRL's default (True) runs an extra no-grad forward over the batch to get old log-probs for the
                  # vLLM/trainer mismatch correction; r1lab's on-policy loop does not, so off unless asked
                  vllm_importance_sampling_correction=vllm_is_correction,
                  vllm_enable_sleep_mode=False)
    else:
        raise ValueError(f"mode must be 'default' or 'vllm_colocate', got {mode!r}")
    if overrides:
        kw.update(overrides)
    return kw


class _Recorder:
    def __init__(self):
        self.events: list[tuple[str, float, int]] = []   # (name, seconds, global_step at entry)
        self.step_marks: dict[int, dict[str, float]] = defaultdict(dict)
        self.tok: dict[int, dict[str, Any]] = {}
        self.autocast: dict[str, dict[str, Any]] = {}
        self.diag: dict[str, Any] = {}
        self.logs: list[dict[str, Any]] = []

    def add(self, name: str, dt: float, step: int):
        self.events.append((name, dt, step))


def run_trl(model_dir: str, prompts: list[str], answers: list[str], *, mode: str, steps: int, warmup: int,
            n: int, prompts_per_step: int, max_new_tokens: int, lr: float, bf16: bool, seed: int,
            out_dir: str, micro_batch_size: int = 8, gradient_checkpointing: bool = False,
            chat_template: bool = False, threads: int | None = None, vllm_is_correction: bool = False,
            vllm_dtype: str | None = None, vllm_kv_cache_gb: float | None = None,
            overrides: dict | None = None, reward_funcs: list | None = None, columns: dict | None = None,
            lr_lambda: Callable[[int], float] | None = None, save_dir: str | None = None) -> dict:
    """Run warmup + steps GRPO optimizer steps through TRL's GRPOTrainer; return per measured step timings.

    prompts: final prompt texts (tokenised as they are), or with chat_template=True user messages that TRL
    renders with the tokenizer's chat template (add_generation_prompt=True). answers: one per prompt, for the
    trivial reward (1.0 if the answer string is in the completion). micro_batch_size: per_device_train_batch_size
    (forward/backward micro-batch; gradient accumulation makes up the rest of the batch). vllm_dtype: the dtype
    colocated vLLM runs in (default bfloat16 when bf16 else float32; TRL itself passes none, so vLLM would use the
    checkpoint's fp32). vllm_kv_cache_gb: vLLM CPU KV-cache size (default: TRL's gpu_memory_utilization=0.3).
    overrides: extra GRPOConfig kwargs, applied last. reward_funcs: TRL reward functions instead of the trivial one;
    columns: extra dataset columns (one list per name, aligned with prompts) that TRL hands them as keyword
    arguments. lr_lambda: lr x lr_lambda(k) at optimizer step k instead of HF's schedule (e.g. r1lab's own,
    `rl.grpo.trainer_worker.lr_lambda`, whose warm-up starts at lr / w where HF's `constant_with_warmup` starts at
    0). save_dir: the trained model and tokenizer are saved there."""
    if mode not in ("default", "vllm_colocate"):
        raise ValueError(f"mode must be 'default' or 'vllm_colocate', got {mode!r}")
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    if len(prompts) < prompts_per_step:
        raise ValueError(f"need at least prompts_per_step={prompts_per_step} prompts, got {len(prompts)}")
    os.environ.setdefault("WANDB_DISABLED", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    if threads:
        torch.set_num_threads(threads)
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling as trl_profiling

    cfg_kw = trl_config(mode=mode, steps=steps, warmup=warmup, n=n, prompts_per_step=prompts_per_step,
                        max_new_tokens=max_new_tokens, lr=lr, bf16=bf16, seed=seed, out_dir=out_dir,
                        micro_batch_size=micro_batch_size, gradient_checkpointing=gradient_checkpointing,
                        vllm_is_correction=vllm_is_correction, overrides=overrides)
    os.makedirs(out_dir, exist_ok=True)
    rec = _Recorder()
    batch = prompts_per_step * n

    # ---- TRL's own profiling timings: wrap ProfilingContext._log_metrics for this run only ----
    orig_log_metrics = trl_profiling.ProfilingContext._log_metrics

    def _log_metrics(self, duration):
        rec.add(self.name, duration, self.step if self.step is not None else -1)
        return orig_log_metrics(self, duration)

    # ---- vLLM: inject dtype / KV cache size into TRL's LLM(...) call ----
    patches: list[tuple[Any, str, Any]] = [(trl_profiling.ProfilingContext, "_log_metrics", orig_log_metrics)]
    if mode == "vllm_colocate":
        from trl.generation import vllm_generation as vg
        if not getattr(vg, "is_vllm_available", lambda: True)():
            raise TRLModeUnavailable("vllm is not importable in this environment")
        orig_llm = vg.LLM
        llm_extra: dict[str, Any] = {"dtype": vllm_dtype or ("bfloat16" if bf16 else "float32")}
        if vllm_kv_cache_gb:
            llm_extra["kv_cache_memory_bytes"] = int(vllm_kv_cache_gb * 2**30)

        def _llm(*a, **k):
            for key, v in llm_extra.items():
                k.setdefault(key, v)
            rec.diag["vllm_llm_kwargs"] = {key: str(v) for key, v in k.items()}
            return orig_llm(*a, **k)

        patches.append((vg, "LLM", orig_llm))

    ds_rows = {"prompt": ([[{"role": "user", "content": p}] for p in prompts] if chat_template else list(prompts)),
               "answer": [str(a) for a in answers]}
    for name, values in (columns or {}).items():
        if len(values) != len(prompts):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(prompts)} prompts")
        ds_rows[name] = list(values)
    train_ds = Dataset.from_dict(ds_rows)
    reward_funcs = reward_funcs or [_reward_contains_answer]
    trainer_cls = _with_lr_lambda(GRPOTrainer, lr_lambda) if lr_lambda else GRPOTrainer

    class _Cb(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec.step_marks[-1]["end"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            rec.step_marks[state.global_step]["begin"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            rec.step_marks[state.global_step]["opt_done"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            rec.step_marks[state.global_step - 1]["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            rec.logs.append({"step": state.global_step, **(logs or {})})

    trainer = None
    saved_env = {k: os.environ.get(k) for k in _DIST_ENV}
    # vLLM's CPU worker binds the OpenMP threads to cores and replaces torch.set_num_threads with a no-op for the
    # whole process (vllm/v1/worker/cpu_worker.py init_device); the function is put back afterwards, the binding
    # cannot be: run each side of the benchmark in its own process
    saved_set_num_threads = torch.set_num_threads
    try:
        trl_profiling.ProfilingContext._log_metrics = _log_metrics
        if mode == "vllm_colocate":
            vg.LLM = _llm
        try:
            config = GRPOConfig(**cfg_kw)
            trainer = trainer_cls(model=model_dir, reward_funcs=reward_funcs, args=config,
                                  train_dataset=train_ds, callbacks=[_Cb()])
        except Exception as e:
            if mode == "vllm_colocate":
                raise TRLModeUnavailable(_why(e, "starting TRL's colocated vLLM (GRPOTrainer.__init__)")) from e
            raise
        _instrument(trainer, rec, torch)
        if mode == "vllm_colocate":
            rec.diag["vllm_env"] = {k: os.environ.get(k) for k in _DIST_ENV}
        t0 = time.perf_counter()
        try:
            trainer.train()
        except Exception as e:
            if mode == "vllm_colocate":
                raise TRLModeUnavailable(_why(e, "running a GRPO step with TRL's colocated vLLM")) from e
            raise
        total = time.perf_counter() - t0
        if save_dir:
            trainer.save_model(save_dir)
            trainer.processing_class.save_pretrained(save_dir)
    except BaseException:
        _cleanup(trainer, torch)
        raise
    finally:
        for obj, name, orig in patches:
            setattr(obj, name, orig)
        torch.set_num_threads = saved_set_num_threads
        # TRL's colocate init writes RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (and vLLM
        # VLLM_ENABLE_V1_MULTIPROCESSING) into os.environ; put them back for whatever runs next in this process
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    res = _summarise(rec, trainer, mode=mode, steps=steps, warmup=warmup, batch=batch, total=total,
                     reward_names=tuple("." + f.__name__ for f in reward_funcs))
    res["config"] = {k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list)) else str(v))
                     for k, v in cfg_kw.items()}
    res["versions"] = {"trl": trl.__version__, "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__}
    if mode == "vllm_colocate":
        with contextlib.suppress(Exception):
            res["versions"]["vllm"] = __import__("vllm").__version__
    with open(os.path.join(out_dir, f"trl_{mode}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    _cleanup(trainer, torch)
    return res


def _with_lr_lambda(trainer_cls, fn: Callable[[int], float]):
    """trainer_cls whose scheduler is lr x fn(k) at optimizer step k."""
    from torch.optim.lr_scheduler import LambdaLR

    class WithLrLambda(trainer_cls):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, fn)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return WithLrLambda


def _why(e: BaseException, what: str) -> str:
    """One line: the innermost meaningful error, with where it came from."""
    chain, cur = [], e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    root = chain[-1]
    tb = traceback.extract_tb(root.__traceback__)
    where = ""
    if tb:
        fr = tb[-1]
        where = f" (at {re.sub(r'.*site-packages/', '', fr.filename)}:{fr.lineno} in {fr.name})"
    msg = f"{type(root).__name__}: {str(root).strip()}"
    if root is not e:
        msg = f"{type(e).__name__}: {str(e).strip()[:300]} <- caused by {msg}"
    msg = " ".join(msg.split())
    out = f"{what} failed: {msg[:1200]}{where}"
    if "weight_loader" in str(root) and "load_weights" in where:
        out += (". Why: TRL's colocate mode pushes the trainer's weights into the in-process engine before every "
                "generation with llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, "
                "param)]) (trl/generation/vllm_generation.py sync_weights); on the CPU build, vLLM's "
                "process_weights_after_loading repacks every linear layer for oneDNN/SGL kernels "
                "(dispatch_cpu_unquantized_gemm(remove_weight=True)) and replaces layer.weight with an empty "
                "Parameter without a weight_loader, so the first weight sync fails (and even a successful copy would "
                "not reach the packed weights the CPU kernels use)")
    return out


def _instrument(trainer, rec: _Recorder, torch) -> None:
    """Instance-level wrappers: training_step, _prepare_inputs, _generate (token counts), the no-grad log-prob
    recompute, and one forward hook on the first decoder layer's q_proj recording autocast state and dtypes."""
    step_of = lambda: trainer.state.global_step

    orig_ts = trainer.training_step

    @functools.wraps(orig_ts)
    def training_step(*a, **k):
        t = time.perf_counter()
        out = orig_ts(*a, **k)
        t1 = time.perf_counter()
        rec.add("bench.training_step", t1 - t, step_of())
        rec.step_marks[step_of()]["last_ts_end"] = t1
        return out

    trainer.training_step = training_step

    def timed(fn, name: str, when=lambda: True):
        """fn, recording each call's duration under `name` while `when()` holds."""
        @functools.wraps(fn)
        def wrapper(*a, **k):
            if not when():
                return fn(*a, **k)
            t = time.perf_counter()
            out = fn(*a, **k)
            rec.add(name, time.perf_counter() - t, step_of())
            return out
        return wrapper

    trainer._prepare_inputs = timed(trainer._prepare_inputs, "bench._prepare_inputs")

    orig_gen = trainer._generate

    @functools.wraps(orig_gen)
    def _generate(prompts):
        out = orig_gen(prompts)
        prompt_ids, completion_ids = out[0], out[1]
        lens = [len(c) for c in completion_ids]
        eos = set(trainer.eos_token_ids)
        rec.tok[step_of()] = {
            "completions": len(lens), "completion_tokens": sum(lens), "min_len": min(lens), "max_len": max(lens),
            "prompt_tokens": sum(len(p) for p in prompt_ids),
            "completions_with_eos": sum(any(t in eos for t in c) for c in completion_ids)}
        return out

    trainer._generate = _generate

    # the no-grad calls are the log-prob recompute (the update's own forward runs with grad)
    trainer._get_per_token_logps_and_entropies = timed(trainer._get_per_token_logps_and_entropies,
                                                       "bench.logprob_recompute",
                                                       when=lambda: not torch.is_grad_enabled())

    # autocast probe: which phase is running is told by torch.is_grad_enabled() (generate runs under no_grad)
    model = trainer.model
    try:
        probe = model.model.layers[0].self_attn.q_proj
    except AttributeError:
        probe = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

    def hook(mod, inputs, output):
        phase = "train_forward" if torch.is_grad_enabled() else "no_grad_forward(generate/recompute)"
        if phase in rec.autocast:
            return
        rec.autocast[phase] = {
            "autocast_cpu_enabled": torch.is_autocast_enabled("cpu"),
            "autocast_cpu_dtype": str(torch.get_autocast_dtype("cpu")),
            "weight_dtype": str(mod.weight.dtype), "input_dtype": str(inputs[0].dtype),
            "output_dtype": str(output.dtype)}

    probe.register_forward_hook(hook)


def _summarise(rec: _Recorder, trainer, *, mode, steps, warmup, batch, total,
               reward_names: tuple[str, ...] = ("._reward_contains_answer",)) -> dict:
    per: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    calls: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, dt, step in rec.events:
        key = None
        if name.endswith((".transformers.generate", ".vLLM.generate", ".transformers.generate_batch")):
            key = "generate"
        elif name.endswith(reward_names):
            key = "reward"
        elif name.endswith(".sync_weights"):
            key = "weight_sync"
        elif name == "bench.training_step":
            key = "training_step"
        elif name == "bench._prepare_inputs":
            key = "prepare_inputs"
        elif name == "bench.logprob_recompute":
            key = "logprob_recompute"
        elif name.endswith(".compute_loss"):
            key = "compute_loss"
        if key:
            per[step][key] += dt
            calls[step][key] += 1
    out_steps = []
    for s in range(warmup, warmup + steps):
        m = rec.step_marks.get(s, {})
        prev_end = rec.step_marks.get(s - 1, {}).get("end")
        if "end" not in m or prev_end is None:
            continue
        wall = m["end"] - prev_end
        p = per[s]
        opt = m["end"] - m.get("last_ts_end", m["end"])          # clip + optimizer.step + sched + zero_grad
        fwd_bwd = p["training_step"] - p["prepare_inputs"]
        update = fwd_bwd + opt
        gen, rew = p["generate"], p["reward"]
        other = wall - gen - rew - update
        tok = rec.tok.get(s, {})
        ctoks = tok.get("completion_tokens", 0)
        out_steps.append({
            "step": s, "wall_s": wall,
            "phases": {"generation": gen, "reward": rew, "update": update, "other": other},
            "details": {"forward_backward": fwd_bwd, "compute_loss(fwd)": p["compute_loss"],
                        "optimizer(clip+step+zero)": opt, "weight_sync": p["weight_sync"],
                        "logprob_recompute": p["logprob_recompute"],
                        "prepare_inputs_total": p["prepare_inputs"],
                        "other_excl_sync_recompute": other - p["weight_sync"] - p["logprob_recompute"]},
            "samples": tok.get("completions", 0), "generated_tokens": ctoks,
            "samples_per_s": tok.get("completions", 0) / wall if wall > 0 else math.nan,
            "gen_tokens_per_s": ctoks / wall if wall > 0 else math.nan,
            "gen_tokens_per_s_generation_only": ctoks / gen if gen > 0 else math.nan,
            "completion_len_min_max": [tok.get("min_len"), tok.get("max_len")],
            "completions_with_eos": tok.get("completions_with_eos"),
            "prompt_tokens": tok.get("prompt_tokens"),
            "generate_calls": calls[s]["generate"], "micro_steps": calls[s]["training_step"],
            "trl_step_time_s": next((lg.get("step_time") for lg in rec.logs if lg.get("step") == s + 1), None)})

    def mean(key, sub=None):
        vals = [(x[sub][key] if sub else x[key]) for x in out_steps]
        return sum(vals) / len(vals) if vals else math.nan

    summary = {"wall_s": mean("wall_s"), "samples_per_s": mean("samples_per_s"),
               "gen_tokens_per_s": mean("gen_tokens_per_s"),
               "phases": {k: mean(k, "phases") for k in ("generation", "reward", "update", "other")}}
    opt_steps = trainer.state.global_step
    return {"mode_requested": mode, "mode_ran": mode, "generation_backend":
            ("vllm colocate (in-process LLM)" if trainer.use_vllm else "transformers generate"),
            "steps": out_steps, "summary": summary, "total_train_s": total, "optimizer_steps": opt_steps,
            "batch": batch, "autocast": rec.autocast, "diagnostics": rec.diag,
            "trl_logs": rec.logs}


def _cleanup(trainer, torch) -> None:
    """Free vLLM / the model so that a following run in the same process gets the cores and memory back."""
    if trainer is None:
        return
    vg = getattr(trainer, "vllm_generation", None)
    if vg is not None and getattr(vg, "llm", None) is not None:
        with contextlib.suppress(Exception):
            vg.llm.llm_engine.engine_core.shutdown()
        vg.llm = None
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )
            destroy_model_parallel()
            destroy_distributed_environment()
    with contextlib.suppress(Exception):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    import gc
    gc.collect()
