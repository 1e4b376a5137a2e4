"""The distillation stage: teacher traces -> rejection sampling -> student SFT -> teacher vs student evaluation.

  1. check every input before any work: the teacher and student model paths, the prompt rows' fields, the
     reward names, the student's SFT config;
  2. the teacher (any HF causal LM, through vLLM) samples `sampling.n` traces per prompt with R1's settings;
  3. rejection sampling (`rl.distill.traces.select_traces`) keeps verified, well-formed, finished, deduplicated
     traces within the length cap; `traces.jsonl` keeps every candidate with its verdict (for audit),
     `dataset.jsonl` the kept rows with provenance, `dataset_summary.json` the acceptance rate;
  4. the student (any architecture: a Llama student of a Qwen2 teacher is the default demo) is trained by the
     SFT stage (`rl.sft.train.run_sft`, TRL SFTTrainer) on `dataset.jsonl`;
  5. teacher and student are evaluated with the eval harness on the same held-out problems.

Differences from R1: no LLM judge for open-ended data and no language-consistency filter; the student is
trained on the traces only (R1 adds 200k non-reasoning samples).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rl.config import ConfigError, check_model_path, to_dict
from rl.distill.config import DistillConfig
from rl.distill.traces import dataset_rows, generate_traces, score_traces, select_traces, write_jsonl_atomic
from rl.grpo.prompts import load_train_rows
from rl.model_card import CardInfo, add_results, eval_result
from rl.sft.config import SFTStageConfig


@dataclass
class Inputs:
    teacher: str                       # resolved teacher path
    rows: list[dict[str, Any]]         # prompts for the teacher
    heldout: str | None                # benchmark name or JSONL path for evaluation (None: skipped)
    student_cfg: SFTStageConfig
    student_spec: str                  # the student's model.path as configured (e.g. tiny:llama:hidden_size=96)


def _heldout(cfg: DistillConfig, out: Path) -> str | None:
    e = cfg.eval
    if e.problems == 0:
        return None
    if e.benchmark:
        from data.benchmarks import load_benchmark

        load_benchmark(e.benchmark)  # fails now, naming it, rather than after training
        return e.benchmark
    from data.tasks import make_synthetic, write_problems_jsonl

    dc = cfg.data
    rows = make_synthetic(dc.source.split(":", 1)[1], e.problems, split="test", seed=0, knobs=dc.task_knobs)
    return write_problems_jsonl(rows, out / "heldout.jsonl")


def check_inputs(cfg: DistillConfig, out: Path) -> Inputs:
    """Everything that can be wrong with the input, checked before the teacher generates a token."""
    teacher = check_model_path(cfg.teacher.path, "teacher.path")
    # the same prompt rows GRPO trains on (the held-out split is made by _heldout, for eval.problems)
    rows = load_train_rows(replace(cfg.data, num_eval=0))[0][: cfg.data.num_train]
    if not rows:
        raise ConfigError(f"data.source={cfg.data.source}: no prompts")
    student_cfg = cfg.student.load(SFTStageConfig, [
        f"data.source={out / 'dataset.jsonl'}", "data.completion_field=completion", "data.field_map={}",
        f"output_dir={out / 'student'}", f"log.report_to={json.dumps(list(cfg.log.report_to))}",
        f"log.project={cfg.log.project}", "log.push_to_hub="])  # the stage uploads the student: its card is final
    spec = student_cfg.model.path
    student_cfg.model.path = check_model_path(spec, "student model.path")
    return Inputs(teacher, rows, _heldout(cfg, out), student_cfg, spec)


def _eval_sampling(cfg: DistillConfig):
    from rl.eval.harness import Sampling

    e = cfg.eval
    return Sampling(temperature=e.temperature, top_p=e.top_p, n=e.samples, max_tokens=e.max_tokens,
                    template=cfg.data.template, force_think=cfg.data.force_think)


def make_traces(cfg: DistillConfig, inp: Inputs, out: Path, llm: Any) -> dict[str, Any]:
    """Steps 2-3: generate, score, select; write traces.jsonl, dataset.jsonl, dataset_summary.json."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(inp.teacher)
    t0 = time.time()
    cands = generate_traces(llm, tok, inp.rows, cfg.sampling, template=cfg.data.template,
                            force_think=cfg.data.force_think)
    gen_s = time.time() - t0
    scores, score_metrics = score_traces(cands, cfg.filter, cfg.sampling.max_tokens)
    cap = cfg.filter.max_tokens or cfg.sampling.max_tokens
    kept, reasons, stats = select_traces(cands, scores, cfg.filter, cap)
    provenance = {"teacher": cfg.teacher.path, "teacher_resolved": inp.teacher,
                  "sampling": to_dict(cfg.sampling), "template": cfg.data.template,
                  "filter": to_dict(cfg.filter)}
    write_jsonl_atomic([{"prompt_index": c["prompt_index"], "sample": c["sample"], "problem": c["row"]["problem"],
                         "answer": c["row"]["answer"], "completion": c["completion"], "num_tokens": c["num_tokens"],
                         "finish_reason": c["finish_reason"], "kept": reasons[j] is None, "reject_reason": reasons[j],
                         "rewards": {n: float(v[j]) for n, v in scores.items()}}
                        for j, c in enumerate(cands)], out / "traces.jsonl")
    if not kept:
        raise RuntimeError(f"rejection sampling kept 0 of {len(cands)} traces (rejected: {stats['rejected']}); "
                           f"see {out / 'traces.jsonl'}. The teacher cannot solve these prompts under the filter "
                           "(filter.min_scores, filter.max_tokens), so there is nothing to distill.")
    write_jsonl_atomic(dataset_rows(cands, kept, scores, provenance), out / "dataset.jsonl")
    summary = {**stats, "scoring": {k: v for k, v in score_metrics.items() if k.startswith("reward/")},
               "generation_s": round(gen_s, 2),
               "tokens_per_s": round(sum(c["num_tokens"] for c in cands) / max(gen_s, 1e-9), 1),
               "provenance": provenance, "dataset": str(out / "dataset.jsonl")}
    (out / "dataset_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"kept {stats['kept']}/{stats['candidates']} traces (acceptance {stats['acceptance_rate']:.3f}); "
          f"rejected {stats['rejected']}", flush=True)
    return summary


