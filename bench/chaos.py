"""Chaos benchmark: a 20-step tiny GRPO run with injected faults, and the same run without them.

Faults, all real (processes are signalled from outside, files damaged on disk; no hook in r1lab's code):
  1. SIGKILL of the rollout worker while it generates            (after step 3)
  2. SIGKILL of the rollout worker while it loads a weight sync  (after step 6)
  3. bytes flipped in the newest checkpoint's DCP shard, then    (after step 9; the newest is step 8)
  4. SIGKILL of a trainer worker in its update: the restart must skip the damaged step-8 checkpoint
  5. SIGSTOP of a trainer worker in its update: a stalled collective (trainer.collective_timeout_s=30)
                                                                 (after step 14 of the restarted stream)
  6. SIGSTOP of the rollout worker while it generates: a hung engine (resources.health_timeout_s=20)
                                                                 (after step 17)
  7. a reward plugin that fails transiently on 20% of its calls, for the whole run (reward.retries=8)
The run must finish by itself. Printed: each fault with its recovery time, the held-out accuracy of both runs
(pass@1 over 64 problems x 4 samples at steps 0 and 20), how far apart their final weights are, and last
`survived=N/N lost_samples=M` (a sample is lost when a trained group has fewer than rollout.n samples).

  .venv/bin/python bench/chaos.py [--out runs/chaos]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def flaky_accuracy(completion, sample):
    """The accuracy reward behind a verifier that is busy on 20% of calls (bench/chaos.py as a plugin)."""
    from rewards.functions import accuracy
    from rewards.outcome import TransientRewardError

    if random.random() < 0.2:
        raise TransientRewardError("verifier busy (HTTP 503, injected)")
    return accuracy(completion, sample)


def _procs(title: str) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if cmd and cmd[0].startswith(title):
            out.append(p.info["pid"])
    return out


def _last_step(out: Path) -> int:
    """The step of the last complete line of metrics.jsonl (a line being appended is skipped)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)["step"]
        except ValueError:
            continue
    return 0


def _damage_newest(ckpts: Path) -> str:
    newest = max(p for p in ckpts.glob("step_*") if p.name[5:].isdigit())
    shard = min((newest / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])   # same size, tensor bytes changed
    shard.write_bytes(bytes(data))
    return f"{newest.name}/dcp/{shard.name}"


class Injector(threading.Thread):
    """Watches metrics.jsonl and fires the faults; records what it did and when."""

    def __init__(self, out: Path) -> None:
        super().__init__(daemon=True)
        self.out, self.done, self.stop = out, [], threading.Event()
        self.plan = [(3, "rollout kill (generating)", self._kill, "ray::RolloutWorker.rollout"),
                     (6, "rollout kill (loading a weight sync)", self._kill, "ray::RolloutWorker.load_weights"),
                     (9, "damaged newest checkpoint + trainer kill (update)", self._damage_and_kill,
                      "ray::TrainerWorker.update"),
                     (14, "stalled collective (trainer SIGSTOP in update)", self._sigstop, "ray::TrainerWorker.update"),
                     (17, "hung rollout worker (SIGSTOP while generating)", self._sigstop,
                      "ray::RolloutWorker.rollout")]

    @staticmethod
    def _signal(title: str, sig: int, done: str) -> str | None:
        pids = _procs(title)
        if not pids:
            return None
        os.kill(pids[0], sig)
        return f"pid {pids[0]} {done}"

    def _kill(self, title: str) -> str | None:
        return self._signal(title, signal.SIGKILL, "killed")

    def _damage_and_kill(self, title: str) -> str | None:
        if not _procs(title):
            return None
        where = _damage_newest(self.out / "checkpoints")
        return f"{where} damaged; " + (self._kill(title) or "no process")

    def _sigstop(self, title: str) -> str | None:
        return self._signal(title, signal.SIGSTOP, "stopped")

    def run(self) -> None:
        k = 0
        while not self.stop.is_set() and k < len(self.plan):
            step = _last_step(self.out)   # after the restart from step 4 it counts up again from there
            at, name, fire, title = self.plan[k]
            if step >= at:
                what = fire(title)
                if what:
                    self.done.append({"fault": name, "after_step": step, "what": what, "t": time.time()})
                    k += 1
            time.sleep(0.002)


SFT = ["model.path=tiny:qwen2", "data.source=synthetic:chain_sum", "data.num_train=700",
       "data.task_knobs={min_terms: 2, max_terms: 2, min_value: 1, max_value: 30}", "train.max_steps=300",
       "train.batch_size=32", "train.lr=0.003", "train.lr_schedule=cosine", "train.warmup_ratio=0.05",
       "train.logging_steps=20", "train.resume=never"]   # the tests' cold start (tests/conftest.py SFT_OVERRIDES)


def make_base(out: Path) -> Path:
    """A tiny Qwen2 after a cold start on chain sums, so that held-out accuracy means something."""
    from rl.config import load_config
    from rl.sft.config import SFTStageConfig
    from rl.sft.train import run_sft

    sft = out / "sft"
    if not (sft / "summary.json").exists():
        run_sft(load_config(SFTStageConfig, None, SFT + [f"output_dir={sft}"]))
    return sft / "final"


