"""Supervised fine-tuning with TRL's SFTTrainer: chat template, loss on completions only, optional packing,
full fine-tune or LoRA (PEFT), LR schedules (incl. multi-step), checkpoint/resume, HF export (merged LoRA).

No hand-written training loop: everything runs through `trl.SFTTrainer`; r1lab adds the dataset mapping,
a multi-step LR schedule, the trackers of log.report_to (rl.tracking: TensorBoard through transformers' own
callback, the others through ours, with the same train/... names), and an atomic export with a model card
(rl.model_card) that log.push_to_hub uploads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from data.loading import DataError
from data.prompts import build_messages, build_prompt
from rl.config import resolve_model_path, to_dict
from rl.model_card import CardInfo, write_model_card
from rl.sft.config import SFTDataConfig, SFTStageConfig


def sft_dataset(dc: SFTDataConfig, model_path: str = "") -> Dataset:
    """Prompt-completion rows in TRL's conversational format; a row without the fields fails by name.
    format=text: {"text": document} rows (plain language modelling)."""
    if dc.format == "text":
        return text_dataset(dc, model_path)
    if dc.source.startswith("synthetic:"):
        from data.tasks import make_synthetic

        ds = make_synthetic(dc.source.split(":", 1)[1], dc.num_train, split="train", seed=dc.seed,
                            knobs=dc.task_knobs)
        rows, origin = ds.to_list(), dc.source
    else:
        from data.loading import load_dataset

        ds = load_dataset(dc.source, split=dc.split, field_map=dc.field_map,
                          required=("problem", dc.completion_field), add_prompt=False)
        rows, origin = ds.to_list(), dc.source
    out = []
    for i, r in enumerate(rows):
        target = r.get(dc.completion_field)
        if not isinstance(target, str) or not target.strip():
            raise DataError(f"{origin}: row {i}: missing required field {dc.completion_field!r}")
        out.append(sft_row(str(r["problem"]), target, dc.template))
    return Dataset.from_list(out)


def text_dataset(dc: SFTDataConfig, model_path: str) -> Dataset:
    """Documents for plain next-token training: `pretrain:<task>` builds a base model's corpus (data.pretrain;
    task_knobs: the keyword arguments of data.pretrain.base_corpus, and pack_chars), anything else is read from `text_field`."""
    if dc.source.startswith("pretrain:"):
        from data.pretrain import base_corpus

        task = dc.source.split(":", 1)[1]
        if task != "arithmetic":
            raise DataError(f"data.source={dc.source}: pretraining text exists for: arithmetic")
        from transformers import AutoTokenizer

        from data.pretrain import pack
        from rl.config import resolve_model_path

        knobs = dict(dc.task_knobs)
        pack_chars = int(knobs.pop("pack_chars", 0))
        tok = AutoTokenizer.from_pretrained(resolve_model_path(model_path))  # tag_names: vocab, and the eos
        try:
            docs = base_corpus(dc.num_train, dc.seed, tokenizer=tok, **knobs)
        except (TypeError, ValueError) as e:
            raise DataError(f"data.task_knobs={dict(dc.task_knobs)}: {e}") from None
        if pack_chars:
            docs = pack(docs, tok.eos_token, pack_chars)
        return Dataset.from_list([{"text": d} for d in docs])
    from data.loading import load_dataset

    ds = load_dataset(dc.source, split=dc.split, field_map=dc.field_map, required=(dc.text_field,), add_prompt=False)
    rows = []
    for i, r in enumerate(ds.to_list()):
        if not isinstance(r.get(dc.text_field), str) or not r[dc.text_field].strip():
            raise DataError(f"{dc.source}: row {i}: field {dc.text_field!r} must be non-empty text")
        rows.append({"text": r[dc.text_field]})
    return Dataset.from_list(rows)


def sft_row(problem: str, target: str, template: str) -> dict[str, Any]:
    """One prompt-completion row: conversational for the chat template (TRL applies the tokenizer's template),
    plain strings rendered by `build_prompt` for r1_zero / plain (the same text GRPO and evaluation use)."""
    if template == "chat":
        return {"prompt": build_messages(problem), "completion": [{"role": "assistant", "content": target}]}
    return {"prompt": build_prompt(problem, template=template), "completion": target}


def _trainer_cls():
    from transformers import Trainer
    from trl import SFTTrainer

    class R1SFTTrainer(SFTTrainer):
        """SFTTrainer plus a multi-step LR schedule (transformers has none built in), and the choice of TRL's
        fused LM head or the model's own loss (train.fused_lm_head)."""
        r1_milestones: list[int] = []
        r1_gamma: float = 0.1
        r1_fused_lm_head: bool = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """train.fused_lm_head=false: transformers' Trainer.compute_loss, i.e. the model's causal-LM loss on
            its full logits (labels shifted, -100 ignored, summed over num_items_in_batch tokens: the loss TRL's
            head computes). Measured on the R1-Zero base (hidden 128, vocabulary 1,048, 11 packed rows of 256):
            a training step 130 ms with TRL's head (chunked log-probs, entropy, top-1) against 76 ms. Models with
            a router aux loss (MoE) keep TRL's path, which adds it."""
            if self.r1_fused_lm_head or return_outputs or self.aux_loss_enabled:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return Trainer.compute_loss(self, model, {**inputs, "use_cache": False},
                                        num_items_in_batch=num_items_in_batch)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.args.lr_scheduler_type == "constant" and self.r1_milestones:
                opt = optimizer or self.optimizer
                self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, self.r1_milestones, self.r1_gamma)
                self._created_lr_scheduler = True
                return self.lr_scheduler
            return super().create_scheduler(num_training_steps, optimizer)

    return R1SFTTrainer


