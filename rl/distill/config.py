"""DistillConfig: teacher traces -> rejection sampling -> student SFT -> held-out evaluation, validated on load.

Sections (YAML top-level keys; CLI `section.key=value`): teacher, data, sampling, filter, student, eval.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rl.config import EAGER_HELP, DataConfig, LogSection, StageRef, opt, require, require_known_rewards


@dataclass
class TeacherSection:
    """The model whose traces are distilled (any HF causal LM path)."""
    path: str = opt("", "HF model directory or hub id of the teacher (tiny:qwen2 builds a tiny one)")
    max_model_len: int = opt(2048, "vLLM context length for the teacher")
    dtype: str = opt("auto", "vLLM dtype (auto: float32 on CPU, the checkpoint's dtype on GPU)")
    tensor_parallel_size: int = opt(1, "vLLM tensor parallelism for a large teacher")
    enforce_eager: bool = opt(False, EAGER_HELP)

    def validate(self) -> None:
        require(bool(self.path), "teacher.path", "must be set (an HF model directory or hub id)")
        require(self.max_model_len >= 64, "teacher.max_model_len", "must be >= 64")


@dataclass
class TraceSampling:
    """How the teacher samples (R1's recommended settings by default)."""
    n: int = opt(4, "traces sampled per prompt")
    temperature: float = opt(0.6, "sampling temperature (R1: 0.6)")
    top_p: float = opt(0.95, "nucleus sampling (R1: 0.95)")
    max_tokens: int = opt(1024, "maximum trace length in tokens (truncated traces are rejected)")
    seed: int = opt(0, "engine seed")

    def validate(self) -> None:
        require(self.n >= 1, "sampling.n", "must be >= 1")
        require(self.temperature >= 0, "sampling.temperature", "must be >= 0")
        require(0 < self.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
        require(self.max_tokens >= 1, "sampling.max_tokens", "must be >= 1")


@dataclass
class FilterSection:
    """Rejection sampling: which traces become training data."""
    rewards: list = opt(["accuracy", "format"], "reward functions a trace is scored with (rewards.registry names)")
    min_scores: list = opt([1.0, 1.0], "a trace is kept only if every reward reaches its minimum here")
    max_tokens: int = opt(0, "length cap in tokens for kept traces (0 = sampling.max_tokens)")
    dedup: bool = opt(True, "drop exact duplicate traces of the same prompt (whitespace-normalised)")
    max_per_prompt: int = opt(0, "keep at most this many traces per prompt (0 = all that pass)")

    def validate(self) -> None:
        require(len(self.rewards) >= 1, "filter.rewards", "needs at least one reward function")
        require(len(self.min_scores) == len(self.rewards), "filter.min_scores",
                f"{len(self.min_scores)} minimums for {len(self.rewards)} rewards {self.rewards}")
        require_known_rewards(self.rewards, "filter.rewards")
        require(self.max_tokens >= 0 and self.max_per_prompt >= 0, "filter.max_tokens", "must be >= 0")


@dataclass
class StudentSection(StageRef):
    """The student's SFT stage (YAML + overrides); distillation sets its data.source and output_dir.

    e.g. overrides: [model.path=tiny:llama, train.max_steps=1000]."""


@dataclass
class DistillEval:
    """Teacher and student on the same held-out problems (the eval harness)."""
    benchmark: str = opt("", "benchmark name or JSONL path; empty = the held-out split of the synthetic task")
    problems: int = opt(128, "held-out problems (0 = skip evaluation)")
    samples: int = opt(4, "samples per problem")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling")
    max_tokens: int = opt(1024, "maximum response tokens")
    enforce_eager: bool = opt(False, "of the student's evaluation engine (the teacher's is teacher.enforce_eager): "
                                     + EAGER_HELP)


@dataclass
class DistillConfig:
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: TraceSampling = field(default_factory=TraceSampling)
    filter: FilterSection = field(default_factory=FilterSection)
    student: StudentSection = field(default_factory=StudentSection)
    eval: DistillEval = field(default_factory=DistillEval)
    log: LogSection = field(default_factory=LogSection)  # the student's SFT run gets the same trackers
    output_dir: str = opt("runs/distill", "run directory: traces.jsonl, dataset.jsonl, student/, summary.json")

    def validate(self) -> None:
        require(self.data.source.startswith("synthetic:") or bool(self.eval.benchmark) or self.eval.problems == 0,
                "eval.benchmark", "a file or hub data source has no built-in held-out split: name a benchmark "
                "(or set eval.problems=0)")
