"""Trainer rank 0's peak extra memory while it syncs weights and saves a checkpoint: before vs after.

On Qwen2.5-0.5B's shape (random init, fp32 masters + AdamW, two FSDP2 ranks under torchrun, CPU/gloo):
  sync   before: gather the full state dict to rank 0's CPU (`get_model_state_dict(full_state_dict=True)`, what
                 the trainer did) and write it as safetensors
         after:  `TrainerWorker.push_weights`: one bucket at a time through the file transport, to a reader in
                 another process (as a vLLM engine would read), bf16 like the engine
  ckpt   before: gather model + optimizer to rank 0 and `torch.save` them (the old format)
         after:  `TrainerWorker.save_checkpoint`: DCP, each rank writes its own shards
Peak extra = rank 0's high-water RSS during the operation minus its RSS before it (reset via
/proc/self/clear_refs). Bucket size: --bucket-mb (default 256).

  .venv/bin/python bench/bench_state_memory.py [--bucket-mb 256]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


def _measure(fn) -> tuple[float, float]:
    import torch.distributed as dist

    dist.barrier()
    before = _rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return _rss("VmHWM:") - before, time.perf_counter() - t0


def reader(spec_json: str, version: int) -> None:
    """A stand-in for the vLLM engine: reads every bucket and drops it."""
    from rl.grpo.sync import make_transport

    n = 0
    for _, t in make_transport(json.loads(spec_json)).receive(version, 0):
        n += t.numel()
    print(json.dumps({"read_elements": n}))


def ranks(bucket_mb: float, work: str) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    from rl.config import load_config, resolve_model_path
    from rl.grpo.config import GRPOConfig
    from rl.grpo.sync import FileTransport
    from rl.grpo.trainer_worker import TrainerWorker

    sys.path.insert(0, str(REPO / "launch"))
    from train_step import synthetic_shard

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["model.path=tiny:qwen2:shape=qwen2.5-0.5b",
                                                             "trainer.micro_batch_tokens=2048"])
    transport = FileTransport(f"{work}/shm", "bench", readers=1, timeout_s=600)
    w = TrainerWorker.from_env(cfg, resolve_model_path(cfg.model.path), sync_spec=transport.spec())
    batch = synthetic_shard(151936, 0, 128, 32, 64, 48, 0.3, seed=w.rank)
    batch["rollout_logp"] = batch["old_logp"] = torch.zeros_like(batch["rollout_logp"])
    w.update(batch)  # AdamW state exists, as in a real run
    out = {}

    def old_sync():
        state = get_model_state_dict(w.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if w.rank == 0:
            save_file({k: v.contiguous() for k, v in state.items() if "lm_head" not in k}, f"{work}/old.safetensors")

    def new_sync():
        proc = None
        if w.rank == 0:
            proc = subprocess.Popen([sys.executable, __file__, "--reader", json.dumps(transport.spec())],
                                    stdout=subprocess.PIPE, text=True)
        w.push_weights(1, bucket_mb, checksum=False)
        if proc is not None:
            proc.wait(timeout=600)

    def old_ckpt():
        msd, osd = get_state_dict(w.model, w.optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if w.rank == 0:
            torch.save({"model": msd, "optim": osd}, f"{work}/trainer.pt")

    def new_ckpt():
        os.makedirs(f"{work}/ckpt", exist_ok=True)
        w.save_checkpoint(f"{work}/ckpt")

    for name, fn in (("sync_before", old_sync), ("sync_after", new_sync), ("ckpt_before", old_ckpt),
                     ("ckpt_after", new_ckpt)):
        out[name] = _measure(fn)
    if w.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    w.shutdown()
    dist.destroy_process_group() if dist.is_initialized() else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--ranks", action="store_true")
    ap.add_argument("--reader")
    ap.add_argument("--work")
    a = ap.parse_args()
    if a.reader:
        return reader(a.reader, 1)
    if a.ranks:
        return ranks(a.bucket_mb, a.work)
    with tempfile.TemporaryDirectory(dir="/tmp") as work:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               __file__, "--ranks", "--bucket-mb", str(a.bucket_mb), "--work", work]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise SystemExit(out.stderr[-4000:])
        res = json.loads(lines[-1][len("RESULT "):])
    print("Qwen2.5-0.5B shape (494M params, fp32 masters + AdamW), 2 FSDP2 ranks (gloo, CPU), rank 0's peak extra RSS")
    print(f"{'operation':<12} {'before MB':>10} {'after MB':>10} {'before s':>9} {'after s':>8}")
    for op in ("sync", "ckpt"):
        b, a_ = res[f"{op}_before"], res[f"{op}_after"]
        print(f"{op:<12} {b[0]:>10.0f} {a_[0]:>10.0f} {b[1]:>9.1f} {a_[1]:>8.1f}")
    print(f"bucket_mb={a.bucket_mb:g} (the sync's bound: ~one bucket in bf16 plus the largest single tensor)")


if __name__ == "__main__":
    main()
