"""GRPO checkpoints: sharded trainer state (torch.distributed.checkpoint), an HF export, the driver's cursor.

Layout of `<output_dir>/checkpoints/step_<N>/` (written under `step_<N>.tmp/`, renamed when complete):
  dcp/                model + AdamW state, sharded: each trainer rank writes and reads only its own shards
  trainer_state.pt    LR-schedule state (identical on every rank)
  rng_rank<r>.pt      each rank's Python/torch RNG state
  hf/                 the policy as an HF model directory (what users load; the engines restart from it)
  driver.json         step and data cursor
  DONE                written last: only directories with it are checkpoints
DCP reshards on load, so a run may resume with a different number of trainer workers (2 -> 1, 1 -> 2): the
step and the data cursor continue exactly; ranks without an RNG file of their own derive one from the seed
and the step.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

CKPT_PREFIX = "step_"


# ------------------------------------------------------------------------------------------------ trainer side
def save_trainer_state(model, optim, sched, rank: int, out_dir: str | Path) -> None:
    """Collective: sharded model + optimizer via DCP, the schedule (rank 0) and this rank's RNG."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = Path(out_dir)
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / "dcp"))
    if rank == 0:
        torch.save({"sched": sched.state_dict()}, out / "trainer_state.pt")
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, out / f"rng_rank{rank}.pt")
    dist.barrier()


def load_trainer_state(model, optim, sched, rank: int, ckpt_dir: str | Path, seed: int) -> int:
    """Collective: restore model, optimizer (resharded to this world size), schedule and RNG; returns the
    schedule's step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(ckpt_dir)
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(torch.load(path / "trainer_state.pt", weights_only=False)["sched"])
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        blob = torch.load(rng, weights_only=False)
        random.setstate(blob["python"])
        torch.set_rng_state(blob["torch"])
    else:  # more ranks than when saved: a fresh, reproducible stream per rank
        random.seed(seed * 1_000_003 + 7919 * rank + int(sched.last_epoch))
        torch.manual_seed(seed * 1_000_003 + 7919 * rank + int(sched.last_epoch))
    dist.barrier()
    return int(sched.last_epoch)


# ------------------------------------------------------------------------------------------------ driver side
def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob(f"{CKPT_PREFIX}*") if (p / "DONE").exists())
    return done[-1] if done else None


def begin(ckpt_root: Path, step: int) -> tuple[Path, Path]:
    """(temporary directory to write into, final name)."""
    final = ckpt_root / f"{CKPT_PREFIX}{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp, final


def commit(tmp: Path, final: Path, driver_state: dict, keep: int) -> Path:
    """Write the driver's state and DONE, rename into place, drop the oldest beyond `keep`."""
    (tmp / "driver.json").write_text(json.dumps(driver_state))
    (tmp / "DONE").write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    kept = sorted(p for p in final.parent.glob(f"{CKPT_PREFIX}*") if (p / "DONE").exists())
    for old in kept[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_driver_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "driver.json").read_text())
