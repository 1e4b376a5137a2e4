"""Verified checkpoints: manifests written last, damage detected at resume, the newest intact one used."""
import json
import logging
import os

import pytest

from rl.config import load_config
from rl.grpo import checkpoint as ckpt
from rl.grpo.ckpt_manifest import LEGACY, VERIFIED, CheckpointDamaged, file_crc32, verify
from rl.grpo.config import GRPOConfig
from rl.ports import free_port

SHARD = "dcp/__1_0.distcp"


def _save(root, step, seed, keep=5):
    """A checkpoint-shaped directory through the real begin/commit path (random bytes as shards)."""
    tmp, final = ckpt.begin(root, step)
    rng = __import__("random").Random(seed)
    files = {"dcp/__0_0.distcp": 300_000, SHARD: 300_000, "dcp/.metadata": 2_000, "trainer_state.pt": 900,
             "rng_rank0.pt": 500, "hf/model.safetensors": 150_000, "hf/config.json": 300}
    for name, size in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(rng.randbytes(size))
    return ckpt.commit(tmp, final, {"step": step, "cursor": {"epoch": 0, "pos": step}}, keep)


def _flip(path, offset, n=4):
    """Flip n bytes in place (same size)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _truncate(path, keep_bytes):
    with open(path, "r+b") as f:
        f.truncate(keep_bytes)


def test_manifest_lists_every_file_with_size_and_checksum_and_done_names_it(tmp_path):
    c = _save(tmp_path, 2, seed=0)
    manifest = json.loads((c / "manifest.json").read_text())
    done = json.loads((c / "DONE").read_text())
    on_disk = sorted(str(p.relative_to(c)) for p in c.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == sorted(set(on_disk) - {"manifest.json", "DONE"})
    for name, entry in manifest["files"].items():
        assert (entry["bytes"], entry["crc32"]) == file_crc32(c / name)
    assert done["manifest"] == "manifest.json" and done["files"] == len(manifest["files"])
    assert verify(c) == VERIFIED
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage, what", [
    (lambda c: _truncate(c / SHARD, 1000), "bytes, the manifest says 300000 (truncated"),
    (lambda c: _flip(c / SHARD, 150_000), "contents changed"),           # same size: only the checksum sees it
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage, what):
    older = _save(tmp_path, 2, seed=0)
    newest = _save(tmp_path, 4, seed=1)
    size_before = (newest / SHARD).stat().st_size
    damage(newest)
    assert ((newest / SHARD).stat().st_size == size_before) == ("changed" in what)
    with caplog.at_level(logging.WARNING, logger="r1lab.grpo"):
        got = ckpt.latest_intact_checkpoint(tmp_path)
    assert got == older
    moved = tmp_path / "step_000004.damaged"
    assert moved.is_dir() and not newest.exists()                        # kept for inspection, out of the way
    warning = caplog.text
    assert SHARD in warning and what in warning and f"resuming from {older}" in warning and str(moved) in warning
    # the run continues from step 2 and saves step 4 again: the damaged copy is neither overwritten nor counted
    _save(tmp_path, 4, seed=2, keep=1)
    assert moved.is_dir() and verify(tmp_path / "step_000004") == VERIFIED
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step_000004"]   # keep=1: step 2 rotated out


@pytest.mark.parametrize("damage, file, what", [
    (lambda c: os.remove(c / "trainer_state.pt"), "trainer_state.pt", "missing"),
    (lambda c: (c / "dcp" / "__2_0.distcp").write_bytes(b"x"), "dcp/__2_0.distcp", "not in the manifest"),
    (lambda c: _flip(c / "manifest.json", 40, 1), "manifest.json", "the manifest changed"),
    (lambda c: (c / "DONE").write_text("{garbled"), "DONE", "unreadable"),
])
def test_every_kind_of_damage_names_the_file(tmp_path, damage, file, what):
    c = _save(tmp_path, 2, seed=0)
    damage(c)
    with pytest.raises(CheckpointDamaged) as e:
        verify(c)
    assert e.value.first_file == file and what in str(e.value) and str(c) in str(e.value)


def test_explicit_resume_of_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    _save(tmp_path, 2, seed=0)
    c = _save(tmp_path, 4, seed=1)
    _flip(c / SHARD, 10)
    with pytest.raises(CheckpointDamaged, match=rf"{c} is damaged: {SHARD}: crc32 .*checkpoint.resume={c} names it"):
        ckpt.check_resume_path(c)
    assert c.is_dir()                                                    # an explicit choice is not moved
    assert ckpt.check_resume_path(c, verify_files=False) == c            # checkpoint.verify=false: DONE alone


def test_no_intact_checkpoint_is_an_error_not_a_silent_fresh_start(tmp_path):
    for step in (2, 4):
        _truncate(_save(tmp_path, step, seed=step) / SHARD, 10)
    with pytest.raises(ckpt.NoIntactCheckpoint, match=r"no intact checkpoint .*checkpoint.resume=never"):
        ckpt.latest_intact_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002.damaged", "step_000004.damaged"]
    with pytest.raises(ckpt.NoIntactCheckpoint):                         # the same on the next attempt
        ckpt.latest_intact_checkpoint(tmp_path)
    assert ckpt.latest_intact_checkpoint(tmp_path / "empty") is None     # a run without checkpoints starts fresh


def test_legacy_checkpoints_are_used_unverified_with_a_warning(tmp_path, caplog):
    c = _save(tmp_path, 2, seed=0)
    os.remove(c / "manifest.json")
    (c / "DONE").write_text("ok\n")                                      # what checkpoints used to look like
    assert verify(c) == LEGACY
    with caplog.at_level(logging.WARNING, logger="r1lab.grpo"):
        assert ckpt.latest_intact_checkpoint(tmp_path) == c
    assert "written before checkpoint manifests existed" in caplog.text


def test_half_renamed_and_quarantined_directories_are_never_the_latest(tmp_path):
    c = _save(tmp_path, 2, seed=0)
    crashed = tmp_path / "step_000004.tmp"                               # DONE written, crash before the rename
    crashed.mkdir()
    (crashed / "DONE").write_text("ok\n")
    (tmp_path / "step_000006.damaged").mkdir()
    (tmp_path / "step_000006.damaged" / "DONE").write_text("ok\n")
    assert ckpt.latest_checkpoint(tmp_path) == c and ckpt.latest_intact_checkpoint(tmp_path) == c


# ------------------------------------------------------------------------------- real DCP shards, real resume


def test_flipped_tensor_bytes_in_a_real_dcp_shard_are_caught_and_the_previous_state_restored(tiny, tmp_path):
    """A trainer saves step 1 and step 2 through the driver's path; bytes flipped inside the tensor data of
    step 2's DCP shard load silently without verification (wrong weights), and are caught with it: the resume
    point is step 1, whose weights and AdamW moments come back exactly."""
    from test_trainer_worker import _batch

    from rl.grpo.trainer_worker import TrainerWorker

    cfg = load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["trainer.threads=1", f"log.output_dir={tmp_path}",
                                                             "checkpoint.resume=auto"])
    root = tmp_path / "checkpoints"
    w = TrainerWorker(0, 1, "127.0.0.1", free_port(), cfg, str(tiny.qwen2))
    try:
        sums = {}
        batch = _batch(w)
        for step in (1, 2):
            batch["old_logp"] = w.compute_logprobs(batch)["old_logp"]
            w.update(batch)
            tmp, final = ckpt.begin(root, step)
            w.save_checkpoint(str(tmp))
            w.export_hf(str(tmp / "hf"), 1, True)
            ckpt.commit(tmp, final, {"step": step, "cursor": {"epoch": 0, "pos": step}}, keep=3)
            sums[step] = w.state_sums()
        (shard,) = (root / "step_000002" / "dcp").glob("*.distcp")
        _flip(shard, shard.stat().st_size // 2, 16)
        w.load_checkpoint(str(root / "step_000002"))        # no error: DCP does not notice
        silently = w.state_sums()
        assert silently != sums[2]
        from rl.grpo.driver import GRPODriver

        resume = GRPODriver(cfg)._resume_point()             # what `launch/grpo.py` resumes from
        assert resume == root / "step_000001" and (root / "step_000002.damaged").is_dir()
        w.load_checkpoint(str(resume))
        assert w.state_sums() == sums[1]
    finally:
        w.shutdown()
