"""Long responses: peak memory per trainer rank of one training step on one response of L tokens, without
(k=1, one rank) and with Ulysses sequence parallelism (k=2, two gloo ranks).

The step is the real `TrainerWorker.update` (packed micro-batch, FSDP2 over the k ranks, fp32 master weights and
AdamW state, bf16 compute, gradient checkpointing, chunked log-probs, AdamW step) on a model with Qwen2.5-0.5B's
width, heads, KV heads and vocabulary (`tiny:qwen2:shape=qwen2.5-0.5b`, random init) and --layers decoder
layers (the same for every point; 24 is the real depth). The row: a 64-token prompt and L response tokens, in
one micro-batch. Each point runs in fresh processes; the peak is each rank's VmHWM during --updates steps (reset
after start-up, so loading the full model before sharding does not count; from the second step on AdamW's
moments are held during forward and backward, as in any real run), and the table shows the largest over the
ranks, the step time that of the last step. A point runs only when the peaks fitted so far predict that it fits
this machine's free memory (and 32k is tried last). Timings are noisy on a shared machine; the memory is what this measures.

Prints the table, the fitted slope of peak memory in L for each k (MB per 1k tokens, and the largest deviation
from the line), then `max_len_sp2=` (the longest L that trained at k=2) and last `peak_ratio=` (per-rank peak
at k=2 over k=1 at the longest L both trained).

  .venv/bin/python bench/bench_long_context.py [--layers 24] [--lengths 2048,4096,8192,16384,32768] [--updates 2]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.ports import free_port  # noqa: E402

PROMPT = 64


def _vm(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _rank(rank: int, k: int, port: int, model: str, L: int, threads: int, out: str, updates: int) -> None:
    import torch

    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.heap import release_free_heap
    from rl.grpo.trainer_worker import TrainerWorker

    n = PROMPT + L
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [
        f"model.path={model}", "model.dtype=bfloat16", "model.gradient_checkpointing=true", "trainer.packing=true",
        f"trainer.sequence_parallel={k}", f"trainer.num_workers={k}", f"trainer.micro_batch_tokens={n}",
        f"trainer.threads={threads}", f"rollout.max_new_tokens={L}", f"rollout.max_model_len={n + 1}",
        f"data.max_prompt_tokens={PROMPT}", "trainer.lr=1e-6"])
    w = TrainerWorker(rank, k, "127.0.0.1", port, cfg, model)
    g = torch.Generator().manual_seed(0)
    resp = torch.zeros(1, n)
    resp[0, PROMPT:] = 1
    batch = {"input_ids": torch.randint(3, w.model.hf.config.vocab_size, (1, n), generator=g),
             "attention_mask": torch.ones(1, n, dtype=torch.long), "response_mask": resp,
             "rollout_logp": torch.zeros(1, n), "adv": torch.ones(1)}
    gc.collect()
    release_free_heap()                        # start-up's freed memory back to the OS before the peak is reset
    base = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                           # VmHWM := VmRSS
    seconds = []
    for _ in range(updates):   # from the second on, AdamW's moments exist during forward and backward too
        t0 = time.perf_counter()
        m = w.update(batch)
        seconds.append(time.perf_counter() - t0)
    result = {"rank": rank, "peak_mb": _vm("VmHWM"), "start_mb": base, "seconds": seconds[-1],
              "grad_norm": m["actor/grad_norm"], "tokens_per_rank": n // k}
    w.shutdown()
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def run_point(model: str, L: int, k: int, threads: int, updates: int) -> dict | None:
    """`updates` training steps at length L over k ranks in fresh processes; None when a rank died (e.g. killed
    for memory)."""
    import torch.multiprocessing as mp

    out = tempfile.mktemp(prefix="r1lab-long-")
    try:
        mp.spawn(_rank, args=(k, free_port(), model, L, threads, out, updates), nprocs=k)
    except Exception as e:   # a rank killed for memory, or an error: reported, the sweep goes on
        print(f"L={L} k={k}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        return None
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(k)]
    for r in range(k):
        os.unlink(f"{out}.{r}")
    return {"peak_mb": max(r["peak_mb"] for r in ranks), "start_mb": max(r["start_mb"] for r in ranks),
            "seconds": max(r["seconds"] for r in ranks), "grad_norm": ranks[0]["grad_norm"]}


def fit(points: dict[int, dict]) -> tuple[float, float, float]:
    """Least-squares line of peak MB over L: (slope MB per token, intercept MB, largest |deviation| MB)."""
    xs, ys = list(points), [p["peak_mb"] for p in points.values()]
    if len(xs) < 2:
        return 0.0, ys[0] if ys else 0.0, 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    icpt = my - slope * mx
    return slope, icpt, max(abs(y - (icpt + slope * x)) for x, y in zip(xs, ys))


def free_mb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2.5-0.5B has 24; fewer are faster, but "
                    "the tied embedding then dominates the peak and it hardly halves at k=2)")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--threads", type=int, default=2, help="compute threads in all (split over the k ranks)")
    ap.add_argument("--updates", type=int, default=2,
                    help="training steps per point; the peak is over all of them (the first step creates AdamW's "
                         "moments, later ones carry them through forward and backward: the steady state)")
    ap.add_argument("--margin-mb", type=float, default=1500, help="free memory kept aside when predicting a fit")
    a = ap.parse_args()
    os.environ.setdefault("R1LAB_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "r1lab"))
    from rl.config import resolve_model_path

    model = resolve_model_path(f"tiny:qwen2:shape=qwen2.5-0.5b,num_layers={a.layers}")
    lengths = [int(x) for x in a.lengths.split(",")]
    res: dict[int, dict[int, dict]] = {1: {}, 2: {}}
    stopped = {1: False, 2: False}
    for L in lengths:
        for k in (1, 2):
            if stopped[k]:
                continue   # a shorter length failed or was skipped at this k
            slope, icpt, _ = fit(res[k])
            predicted = k * (icpt + slope * L) if len(res[k]) >= 2 else 0.0
            if predicted > free_mb() - a.margin_mb:
                print(f"L={L} k={k}: skipped, predicted {predicted:.0f} MB over {k} rank(s) > free "
                      f"{free_mb():.0f} MB - margin", flush=True)
                stopped[k] = True
                continue
            p = run_point(model, L, k, max(1, a.threads // k), a.updates)
            stopped[k] = p is None
            if p is not None:
                res[k][L] = p
                print(f"L={L} k={k}: peak {p['peak_mb']:.0f} MB per rank, step {p['seconds']:.1f} s", flush=True)
    print(f"\nQwen2.5-0.5B width/heads/vocab, {a.layers} layers, bf16 compute, fp32 masters + AdamW, gradient "
          f"checkpointing, packed; one response of L tokens after a {PROMPT}-token prompt")
    print(f"{'L':>7} {'k=1 peak MB':>12} {'k=2 peak MB/rank':>17} {'ratio':>6} {'k=1 step s':>11} {'k=2 step s':>11}")
    for L in lengths:
        a1, a2 = res[1].get(L), res[2].get(L)
        cell = lambda p, key, f: format(p[key], f) if p else "-"  # noqa: E731
        ratio = f"{a2['peak_mb'] / a1['peak_mb']:.2f}" if a1 and a2 else "-"
        print(f"{L:>7} {cell(a1, 'peak_mb', '.0f'):>12} {cell(a2, 'peak_mb', '.0f'):>17} {ratio:>6} "
              f"{cell(a1, 'seconds', '.1f'):>11} {cell(a2, 'seconds', '.1f'):>11}")
    for k in (1, 2):
        slope, icpt, dev = fit(res[k])
        print(f"k={k}: peak = {icpt:.0f} MB + {slope * 1024:.1f} MB per 1k tokens (largest deviation from the "
              f"line {dev:.0f} MB over {len(res[k])} points)")
    both = [L for L in lengths if L in res[1] and L in res[2]]
    print(f"max_len_sp2={max(res[2]) if res[2] else 0}")
    print(f"peak_ratio={res[2][both[-1]]['peak_mb'] / res[1][both[-1]]['peak_mb']:.3f}" if both else "peak_ratio=nan")


if __name__ == "__main__":
    main()
