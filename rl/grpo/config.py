"""GRPOConfig: every knob of a GRPO run, validated before Ray starts.

Sections (YAML top-level keys; CLI `section.key=value`): model, data, rollout, algo, reward, trainer, sync,
checkpoint, log, resources.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from rl.config import DataConfig, LogSection, PolicyModelConfig, opt, require, require_known_rewards
from rl.moe import DEFAULT_AUX_COEF


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
    keep_heap: bool = opt(True, "CPU: each engine keeps the memory an in-place weight reload frees for the next one "
                                "(rl.heap.keep_freed_heap: reloads without page faults, 0.65 -> 0.48 s at the 0.5B "
                                "shape on one thread), so its resident memory stays near its high-water mark "
                                "(+0.45-0.9 GB there, up to about one more copy of the weights); false = only the "
                                "per-step decode buffers are kept")
    async_steps: int = opt(0, "overlap: generate the batches of up to this many later steps while the current one "
                              "trains (weights at most this many steps stale; 0 = synchronous). "
                              "algo.rollout_correction corrects for the staleness too")
    tools: str = opt("", "tool the policy may call mid-response: '' = none; python = a fenced ```python block "
                         "is run in the sandbox and its output inserted (rl.rollout.tools; inserted tokens are "
                         "masked out of the loss)", choices=["", "python"])
    max_tool_calls: int = opt(2, "tools: calls per sample; after the last one the policy must answer")
    tool_timeout_s: float = opt(5.0, "tools: wall-clock limit of one call (the context then says it timed out)")
    tool_memory_mb: int = opt(256, "tools: memory limit of one call")
    tool_max_output_chars: int = opt(256, "tools: longer outputs are cut (head and tail kept) before insertion")
    return_routed_experts: bool = opt(False, "Mixture-of-Experts policies: the engine records which experts it "
                                             "routed every token to in every MoE layer (vLLM's "
                                             "enable_return_routed_experts on GPU, r1lab's recorder on CPU: "
                                             "rl.rollout.routing_recorder), and the records travel with the "
                                             "samples to the trainer; needed by algo.routing_replay=r3; with "
                                             "routing_replay=off it only adds moe/routing_agreement (trainer vs "
                                             "engine). On CPU it turns prefix caching off and forces eager mode")
    quantization: str = opt("none", "weights of the rollout engines: none = the trainer's compute dtype; int8 = W8A8 "
                                    "int8 (per-channel weights, per-token dynamic activations; CPU and GPU); fp8 = "
                                    "vLLM's online fp8 (GPU only). The trainer keeps full precision; every weight "
                                    "sync is re-quantized in the engine (rl.rollout.quantization). Pair it with "
                                    "algo.rollout_correction (README: Quantized rollout)",
                            choices=["none", "int8", "fp8"])
    int8_lm_head: bool = opt(False, "with quantization=int8 on CPU: the LM head runs int8 too (W8A8, per-row "
                                    "scales; rl.rollout.int8_head), ~2x faster logits at a large vocabulary for more "
                                    "engine-vs-trainer log-prob mismatch (README: Quantized rollout); the compressed-"
                                    "tensors format leaves the head in float, as llm-compressor's recipes do")
    max_restarts: int = opt(3, "rollout workers that die (process killed, out of memory, engine crash) or hang past "
                               "resources.health_timeout_s are replaced in the same placement, loaded with the "
                               "current policy (checksum-verified) and given the lost prompts again, at most this "
                               "many times per run (rl.grpo.recovery); 0 = stop at the first failure")
    min_workers: int = opt(1, "after a lost node whose bundles Ray places on no other node within "
                              "resources.wait_s, the run is re-placed on the nodes left with the rollout workers "
                              "left, down to this many (= num_workers: never go on with fewer; the run stops "
                              "naming this key) (rl.grpo.recovery)")

    def validate(self) -> None:
        require(self.num_workers >= 1, "rollout.num_workers", "must be >= 1")
        require(self.max_restarts >= 0, "rollout.max_restarts", "must be >= 0 (0 = no replacement)")
        require(1 <= self.min_workers <= self.num_workers, "rollout.min_workers",
                f"must be in [1, rollout.num_workers={self.num_workers}]")
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
        require(not (self.return_routed_experts and self.tools), "rollout.return_routed_experts",
                "is not supported with rollout.tools yet: a tool rollout runs one engine request per turn and the "
                "per-turn routing records are not merged into one per sample; use algo.routing_replay=r2 "
                "(the trainer records its own routing) and return_routed_experts=false")

    def tool_spec(self):
        """The limits of tool calls (rl.rollout.tools.ToolSpec); calls happen only when `tools` is set."""
        from rl.rollout.tools import ToolSpec

        return ToolSpec(max_calls=self.max_tool_calls, timeout_s=self.tool_timeout_s, memory_mb=self.tool_memory_mb,
                        max_output_chars=self.tool_max_output_chars)


@dataclass
class AlgoConfig:
    """The GRPO objective."""
    advantage: str = opt("grpo", "advantage estimator (registry rl.algos.ADVANTAGE_ESTIMATORS)")
    policy_loss: str = opt("ppo_clip", "policy loss (registry rl.algos.POLICY_LOSSES): ppo_clip = PPO-clip (GRPO); "
                                       "gspo = GSPO, one clipped ratio per sequence (its paper aggregates with "
                                       "loss_agg=seq_mean_token_mean); cispo = CISPO, clipped and detached IS "
                                       "weights on every token's log-prob gradient (none is dropped)")
    loss_agg: str = opt("token_mean", "loss aggregation",
                        choices=["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
    clip_eps_low: float | None = opt(None, "ratio clipped from below at 1 - clip_eps_low; null = the policy loss's "
                                           "own default: ppo_clip 0.2, gspo 3e-4 (GSPO paper), cispo 1.0 (no "
                                           "lower bound, as MiniMax-M1; any value >= 1 means none)")
    clip_eps_high: float | None = opt(None, "ratio clipped from above at 1 + clip_eps_high; null = the loss's own "
                                            "default: ppo_clip 0.2 (DAPO clip-higher: 0.28), gspo 4e-4, cispo 0.2 "
                                            "(verl's example). A YAML that sets 0.2/0.28 keeps them for gspo too: "
                                            "write null there")
    dual_clip_c: float = opt(0.0, "dual-clip constant for negative advantages (0 = off; typical 3.0)")
    kl_coef: float = opt(0.0, "KL-to-reference coefficient in the loss (0 = no reference model)")
    kl_estimator: str = opt("k3", "KL estimator", choices=["k1", "k2", "k3"])
    entropy_coef: float = opt(0.0, "entropy bonus coefficient (entropy is always logged)")
    tis_cap: float = opt(2.0, "token_tis / seq_tis: importance weights are truncated at this (0 turns token_tis "
                              "off); token_mis: tokens whose ratio exceeds it are masked")
    rollout_correction: str = opt("token_tis", "correction for the gap between the rollout engine's policy (older "
                                  "weights in async mode, sampler numerics) and the trainer's, with r = "
                                  "pi_old/pi_rollout per token (rl.algos.rollout_correction): token_tis = weight "
                                  "min(r, tis_cap); seq_tis = weight min(prod r, tis_cap) per sequence; token_mis = "
                                  "weight r, tokens with r > tis_cap masked; seq_mis = sequences whose geometric-"
                                  "mean ratio is outside [seq_mask_low, seq_mask_high] masked; icepop = weight r, "
                                  "tokens with r outside [icepop_low, icepop_high] masked; none. tis and seq_mask "
                                  "are the old names of token_tis and seq_mis",
                                  choices=["none", "token_tis", "seq_tis", "token_mis", "seq_mis", "icepop", "tis",
                                           "seq_mask"])
    seq_mask_low: float = opt(0.5, "seq_mis: lowest kept geometric-mean sequence ratio")
    seq_mask_high: float = opt(2.0, "seq_mis: highest kept geometric-mean sequence ratio")
    icepop_low: float = opt(0.5, "icepop: tokens whose ratio is below this are masked (IcePop's alpha)")
    icepop_high: float = opt(5.0, "icepop: tokens whose ratio is above this are masked (IcePop's beta)")
    overlong_filter: bool = opt(False, "DAPO: truncated responses do not contribute to the loss")
    logprob_check_tol: float = opt(0.0, "step 1: stop if mean |trainer - rollout| log-prob exceeds this; 0 = by "
                                        "the rollout's precision: 0.1 for full-precision engines, 0.25 for "
                                        "rollout.quantization=int8/fp8 (rl.grpo.config.LOGPROB_TOL)")
    distill_teacher: str = opt("", "on-policy distillation: teacher model path (same tokenizer as the policy); "
                                   "each sampled token's advantage gets -distill_coef * (log pi - log teacher)")
    distill_coef: float = opt(1.0, "weight of the per-token reverse-KL advantage (with distill_teacher)")
    routing_replay: str | bool = opt("off", "Mixture-of-Experts routing replay in the trainer's forwards (rl.moe.replay, "
                                     "rl.moe.trainer_routing): off = the trainer routes on its own; r2 = the "
                                     "old-log-prob pass records the trainer's own expert choices and the update's "
                                     "forwards replay them; r3 = Rollout Routing Replay (arXiv 2510.11370): every "
                                     "trainer forward uses the experts the rollout engine chose (needs "
                                     "rollout.return_routed_experts), while the gate weights still come from the "
                                     "trainer's router, so the router keeps its gradient. r2/r3 need an MoE "
                                     "policy. One of off | r2 | r3 (YAML's bare off, read as false, means off)")
    moe_aux_coef: float = opt(DEFAULT_AUX_COEF, "Mixture-of-Experts: weight of the router's load-balancing loss "
                                                "(moe/aux_loss: HF's Switch loss for softmax routers, DeepSeek-V3's "
                                                "sequence-wise loss for sigmoid ones) added to the loss. Default 0, "
                                                "as Unsloth (TRL adds 0.001 x HF's loss): RL starts from a router "
                                                "pre-training already balanced, on far less data, and under r3 the "
                                                "selection is the engine's anyway, so the loss would mostly pull "
                                                "the router against the policy gradient; raise it if "
                                                "moe/expert_load_entropy falls")

    def validate(self) -> None:
        from rl.algos import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, policy_loss_defaults
        from rl.algos.rollout_correction import canonical_mode

        require(self.advantage in ADVANTAGE_ESTIMATORS, "algo.advantage",
                f"{self.advantage!r} unknown; allowed: {sorted(ADVANTAGE_ESTIMATORS)}")
        require(self.policy_loss in POLICY_LOSSES, "algo.policy_loss",
                f"{self.policy_loss!r} unknown; allowed: {sorted(POLICY_LOSSES)}")
        for key, default in policy_loss_defaults(self.policy_loss).items():   # null: the loss's own default
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.policy_loss == "cispo":
            require(self.clip_eps_low >= 0, "algo.clip_eps_low", "must be >= 0 (>= 1: no lower bound)")
        else:
            require(0 <= self.clip_eps_low < 1, "algo.clip_eps_low", "must be in [0, 1)")
        require(self.clip_eps_high >= 0, "algo.clip_eps_high", "must be >= 0")
        require(self.dual_clip_c == 0 or self.dual_clip_c > 1, "algo.dual_clip_c", "must be 0 (off) or > 1")
        require(self.dual_clip_c == 0 or self.policy_loss == "ppo_clip", "algo.dual_clip_c",
                f"dual-clip is defined for policy_loss=ppo_clip only, not {self.policy_loss}: set it to 0")
        self.rollout_correction = canonical_mode(self.rollout_correction)
        require(self.kl_coef >= 0, "algo.kl_coef", "must be >= 0")
        require(self.tis_cap == 0 or self.tis_cap >= 1, "algo.tis_cap", "must be 0 (off) or >= 1")
        require(self.tis_cap >= 1 or self.rollout_correction not in ("seq_tis", "token_mis"), "algo.tis_cap",
                f"rollout_correction={self.rollout_correction} needs tis_cap >= 1")
        require(self.distill_coef > 0, "algo.distill_coef", "must be > 0")
        require(self.logprob_check_tol >= 0, "algo.logprob_check_tol", "must be >= 0 (0 = by rollout precision)")
        require(0 < self.seq_mask_low <= 1 <= self.seq_mask_high, "algo.seq_mask_low",
                "need 0 < seq_mask_low <= 1 <= seq_mask_high")
        require(0 < self.icepop_low <= 1 <= self.icepop_high, "algo.icepop_low",
                "need 0 < icepop_low <= 1 <= icepop_high")
        if self.routing_replay is False:     # YAML 1.1 reads a bare `off` as false
            self.routing_replay = "off"
        require(self.routing_replay in ("off", "r2", "r3"), "algo.routing_replay",
                f"{self.routing_replay!r} is not allowed; allowed values: off, r2, r3")
        require(self.moe_aux_coef >= 0, "algo.moe_aux_coef", "must be >= 0 (0 = no load-balancing loss)")


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
    retries: int = opt(2, "retries of an item whose reward plugin failed transiently (TransientRewardError, "
                          "timeouts, connection errors, HTTP 408/425/429/5xx: rewards.outcome.is_transient) before "
                          "it counts as failed; deterministic errors are never retried")
    retry_backoff_s: float = opt(0.5, "wait before the k-th retry: retry_backoff_s x 2^(k-1) (all retries stay "
                                      "within reward.batch_timeout_s)")

    def validate(self) -> None:
        require(len(self.functions) == len(self.weights), "reward.weights",
                f"{len(self.weights)} weights for {len(self.functions)} functions {self.functions}")
        require_known_rewards(self.functions, "reward.functions")
        require(0 <= self.max_failed_frac <= 1, "reward.max_failed_frac", "must be in [0, 1]")
        require(self.max_failed_steps >= 1, "reward.max_failed_steps", "must be >= 1")
        require(self.retries >= 0, "reward.retries", "must be >= 0 (0 = no retries)")
        require(self.retry_backoff_s >= 0, "reward.retry_backoff_s", "must be >= 0")


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
    micro_batch_tokens: int = opt(8192, "token budget of one forward/backward micro-batch per worker (verl: "
                                        "ppo_max_token_len_per_gpu; micro-batches are always cut by tokens, as "
                                        "verl's use_dynamic_bsz): padded, (longest row) x (rows) <= it; packed, "
                                        "the real tokens of a micro-batch <= it x sequence_parallel, so each rank "
                                        "holds at most this many; a longer sequence gets a micro-batch of its own")
    math_attention_below: int = opt(192, "CPU: micro-batches of padded rows shorter than this many tokens compute "
                                         "attention with SDPA's math kernel instead of flash, whose backward has a "
                                         "fixed cost per 32-row block below 192 tokens (17 rows of 113 tokens: "
                                         "29 vs 57 ms per layer), when what it keeps for the backward fits 1 GiB "
                                         "(rl/grpo/attention_kernel.py); 0 = always flash")
    packing: bool = opt(False, "pack each micro-batch's sequences into one row without padding (verl: "
                               "use_remove_padding): positions restart per sequence and attention stays within "
                               "each (flash-attention varlen on CUDA when flash_attn is installed, else SDPA); "
                               "log-probs, loss and normalisers are those of padded rows (rl.packing, "
                               "rl.grpo.sequence_parallel). false: length-sorted padded rows with an attention mask")
    sequence_parallel: int = opt(1, "Ulysses sequence parallelism (verl: ulysses_sequence_parallel_size): groups of "
                                    "this many trainer workers split every packed row's tokens between them, and "
                                    "attention exchanges heads with all-to-all, so one response of L tokens needs "
                                    "L/k activations per worker; needs packing, num_workers divisible by it, and "
                                    "attention heads divisible by it (KV heads divisible by it or dividing it); "
                                    "parameters and optimizer state are sharded over all workers (dp x sp)")
    seed: int = opt(0, "global seed")
    threads: int = opt(0, "torch threads per trainer worker (0 = auto)")
    release_heap: bool = opt(True, "CPU trainers only. true: give glibc's freed heap back to the OS before each "
                                   "micro-batch's backward and each FSDP unit's gradient reduce (lowest peak: "
                                   "Qwen2.5-0.5B shape, two ranks, 8.1 -> 6.3 GB at 962 tokens, 11.6 -> 9.7 GB at "
                                   "16k). false: keep it instead, the update's tensors below 2 GiB served from the "
                                   "heap and never trimmed (unless tcmalloc/jemalloc is loaded or GLIBC_TUNABLES sets "
                                   "thresholds), so each step reuses the pages of the last one rather than faulting "
                                   "them in again (same shape, one rank of two threads, 1,874 tokens: update 16.6 -> "
                                   "~9 s, peak 11.9 -> 15.0 GB); rl/heap.py")
    backend: str = opt("auto", "torch.distributed backend", choices=["auto", "gloo", "nccl"])
    collective_timeout_s: float = opt(1800.0, "a collective of the trainer group that waits longer than this fails "
                                              "with an error naming the rank that did not arrive "
                                              "(rl.grpo.collective_watch; the process-group timeout; NCCL's "
                                              "watchdog aborts the process instead); must exceed sync.timeout_s")
    max_restarts: int = opt(2, "when a trainer worker dies or a collective times out, the trainer group is torn "
                               "down, started again, restored from the last committed checkpoint (the driver's "
                               "step, data cursor and metrics rewind to it) and the run goes on in the same job, at "
                               "most this many times (rl.grpo.recovery); 0 = stop at the first failure")
    min_workers: int = opt(1, "after a lost node whose bundles Ray places on no other node within "
                              "resources.wait_s, the trainer group restarts with the workers left (a multiple of "
                              "sequence_parallel; DCP reshards the checkpoint), down to this many (= num_workers: "
                              "never shrink; the run stops naming this key) (rl.grpo.recovery)")
    peak_tflops: float = opt(0.0, "per-device dense peak in TFLOP/s (H100 bf16: 989) for the perf/mfu metric "
                                  "(6 x params x trained tokens / update time / peak); 0 = no MFU")

    def validate(self) -> None:
        require(self.num_workers >= 1, "trainer.num_workers", "must be >= 1")
        require(self.max_steps >= 1, "trainer.max_steps", "must be >= 1")
        require(self.lr > 0, "trainer.lr", "must be > 0")
        require(self.ppo_epochs >= 1 and self.mini_batches >= 1, "trainer.mini_batches", "must be >= 1")
        require(self.micro_batch_tokens >= 16, "trainer.micro_batch_tokens", "must be >= 16")
        require(self.sequence_parallel >= 1, "trainer.sequence_parallel", "must be >= 1 (1 = off)")
        require(self.num_workers % self.sequence_parallel == 0, "trainer.sequence_parallel",
                f"trainer.num_workers={self.num_workers} is not divisible by sequence_parallel="
                f"{self.sequence_parallel} (workers form groups of sequence_parallel ranks)")
        require(0 <= self.math_attention_below <= 1024, "trainer.math_attention_below",
                "must be in [0, 1024] (0 = always flash; the math kernel's time and memory grow with the square of "
                "the length, and flash is 2-4x faster from 256 tokens on)")
        require(self.packing or self.sequence_parallel == 1, "trainer.sequence_parallel",
                f"sequence_parallel={self.sequence_parallel} splits packed rows: set trainer.packing=true")
        require(all(isinstance(m, int) for m in self.milestones), "trainer.milestones", "must be integers")
        require(self.collective_timeout_s > 0, "trainer.collective_timeout_s", "must be > 0")
        require(self.max_restarts >= 0, "trainer.max_restarts", "must be >= 0 (0 = no restart)")
        require(1 <= self.min_workers <= self.num_workers, "trainer.min_workers",
                f"must be in [1, trainer.num_workers={self.num_workers}]")


@dataclass
class SyncConfig:
    """Trainer -> vLLM weight sync."""
    method: str = opt("auto", "transport (rl.grpo.sync): shm = buckets copied through shared-memory slots in "
                              "sync.dir that trainers and engines of one node map (no file per bucket); file = "
                              "safetensors buckets in sync.dir (across nodes: a shared file system); auto = shm "
                              "when the run is on one node, else file", choices=["auto", "shm", "file"])
    dir: str = opt("/dev/shm", "where buckets are written: a RAM disk on one node, a shared file system across "
                               "nodes (trainer rank 0 writes, every rollout worker reads)")
    shards: str = opt("auto", "local = every trainer rank writes its own FSDP pieces and the engines concatenate "
                              "them (no all-gather: 3.3 s of a 7.4 s sync at the 0.5B shape); gather = rank 0 "
                              "writes all-gathered tensors (needed across nodes without a shared sync.dir, with "
                              "LoRA, with sequence parallelism); auto = local on a single-node run where it applies",
                      choices=["auto", "local", "gather"])
    bucket_mb: float = opt(512, "weights are gathered, sent and loaded this many MB at a time (bounds the memory "
                              "a sync needs)")
    timeout_s: float = opt(300.0, "timeout for each transfer")
    threads: int = opt(0, "torch threads of every trainer rank and engine while a transfer runs (both sides run "
                          "at once; rl.grpo.sync.threads): 0 = auto (on a CPU run each gets an equal share of its "
                          "node's cores among the transfer's processes there: a sync at the 0.5B shape on 2 cores "
                          "1.25 -> 0.99 s, 0.78 s with the engine's kept heap), n = at most n each (counts are only "
                          "lowered), -1 = leave them as they are")
    checksum_every: int = opt(0, "verify engine weights == trainer weights every N steps (step 0 always)")

    def validate(self) -> None:
        require(self.threads >= -1, "sync.threads", "must be >= -1 (0 = auto, -1 = leave the thread counts alone)")


@dataclass
class CheckpointConfig:
    """Checkpoints (atomic: written to a temporary directory, then renamed)."""
    every: int = opt(10, "save every N steps (0 = only at the end)")
    resume: str = opt("auto", "auto: continue from the latest checkpoint in output_dir; never; or a path")
    keep: int = opt(2, "number of checkpoints kept (complete step_N directories; the one just written always "
                       "is; damaged ones renamed step_N.damaged are never counted nor deleted)")
    verify: bool = opt(True, "before resuming, check every file of the checkpoint against its manifest (sizes and "
                             "CRC-32, written with every checkpoint); a damaged newest checkpoint is renamed "
                             "step_N.damaged and the newest intact one is used, with a warning naming the file")


@dataclass
class LogConfig(LogSection):
    """Metrics, trackers, progress, validation and the hub upload."""
    KEY_HINTS: ClassVar[dict[str, str]] = {"tensorboard": "TensorBoard is one of log.report_to (default "
                                           "[tensorboard]); log.report_to=[] writes metrics.jsonl only"}
    output_dir: str = opt("runs/grpo", "run directory: metrics.jsonl, tensorboard/, checkpoints/, final/")
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
                               "(an infeasible one fails at once), and, after a lost node, for Ray to place its "
                               "bundles on another node before the run goes on with fewer workers "
                               "(rollout.min_workers, trainer.min_workers)")
    health_timeout_s: float = opt(1800.0, "a rollout worker call (generating a batch, loading weights) still running "
                                          "after this long is declared hung: the worker is killed and replaced "
                                          "(rollout.max_restarts); a killed worker is noticed at once")


# Step-1 check of mean |trainer - engine| log-prob per rollout precision (algo.logprob_check_tol = 0). Measured:
# full precision 0.001-0.02 (fp32/bf16 kernels); int8 W8A8 adds its rounding: see bench/quantized_rollout.py.
LOGPROB_TOL = {"none": 0.1, "int8": 0.25, "fp8": 0.25}


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

    def logprob_tol(self) -> float:
        """The step-1 check's tolerance: algo.logprob_check_tol, or the rollout precision's (LOGPROB_TOL)."""
        return self.algo.logprob_check_tol or LOGPROB_TOL[self.rollout.quantization]

    def validate(self) -> None:
        require(0 < self.resources.rollout_gpu_share < 1, "resources.rollout_gpu_share", "must be in (0, 1)")
        require(self.resources.health_timeout_s > 0, "resources.health_timeout_s", "must be > 0")
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
        require(self.trainer.collective_timeout_s > self.sync.timeout_s, "trainer.collective_timeout_s",
                f"must exceed sync.timeout_s={self.sync.timeout_s:g}: during a weight sync trainer rank 0 waits that "
                "long for the engines while the other ranks wait in a collective")
        require(self.rollout.quantization != "fp8" or self.resources.rollout_gpus > 0, "rollout.quantization",
                "fp8 is vLLM's online fp8, which needs GPU rollout workers (resources.rollout_gpus > 0; vLLM's CPU "
                "build has no fp8 quantize op); on CPU use rollout.quantization=int8")
        require(not self.rollout.int8_lm_head or (self.rollout.quantization == "int8"
                                                  and self.resources.rollout_gpus == 0), "rollout.int8_lm_head",
                "quantizes the head of a CPU int8 engine: it needs rollout.quantization=int8 and CPU rollout workers "
                f"(rollout.quantization={self.rollout.quantization}, resources.rollout_gpus="
                f"{self.resources.rollout_gpus:g})")
        require(self.sync.shards != "local" or (not self.model.lora_r and self.trainer.sequence_parallel == 1),
                "sync.shards", "local writes FSDP pieces as they are: LoRA adapters must be merged from full tensors "
                "and sequence parallelism shards over a 2-D mesh; use sync.shards=gather (or auto)")
        if self.algo.routing_replay == "r3":
            require(self.rollout.return_routed_experts, "algo.routing_replay",
                    "r3 replays the experts the rollout engine chose: set rollout.return_routed_experts=true "
                    "(or use r2, which replays the trainer's own old-log-prob pass)")
        if self.algo.routing_replay == "r2":
            require(self.trainer.sequence_parallel == 1, "algo.routing_replay",
                    "r2 with trainer.sequence_parallel > 1 is not supported yet (each rank records only its part "
                    "of a packed row): use r3 or sequence_parallel=1")
        require(self.rollout.max_new_tokens < self.rollout.max_model_len, "rollout.max_new_tokens",
                f"must be below rollout.max_model_len ({self.rollout.max_model_len})")
        need = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        require(need <= self.rollout.max_model_len, "rollout.max_model_len",
                f"{self.rollout.max_model_len} cannot hold the longest prompt plus the longest response: "
                f"data.max_prompt_tokens={self.data.max_prompt_tokens} + rollout.max_new_tokens="
                f"{self.rollout.max_new_tokens} = {need}; raise it (or lower those), else responses are cut at the "
                "context length before max_new_tokens, where DAPO's overlong penalty and filter do not look")