def run_distill(cfg: DistillConfig, also_evaluate: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the stage; returns (and writes to summary.json) the dataset summary and the evaluations.

    also_evaluate: more checkpoints of the teacher's architecture to evaluate on the same held-out set while
    the teacher's engine is up (the demo passes the SFT model)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    inp = check_inputs(cfg, out)  # before vLLM and TRL are imported
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    from rl.tracking import Trackers

    trackers = Trackers(cfg.log.report_to, out, to_dict(cfg), project=cfg.log.project, run_name=cfg.log.run_name)
    try:
        summary = _run(cfg, inp, out, also_evaluate)
        ds = summary["dataset"]
        trackers.log(0, {"distill/acceptance_rate": ds["acceptance_rate"], "distill/kept": ds["kept"],
                         "distill/candidates": ds["candidates"],
                         **{f"eval/{k}/pass@1": v for k, v in summary["accuracy"].items()}})
        trackers.summary(summary)
    finally:
        trackers.close()
    if cfg.log.push_to_hub:
        from rl.model_card import push_to_hub

        summary["student"]["hub_url"] = push_to_hub(summary["student"]["path"], cfg.log.push_to_hub)
        print(f"uploaded {summary['student']['path']} to {summary['student']['hub_url']}", flush=True)
    return summary


def student_card(cfg: DistillConfig, inp: Inputs, data_summary: dict[str, Any]) -> CardInfo:
    """The distilled student's model card: the teacher, the rejection sampling and the kept share."""
    f = cfg.filter
    rules = ", ".join(f"{n} >= {m:g}" for n, m in zip(f.rewards, f.min_scores))
    return CardInfo(stage="distillation", started_from=inp.student_spec, datasets=[cfg.data.source],
                    config={"distillation": to_dict(cfg), "student_sft": to_dict(inp.student_cfg)},
                    details={"teacher": f"`{cfg.teacher.path}`",
                             "traces": f"{cfg.sampling.n} per prompt at T={cfg.sampling.temperature:g}; kept "
                                       f"{data_summary['kept']}/{data_summary['candidates']} (acceptance "
                                       f"{data_summary['acceptance_rate']:.3f}) by rejection sampling: {rules}",
                             "training data": f"`{data_summary['dataset']}` (every row with its provenance)"},
                    name=f"{Path(cfg.output_dir).name}-student")


def heldout_name(cfg: DistillConfig) -> str:
    return cfg.eval.benchmark or f"{cfg.data.source} (held-out)"


def _run(cfg: DistillConfig, inp: Inputs, out: Path, also_evaluate: dict[str, str] | None) -> dict[str, Any]:
    from rl.eval.harness import evaluate_models
    from rl.rollout.vllm_engine import make_llm, shutdown
    from rl.sft.train import run_sft

    t0 = time.time()
    llm = make_llm(inp.teacher, dtype=cfg.teacher.dtype, seed=cfg.sampling.seed,
                   max_model_len=cfg.teacher.max_model_len, tensor_parallel_size=cfg.teacher.tensor_parallel_size,
                   enforce_eager=cfg.teacher.enforce_eager, in_process=True)  # one engine at a time
    evals: dict[str, Any] = {}
    try:
        data_summary = make_traces(cfg, inp, out, llm)
        if inp.heldout:
            models = {"teacher": inp.teacher, **(also_evaluate or {})}
            evals.update(evaluate_models(models, inp.heldout, _eval_sampling(cfg), out, llm=llm,
                                         llm_model=inp.teacher, max_model_len=cfg.teacher.max_model_len))
    finally:
        shutdown(llm)
    sft_summary = run_sft(inp.student_cfg, card=student_card(cfg, inp, data_summary), push=False)
    student = sft_summary["final"]
    if inp.heldout:
        evals.update(evaluate_models({"student": student}, inp.heldout, _eval_sampling(cfg), out,
                                     max_model_len=cfg.teacher.max_model_len,
                                     enforce_eager=cfg.eval.enforce_eager))
        add_results(student, [eval_result(evals["student"], heldout_name(cfg))])
    acc = {name: r["metrics"]["pass@1"] for name, r in evals.items()}
    summary = {"dataset": data_summary, "student": {"path": student, "model": inp.student_spec,
                                                    "model_resolved": inp.student_cfg.model.path,
                                                    "first_loss": sft_summary["first_loss"],
                                                    "last_loss": sft_summary["last_loss"]},
               "accuracy": acc, "heldout": inp.heldout,
               "student_over_teacher": (acc["student"] / acc["teacher"]) if acc.get("teacher") else None,
               "wall_s": round(time.time() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
