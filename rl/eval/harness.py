"""The evaluation harness: R1 sampling through vLLM (or completions made elsewhere), graded by the same grader
the rewards use, reported with pass@k, maj@k and 95% intervals.

Three outcomes per sample: correct, wrong, and failed (the grader timed out or crashed, the gold answer does
not parse, the code sandbox was unavailable). Failed samples are reported apart from wrong ones and counted as
not correct in every metric (conservative); `failed_frac` and a warning in the summary say how many there were.

Outputs: `results.json` ({benchmark, num_problems, samples_per_problem, metrics, failed, failed_examples,
sampling, model, breakdown, grader}) and a per-sample JSONL (index, sample, extracted answer, status
"correct" | "wrong" | "failed", reason (failed only), correct, completion).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data.benchmarks import Benchmark, load_benchmark
from data.loading import DataError, read_jsonl
from rewards.countdown import check_completion
from rewards.extract import final_answers
from rewards.math import (CORRECT, EVAL_POLICY, FAILED, GRADER_STATS, WRONG, grade_answers, grade_batch,
                          graded_text)
from rewards.outcome import is_failed
from rl.eval.metrics import aggregate
from rl.rollout.tools import ToolSpec, strip_outputs

MAX_FAILED_EXAMPLES = 5


@dataclass
class Sampling:
    """R1 evaluation defaults (DeepSeek-R1 paper, section 3): T=0.6, top-p=0.95, several samples."""
    temperature: float = 0.6
    top_p: float = 0.95
    n: int | None = None            # None: the benchmark's default (4 for MATH500, 16 for AIME)
    max_tokens: int = 32768
    seed: int = 0
    template: str = "chat"          # chat | r1_zero | plain (see data.prompts.build_prompt)
    force_think: bool = False
    tools: str = ""                 # "" or "python": multi-turn sampling with sandboxed calls (rl.rollout.tools)
    tool: ToolSpec = field(default_factory=ToolSpec)   # limits of those calls


def read_completions(path: str | Path, problems: list[dict[str, Any]]) -> dict[int, list[str]]:
    """`{"index": i, "completion": "..."}` rows -> {index: [completions]}. Errors name the line."""
    valid = {p["index"] for p in problems}
    out: dict[int, list[str]] = defaultdict(list)
    rows, lines = read_jsonl(path)
    for row, lineno in zip(rows, lines):
        for key in ("index", "completion"):
            if key not in row:
                raise DataError(f"{path}: line {lineno}: missing field {key!r}")
        idx = row["index"]
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise DataError(f"{path}: line {lineno}: 'index' must be an integer, got {idx!r}")
        if idx not in valid:
            raise DataError(f"{path}: line {lineno}: index {idx} is not a problem of this benchmark "
                            f"(valid: {min(valid)}..{max(valid)}, {len(valid)} problems)")
        if not isinstance(row["completion"], str):
            raise DataError(f"{path}: line {lineno}: 'completion' must be a string")
        out[idx].append(row["completion"])
    if not out:
        raise DataError(f"{path}: no completions")
    return dict(out)


def generate_completions(model: str | None, problems: list[dict[str, Any]], sampling: Sampling, n: int,
                         llm: Any = None, tool_samples: dict | None = None,
                         enforce_eager: bool = False) -> dict[int, list[str]]:
    """Sample n completions per problem with vLLM: with the engine passed in (e.g. GRPO's rollout engine), or
    with one started for `model` (in this process on CPU, eager when `enforce_eager`: make_llm) and shut down.

    With `sampling.tools` the completions are multi-turn transcripts (tool outputs inserted); the sample dicts
    of rl.rollout.tools.as_sample are put in `tool_samples` ({index: [sample]}) when it is given."""
    from rl.rollout.vllm_engine import make_llm, shutdown

    if llm is not None:
        return _generate(llm, model, problems, sampling, n, tool_samples)
    if model is None:
        raise ValueError("generate_completions needs a model path or an engine")
    own = make_llm(model, max_model_len=_context_len(model, sampling.max_tokens + 2048), seed=sampling.seed,
                   enforce_eager=enforce_eager, in_process=True)
    try:
        return _generate(own, model, problems, sampling, n, tool_samples)
    finally:
        shutdown(own)


def _generate(llm, model: str | None, problems: list[dict[str, Any]], sampling: Sampling, n: int,
              tool_samples: dict | None) -> dict[int, list[str]]:
    from transformers import AutoTokenizer

    from data.prompts import build_prompt
    from rl.rollout.vllm_engine import generate, sampling_params

    tok = AutoTokenizer.from_pretrained(model) if model else llm.get_tokenizer()
    template = sampling.template if (sampling.template != "chat" or tok.chat_template) else "r1_zero"
    prompts = [build_prompt(p["problem"], tok, template=template, force_think=sampling.force_think) for p in problems]
    params = sampling_params(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                             max_tokens=sampling.max_tokens, seed=sampling.seed, logprobs=bool(sampling.tools))
    prefix = "<think>\n" if sampling.force_think else ""  # the forced tag is part of the answer's text
    if sampling.tools:
        return _tool_completions(llm, tok, problems, prompts, params, sampling, prefix, tool_samples)
    outs = generate(llm, prompts, params, use_tqdm=True)
    return {p["index"]: [prefix + s.text for s in samples] for p, samples in zip(problems, outs)}


def _context_len(model: str, want: int) -> int:
    """`want` tokens of context, or the model's own maximum when that is smaller (tiny models: 2,048)."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    return min(want, int(limit)) if limit else want


def _tool_completions(llm, tok, problems, prompts, params, sampling: Sampling, prefix: str,
                      tool_samples: dict | None) -> dict[int, list[str]]:
    from rl.rollout.tools import as_sample, generate_with_tools

    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    out: dict[int, list[str]] = {}
    for i, trajs in tqdm(generate_with_tools(llm, ids, params, sampling.tool, tok), total=len(ids),
                         desc="tool rollouts"):
        samples = [as_sample(t, tok) for t in trajs]
        out[problems[i]["index"]] = [prefix + s["text"] for s in samples]
        if tool_samples is not None:
            tool_samples[problems[i]["index"]] = samples
    return {p["index"]: out[p["index"]] for p in problems}


def _equivalent(a: str, b: str, timeout_s: float) -> bool:
    """Two extracted answers the same value? (maj@k clustering; a comparison that fails counts as different)"""
    (v,) = grade_answers([((a,), b)], timeout_s=timeout_s)
    return v.correct


def _math_outcomes(comps: list[str], samples: list[Mapping[str, Any]], timeout_s: float) -> list[tuple]:
    """(answer, status, reason) per completion: the math grader, or the countdown checker for countdown rows."""
    graded = [j for j, s in enumerate(samples) if s.get("task") != "countdown"]
    verdicts = dict(zip(graded, grade_batch([comps[j] for j in graded], [samples[j]["answer"] for j in graded],
                                            policy=EVAL_POLICY, timeout_s=timeout_s)))
    out = []
    for j, (c, s) in enumerate(zip(comps, samples)):
        answer = graded_text(final_answers(c, EVAL_POLICY), s.get("answer", ""))  # what the policy grades
        if j in verdicts:
            out.append((answer, verdicts[j].status, verdicts[j].reason))
        else:  # countdown: the expression is evaluated, not compared
            out.append((answer, CORRECT if check_completion(c, s) else WRONG, None))
    return out


def _code_outcomes(comps: list[str], samples: list[Mapping[str, Any]]) -> list[tuple]:
    """(program, status, reason) per completion; a `Failed` entry (e.g. sandbox outage) is a failed sample."""
    from rewards.code import code_reward_batch, extract_program

    rewards = list(code_reward_batch(comps, samples, all_or_nothing=True))
    if len(rewards) != len(comps):
        raise RuntimeError(f"code_reward_batch returned {len(rewards)} rewards for {len(comps)} completions")
    return [(extract_program(c), FAILED, r.reason) if is_failed(r) else
            (extract_program(c), CORRECT if r == 1.0 else WRONG, None) for c, r in zip(comps, rewards)]


def _apply_tool_outcomes(records: list[dict[str, Any]], tool_samples: dict[int, list[dict]]) -> dict[str, float]:
    """Tool-call statistics of an evaluation with tools; a sample whose call met a sandbox outage is failed
    (not wrong). Metrics: rl.rollout.tools.tool_metrics, plus the pass@1 of samples that used a tool."""
    from rl.rollout.tools import tool_metrics

    used, used_ok = 0, 0
    for r in records:
        t = tool_samples[r["index"]][r["sample"]]["tool"]
        r["tool_calls"], r["tool_outcomes"] = t["calls"], t["outcomes"]
        if t["outage"]:
            r.update(status=FAILED, correct=False, reason=f"tool call: {t['outage']}")
        used += t["calls"] > 0
        used_ok += t["calls"] > 0 and r["correct"]
    out = tool_metrics([s for ss in tool_samples.values() for s in ss], prefix="")
    out["pass@1_when_used"] = used_ok / used if used else 0.0
    return out


def grade(spec: Benchmark, problems: list[dict[str, Any]], completions: Mapping[int, list[str]],
          timeout_s: float = 5.0, policy_text: bool = False) -> list[dict[str, Any]]:
    """One record per sample: index, sample, answer (extracted), status, reason (failed only), correct.
    policy_text: grade the policy's own text (tool transcripts: inserted output blocks removed)."""
    by_index = {p["index"]: p for p in problems}
    flat = [(i, k, c) for i, cs in completions.items() for k, c in enumerate(cs)]
    records = []
    chunk = 256
    for start in tqdm(range(0, len(flat), chunk), desc=f"grading {spec.name}", unit="chunk"):
        part = flat[start:start + chunk]
        comps = [strip_outputs(c) if policy_text else c for _, _, c in part]
        samples = [by_index[i] for i, _, _ in part]
        outcomes = (_code_outcomes(comps, samples) if spec.kind == "code"
                    else _math_outcomes(comps, samples, timeout_s))
        for (i, k, c), (answer, status, reason) in zip(part, outcomes):
            rec = {"index": i, "sample": k, "answer": answer, "status": status, "correct": status == CORRECT}
            if status == FAILED:
                rec["reason"] = reason
            records.append({**rec, "completion": c})
    return records


def summarize(spec: Benchmark, problems: list[dict[str, Any]], records: list[dict[str, Any]],
              timeout_s: float = 5.0) -> tuple[dict[str, float], dict[str, Any]]:
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["index"]].append(r)
    order = [p["index"] for p in problems if p["index"] in groups]
    verdicts = [[r["status"] == CORRECT for r in groups[i]] for i in order]  # failed counts as not correct
    failed = [[r["status"] == FAILED for r in groups[i]] for i in order]
    answers = [[r["answer"] for r in groups[i]] for i in order] if spec.kind == "math" else None
    metrics = aggregate(verdicts, answers, (lambda a, b: _equivalent(a, b, timeout_s)) if answers else None,
                        failed=failed)
    breakdown: dict[str, Any] = {}
    by_index = {p["index"]: p for p in problems}
    for key in ("level", "subject"):
        if key in spec.meta:
            buckets: dict[str, list[float]] = defaultdict(list)
            for i, v in zip(order, verdicts):
                buckets[str(by_index[i][key])].append(sum(v) / len(v))
            breakdown[f"by_{key}"] = {b: {"pass@1": sum(x) / len(x), "num_problems": len(x)}
                                      for b, x in sorted(buckets.items())}
    return metrics, breakdown


