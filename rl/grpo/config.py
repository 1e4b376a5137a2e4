"""GRPOConfig: every knob of a GRPO run, validated before Ray starts.

Sections (YAML top-level keys; CLI `section.key=value`): model, data, rollout, algo, reward, trainer, sync,
checkpoint, log, resources.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rl.config import DataConfig, PolicyModelConfig, opt, require, require_known_rewards


@dataclass
class RolloutConfig:
    """vLLM rollout workers."""
    num_workers: int = opt(1, "number of vLLM rollout workers (each one engine)")
    batch_prompts: int = opt(16, "prompts per training step (groups)")
    n: int = opt(8, "samples per prompt (the GRPO group size)", )
    max_new_tokens: int = opt(64, "maximum response length in tokens")
    min_new_tokens: int = opt(0, "generate at least this many tokens: EOS is suppressed until then (vLLM "
                                 "min_tokens; for benchmarks with fixed-length responses, 0 = off)")
    temperature: float = opt(1.0, "sampling temperature (the trainer divides logits by the same value)")
    top_p: float = opt(1.0, "nucleus sampling; keep 1.0 for unbiased GRPO unless you know why")
    max_model_len: int = opt(1024, "vLLM context length")
    gpu_memory_utilization: float = opt(0.0, "vLLM memory share; 0 = auto (0.3 on CPU, 0.5 on GPU)")
    dynamic_sampling: bool = opt(False, "DAPO: drop groups whose rewards are all equal and refill the batch")
    max_gen_batches: int = opt(4, "dynamic sampling: at most this many generation rounds per step")
    enforce_eager: bool = opt(False, "disable CUDA graphs / torch.compile in vLLM (faster start, slower decode; "
                                     "right for tiny models)")
    kv_cache_gb: float = opt(0.0, "CPU only: vLLM KV-cache size in GB (0 = vLLM's default share of memory)")
    threads: int = opt(0, "CPU only: compute threads of each rollout engine (0 = every core of its node: the "
                          "synchronous loop never generates and trains at once)")
    async_steps: int = opt(0, "overlap: generate the batches of up to this many later steps while the current one "
                              "trains (weights at most this many steps stale; 0 = synchronous). TIS or seq_mask "
                              "(algo.rollout_correction) corrects for the staleness")
    tools: str = opt("", "tool the policy may call mid-response: '' = none; python = a fenced ```python block "
                         "is run in the sandbox and its output inserted (rl.rollout.tools; inserted tokens are "
                         "masked out of the loss)", choices=["", "python"])
    max_tool_calls: int = opt(2, "tools: calls per sample; after the last one the policy must answer")
    tool_timeout_s: float = opt(5.0, "tools: wall-clock limit of one call (the context then says it timed out)")
    tool_memory_mb: int = opt(256, "tools: memory limit of one call")
    tool_max_output_chars: int = opt(256, "tools: longer outputs are cut (head and tail kept) before insertion")

    def validate(self) -> None:
        require(self.num_workers >= 1, "rollout.num_workers", "must be >= 1")
        require(self.n >= 2, "rollout.n", "GRPO needs at least 2 samples per prompt")
        require(self.batch_prompts >= 1, "rollout.batch_prompts", "must be >= 1")
        require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "rollout.min_new_tokens",
                f"must be in [0, rollout.max_new_tokens={self.max_new_tokens}]")
        require(self.temperature > 0, "rollout.temperature", "must be > 0 (greedy sampling has no group variance)")
        require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        require(self.max_gen_batches >= 1, "rollout.max_gen_batches", "must be >= 1")
        require(self.async_steps >= 0, "rollout.async_steps", "must be >= 0")
        require(self.threads >= 0, "rollout.threads", "must be >= 0 (0 = every core)")
        require(self.max_tool_calls >= 1, "rollout.max_tool_calls", "must be >= 1")
        require(self.tool_timeout_s > 0, "rollout.tool_timeout_s", "must be > 0")
        require(self.tool_memory_mb >= 16, "rollout.tool_memory_mb", "must be >= 16")
        require(self.tool_max_output_chars >= 16, "rollout.tool_max_output_chars", "must be >= 16")

    def tool_spec(self):
        """The limits of tool calls (rl.rollout.tools.ToolSpec); calls happen only when `tools` is set."""
        from rl.rollout.tools import ToolSpec

        return ToolSpec(max_calls=self.max_tool_calls, timeout_s=self.tool_timeout_s, memory_mb=self.tool_memory_mb,
                        max_output_chars=self.tool_max_output_chars)


@dataclass
class AlgoConfig:
    """The GRPO objective."""
    advantage: str = opt("grpo", "advantage estimator (registry rl.algos.ADVANTAGE_ESTIMATORS)")
    policy_loss: str = opt("ppo_clip", "policy loss (registry rl.algos.POLICY_LOSSES)")
    loss_agg: str = opt("token_mean", "loss aggregation",
                        choices=["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
    clip_eps_low: float = opt(0.2, "PPO clip: lower bound 1 - clip_eps_low")
    clip_eps_high: float = opt(0.2, "PPO clip: upper bound 1 + clip_eps_high (DAPO clip-higher: 0.28)")
    dual_clip_c: float = opt(0.0, "dual-clip constant for negative advantages (0 = off; typical 3.0)")
    kl_coef: float = opt(0.0, "KL-to-reference coefficient in the loss (0 = no reference model)")
    kl_estimator: str = opt("k3", "KL estimator", choices=["k1", "k2", "k3"])
    entropy_coef: float = opt(0.0, "entropy bonus coefficient (entropy is always logged)")
    tis_cap: float = opt(2.0, "truncated importance sampling cap vs rollout log-probs (0 = off)")
    rollout_correction: str = opt("tis", "correction for the gap between the rollout engine's policy (older "
                                  "weights in async mode, sampler numerics) and the trainer's: tis = per-token "
                                  "weight min(pi_old/pi_rollout, tis_cap); seq_mask = drop sequences whose "
                                  "geometric-mean ratio is outside [seq_mask_low, seq_mask_high]; none",
                                  choices=["tis", "seq_mask", "none"])
    seq_mask_low: float = opt(0.5, "seq_mask: lowest kept sequence importance ratio")
    seq_mask_high: float = opt(2.0, "seq_mask: highest kept sequence importance ratio")
    overlong_filter: bool = opt(False, "DAPO: truncated responses do not contribute to the loss")
    logprob_check_tol: float = opt(0.1, "step 0: stop if mean |trainer - rollout| log-prob exceeds this")
    distill_teacher: str = opt("", "on-policy distillation: teacher model path (same tokenizer as the policy); "
                                   "each sampled token's advantage gets -distill_coef * (log pi - log teacher)")
    distill_coef: float = opt(1.0, "weight of the per-token reverse-KL advantage (with distill_teacher)")

    def validate(self) -> None:
        from rl.algos import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

        require(self.advantage in ADVANTAGE_ESTIMATORS, "algo.advantage",
                f"{self.advantage!r} unknown; allowed: {sorted(ADVANTAGE_ESTIMATORS)}")
        require(self.policy_loss in POLICY_LOSSES, "algo.policy_loss",
                f"{self.policy_loss!r} unknown; allowed: {sorted(POLICY_LOSSES)}")
        require(0 <= self.clip_eps_low < 1, "algo.clip_eps_low", "must be in [0, 1)")
        require(self.clip_eps_high >= 0, "algo.clip_eps_high", "must be >= 0")
        require(self.dual_clip_c == 0 or self.dual_clip_c > 1, "algo.dual_clip_c", "must be 0 (off) or > 1")
        require(self.kl_coef >= 0, "algo.kl_coef", "must be >= 0")
        require(self.tis_cap == 0 or self.tis_cap >= 1, "algo.tis_cap", "must be 0 (off) or >= 1")
        require(self.distill_coef > 0, "algo.distill_coef", "must be > 0")
        require(0 < self.seq_mask_low <= 1 <= self.seq_mask_high, "algo.seq_mask_low",
                "need 0 < seq_mask_low <= 1 <= seq_mask_high")


@dataclass
class RewardSection:
    """Rule-based rewards (rewards.registry names or module:function)."""
    functions: list = opt(["accuracy", "format"], "reward functions")
    weights: list = opt([1.0, 0.1], "one weight per function")
    timeout_s: float = opt(5.0, "per-item timeout for graders and plugins")
    batch_timeout_s: float = opt(120.0, "deadline for scoring one batch")
    overlong_buffer: int = opt(0, "soft overlong penalty buffer in tokens (with the 'overlong' reward)")
    max_failed_frac: float = opt(0.2, "stop the run when a reward function fails (timeout, crash, unparsable "
                                      "gold) on more than this share of a step's items ...")
    max_failed_steps: int = opt(3, "... for this many steps in a row (failed items never train either way)")

    def validate(self) -> None:
        require(len(self.functions) == len(self.weights), "reward.weights",
                f"{len(self.weights)} weights for {len(self.functions)} functions {self.functions}")
        require_known_rewards(self.functions, "reward.functions")
        require(0 <= self.max_failed_frac <= 1, "reward.max_failed_frac", "must be in [0, 1]")
        require(self.max_failed_steps >= 1, "reward.max_failed_steps", "must be >= 1")


@dataclass
class TrainerConfig:
    """FSDP2 trainer workers and optimisation."""
    num_workers: int = opt(2, "data-parallel FSDP2 trainer workers")
    max_steps: int = opt(50, "training steps")
    lr: float = opt(1e-5, "peak learning rate")
    lr_schedule: str = opt("constant", "learning-rate schedule", choices=["constant", "cosine", "multistep"])
    warmup_steps: int = opt(0, "linear warm-up steps (constant and cosine)")
    milestones: list = opt([], "multistep: steps at which the LR is multiplied by gamma")
    gamma: float = opt(0.1, "multistep decay factor")
    min_lr_ratio: float = opt(0.0, "cosine: final LR as a fraction of the peak")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    betas: list = opt([0.9, 0.999], "AdamW betas")
    grad_clip: float = opt(1.0, "max grad norm (0 = off)")
    ppo_epochs: int = opt(1, "passes over each rollout batch")
    mini_batches: int = opt(1, "optimizer steps per epoch (the batch is split into this many)")
    micro_batch_tokens: int = opt(8192, "max tokens per forward/backward micro-batch (per worker)")
    seed: int = opt(0, "global seed")
    threads: int = opt(0, "torch threads per trainer worker (0 = auto)")
    backend: str = opt("auto", "torch.distributed backend", choices=["auto", "gloo", "nccl"])
    peak_tflops: float = opt(0.0, "per-device dense peak in TFLOP/s (H100 bf16: 989) for the perf/mfu metric "
                                  "(6 x params x trained tokens / update time / peak); 0 = no MFU")

    def validate(self) -> None:
        require(self.num_workers >= 1, "trainer.num_workers", "must be >= 1")
        require(self.max_steps >= 1, "trainer.max_steps", "must be >= 1")
        require(self.lr > 0, "trainer.lr", "must be > 0")
        require(self.ppo_epochs >= 1 and self.mini_batches >= 1, "trainer.mini_batches", "must be >= 1")
        require(self.micro_batch_tokens >= 16, "trainer.micro_batch_tokens", "must be >= 16")
        require(all(isinstance(m, int) for m in self.milestones), "trainer.milestones", "must be integers")


@dataclass
class SyncConfig:
    """Trainer -> vLLM weight sync."""
    method: str = opt("file", "transport (rl.grpo.sync.transport): file = safetensors buckets in sync.dir, "
                              "streamed to the engines as they are written", choices=["file"])
    dir: str = opt("/dev/shm", "where buckets are written: a RAM disk on one node, a shared file system across "
                               "nodes (trainer rank 0 writes, every rollout worker reads)")
    bucket_mb: float = opt(512, "weights are gathered, sent and loaded this many MB at a time (bounds the memory "
                              "a sync needs)")
    timeout_s: float = opt(300.0, "timeout for each transfer")
    checksum_every: int = opt(0, "verify engine weights == trainer weights every N steps (step 0 always)")


@dataclass
class CheckpointConfig:
    """Checkpoints (atomic: written to a temporary directory, then renamed)."""
    every: int = opt(10, "save every N steps (0 = only at the end)")
    resume: str = opt("auto", "auto: continue from the latest checkpoint in output_dir; never; or a path")
    keep: int = opt(2, "number of checkpoints kept")


@dataclass
class LogConfig:
    """Metrics, progress and validation."""
    output_dir: str = opt("runs/grpo", "run directory: metrics.jsonl, tensorboard/, checkpoints/, final/")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    progress: bool = opt(True, "progress bar with ETA")
    val_every: int = opt(0, "validate every N steps (0 = off)")
    val_benchmark: str = opt("", "benchmark for validation: a name (math500, ...) or a JSONL path; "
                                 "empty = the held-out split of the synthetic task")
    val_problems: int = opt(64, "problems per validation")
    val_samples: int = opt(4, "samples per validation problem")
    val_temperature: float = opt(1.0, "validation sampling temperature")


@dataclass
class ResourcesConfig:
    """Ray placement."""
    ray_address: str = opt("auto", "auto: join a running cluster, else start a local one; local: always a fresh "
                                   "private instance; or a cluster address")
    colocate: bool = opt(False, "put each rollout worker in a trainer worker's bundle (share its GPU)")
    rollout_gpu_share: float = opt(0.5, "colocate on GPUs: the fraction of a bundle's GPUs the rollout worker "
                                        "asks Ray for (the trainer gets the rest; vLLM sleeps while it trains)")
    trainer_cpus: float = opt(1.0, "CPUs per trainer worker")
    trainer_gpus: float = opt(0.0, "GPUs per trainer worker")
    rollout_cpus: float = opt(1.0, "CPUs per rollout worker")
    rollout_gpus: float = opt(0.0, "GPUs per rollout worker")
    placement_strategy: str = opt("PACK", "placement group strategy", choices=["PACK", "SPREAD", "STRICT_PACK"])
    wait_s: float = opt(600.0, "how long to wait for the cluster to free the resources of a feasible run "
                               "(an infeasible one fails at once)")


@dataclass
class GRPOConfig:
    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardSection = field(default_factory=RewardSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def validate(self) -> None:
        require(0 < self.resources.rollout_gpu_share < 1, "resources.rollout_gpu_share", "must be in (0, 1)")
        if self.log.val_every > 0 and not self.data.source.startswith("synthetic:"):
            require(bool(self.log.val_benchmark), "log.val_every",
                    f"validation needs held-out problems: data.source={self.data.source!r} has no held-out split, "
                    "so set log.val_benchmark (a benchmark name or JSONL path) or log.val_every=0")
        if self.resources.colocate:
            require(self.rollout.num_workers <= self.trainer.num_workers, "resources.colocate",
                    "needs rollout.num_workers <= trainer.num_workers")
            require(not (self.resources.trainer_gpus > 0 and self.rollout.async_steps > 0), "rollout.async_steps",
                    "colocated on GPUs the engine sleeps while the trainer trains, so nothing can overlap: use "
                    "async_steps=0 or separate GPUs (resources.colocate=false)")
        require(self.rollout.max_new_tokens < self.rollout.max_model_len, "rollout.max_new_tokens",
                f"must be below rollout.max_model_len ({self.rollout.max_model_len})")
