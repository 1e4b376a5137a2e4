"""GRPO checkpoints: sharded trainer state (torch.distributed.checkpoint), an HF export, the driver's cursor.

Layout of `<output_dir>/checkpoints/step_<N>/` (written under `step_<N>.tmp/`, renamed when complete):
  dcp/                model + AdamW state, sharded: each trainer rank writes and reads only its own shards
  trainer_state.pt    LR-schedule state (identical on every rank)
  rng_rank<r>.pt      each rank's Python/torch RNG state
  hf/                 the policy as an HF model directory (what users load; the engines restart from it)
  driver.json         step and data cursor
  manifest.json       every file above with its size and CRC-32 (rl.grpo.ckpt_manifest)
  DONE                written last (names the manifest and its CRC): only directories with it are checkpoints
Every file and directory is fsynced before DONE, and the parent after the rename. DCP reshards on load, so a run
may resume with a different number of trainer workers (2 -> 1, 1 -> 2): the step and the data cursor continue
exactly; ranks without an RNG file of their own derive one from the seed and the step.

Resuming (`latest_intact_checkpoint`, with `checkpoint.verify`): checkpoints are tried newest first; one whose
files do not match its manifest is renamed `step_<N>.damaged` (kept for inspection, never deleted, never counted
or overwritten by later saves) with a warning naming the bad file and the checkpoint used instead. Checkpoints
from before manifests existed (DONE holds "ok") are used unverified, with a warning. Retention (`keep`) counts
only complete `step_<N>` directories, and the checkpoint just written (sealed, so intact) is always kept.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from rl.grpo.ckpt_manifest import LEGACY, CheckpointDamaged, fsync_dir, fsync_file, seal, verify

log = logging.getLogger("r1lab.grpo")
CKPT_PREFIX = "step_"
_CKPT_NAME = re.compile(rf"^{CKPT_PREFIX}(\d+)$")


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
        fsync_file(out / "trainer_state.pt")
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, out / f"rng_rank{rank}.pt")
    fsync_file(out / f"rng_rank{rank}.pt")   # DCP fsyncs its own files; the driver's seal fsyncs all again
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
def checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (`step_<N>` with DONE), oldest first; `.tmp` and `.damaged` directories are not."""
    found = [p for p in Path(ckpt_root).glob(f"{CKPT_PREFIX}*") if _CKPT_NAME.match(p.name) and (p / "DONE").exists()]
    return sorted(found, key=lambda p: int(_CKPT_NAME.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, unverified (cheap; `latest_intact_checkpoint` is what resumes use)."""
    done = checkpoints(ckpt_root)
    return done[-1] if done else None


class NoIntactCheckpoint(RuntimeError):
    """checkpoint.resume=auto found checkpoints, but none intact: starting over must be asked for."""


def latest_intact_checkpoint(ckpt_root: Path, verify_files: bool = True, quarantine: bool = True) -> Path | None:
    """The newest checkpoint whose files match its manifest; None when the run has no checkpoint at all.

    Damaged ones are renamed `<name>.damaged` (with `quarantine`) and reported in a warning that names the bad
    file and the checkpoint used instead. When checkpoints were written but none is intact (now or quarantined
    by an earlier attempt), raises NoIntactCheckpoint: a silent start from step 0 would throw the run away.
    With `verify_files` False: the newest with DONE, as before manifests."""
    found = checkpoints(ckpt_root)
    if not verify_files:
        return found[-1] if found else None
    damaged: list[tuple[CheckpointDamaged, Path | None]] = []
    chosen = None
    for path in reversed(found):
        try:
            status = verify(path)
        except CheckpointDamaged as e:
            damaged.append((e, quarantine_checkpoint(path) if quarantine else None))
            continue
        if status == LEGACY:
            log.warning("checkpoint %s was written before checkpoint manifests existed: resuming from it "
                        "unverified", path)
        chosen = path
        break
    instead = f"resuming from {chosen}, the newest intact checkpoint" if chosen else "no intact checkpoint is left"
    for e, moved in damaged:
        log.warning("%s; %s; %s", e, f"moved to {moved} (kept for inspection)" if moved else "left in place",
                    instead)
    quarantined = sorted(p.name for p in Path(ckpt_root).glob(f"{CKPT_PREFIX}*.damaged*"))
    if chosen is None and (damaged or quarantined):
        first = f"{damaged[0][0]}; " if damaged else ""
        raise NoIntactCheckpoint(
            f"{first}no intact checkpoint in {ckpt_root} (damaged: {quarantined or [str(e.path) for e, _ in damaged]}"
            "). Set checkpoint.resume=never to start over from the model (the damaged checkpoints are kept), or "
            "checkpoint.resume=PATH for a checkpoint you trust")
    return chosen


def quarantine_checkpoint(path: Path) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged` (`.damaged.<k>` when taken), out of resume and retention."""
    target = path.with_name(path.name + ".damaged")
    k = 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.damaged.{k}")
    os.rename(path, target)
    fsync_dir(path.parent)
    return target


def check_resume_path(path: Path, verify_files: bool = True) -> Path:
    """An explicitly named checkpoint: complete (DONE) and, with `verify_files`, intact, else a clear error
    (raised as is: an explicit choice is never swapped for another checkpoint)."""
    if not (path / "DONE").exists():
        raise FileNotFoundError(f"checkpoint.resume={path}: not a complete checkpoint (no DONE file)")
    if not verify_files:
        return path
    try:
        status = verify(path)
    except CheckpointDamaged as e:
        raise CheckpointDamaged(e.path, e.problems, f"checkpoint.resume={path} names it explicitly: choose another "
                                "checkpoint, or checkpoint.resume=auto for the newest intact one") from None
    if status == LEGACY:
        log.warning("checkpoint %s was written before checkpoint manifests existed: resuming from it unverified",
                    path)
    return path


def begin(ckpt_root: Path, step: int) -> tuple[Path, Path]:
    """(temporary directory to write into, final name)."""
    final = ckpt_root / f"{CKPT_PREFIX}{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp, final


def commit(tmp: Path, final: Path, driver_state: dict, keep: int) -> Path:
    """Write the driver's state, seal (manifest, fsyncs, DONE), rename into place, fsync the parent, and drop
    the oldest complete checkpoints beyond `keep` (never the one just written)."""
    (tmp / "driver.json").write_text(json.dumps(driver_state))
    info = seal(tmp)
    log.info("checkpoint %s: %d files, %.2f GB sealed in %.2f s", final.name, info.files, info.bytes / 1e9,
             info.seconds)
    if final.exists():   # the same step saved again (a resume from an earlier one): the new one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    kept = [p for p in checkpoints(final.parent) if p != final]
    for old in kept[: max(0, len(kept) - (max(1, keep) - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_driver_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "driver.json").read_text())
