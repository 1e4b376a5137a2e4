"""Evaluate a model (vLLM, R1 sampling) or a file of completions on a benchmark.

  python launch/eval.py --benchmark math500 --model PATH --output runs/eval/math500.json
  python launch/eval.py --benchmark aime24 --completions my_samples.jsonl --output results.json
  python launch/eval.py --benchmark math500 --model PATH --tools python --output runs/eval/math500_tir.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from data.benchmarks import BENCHMARKS
    from rl.eval.harness import Sampling, evaluate
    from rl.rollout.tools import ToolSpec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", required=True, help=f"one of {sorted(BENCHMARKS)} or a JSONL path")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model path or hub id (generation through vLLM)")
    src.add_argument("--completions", help='JSONL of {"index": i, "completion": "..."} rows')
    ap.add_argument("--output", required=True, help="results.json path (per-sample JSONL written beside it)")
    ap.add_argument("--samples-output", help="per-sample JSONL path (default: <output>.samples.jsonl)")
    ap.add_argument("--n", type=int, help="samples per problem (default: 4 for MATH500, 16 for AIME, ...)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", default="chat", choices=["chat", "r1_zero", "plain"])
    ap.add_argument("--force-think", action="store_true", help="start every answer with '<think>\\n'")
    ap.add_argument("--tools", default="", choices=["", "python"],
                    help="let the model call a tool: python = fenced ```python blocks run in the sandbox, their "
                         "output inserted, the model continues (rl.rollout.tools)")
    ap.add_argument("--max-tool-calls", type=int, default=2, help="tool calls per sample (with --tools)")
    ap.add_argument("--tool-timeout", type=float, default=5.0, help="seconds per tool call (with --tools)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="start vLLM without torch.compile / CUDA graphs (faster start, slower decode on GPU)")
    ap.add_argument("--limit", type=int, help="only the first N problems")
    ap.add_argument("--timeout", type=float, default=5.0, help="grader timeout per answer, seconds")
    args = ap.parse_args(argv)
    if args.tools and args.completions:
        ap.error("--tools needs --model: a completions file was generated elsewhere, its tool calls already ran")
    if args.max_tool_calls < 1 or args.tool_timeout <= 0:
        ap.error("--max-tool-calls must be >= 1 and --tool-timeout > 0")
    model = args.model
    if model is not None:
        from rl.model_path import preflight

        if isinstance(rc := preflight([(model, "--model")]), int):  # before vLLM starts
            return rc
        model = rc["--model"]
    sampling = Sampling(args.temperature, args.top_p, args.n, args.max_tokens, args.seed, args.template,
                        args.force_think, tools=args.tools,
                        tool=ToolSpec(max_calls=args.max_tool_calls, timeout_s=args.tool_timeout))
    evaluate(args.benchmark, model=model, completions_file=args.completions, sampling=sampling,
             output=args.output, samples_output=args.samples_output, limit=args.limit, timeout_s=args.timeout,
             enforce_eager=args.enforce_eager)
    return 0


if __name__ == "__main__":
    sys.exit(main())