def weights_diff(a: Path, b: Path) -> float:
    """max |a - b| over every tensor of two exported models."""
    from safetensors.torch import load_file

    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def run(out: Path, base: Path, faults: bool) -> tuple[dict, list[dict], object, list[dict]]:
    from rl.config import load_config
    from rl.grpo.config import GRPOConfig
    from rl.grpo.driver import GRPODriver

    shutil.rmtree(out, ignore_errors=True)
    reward = "chaos:flaky_accuracy" if faults else "accuracy"   # this file, imported by module name
    cfg = load_config(GRPOConfig, str(ROOT / "configs/tiny_grpo.yaml"), [
        f"model.path={base}", "trainer.max_steps=20", "trainer.lr=1e-4", "trainer.warmup_steps=3", "checkpoint.every=4", "checkpoint.keep=3",
        f"log.output_dir={out}", "log.progress=false", "log.val_every=20", "log.val_problems=64",
        "log.val_samples=4", "resources.ray_address=local", f"reward.functions=[{reward}, format]",
        "reward.weights=[1.0, 0.1]", "reward.retries=8", "reward.retry_backoff_s=0.05", "sync.timeout_s=20",
        "trainer.collective_timeout_s=30", "sync.checksum_every=5", "rollout.max_restarts=3",
        "resources.health_timeout_s=20",
        "trainer.max_restarts=3"])
    inj = Injector(out)
    if faults:
        inj.start()
    t0 = time.time()
    d = GRPODriver(cfg)
    try:
        result = d.run()
    finally:
        inj.stop.set()
    result["seconds"] = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result, rows, d.faults, inj.done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/chaos")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    sys.path.insert(0, str(Path(__file__).resolve().parent))   # the reward plugin `chaos:flaky_accuracy`
    base = make_base(out)
    res_f, rows_f, faults, injected = run(out / "faults", base, faults=True)
    res_c, rows_c, _, _ = run(out / "clean", base, faults=False)

    print("\n== injected faults")
    for i in injected:
        print(f"  after step {i['after_step']:2d}: {i['fault']}: {i['what']}")
    print("== recoveries (rl.grpo.recovery)")
    for f in faults.faults:
        print(f"  step {f.step:2d} {f.kind:8s} recovered in {f.recovery_s:6.1f} s, lost steps {f.lost_steps}: "
              f"{f.cause[:110]}")
    steps = [r["step"] for r in rows_f if r["step"] > 0]
    lost = int(sum(r.get("rollout/short_groups", 0) for r in rows_f))
    retries = sum(v for r in rows_f for k, v in r.items() if k.endswith("/retries") and k.startswith("reward/"))
    failed = max((v for r in rows_f for k, v in r.items() if k.startswith("reward/") and k.endswith("failed_frac")),
                 default=0.0)
    damaged = sorted(p.name for p in (out / "faults" / "checkpoints").glob("*.damaged"))
    acc = lambda rows: next((v for r in reversed(rows) for k, v in r.items() if k.endswith("pass@1")), float("nan"))
    kinds = [f.kind for f in faults.faults if f.recovery_s >= 0]
    stalled = any("did not arrive" in f.cause or "collective" in f.cause for f in faults.faults)
    hung = any(f.kind == "rollout" and "hung" in f.cause and f.recovery_s >= 0 for f in faults.faults)
    checks = {"rollout kill (generating)": kinds.count("rollout") >= 1,
              "rollout kill (weight sync)": kinds.count("rollout") >= 2,
              "damaged newest checkpoint": bool(damaged),
              "trainer kill": kinds.count("trainer") >= 1,
              "stalled collective": stalled and kinds.count("trainer") >= 2,
              "hung rollout worker": hung,
              "flaky reward": retries > 0 and failed == 0.0}
    print(f"== steps logged {steps == list(range(1, 21))} ({len(steps)} lines), damaged set aside: {damaged}, "
          f"reward retries {retries:.0f}, max reward failed_frac {failed:.3f}")
    for name, ok in checks.items():
        print(f"  {name}: {'survived' if ok else 'NOT survived'}")
    first = lambda rows: next((v for r in rows for k, v in r.items() if k.endswith("pass@1")), float("nan"))
    print(f"held-out pass@1 at step 0: {first(rows_c):.3f}; at step 20: faulty run {acc(rows_f):.3f} "
          f"({res_f['seconds']:.0f} s), clean run {acc(rows_c):.3f} ({res_c['seconds']:.0f} s)")
    print(f"final weights, max |faulty - clean| = {weights_diff(Path(res_f['final']), Path(res_c['final'])):.3g} "
          "(rollouts reseeded per step and worker; restarts restore optimizer, schedule and RNG)")
    ok = sum(checks.values()) if steps == list(range(1, 21)) else 0
    print(f"survived={ok}/{len(checks)} lost_samples={lost}")


if __name__ == "__main__":
    main()
