"""Multi-turn tool rollouts: the policy writes a fenced Python block, the sandbox runs it, the output goes back
into the context, and the policy continues (tool-integrated reasoning, the ToRL / ReTool recipe).

Protocol (the text the policy sees and writes):

    ```python
    print(123 * 456)
    ```                      <- generation stops at this closing fence (stop string CLOSE_FENCE)
    ```output
    56088
    ```                      <- inserted by the rollout, never sampled
    ... the policy continues, e.g. </think> \\boxed{56088}

Token-in, token-out: a trajectory's response is the concatenation of the token ids the engine sampled and the
token ids of the inserted output blocks (each block tokenized on its own). Nothing is re-tokenized, so the
trainer sees exactly the ids the engine conditioned on. Inserted ids carry `loss_mask` 0 (out of the loss and
of the trainer-vs-engine log-prob check) and log-prob 0.0.

A trajectory ends at EOS (or any stop that is not the fence), at the token budget (`max_tokens` counts sampled
and inserted tokens: finish_reason "length"), or after `max_calls` tool calls (the next turn is generated
without the fence stop, so the policy must answer). Tool calls run on a thread pool against the sandbox while
the engine keeps generating the other trajectories: many samples' calls run at once, overlapped with decoding.

Tool outcomes: "ok"; "error" (non-zero exit: the traceback goes back to the policy, syntax errors included);
"timeout", "memory", "output_limit" (the call is stopped and the context says so); "outage" (the sandbox
itself failed, `ExecResult.infra_error`): the trajectory stops and the sample is a *failed* item (see
rewards/outcome.py), never a reward of 0.

Differences from the papers: one tool (Python in r1lab's sandbox, no state kept between calls of a
trajectory), answers are graded on the policy's own text (`strip_outputs`: a boxed answer printed by the
program does not count).
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

OPEN_FENCE = "```python\n"
CLOSE_FENCE = "\n```\n"
OUTPUT_OPEN, OUTPUT_CLOSE = "```output\n", "\n```\n"
_OUTPUT_BLOCK = re.compile(r"```output\n.*?\n```\n?", re.S)
_IDS = itertools.count()


@dataclass(frozen=True)
class ToolSpec:
    """How tool calls run (from rollout.* / the eval harness's Sampling)."""
    max_calls: int = 2
    timeout_s: float = 5.0
    memory_mb: int = 256
    max_output_chars: int = 256
    concurrency: int = 0         # tool calls in flight at once (0 = the sandbox's slots)


@dataclass
class Trajectory:
    """One sample: the prompt and everything after it (sampled and inserted ids), with per-token masks."""
    prompt: int                  # index of its prompt
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    calls: int = 0
    outcomes: list[str] = field(default_factory=list)   # per call: ok/error/timeout/memory/output_limit/outage
    turns: int = 0
    finish_reason: str | None = None
    outage: str | None = None    # the sandbox failed (not the program): the sample is a failed item

    def add(self, ids: list[int], logprobs: list[float] | None, sampled: bool) -> None:
        self.token_ids += ids
        self.logprobs += list(logprobs) if logprobs else [0.0] * len(ids)
        self.loss_mask += [1 if sampled else 0] * len(ids)


def extract_call(turn_text: str) -> str | None:
    """The code of the python block that the closing fence at the end of `turn_text` closes, else None."""
    if not turn_text.endswith(CLOSE_FENCE):
        return None
    body = turn_text[: -len(CLOSE_FENCE)]
    start = body.rfind(OPEN_FENCE)
    if start < 0 or "```" in body[start + len(OPEN_FENCE):]:
        return None
    return body[start + len(OPEN_FENCE):]


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[: limit // 4]    # the tail matters more: a traceback's last line names the error
    tail = text[-(limit - len(head)):]
    return f"{head}\n...[{len(text) - len(head) - len(tail)} characters cut]...\n{tail}"


def output_block(res: Any, spec: ToolSpec) -> tuple[str | None, str]:
    """(the block inserted into the context, the call's outcome) for a sandbox ExecResult; the block is None
    for an outage (the sandbox failed for a reason the program did not cause)."""
    if res.infra_error:
        return None, "outage"
    out, err = res.stdout, res.stderr
    if res.status == "ok":
        outcome, body = "ok", out
    elif res.status == "timeout":
        outcome, body = "timeout", out + f"\nTimeoutError: the program ran longer than {spec.timeout_s:g} s and was stopped"
    elif res.status == "memory":
        outcome, body = "memory", out + f"\nMemoryError: the program used more than {spec.memory_mb} MB and was stopped"
    elif res.status == "output_limit":
        outcome, body = "output_limit", out + "\nError: the program printed too much and was stopped"
    else:   # "error" (traceback on stderr) or a program that killed its supervisor
        outcome, body = "error", (out + err) or f"Error: the program failed (status {res.status})"
    body = _clip(body.strip("\n"), spec.max_output_chars)
    return OUTPUT_OPEN + body + OUTPUT_CLOSE, outcome


def no_block_output() -> str:
    return OUTPUT_OPEN + f"Error: no {OPEN_FENCE.strip()} block to run before this fence" + OUTPUT_CLOSE


def strip_outputs(text: str) -> str:
    """The policy's own text: inserted output blocks removed (answers are graded on what the policy wrote)."""
    return _OUTPUT_BLOCK.sub("", text)


def sandbox_runner(spec: ToolSpec) -> Callable[[str], Any]:
    """Run code in the process-wide sandbox pool with the spec's limits (ExecResult back)."""
    from sandbox import default_sandbox

    def run(code: str):
        return default_sandbox().run(code, timeout_s=spec.timeout_s, memory_mb=spec.memory_mb)
    return run


class _Loop:
    """The scheduling of `generate_with_tools`: engine requests and tool futures for all trajectories."""

    def __init__(self, engine, params, spec: ToolSpec, encode: Callable[[str], list[int]],
                 run_code: Callable[[str], Any]) -> None:
        self.engine, self.params, self.spec, self.encode, self.run_code = engine, params, spec, encode, run_code
        workers = spec.concurrency or _sandbox_slots()
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="r1lab-tool")
        self.requests: dict[str, Trajectory] = {}
        self.calls: dict[Future, Trajectory] = {}

    def submit(self, t: Trajectory) -> None:
        """Ask the engine for the next turn of t (the whole context so far as the prompt)."""
        from vllm.sampling_params import RequestOutputKind

        sp = self.params.clone()
        sp.n = 1
        sp.max_tokens = self.params.max_tokens - len(t.token_ids)
        sp.output_kind = RequestOutputKind.FINAL_ONLY
        if t.calls < self.spec.max_calls:
            sp.stop = list(sp.stop or []) + [CLOSE_FENCE]
            sp.include_stop_str_in_output = True
        rid = f"r1lab-tool-{next(_IDS)}"
        self.requests[rid] = t
        t.turns += 1
        self.engine.add_request(rid, {"prompt_token_ids": t.prompt_ids + t.token_ids}, sp)

    def on_turn(self, out) -> bool:
        """A finished engine request: record the sampled turn; True when the trajectory is done."""
        from rl.rollout.vllm_engine import _samples

        t = self.requests.pop(out.request_id)
        (s,) = _samples(out)
        t.add(s.token_ids, s.logprobs, sampled=True)
        o = out.outputs[0]
        if o.finish_reason == "stop" and o.stop_reason == CLOSE_FENCE and t.calls < self.spec.max_calls:
            t.calls += 1
            if len(t.token_ids) >= self.params.max_tokens:
                t.finish_reason = "length"
                return True
            code = extract_call(s.text)
            if code is None:
                self.calls[_done_future(None)] = t
            else:
                self.calls[self.pool.submit(self.run_code, code)] = t
            return False
        t.finish_reason = s.finish_reason
        return True

    def on_call(self, fut: Future) -> bool:
        """A finished tool call: insert its output; True when the trajectory is done."""
        t = self.calls.pop(fut)
        try:
            res = fut.result()
        except Exception as e:   # the runner itself broke: an outage, not the program's doing
            t.outcomes.append("outage")
            t.outage, t.finish_reason = f"tool runner raised {type(e).__name__}: {e}", "tool_outage"
            return True
        if res is None:
            block, outcome = no_block_output(), "error"
        else:
            block, outcome = output_block(res, self.spec)
        t.outcomes.append(outcome)
        if block is None:
            t.outage, t.finish_reason = f"sandbox unavailable: {res.infra_error}", "tool_outage"
            return True
        ids = self.encode(block)
        room = self.params.max_tokens - len(t.token_ids)
        t.add(ids[:room], None, sampled=False)
        if len(ids) >= room:
            t.finish_reason = "length"
            return True
        self.submit(t)
        return False


def _done_future(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _sandbox_slots() -> int:
    from sandbox import default_sandbox

    return default_sandbox().num_slots


def generate_with_tools(llm, prompts: list[list[int]], params, spec: ToolSpec, tokenizer, *,
                        run_code: Callable[[str], Any] | None = None,
                        engine=None) -> Iterator[tuple[int, list[Trajectory]]]:
    """Multi-turn sampling with tool calls: `params.n` trajectories per token-id prompt, each an independent
    request after the prompt. Yields (prompt index, its trajectories) as soon as all of a prompt's
    trajectories are done, so callers can score groups while the others generate.

    `run_code(code) -> ExecResult` defaults to the sandbox with the spec's limits; `engine` (an object with
    add_request/step/has_unfinished_requests) defaults to `llm.llm_engine`."""
    engine = engine if engine is not None else llm.llm_engine
    run_code = run_code or sandbox_runner(spec)
    loop = _Loop(engine, params, spec, lambda s: tokenizer.encode(s, add_special_tokens=False), run_code)
    left = {i: params.n for i in range(len(prompts))}
    trajs = {i: [Trajectory(i, list(p)) for _ in range(params.n)] for i, p in enumerate(prompts)}
    try:
        for ts in trajs.values():
            for t in ts:
                loop.submit(t)
        while loop.requests or loop.calls:
            done: list[Trajectory] = []
            if loop.requests and engine.has_unfinished_requests():
                for o in engine.step():
                    t = loop.requests.get(o.request_id)
                    if o.finished and t is not None and loop.on_turn(o):
                        done.append(t)
                ready = [f for f in list(loop.calls) if f.done()]
            elif loop.requests:
                raise RuntimeError(f"vLLM has no unfinished requests but {len(loop.requests)} tool-rollout turns "
                                   "were never answered")
            else:
                ready = list(wait(list(loop.calls), return_when=FIRST_COMPLETED).done)
            for f in ready:
                t = loop.calls[f]
                if loop.on_call(f):
                    done.append(t)
            for t in done:
                left[t.prompt] -= 1
                if left[t.prompt] == 0:
                    yield t.prompt, trajs[t.prompt]
    finally:
        loop.pool.shutdown(wait=False, cancel_futures=True)


def as_sample(t: Trajectory, tokenizer) -> dict[str, Any]:
    """The rollout worker's sample dict: the response ids (sampled + inserted), per-token log-probs and
    loss mask, the decoded transcript, the text that is graded (the policy's own), tool statistics."""
    text = tokenizer.decode(t.token_ids, skip_special_tokens=True)
    return {"token_ids": t.token_ids, "logprobs": t.logprobs, "loss_mask": t.loss_mask, "text": text,
            "graded_text": strip_outputs(text), "finish_reason": t.finish_reason,
            "tool": {"calls": t.calls, "turns": t.turns, "outcomes": list(t.outcomes), "outage": t.outage}}


def tool_metrics(samples: list[dict[str, Any]], prefix: str = "tool/") -> dict[str, float]:
    """Per-step (or per-evaluation) tool statistics over sample dicts of `as_sample`."""
    stats = [s["tool"] for s in samples if "tool" in s]
    if not stats:
        return {}
    n = len(stats)
    calls = sum(s["calls"] for s in stats)
    outcomes = [o for s in stats for o in s["outcomes"]]
    count = lambda *kinds: sum(o in kinds for o in outcomes)  # noqa: E731
    return {f"{prefix}calls_per_sample": calls / n, f"{prefix}used_frac": sum(s["calls"] > 0 for s in stats) / n,
            f"{prefix}turns_mean": sum(s["turns"] for s in stats) / n,
            f"{prefix}error_frac": count("error") / max(1, calls),
            f"{prefix}timeout_frac": count("timeout") / max(1, calls),
            f"{prefix}limit_frac": count("memory", "output_limit") / max(1, calls),
            f"{prefix}outage_frac": sum(s["outage"] is not None for s in stats) / n,
            f"{prefix}calls_total": float(calls)}


def mark_outages(res: Any, samples: list[dict[str, Any]]) -> None:
    """A reward ScoreResult, amended in place: samples whose tool call met a sandbox outage are failed items
    (left out of group statistics and the loss; `reward/tool/failed_frac` feeds the run's FailureWatch)."""
    out = [s.get("tool", {}).get("outage") for s in samples]
    for j, why in enumerate(out):
        if why:
            res.failed[j] = True
            res.rewards[j] = float("nan")
            res.error_example = res.error_example or f"tool call: {why}"
    res.metrics["reward/tool/failed_frac"] = sum(bool(w) for w in out) / max(1, len(out))
