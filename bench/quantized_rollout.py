"""Quantized rollout (issue 29): what int8 weights buy in the engine, and whether learning keeps up.

Part 1, `engine` (Qwen2.5-0.5B's shape, random init, bf16 on disk): one vLLM CPU engine per precision (bf16; int8
decoder layers with the LM head in bf16; int8 with the LM head int8 too, `rollout.int8_lm_head`), each in its own
process, the same 8 prompts x 8 samples x 64 new tokens (min_tokens = max_tokens, so every run decodes the same
number of tokens), T=1. The three engines are loaded at once and take turns generating, in --rounds rounds
(the order rotating; this shared machine drifts by 10-20% over minutes, so timing each precision minutes apart
measured the drift as much as the precision). Per precision: generation tokens/s (the median round), the in-place
reload of the whole model from its bf16 files (int8: re-quantized in the engine, what every weight sync does),
and the mean |log-prob difference| of the sampled tokens against transformers in fp32 (the trainer's reference
numerics). Also: how long quantizing every linear weight takes and how many bytes an int8 sync would move, the
measurement behind re-quantizing in the engine rather than on the trainer.

Part 2, `learn`: the demo's GRPO stage (configs/demo.yaml: from the demo's SFT model, same data, seeds, lr,
batch and steps) with a full-precision rollout (the demo's fp32 engine), with an int8 rollout without
correction, and with an int8 rollout under each correction in --corrections; every final model evaluated by
the same harness on the demo's held-out problems (128 x 8 at T=1, a full-precision engine). `parity` = held-out
accuracy of int8 + the first correction in --corrections minus the full-precision run's.

`--int8-lm-head` picks the int8 setting both parts report: the int8 runs of `learn` use `rollout.int8_lm_head=true`
and `gen_speedup` is int8 + int8 head over bf16 (without it: int8 with a bf16 head over bf16; the engine part
prints all three rows either way).

  .venv/bin/python bench/quantized_rollout.py [--part engine|learn|all] [--corrections token_tis,icepop]
                                              [--int8-lm-head] [--rounds 6]
Last line: `gen_speedup=X parity=Y` (goals X >= 1.3, Y >= -0.03).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPE = "tiny:qwen2:shape=qwen2.5-0.5b"


def _load_engine(mode: str):
    from rl.model_path import resolve_model_path
    from rl.rollout.vllm_engine import make_llm

    src = resolve_model_path(SHAPE)
    quant, head = ("int8", True) if mode == "int8_head" else (mode, False)
    return src, make_llm(src, dtype="bfloat16", in_process=True, enforce_eager=False, kv_cache_gb=1,
                         quantization=quant, int8_lm_head=head)


def serve_engine(mode: str, prompts: int, n: int, new_tokens: int, conn) -> None:
    """One precision's engine in its own process (one engine per process), driven over `conn` by
    `interleaved_rounds`: "gen" -> one timed generation of the bench's batch; "finish" -> the reloads, the
    log-prob difference, then exit."""
    import torch
    from vllm import SamplingParams

    from rl.rollout import vllm_engine as ve

    t0 = time.perf_counter()
    src, llm = _load_engine(mode)
    start_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(100, 5000, (48,), generator=g).tolist() for _ in range(prompts)]
    sp = SamplingParams(temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=0, n=n, seed=None)
    ve.generate(llm, ids, sp)                                   # warm-up (compile, first-call allocations)
    conn.send({"ready": True})
    samples = None
    while conn.recv() == "gen":
        t = time.perf_counter()
        samples = ve.generate(llm, ids, sp)
        conn.send({"gen_s": time.perf_counter() - t, "tokens": sum(len(s.token_ids) for g_ in samples for s in g_)})
    reload_s = {}
    for checked in (False, True):   # a plain sync step, and a checksum step (+ the quantizer's round-trip check)
        t = time.perf_counter()
        llm.collective_rpc("r1lab_load_from_dir", args=(src, checked))
        reload_s[checked] = time.perf_counter() - t
    after = ve.generate(llm, ids[:2], SamplingParams(temperature=0.0, max_tokens=8, logprobs=0))
    ve.shutdown(llm)
    conn.send({"mode": mode, "start_s": start_s, "reload_s": reload_s[False], "reload_checked_s": reload_s[True],
               "greedy_after_reload": [s.token_ids for g_ in after for s in g_],
               "logprob_diff": logprob_diff(src, ids, samples)})


def interleaved_rounds(a, modes: list[str]) -> dict:
    """Time each precision's generation in rounds, the engines taking turns (the order rotating every round), so
    that this shared 2-core machine's drift (10-20% over minutes) falls on every precision alike. Each engine runs
    in its own process, started one after another and all loaded before the first timed round. Returns per mode
    its per-round generation seconds, tokens, and the finishing numbers (`serve_engine`)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    try:
        for mode in modes:                  # one at a time: start-up compiles on both cores
            parent, child = ctx.Pipe()
            procs[mode] = ctx.Process(target=serve_engine, args=(mode, a.prompts, a.n, a.new_tokens, child))
            procs[mode].start()
            child.close()                   # a dead engine process then reads as EOF here
            conns[mode] = parent
            _recv(conns[mode], procs[mode], mode)
        rows = {m: {"gen_s_rounds": []} for m in modes}
        for r in range(a.rounds):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                time.sleep(0.5)             # the previous engine's threads are idle (OpenMP spin-waits end)
                conns[mode].send("gen")
                out = _recv(conns[mode], procs[mode], mode)
                rows[mode]["gen_s_rounds"].append(out["gen_s"])
                rows[mode]["tokens"] = out["tokens"]
            print(f"round {r + 1}: " + "  ".join(f"{m} {rows[m]['gen_s_rounds'][-1]:.2f}s" for m in modes), flush=True)
        for mode in modes:                  # one at a time: each loads a transformers fp32 model for |dlogp|
            conns[mode].send("finish")
            rows[mode].update(_recv(conns[mode], procs[mode], mode))
            procs[mode].join(timeout=120)
        return rows
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(timeout=10)


