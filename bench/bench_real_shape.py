"""One GRPO step end to end at Qwen2.5-0.5B's shape (slow; not in `make test`).

The model: `tiny:qwen2:shape=qwen2.5-0.5b` (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
vocab 151,936, tied embeddings; random init, bf16 on disk; the local tokenizer padded with unused tokens so
every sampled id decodes). The run: Ray (local), one vLLM CPU rollout worker (bf16), one FSDP2 trainer rank with
a thread per core and its heap kept (fp32 masters, bf16 compute; `trainer.num_workers=1 trainer.threads=<cores>
trainer.release_heap=false`: on one CPU node the fastest trainer measured, its update 2.3-2.6x that of two ranks
of one thread with the heap trimmed, for ~3 GB more memory in all; rl/heap.py), 4 prompts x 4 samples x 64
new tokens; overrides after the flags change any of it (the earlier configuration: `trainer.num_workers=2
trainer.threads=1 trainer.release_heap=true`). The weight sync is the run's default (sync.method=auto: shared
memory on one node; checksums at step 1 only; each side with its share of the cores while it runs: sync.threads)
unless `--sync-method` / `--checksum-every 1` ask otherwise (checked every step: the engine and the trainers also
sum every tensor sent, ~0.1 s per GB each). Step 1 includes first-call warm-ups, and the kept heaps grow for a few
steps (the trainer's page faults stop after two or three steps, the engine's reloads after three or four): the
last step (of 5 by default) is the steady-state number. Prints each step's time breakdown and the peak RSS of
every process (driver, trainer ranks, rollout worker with its in-process engine).

  .venv/bin/python bench/bench_real_shape.py [--steps 5] [--new-tokens 64] [--sync-method auto|shm|file]
      [--checksum-every 0] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sync-method", default="auto", choices=["auto", "shm", "file"])
    ap.add_argument("--checksum-every", type=int, default=0, help="sync.checksum_every (0: step 1 only)")
    ap.add_argument("overrides", nargs="*", help="more config overrides, applied last (e.g. trainer.num_workers=1 "
                                                 "trainer.threads=2 trainer.release_heap=false)")
    a = ap.parse_args()
    os.environ.setdefault("R1LAB_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "r1lab"))
    import ray

    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver
    from rl.grpo.trainer_worker import process_memory_mb

    out = Path(tempfile.mkdtemp(prefix="r1lab-real-shape-"))
    cores = len(os.sched_getaffinity(0))
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        "model.path=tiny:qwen2:shape=qwen2.5-0.5b", "model.dtype=bfloat16", "data.max_prompt_tokens=512",
        "rollout.batch_prompts=4", "rollout.n=4", f"rollout.max_new_tokens={a.new_tokens}", "rollout.max_model_len=1024",
        "rollout.kv_cache_gb=1", "rollout.enforce_eager=false", "trainer.micro_batch_tokens=2048",
        "trainer.num_workers=1", f"trainer.threads={cores}", "trainer.release_heap=false",
        "trainer.lr=1e-6", f"sync.checksum_every={a.checksum_every}", f"sync.method={a.sync_method}",
        "sync.bucket_mb=256", "checkpoint.every=0", "log.progress=false",
        f"log.output_dir={out}", "resources.ray_address=local", f"trainer.max_steps={a.steps}", *a.overrides])
    d = GRPODriver(cfg)
    d.start()
    rows = []
    try:
        heap = ray.get(d.trainers[0].ready.remote())["heap"]
        for _ in range(a.steps):
            rows.append(d.train_step())
            d.step += 1
        mem = {f"trainer rank {i}": m for i, m in enumerate(ray.get([w.peak_rss_mb.remote() for w in d.trainers]))}
        mem.update({f"rollout worker {i}": m for i, m in enumerate(ray.get([w.peak_rss_mb.remote() for w in d.rollouts]))})
        mem["driver"] = process_memory_mb()
    finally:
        d.close()
    keys = ["perf/step_s", "perf/rollout_s", "perf/gen_s", "perf/reward_s", "perf/logprobs_s", "perf/update_s",
            "perf/sync_s", "perf/idle_s"]
    checked = f"every {a.checksum_every} step(s)" if a.checksum_every else "at step 1"
    tc = cfg.trainer
    print(f"Qwen2.5-0.5B shape, {tc.num_workers} FSDP2 rank(s) x {tc.threads} thread(s) (heap: {heap}) + 1 vLLM CPU "
          f"engine, {cfg.rollout.batch_prompts}x"
          f"{cfg.rollout.n} samples x {a.new_tokens} new tokens, bf16 compute; weight sync {d.sync_method} with "
          f"{d.sync_writers} writer(s), checksums {checked}")
    for i, r in enumerate(rows, 1):
        print(f"step {i}: " + ", ".join(f"{k.split('/')[1]} {r[k]:.1f}s" for k in keys) +
              f"; sync {r['sync/mb']:.0f} MB in {int(r['sync/buckets'])} buckets (gather {r['perf/sync_gather_s']:.1f}s,"
              f" send {r['perf/sync_send_s']:.1f}s, finish {r['perf/sync_finish_s']:.1f}s, engine load "
              f"{r['perf/sync_load_s']:.1f}s), checksum_ok={r.get('sync/checksum_ok')}"
              f", logprob_diff {r['rollout/logprob_diff']:.4f}")
    print_floor(rows[-1], min(cores, (tc.threads or cores) * tc.num_workers))   # every trainer thread of the node
    print(f"{'process':<18} {'peak RSS MB':>12} {'RSS now MB':>11}")
    for name, m in mem.items():
        print(f"{name:<18} {m['peak_mb']:>12.0f} {m['rss_mb']:>11.0f}")
    print(json.dumps({"steps": rows, "memory": mem}, default=str)[:0])


def print_floor(r: dict, threads: int) -> None:
    """The step against this machine's compute floor (as bench/grpo_vs_trl.py: 6N FLOPs per trained token, 2N
    per forward token, at the bf16 GEMM rate measured now with all the trainer ranks' threads, at most the
    cores). perf/train_flops is the update's 6N x trained tokens (prompt + response, padding excluded);
    generation and the old-log-prob forward are counted as 2N per token of those sequences (generation slightly
    over: a group's prompt is prefilled once)."""
    from bench.grpo_vs_trl import matmul_tflops

    rate = matmul_tflops(896, 151936, threads=threads)["bf16"] * 1e12
    train = r["perf/train_flops"]
    floor = {"gen_s": train / 3 / rate, "logprobs_s": (train / 3 / rate) if r["perf/logprobs_s"] > 0.05 else 0.0,
             "update_s": train / rate, "sync_s": 0.0}
    print(f"bf16 GEMM rate {rate / 1e12:.3f} TFLOP/s ({threads} threads, 2048^3); per phase, last step:")
    print(f"{'phase':<10} {'seconds':>8} {'floor s':>8} {'x floor':>8}")
    for k, f in floor.items():
        sec = r[f"perf/{k}"]
        print(f"{k[:-2]:<10} {sec:>8.1f} {f:>8.1f} {sec / f if f else float('nan'):>8.2f}")
    total = sum(floor.values())
    sync_gbps = r["sync/mb"] * 2**20 / 1e9 / max(r["perf/sync_s"], 1e-9)
    print(f"update_gemm_frac={floor['update_s'] / r['perf/update_s']:.2f} sync_gbps={sync_gbps:.2f}")
    print(f"floor_ratio={r['perf/step_s'] / total:.2f}")


if __name__ == "__main__":
    main()
