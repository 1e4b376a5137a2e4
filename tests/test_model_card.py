"""Model cards: every HF export gets a README.md that huggingface_hub parses as a model card, with the right
base model (hub lineage), tags, datasets, provenance and, once evaluated, a model-index; log.push_to_hub."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from rl.config import ConfigError, load_config
from rl.model_card import CardInfo, Result, add_results, check_push, push_to_hub, write_model_card

GRPO_CFG = {"model": {"path": "x"}, "data": {"source": "synthetic:arithmetic", "template": "chat"},
            "reward": {"functions": ["accuracy", "format"], "weights": [1.0, 0.1]}}


def card(d: Path) -> ModelCard:
    return ModelCard.load(d / "README.md")


def test_card_metadata_provenance_and_results(tmp_path):
    info = CardInfo(stage="grpo", started_from="Qwen/Qwen2.5-0.5B", config=GRPO_CFG,
                    datasets=["openai/gsm8k", "synthetic:arithmetic"], steps=30,
                    rewards=[("accuracy", 1.0), ("format", 0.1)], details={"teacher": "none"},
                    results=[Result("math500", 0.41, notes="500 problems x 4 samples at T=0.6")], name="qwen-grpo")
    write_model_card(tmp_path, info)
    c = card(tmp_path)
    assert c.data.base_model == "Qwen/Qwen2.5-0.5B" and c.data.library_name == "transformers"
    assert {"r1lab", "grpo", "reasoning"} <= set(c.data.tags)
    assert c.data.datasets == ["openai/gsm8k"]           # only hub ids; the synthetic task is in the body
    (r,) = c.data.eval_results
    assert (r.dataset_name, r.metric_type, r.metric_value) == ("math500", "pass@1", 0.41)
    assert c.data.model_name == "qwen-grpo"
    assert "accuracy (weight 1), format (weight 0.1)" in c.text and "| steps | 30 |" in c.text
    assert "`synthetic:arithmetic`" in c.text and "r1lab commit" in c.text
    assert f"vllm serve {tmp_path.resolve()} --reasoning-parser deepseek_r1" in c.text
    assert json.loads((tmp_path / "r1lab_card.json").read_text())["steps"] == 30


def test_base_model_follows_the_lineage_of_local_exports(tmp_path):
    sft, grpo, tiny = tmp_path / "sft" / "final", tmp_path / "grpo" / "final", tmp_path / "tiny_grpo"
    for d in (sft, grpo, tiny):
        d.mkdir(parents=True)
    write_model_card(sft, CardInfo("sft", "meta-llama/Llama-3.2-1B", {}, ["synthetic:chain_sum"], steps=5))
    write_model_card(grpo, CardInfo("grpo", str(sft), GRPO_CFG, ["synthetic:chain_sum"], steps=2))
    c = card(grpo)
    assert c.data.base_model == "meta-llama/Llama-3.2-1B"
    assert f"`{sft}` (the r1lab sft export; it started from [meta-llama/Llama-3.2-1B]" in c.text
    write_model_card(tiny, CardInfo("grpo", "tiny:qwen2", GRPO_CFG, ["synthetic:chain_sum"], steps=2))
    c = card(tiny)
    assert c.data.base_model is None and "a tiny model built on the spot by r1lab's `rl.tiny`" in c.text
    assert "base_model" not in (tiny / "README.md").read_text().split("---")[1]  # the hub rejects a non-id


def test_add_results_writes_a_model_index_and_leaves_foreign_models_alone(tmp_path):
    from launch.pipeline import card_results

    d = tmp_path / "final"
    d.mkdir()
    write_model_card(d, CardInfo("distillation", "tiny:llama", {}, ["synthetic:arithmetic"], steps=800))
    assert card(d).data.eval_results is None
    res = {"metrics": {"pass@1": 0.897, "pass@1_ci95_low": 0.879, "pass@1_ci95_high": 0.916}, "num_problems": 128,
           "samples_per_problem": 8, "sampling": {"temperature": 1.0}}
    card_results({d: res}, "synthetic:arithmetic (held-out)")
    card_results({d: {**res, "metrics": {**res["metrics"], "pass@1": 0.9}}}, "synthetic:arithmetic (held-out)")
    (r,) = card(d).data.eval_results                      # the re-run replaced its own result
    assert r.metric_value == 0.9 and r.dataset_name == "synthetic:arithmetic (held-out)"
    assert "128 problems x 8 samples at T=1.0; 95% CI [0.879, 0.916]" in r.metric_name
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    assert add_results(foreign, [Result("x", 1.0)]) is None and not (foreign / "README.md").exists()


def test_push_to_hub_is_validated_and_uploads_the_card(tmp_path, monkeypatch):
    from rl.grpo.config import GRPOConfig

    with pytest.raises(ConfigError, match=r"log\.push_to_hub: 'no-owner' is not a hub repo id"):
        load_config(GRPOConfig, None, ["log.push_to_hub=no-owner"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"log\.push_to_hub=me/m: this machine is offline"):
        check_push("me/m")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match=r"log\.push_to_hub=me/m: no Hugging Face token"):
        check_push("me/m")
    calls = []

    class FakeApi:  # what would go over the network
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            calls.append(("upload", folder_path, repo_id, tuple(ignore_patterns)))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    d = tmp_path / "final"
    d.mkdir()
    write_model_card(d, CardInfo("sft", "tiny:qwen2", {}, ["synthetic:chain_sum"], steps=3))
    assert push_to_hub(d, "me/m") == "https://huggingface.co/me/m"
    assert calls == [("create", "me/m", True), ("upload", str(d), "me/m", ("r1lab_card.json",))]
    assert 'AutoTokenizer.from_pretrained("me/m")' in card(d).text


def test_sft_export_has_a_card_and_its_trackers(tmp_path, monkeypatch):
    """A real (3-step) SFT run: final/README.md parses, names the stage, data and steps; MLflow got train/loss."""
    from rl.sft.config import SFTStageConfig
    from rl.sft.train import run_sft

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SFTStageConfig, "configs/tiny_sft.yaml", [
        "train.max_steps=3", "train.logging_steps=1", "data.num_train=48", "train.batch_size=16",
        f"output_dir={tmp_path / 'sft'}", "log.report_to=[tensorboard, mlflow]", "train.resume=never"])
    s = run_sft(cfg)
    c = card(Path(s["final"]))
    assert {"r1lab", "sft"} <= set(c.data.tags) and c.data.base_model is None
    assert "| steps | 3 |" in c.text and "`synthetic:chain_sum`" in c.text and "tiny:qwen2" in c.text
    assert str((tmp_path / "sft" / "final").resolve()) in c.text and ".tmp" not in c.text
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "sft" / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("r1lab").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert run.data.params["train.max_steps"] == "3" and run.data.tags["summary.steps"] == "3"
    assert list((tmp_path / "sft" / "checkpoints" / "runs").rglob("events.out.tfevents.*"))  # TensorBoard


def test_grpo_card_names_rewards_algorithm_and_parent(tmp_path):
    """The GRPO driver's card (final and checkpoints) from its config, without starting Ray."""
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    parent = tmp_path / "sft_final"
    parent.mkdir()
    write_model_card(parent, CardInfo("sft", "Qwen/Qwen2.5-Math-1.5B", {}, ["synthetic:arithmetic"], steps=500))
    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", [f"log.output_dir={tmp_path / 'grpo'}"])
    info = GRPODriver(cfg).card_info()
    info.started_from = str(parent)
    out = tmp_path / "grpo" / "final"
    out.mkdir(parents=True)
    write_model_card(out, info)
    c = card(out)
    assert c.data.base_model == "Qwen/Qwen2.5-Math-1.5B" and "grpo" in c.data.tags
    weights = dict(zip(cfg.reward.functions, cfg.reward.weights))
    assert ", ".join(f"{n} (weight {w:g})" for n, w in weights.items()) in c.text
    assert f"{cfg.algo.advantage} advantages" in c.text and f"{cfg.rollout.n} samples per step" in c.text