def _recv(conn, proc, mode: str, timeout: float = 900.0) -> dict:
    """The engine process's next message; an error naming the mode when it died or went silent."""
    deadline = time.monotonic() + timeout
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"the {mode} engine process exited (code {proc.exitcode}) before answering")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {mode} engine process did not answer within {timeout:.0f} s")
    try:
        return conn.recv()
    except EOFError:
        proc.join(timeout=10)
        raise RuntimeError(f"the {mode} engine process exited (code {proc.exitcode}) before answering") from None


def logprob_diff(src: str, prompts: list[list[int]], samples) -> float:
    """Mean |engine - transformers fp32| log-prob over the sampled tokens (T=1: plain log-softmax)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    diffs = []
    with torch.no_grad():
        for p, group in zip(prompts, samples):
            s = group[0]   # the first sample of each group
            ids = torch.tensor([p + s.token_ids])
            logp = model(ids).logits.float().log_softmax(-1)[0, len(p) - 1:-1]
            ref = logp.gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
            diffs.append((ref - torch.tensor(s.logprobs)).abs())
    return float(torch.cat(diffs).mean())


def quantize_cost() -> dict:
    """Seconds to quantize every linear weight of the 0.5B shape, and bf16 vs int8(+scales) bytes of a sync."""
    import torch
    from safetensors import safe_open

    from rl.model_path import resolve_model_path
    from rl.rollout.quantization import quantize_stream

    src = Path(resolve_model_path(SHAPE))
    tensors = []
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            tensors += [(n, sf.get_tensor(n).to(torch.bfloat16)) for n in sf.keys()]
    list(quantize_stream(tensors, check=False))   # warm-up: oneDNN compiles its kernel per shape (4.6 s once)
    t = time.perf_counter()
    out = list(quantize_stream(tensors, check=False))
    fast = time.perf_counter() - t
    t = time.perf_counter()
    list(quantize_stream(tensors, check=True))
    return {"quantize_s": fast, "quantize_checked_s": time.perf_counter() - t,
            "bf16_mb": sum(x.numel() * x.element_size() for _, x in tensors) / 2**20,
            "int8_mb": sum(x.numel() * x.element_size() for _, x in out) / 2**20}


ENGINE_MODES = {"none": "bf16", "int8": "int8", "int8_head": "int8+head"}


def int8_tag(a) -> str:
    return "int8h" if a.int8_lm_head else "int8"


def run_engine_part(a) -> dict:
    rows = interleaved_rounds(a, list(ENGINE_MODES))
    for r in rows.values():
        r["gen_s"] = statistics.median(r["gen_s_rounds"])
        r["tokens_per_s"] = r["tokens"] / r["gen_s"]
    rows["quantize"] = quantize_cost()
    print(f"\nengine at Qwen2.5-0.5B's shape, {a.prompts} prompts x {a.n} samples x {a.new_tokens} tokens, T=1, one vLLM "
          f"CPU engine per precision; {a.rounds} rounds, the engines taking turns; tokens/s at the median round")
    print(f"{'rollout':<10} {'tokens/s':>9} {'gen s':>7} {'reload s':>9} {'(checked)':>10} {'|dlogp| vs fp32':>16} "
          f"{'start s':>8}  gen s per round")
    for mode, name in ENGINE_MODES.items():
        r = rows[mode]
        print(f"{name:<10} {r['tokens_per_s']:>9.1f} {r['gen_s']:>7.2f} {r['reload_s']:>9.2f} "
              f"{r['reload_checked_s']:>10.2f} {r['logprob_diff']:>16.4f} {r['start_s']:>8.1f}  "
              + " ".join(f"{x:.2f}" for x in r["gen_s_rounds"]))
    q = rows["quantize"]
    print(f"quantizing every linear weight: {q['quantize_s']:.2f}s ({q['quantize_checked_s']:.2f}s with the "
          f"round-trip check); a sync moves {q['bf16_mb']:.0f} MB as bf16, "
          f"{q['int8_mb']:.0f} MB as int8 + scales")
    return rows


def round_speedups(rows: dict, mode: str) -> list[float]:
    """bf16's generation seconds over `mode`'s, round by round (both timed within the same round)."""
    return [b / q for b, q in zip(rows["none"]["gen_s_rounds"], rows[mode]["gen_s_rounds"])]


def run_learn_part(a) -> dict:
    """The demo's GRPO stage once per rollout setting; every result evaluated on the demo's held-out set."""
    from launch.pipeline import PipelineConfig, run_sft_stage
    from rl.config import load_config
    from rl.distill.config import DistillConfig
    from rl.distill.run import _eval_sampling, _heldout
    from rl.eval.harness import evaluate_models
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    cfg = load_config(PipelineConfig, "configs/demo.yaml", [])
    data = [f"data.source=synthetic:{cfg.task}", f"data.task_knobs={json.dumps(cfg.task_knobs)}"]
    sft = Path(cfg.output_dir) / "sft"
    if not (sft / "final" / "config.json").exists():
        run_sft_stage(cfg, data, sft)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = int8_tag(a)                      # int8h: the LM head int8 too (its own run directories)
    runs = [("full", "none", None), (tag, "int8", "none")] + [
        (f"{tag}+{c}", "int8", c) for c in a.corrections.split(",") if c]
    evals = [f"eval.{k}={v}" for k, v in vars(cfg.eval).items()] + ["eval.top_p=1.0", "eval.benchmark="]
    dcfg = cfg.distill.load(DistillConfig, data + evals + [f"teacher.path={sft / 'final'}", f"output_dir={out}"])
    heldout = _heldout(dcfg, out)
    rows = {}
    for name, quant, corr in runs:
        d = out / name.replace("+", "_")
        t0 = time.perf_counter()
        if not (d / "final" / "config.json").exists():
            extra = [f"rollout.quantization={quant}"] + ([f"algo.rollout_correction={corr}"] if corr else [])
            extra += ["rollout.int8_lm_head=true"] if quant == "int8" and a.int8_lm_head else []
            g = cfg.grpo.load(GRPOConfig, data + [f"model.path={sft / 'final'}", f"log.output_dir={d}",
                                                  "log.val_every=0", "log.progress=false", "checkpoint.every=0",
                                                  "resources.ray_address=local"] + extra)
            GRPODriver(g).run()
        last = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        lp = [r["rollout/logprob_diff"] for r in last if "rollout/logprob_diff" in r]
        res = evaluate_models({name: d / "final"}, heldout, _eval_sampling(dcfg), d)[name]
        rows[name] = {"accuracy": res["metrics"]["pass@1"], "train_s": time.perf_counter() - t0,
                      "logprob_diff": sum(lp) / max(1, len(lp)),
                      "reward_last5": sum(r["rollout/reward_mean"] for r in last[-5:]) / 5,
                      "gen_s": sum(r["perf/gen_s"] for r in last)}
    print(f"\nthe demo's GRPO stage ({cfg.grpo.overrides}), held-out {heldout}: 128 x 8 at T=1; int8 runs with the "
          f"LM head {'int8' if a.int8_lm_head else 'bf16'}")
    print(f"{'rollout':<16} {'held-out acc':>12} {'mean |dlogp|':>13} {'reward last 5':>14} {'gen s total':>12}")
    for name, r in rows.items():
        print(f"{name:<16} {r['accuracy']:>12.3f} {r['logprob_diff']:>13.4f} {r['reward_last5']:>14.3f} "
              f"{r['gen_s']:>12.1f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["engine", "learn", "all"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (a GRPO group)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--corrections", default="token_tis,icepop",
                    help="int8 runs with these algo.rollout_correction modes; the first one gives parity=")
    ap.add_argument("--int8-lm-head", action="store_true",
                    help="the int8 setting reported (learn runs, gen_speedup): with the LM head int8 too")
    ap.add_argument("--out-dir", default="runs/bench_quantized", help="the learn part's runs (reused when present)")
    ap.add_argument("--rounds", type=int, default=6,
                    help="timed generations per precision, the engines taking turns (a multiple of 3 balances the order)")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {a.rounds}")
    os.environ.setdefault("R1LAB_CACHE_DIR", str(ROOT / ".cache" / "r1lab"))
    os.chdir(ROOT)
    speedup = parity = float("nan")
    if a.part in ("engine", "all"):
        e = run_engine_part(a)
        for mode in ("int8", "int8_head"):
            ratios = round_speedups(e, mode)
            print(f"{ENGINE_MODES[mode]} over bf16 per round: " + " ".join(f"{x:.2f}" for x in ratios)
                  + f" (median {statistics.median(ratios):.2f})")
        speedup = statistics.median(round_speedups(e, "int8_head" if a.int8_lm_head else "int8"))
    if a.part in ("learn", "all"):
        rows = run_learn_part(a)
        tag = int8_tag(a)
        first = next((n for n in rows if n.startswith(tag + "+")), tag)
        parity = rows[first]["accuracy"] - rows["full"]["accuracy"]
    print(f"gen_speedup={speedup:.2f} parity={parity:+.3f}")


if __name__ == "__main__":
    main()