def _resume_arg(cfg: SFTStageConfig, ckpt_dir: Path) -> Any:
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return str(found[-1]) if found else None
    if not Path(mode).exists():
        raise FileNotFoundError(f"train.resume={mode}: no such checkpoint")
    return mode


def card_info(cfg: SFTStageConfig, steps: int) -> CardInfo:
    """The model card of an SFT export (the distillation stage passes its own)."""
    stage = "pretraining" if cfg.data.format == "text" else "sft"
    lora = {"LoRA": f"rank {cfg.lora.r}, alpha {cfg.lora.alpha}, merged into the weights"} if cfg.lora.enabled else {}
    return CardInfo(stage=stage, started_from=cfg.model.path, config=to_dict(cfg), datasets=[cfg.data.source],
                    steps=steps, details={"learning rate": f"{cfg.train.lr:g} ({cfg.train.lr_schedule})", **lora},
                    name=Path(cfg.output_dir).name)


def run_sft(cfg: SFTStageConfig, callbacks: list | None = None, card: CardInfo | None = None,
            push: bool = True) -> dict[str, Any]:
    """Train; export the (merged) model to <output_dir>/final with a model card (`card`, default: this SFT
    stage's); upload it when log.push_to_hub is set and `push`; return a summary with the loss curve."""
    from rl.tracking import Trackers, hf_callback

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    others = [n for n in cfg.log.report_to if n != "tensorboard"]  # TensorBoard: transformers' own callback
    trackers = Trackers(others, out, to_dict(cfg), project=cfg.log.project, run_name=cfg.log.run_name)
    try:
        summary = _train(cfg, list(callbacks or []) + [hf_callback(trackers)], card)
        trackers.summary({k: v for k, v in summary.items() if k not in ("loss_curve", "config")})
    finally:
        trackers.close()
    if push and cfg.log.push_to_hub:
        from rl.model_card import push_to_hub

        summary["hub_url"] = push_to_hub(summary["final"], cfg.log.push_to_hub)
        print(f"uploaded {summary['final']} to {summary['hub_url']}", flush=True)
    return summary


def _train(cfg: SFTStageConfig, callbacks: list, card: CardInfo | None) -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig

    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_path(cfg.model.path)
    if not Path(model_path).exists() and "/" not in model_path:
        raise FileNotFoundError(f"model.path={cfg.model.path}: no such model directory")
    tok = AutoTokenizer.from_pretrained(model_path)
    train_ds = sft_dataset(cfg.data, model_path)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"), max_steps=t.max_steps, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
        lr_scheduler_type="constant" if t.lr_schedule == "multistep" else t.lr_schedule, warmup_steps=t.warmup_ratio,  # transformers >= 5: a float < 1 is a ratio
        weight_decay=t.weight_decay, logging_steps=t.logging_steps, save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500, save_total_limit=2, seed=t.seed, data_seed=t.seed,
        bf16=cfg.model.dtype == "bfloat16",  # autocast compute, fp32 master weights (as in GRPO)
        packing=False, max_length=cfg.data.max_length, completion_only_loss=cfg.data.format != "text",
        dataset_text_field="text", report_to=["tensorboard"] if "tensorboard" in cfg.log.report_to else "none",
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        gradient_checkpointing=t.gradient_checkpointing, disable_tqdm=False,
        model_init_kwargs={"dtype": torch.float32},
    )
    peft_config = None
    if cfg.lora.enabled:
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    cls = _trainer_cls()
    collator = None
    if t.packing:  # each batch's examples in rows of max_length tokens, attention kept within each (rl.packing)
        from rl.packing import PackedLMCollator

        collator = PackedLMCollator(tok.pad_token_id, cfg.data.max_length)
    trainer = cls(model=model_path, args=args, train_dataset=train_ds, processing_class=tok,
                  peft_config=peft_config, callbacks=callbacks, data_collator=collator)
    trainer.r1_milestones = [int(m) for m in t.milestones] if t.lr_schedule == "multistep" else []
    trainer.r1_gamma = t.gamma
    trainer.r1_fused_lm_head = t.fused_lm_head
    trainer.train(resume_from_checkpoint=_resume_arg(cfg, out / "checkpoints"))
    info = card or card_info(cfg, trainer.state.global_step)
    final = export(trainer, tok, out / "final", lora=cfg.lora.enabled,
                   card=dataclasses.replace(info, steps=info.steps or trainer.state.global_step))
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    summary = {"final": str(final), "steps": trainer.state.global_step, "loss_curve": losses,
               "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
               "config": to_dict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def export(trainer, tok, final: Path, lora: bool, card: CardInfo | None = None) -> Path:
    """HF export with its model card, atomically (tmp dir then rename); LoRA adapters are merged into the base
    weights."""
    model = trainer.model
    if lora:
        model = model.merge_and_unload()
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    if card is not None:
        write_model_card(tmp, card, final_dir=final)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final
