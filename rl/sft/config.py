"""SFTStageConfig: cold-start SFT / distillation student training, validated on load."""
from __future__ import annotations

from dataclasses import dataclass, field

from rl.config import LogSection, ModelConfig, opt, require


@dataclass
class SFTDataConfig:
    """Training traces: prompt from `problem`, target from `completion_field`; or plain text (pretraining)."""
    source: str = opt("synthetic:chain_sum", "JSONL/Parquet path, hub id, synthetic:<task> (worked traces), or "
                                             "pretrain:arithmetic (a base model's pretraining text, data.pretrain)")
    format: str = opt("prompt_completion", "prompt_completion: loss on the completion of each row; text: plain "
                                          "next-token training on whole documents (pretraining a base model)",
                      choices=["prompt_completion", "text"])
    text_field: str = opt("text", "format=text: the field holding each document")
    split: str = opt("train", "split to read")
    field_map: dict = opt({}, "rename fields, e.g. {problem: question, solution: response}")
    completion_field: str = opt("solution", "field holding the target completion (reasoning + answer)")
    template: str = opt("chat", "prompt template: chat = the tokenizer's chat template (conversational rows); "
                                "r1_zero / plain = plain-text prompts (data.prompts.build_prompt)",
                        choices=["chat", "r1_zero", "plain"])
    num_train: int = opt(2000, "synthetic tasks: number of training traces")
    task_knobs: dict = opt({}, "synthetic task difficulty knobs")
    seed: int = opt(0, "data seed")
    max_length: int = opt(512, "maximum tokens of prompt + completion (longer rows are truncated)")

    def validate(self) -> None:
        require(self.num_train > 0, "data.num_train", "must be > 0")
        require(self.max_length >= 16, "data.max_length", "must be >= 16")
        require(not self.source.startswith("pretrain:") or self.format == "text", "data.format",
                f"data.source={self.source} is pretraining text: set data.format=text")


@dataclass
class SFTTrainConfig:
    """Optimisation (passed to TRL's SFTConfig / transformers' TrainingArguments)."""
    max_steps: int = opt(-1, "training steps (-1: use epochs)")
    epochs: float = opt(1.0, "epochs when max_steps is -1")
    batch_size: int = opt(16, "per-device batch size")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr: float = opt(1e-4, "peak learning rate")
    lr_schedule: str = opt("cosine", "schedule", choices=["constant", "cosine", "linear", "multistep"])
    warmup_ratio: float = opt(0.0, "warm-up fraction of training")
    milestones: list = opt([], "multistep: steps at which the LR is multiplied by gamma")
    gamma: float = opt(0.1, "multistep decay factor")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    packing: bool = opt(False, "pack each batch's examples into rows of data.max_length tokens, positions restarting "
                               "per example and attention kept within each (rl.packing): the same batches and loss "
                               "as padding, without computing the padding")
    logging_steps: int = opt(10, "log every N steps")
    save_steps: int = opt(0, "checkpoint every N steps (0: only the final model)")
    resume: str = opt("auto", "auto: continue from the latest checkpoint in output_dir; never; or a path")
    seed: int = opt(0, "seed")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward")
    threads: int = opt(0, "torch threads (0 = default)")
    fused_lm_head: bool = opt(True, "TRL's fused LM head: the loss from per-token log-probs computed in chunks, "
                                    "never the full logits (the memory of a large vocabulary), plus entropy and "
                                    "token-accuracy metrics; false = the model's own loss on its full logits, the "
                                    "same loss, 1.7x faster per step for a tiny model on CPU (rl.sft.train)")

    def validate(self) -> None:
        require(self.lr > 0, "train.lr", "must be > 0")
        require(self.batch_size >= 1 and self.grad_accum >= 1, "train.batch_size", "must be >= 1")
        require(self.max_steps == -1 or self.max_steps > 0, "train.max_steps", "must be -1 or > 0")
        require(self.lr_schedule != "multistep" or bool(self.milestones), "train.milestones",
                "multistep needs milestones, e.g. [100, 200]")


@dataclass
class LoraSection:
    """LoRA via PEFT (off: full fine-tune). The exported model is merged."""
    enabled: bool = opt(False, "train LoRA adapters instead of all weights")
    r: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA alpha")
    dropout: float = opt(0.0, "LoRA dropout")
    target_modules: list = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                               "modules that get adapters")


@dataclass
class SFTStageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    log: LogSection = field(default_factory=LogSection)
    output_dir: str = opt("runs/sft", "run directory: checkpoints/, final/ (HF export), summary.json")