def evaluate(benchmark: str, *, model: str | None = None, completions_file: str | None = None,
             sampling: Sampling | None = None, output: str | Path | None = None, samples_output: str | Path | None = None,
             limit: int | None = None, llm: Any = None, timeout_s: float = 5.0, quiet: bool = False,
             enforce_eager: bool = False) -> dict[str, Any]:
    """Run one benchmark end to end; returns the results dict (also written to `output` when given).
    enforce_eager: of the engine started for `model` (see generate_completions)."""
    t0 = time.time()
    sampling = sampling or Sampling()
    spec, problems = load_benchmark(benchmark)
    if limit is not None:
        problems = problems[:limit]
    if (model is None and llm is None) == (completions_file is None):
        raise ValueError("give exactly one of a model (or engine) and a completions file")
    stats_before = dict(GRADER_STATS)
    tool_samples: dict[int, list[dict]] = {}
    if completions_file is not None:
        completions = read_completions(completions_file, problems)
        problems = [p for p in problems if p["index"] in completions]
        n_per = sorted({len(v) for v in completions.values()})
        samples_per_problem: Any = n_per[0] if len(n_per) == 1 else n_per
    else:
        n = sampling.n or spec.samples
        completions = generate_completions(model, problems, sampling, n, llm=llm, tool_samples=tool_samples,
                                           enforce_eager=enforce_eager)
        samples_per_problem = n
    records = grade(spec, problems, completions, timeout_s, policy_text=bool(tool_samples))
    tools = _apply_tool_outcomes(records, tool_samples) if tool_samples else None
    metrics, breakdown = summarize(spec, problems, records, timeout_s)
    failed = [r for r in records if r["status"] == FAILED]
    results = {
        "benchmark": spec.name, "num_problems": len(problems), "samples_per_problem": samples_per_problem,
        "metrics": metrics, "num_samples": len(records), "failed": len(failed),
        "failed_examples": [{k: r[k] for k in ("index", "sample", "reason")} for r in failed[:MAX_FAILED_EXAMPLES]],
        "sampling": asdict(sampling) if completions_file is None else None,
        "model": model if completions_file is None else None, "completions_file": completions_file,
        "breakdown": breakdown,
        "grader": {k: GRADER_STATS[k] - stats_before.get(k, 0) for k in ("timeouts", "errors", "slow_path", "failed")},
        "tools": tools,
        "wall_s": round(time.time() - t0, 2),
    }
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        per = Path(samples_output) if samples_output else out.with_name(out.stem + ".samples.jsonl")
        with open(per, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    if not quiet:
        print(summary_table(results))
    return results


def summary_table(results: dict[str, Any]) -> str:
    m = results["metrics"]
    lines = [f"{results['benchmark']}: {results['num_problems']} problems x {results['samples_per_problem']} samples",
             f"{'metric':<10} {'value':>8}   95% CI"]
    for key, v in m.items():
        if key.endswith(("_low", "_high")):
            continue
        lo, hi = m.get(f"{key}_ci95_low"), m.get(f"{key}_ci95_high")
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        lines.append(f"{key:<10} {v:>8.4f}   {ci}")
    for name, table in results.get("breakdown", {}).items():
        lines.append(f"-- {name}")
        lines += [f"   {b:<28} {row['pass@1']:.3f}  (n={row['num_problems']})" for b, row in table.items()]
    if results.get("tools"):
        t = results["tools"]
        lines.append(f"tools      {t['calls_per_sample']:.2f} calls/sample, used by {t['used_frac']:.1%} of samples, "
                     f"errors {t['error_frac']:.1%}, timeouts {t['timeout_frac']:.1%} of calls; pass@1 when used "
                     f"{t['pass@1_when_used']:.3f}")
    n_failed, n_samples = results.get("failed", 0), results.get("num_samples", 0)
    lines.append(f"{'failed':<10} {n_failed:>8}   of {n_samples} samples (not gradable; counted as not correct)")
    if n_failed:
        first = (results.get("failed_examples") or [{}])[0]
        lines.append(f"WARNING: {n_failed} samples could not be graded and count as not correct above (the metrics "
                     f"may be underestimated); first: problem {first.get('index')} sample {first.get('sample')}: "
                     f"{first.get('reason')}")
    return "\n".join(lines)


def _engine_signature(path: str | Path) -> tuple:
    """What must match for one vLLM engine to serve another checkpoint through `reload_weights`: the
    architecture's shapes and the tokenizer's meaning (vocabulary, special tokens, chat template), not the
    bytes of tokenizer.json, which every library re-serialises a little differently."""
    import hashlib

    from transformers import AutoTokenizer

    p = Path(path)
    cfg = json.loads((p / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    tok = AutoTokenizer.from_pretrained(str(p))
    meaning = json.dumps([sorted(tok.get_vocab().items()), tok.eos_token, tok.pad_token, tok.bos_token,
                          getattr(tok, "chat_template", None)])
    return tuple(cfg.get(k) for k in keys) + (hashlib.sha256(meaning.encode()).hexdigest(),)


def evaluate_models(models: Mapping[str, str | Path], benchmark: str, sampling: Sampling,
                    out_dir: str | Path, *, llm: Any = None, llm_model: str | Path | None = None,
                    max_model_len: int = 2048, quiet: bool = True,
                    enforce_eager: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate several checkpoints on one benchmark, reusing an engine across same-architecture models.

    `llm` (serving `llm_model`) may be passed in to save an engine start; models it can serve are loaded into
    it with `reload_weights` (so it ends up holding the last of them). Other architectures get their own
    engine, shut down afterwards: in this process on CPU unless `llm` is given (vLLM runs one in-process engine
    at a time), eager when `enforce_eager`. Writes eval_<name>.json (+ per-sample JSONL) under out_dir."""
    from rl.rollout.vllm_engine import make_llm, reload_weights, shutdown

    out = Path(out_dir)
    sig = _engine_signature(llm_model) if llm is not None and llm_model is not None else None
    engine, own = (llm, None) if sig is not None else (None, None)
    results = {}
    try:
        for name, path in models.items():
            want = _engine_signature(path)
            if engine is None or want != sig:
                if own is not None:
                    shutdown(own)
                own = engine = make_llm(str(path), max_model_len=max_model_len, seed=sampling.seed,
                                        enforce_eager=enforce_eager, in_process=llm is None)
                sig = want
            else:
                reload_weights(engine, str(path))
            results[name] = evaluate(benchmark, llm=engine, sampling=sampling, quiet=quiet,
                                     output=out / f"eval_{name}.json")
    finally:
        if own is not None:
            shutdown(own)
    return results
