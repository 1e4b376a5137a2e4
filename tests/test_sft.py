"""Cold-start SFT through TRL: loss falls, held-out accuracy rises; bad input fails early."""
import pytest
from transformers import AutoModelForCausalLM

from data.loading import DataError
from rl.config import ConfigError, load_config
from rl.eval.harness import Sampling, evaluate
from rl.rollout.vllm_engine import reload_weights
from rl.sft.config import SFTStageConfig
from rl.sft.train import run_sft, sft_dataset


@pytest.mark.vllm
def test_sft_lowers_loss_and_raises_heldout_accuracy(tiny, tiny_sft, vllm_engine, tmp_path, heldout_file):
    final, summary = tiny_sft
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary["loss_curve"]
    held = heldout_file(tmp_path / "held.jsonl")
    sampling = Sampling(temperature=0.0, top_p=1.0, n=1, max_tokens=48)
    reload_weights(vllm_engine, str(tiny.qwen2))
    before = evaluate(held, llm=vllm_engine, sampling=sampling, quiet=True)["metrics"]["pass@1"]
    reload_weights(vllm_engine, str(final))
    after = evaluate(held, llm=vllm_engine, sampling=sampling, quiet=True)["metrics"]["pass@1"]
    assert before == 0.0 and after >= 0.2, (before, after)


def test_lora_sft_trains_and_exports_merged(tmp_path, tiny):
    cfg = load_config(SFTStageConfig, None, [
        "model.path=tiny:qwen2", "data.num_train=96", "data.task_knobs={max_terms: 2}", "train.max_steps=12",
        "train.batch_size=8", "train.lr=0.02", "train.lr_schedule=multistep", "train.milestones=[8]",
        "train.logging_steps=1", "lora.enabled=true", "lora.r=8", f"output_dir={tmp_path}", "train.save_steps=6"])
    s = run_sft(cfg)
    losses = [loss for _, loss in s["loss_curve"]]
    assert s["steps"] == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    m = AutoModelForCausalLM.from_pretrained(s["final"])  # merged: a plain Qwen2 checkpoint, no adapters
    assert type(m).__name__ == "Qwen2ForCausalLM" and not any("lora" in n for n, _ in m.named_parameters())
    assert (tmp_path / "checkpoints").exists()


def test_sft_resumes_from_checkpoint(tmp_path, tiny):
    base = ["model.path=tiny:qwen2", "data.num_train=64", "train.batch_size=8", "train.lr=0.001",
            "train.logging_steps=1", "train.save_steps=4", f"output_dir={tmp_path}"]
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        seen: list = []

        def on_step_end(self, args, state, control, **kw):
            self.seen.append(state.global_step)

    run_sft(load_config(SFTStageConfig, None, base + ["train.max_steps=4"]))
    counter = CountSteps()
    s = run_sft(load_config(SFTStageConfig, None, base + ["train.max_steps=8"]), callbacks=[counter])
    assert counter.seen == [5, 6, 7, 8]  # continued after step 4 instead of starting over
    assert [st for st, _ in s["loss_curve"]] == list(range(1, 9))


def test_dataset_without_needed_fields_fails_by_name(tmp_path):
    f = tmp_path / "traces.jsonl"
    f.write_text('{"problem": "1+1", "solution": "<think>x</think>\\\\boxed{2}"}\n{"problem": "2+2"}\n')
    cfg = load_config(SFTStageConfig, None, [f"data.source={f}"])
    with pytest.raises(DataError, match=r"traces\.jsonl: row 1 \(line 2\): missing required field 'solution'"):
        sft_dataset(cfg.data)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.lr_schedul.*allowed"):
        load_config(SFTStageConfig, None, ["train.lr_schedul=cosine"])
    with pytest.raises(ConfigError, match="train.lr_schedule: 'exp' is not allowed"):
        load_config(SFTStageConfig, None, ["train.lr_schedule=exp"])
    with pytest.raises(ConfigError, match="train.milestones: multistep needs milestones"):
        load_config(SFTStageConfig, None, ["train.lr_schedule=multistep"])


def test_missing_model_path_fails_before_training(tmp_path):
    cfg = load_config(SFTStageConfig, None, [f"model.path={tmp_path}/nope", "data.num_train=8"])
    with pytest.raises((FileNotFoundError, OSError)):
        run_sft(cfg)


@pytest.mark.parametrize("packing", [False, True])
def test_the_models_own_loss_equals_trls_fused_head(tmp_path, tiny, packing):
    """train.fused_lm_head=false (the model's loss on full logits, faster for tiny models) trains on the same loss
    as TRL's fused head: the same losses step by step (completion-only SFT, padded and packed)."""
    base = ["model.path=tiny:qwen2", "data.num_train=48", "train.batch_size=8", "train.lr=0.003",
            "train.logging_steps=1", "train.max_steps=4", "train.resume=never", f"train.packing={str(packing).lower()}"]
    curves = {}
    for fused in (True, False):
        s = run_sft(load_config(SFTStageConfig, None, base + [f"train.fused_lm_head={str(fused).lower()}",
                                                              f"output_dir={tmp_path / str(fused)}"]))
        curves[fused] = [loss for _, loss in s["loss_curve"]]
    assert len(curves[True]) == 4 and curves[True] == pytest.approx(curves[False], rel=1e-4), curves
    assert curves[False][-1] < curves[False][0]
