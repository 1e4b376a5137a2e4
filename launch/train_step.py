"""The GRPO trainer step without Ray or vLLM, one process per rank under torchrun: timing, memory, checkpoints.

  torchrun --nproc_per_node 1 launch/train_step.py --config configs/tiny_grpo.yaml \\
      model.path=tiny:qwen2:shape=qwen2.5-1.5b model.dtype=bfloat16 trainer.micro_batch_tokens=16384 \\
      --response-tokens 16384 --steps 3 --baseline --output step.json

Each rank (each data-parallel group, with trainer.sequence_parallel) builds a synthetic shard with R1-like,
long-tailed response lengths (log-normal), takes the rollout log-probs from the policy itself (ratios ~1, as
on-policy), and runs `compute_logprobs` + `update` of the real `TrainerWorker` (FSDP2, mixed precision, chunked
log-probs, length-sorted or packed micro-batches, trainer.packing) for --steps measured
steps after --warmup. Rank 0 prints one JSON line: tokens/s, step time, peak memory, MFU estimate
(6 x params x trained tokens / update time over --peak-tflops) and, with --baseline (one rank), the same batch
through a plain PyTorch + transformers loop (full logits, log-softmax, AdamW) at the same precision.
--save DIR / --load DIR write and restore a sharded checkpoint (DCP) and check the restored state's sums, which
is how a change of world size (2 -> 1, 1 -> 2) is tested.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def synthetic_shard(vocab: int, pad: int, response_tokens: int, prompt_len: int, max_len: int, mean_len: float,
                    sigma: float, seed: int) -> dict[str, torch.Tensor]:
    """Rows of prompt + response token ids until `response_tokens` response tokens; lengths ~ LogNormal."""
    g = torch.Generator().manual_seed(seed)
    mu = math.log(mean_len) - sigma ** 2 / 2
    lengths, total = [], 0
    while total < response_tokens:
        n = int(min(max_len, max(8, math.exp(mu + sigma * float(torch.randn(1, generator=g))))))
        n = min(n, response_tokens - total) if response_tokens - total >= 8 else n
        lengths.append(n)
        total += n
    L = prompt_len + max(lengths)
    B = len(lengths)
    ids = torch.full((B, L), pad, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.long)
    resp = torch.zeros(B, L)
    for b, n in enumerate(lengths):
        ids[b, : prompt_len + n] = torch.randint(3, vocab, (prompt_len + n,), generator=g)
        am[b, : prompt_len + n] = 1
        resp[b, prompt_len: prompt_len + n] = 1
    return {"input_ids": ids, "attention_mask": am, "response_mask": resp, "rollout_logp": torch.zeros(B, L),
            "adv": torch.randn(B, generator=g)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def plain_loop(model_path: str, dtype: torch.dtype, batch: dict, steps: int, warmup: int, lr: float,
               device: torch.device, micro_tokens: int) -> dict[str, float]:
    """The baseline: transformers model, full logits, log-softmax, token-mean policy-gradient loss, AdamW;
    autocast to the same compute dtype with fp32 weights; same length-sorted micro-batches."""
    from transformers import AutoModelForCausalLM

    from rl.grpo.microbatch import micro_batches

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    lengths = batch["attention_mask"].sum(-1).tolist()
    groups = micro_batches(lengths, micro_tokens)
    n_tok = float(batch["response_mask"].sum())
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        for g in groups:
            L = int(max(lengths[i] for i in g))
            ids = batch["input_ids"][g, :L].to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"][g, :L].to(device)).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            mask = batch["response_mask"][g, 1:L].to(device)
            loss = -(lp * batch["adv"][g, None].to(device) * mask).sum() / n_tok
            loss.backward()
            del logits, lp
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {"update_s": sum(times) / len(times), "peak_mb": peak_memory_mb(device)}


def main(argv: list[str] | None = None) -> int:
    from rl.config import ConfigError, load_config, resolve_model_path
    from rl.grpo.config import GRPOConfig
    from rl.grpo.trainer_worker import TrainerWorker

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny_grpo.yaml")
    ap.add_argument("--response-tokens", type=int, default=4096, help="response tokens per rank and step")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--mean-len", type=float, default=0.0, help="mean response length (0: max_new_tokens / 4)")
    ap.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of response lengths")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak (H100 bf16 dense: 989)")
    ap.add_argument("--baseline", action="store_true", help="also time a plain PyTorch+transformers loop")
    ap.add_argument("--save")
    ap.add_argument("--load")
    ap.add_argument("--output")
    ap.add_argument("--profile", help="write a torch-profiler table of the last step's update (rank 0) here")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(GRPOConfig, a.config, a.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    model_path = resolve_model_path(cfg.model.path)
    worker = TrainerWorker.from_env(cfg, model_path)
    rank, world = worker.rank, worker.world
    hf_cfg = worker.model.hf.config
    max_len = cfg.rollout.max_new_tokens
    dp_rank, dp = rank // cfg.trainer.sequence_parallel, world // cfg.trainer.sequence_parallel
    batch = synthetic_shard(hf_cfg.vocab_size, 0, a.response_tokens, a.prompt_len, max_len,   # one per dp group
                            a.mean_len or max_len / 4, a.sigma, cfg.trainer.seed * 100 + dp_rank)
    result: dict = {"world": world, "device": str(worker.device), "rows": int(batch["input_ids"].shape[0]),
                    "response_tokens": int(batch["response_mask"].sum()),
                    "tokens": int(batch["attention_mask"].sum()), "params": sum(p.numel() for p in worker.model.parameters())}  # DTensor numel: global
    if a.load:
        result["loaded_step"] = worker.load_checkpoint(a.load)
        saved = json.loads((Path(a.load) / "state_sums.json").read_text())
        now = worker.state_sums()
        result["restored_max_rel_diff"] = max(abs(now[k] - v) / max(1e-12, abs(v)) for k, v in saved.items())
        result["restored_keys"] = len(saved)
    batch["rollout_logp"] = worker.compute_logprobs(batch)["old_logp"]
    times, lp_times = [], []
    for step in range(a.warmup + a.steps):
        _sync(worker.device)
        t0 = time.perf_counter()
        lp = worker.compute_logprobs(batch)
        batch["old_logp"] = lp["old_logp"]
        _sync(worker.device)
        t1 = time.perf_counter()
        with _profiled(a.profile if rank == 0 and step == a.warmup + a.steps - 1 else None):
            metrics = worker.update(batch)
        _sync(worker.device)
        if step >= a.warmup:
            times.append(time.perf_counter() - t1)
            lp_times.append(t1 - t0)
    upd = sum(times) / len(times)
    tokens = result["tokens"] * dp
    result.update({"update_s": upd, "logprobs_s": sum(lp_times) / len(lp_times),
                   "train_tokens_per_s": tokens / upd, "peak_mb": peak_memory_mb(worker.device),
                   "padding_frac": metrics["perf/padding_frac"], "pg_loss": metrics["actor/pg_loss"],
                   "grad_norm": metrics["actor/grad_norm"]})
    if a.peak_tflops:
        result["mfu"] = 6 * result["params"] * tokens / upd / (a.peak_tflops * 1e12 * world)
    if a.save:
        worker.save_checkpoint(a.save)
        sums = worker.state_sums()
        if rank == 0:
            (Path(a.save) / "state_sums.json").write_text(json.dumps(sums))
    if a.baseline and world == 1:
        device, dtype = worker.device, worker.dtype
        worker.shutdown()
        del worker.model, worker.optim, worker.ref, worker.teacher
        reset_peak_memory(device)
        base = plain_loop(model_path, dtype, batch, a.steps, a.warmup, cfg.trainer.lr, device,
                          cfg.trainer.micro_batch_tokens)
        result["baseline"] = base
        result["speedup_vs_plain"] = base["update_s"] / upd
    else:
        worker.shutdown()
    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if a.output:
            Path(a.output).write_text(line + "\n")
    return 0


@contextlib.contextmanager
def _profiled(path: str | None):
    """torch.profiler around the block when `path`: operators by self CPU time, then by total, written there."""
    if not path:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=True) as prof:
        yield
    avg = prof.key_averages()
    Path(path).write_text("by self CPU time\n" + avg.table(sort_by="self_cpu_time_total", row_limit=40) +
                          "\nby total CPU time\n" + avg.table(sort_by="cpu_time_total", row_limit=40) +
                          "\nby self CPU time, operator and input shapes\n" +
                          prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                             row_limit=60, max_name_column_width=30,
                                                                             max_shapes_column_width=90))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rc = main()
    # Everything is written and the process group destroyed; skip the interpreter's teardown: about 1 run in 10
    # of two gloo ranks aborted there ("terminate called without an active exception", SIGABRT in a C++
    # destructor after main returned; the same before and after this file's last changes), which torchrun
    # reports as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
