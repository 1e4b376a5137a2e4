"""What verified checkpoints cost at a real size: sealing (manifest + fsyncs) and verifying a Qwen2.5-0.5B-shaped
GRPO checkpoint, and the checksum algorithms on one of its shards.

  .venv/bin/python bench/bench_ckpt_verify.py [--shape qwen2.5-0.5b] [--ranks 2] [--scale 1.0] [--dir /tmp]

The directory has the sizes the real save path writes (`rl.grpo.checkpoint`): fp32 master weights and AdamW's two
fp32 moments, sharded over `--ranks` DCP files, plus the bf16 HF export (tied embeddings counted once); file
contents are random bytes (a checksum's speed does not depend on them). Measured, in order:
  fsync      the freshly written files' fsync (the durability every save now pays; dirty pages reach the disk)
  seal       rl.grpo.ckpt_manifest.seal: read back, CRC-32, fsync (now clean), manifest, DONE
  verify     verify() with the files in the page cache (a resume right after a save)
  cold       verify() after dropping this directory's pages (posix_fadvise DONTNEED: other files are untouched)
  algorithms crc32 / sha256 / blake2b / xxh3_128 (when the xxhash package is installed) on the largest shard, hot
Prints one JSON line. --scale 0.1 writes a tenth of the bytes (a quick run); the directory is removed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.grpo.ckpt_manifest import seal, verify

CHUNK = 64 << 20


def param_count(shape: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rl.tiny import SHAPES

    s = SHAPES[shape]
    cfg = Qwen2Config(hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
                      num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                      intermediate_size=s["intermediate_size"], vocab_size=s["vocab_size"],
                      tie_word_embeddings=s["tie_word_embeddings"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())   # tied weights are one parameter


def write(path: Path, size: int, block: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)


def drop_cache(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def algorithms(path: Path) -> dict[str, float]:
    """GB/s of each checksum over one file in the page cache (one thread)."""
    hashers = {"crc32": None, "sha256": hashlib.sha256, "blake2b": hashlib.blake2b}
    try:
        import xxhash

        hashers["xxh3_128"] = xxhash.xxh3_128
    except ImportError:
        pass
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    out = {}
    for name, make in hashers.items():
        h, crc = (make() if make else None), 0
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if h is None:
                    crc = zlib.crc32(view[:n], crc)
                else:
                    h.update(view[:n])
        out[name] = round(path.stat().st_size / (time.perf_counter() - t0) / 1e9, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    n = param_count(args.shape)
    shard = int(3 * 4 * n / args.ranks * args.scale)    # fp32 masters + exp_avg + exp_avg_sq, this rank's share
    files = {f"dcp/__{r}_0.distcp": shard for r in range(args.ranks)}
    files.update({"dcp/.metadata": 200_000, "trainer_state.pt": 1_500, "driver.json": 100,
                  "hf/model.safetensors": int(2 * n * args.scale), "hf/config.json": 1_000,
                  "hf/tokenizer.json": 7_000_000})
    files.update({f"rng_rank{r}.pt": 15_000 for r in range(args.ranks)})
    root = Path(tempfile.mkdtemp(prefix="r1lab-ckpt-bench-", dir=args.dir))
    try:
        block = os.urandom(CHUNK)
        t0 = time.perf_counter()
        for name, size in files.items():
            write(root / name, size, block)
        res = {"shape": args.shape, "params": n, "ranks": args.ranks, "scale": args.scale,
               "bytes": sum(files.values()), "files": len(files), "write_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        for name in files:
            fd = os.open(root / name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        res["fsync_s"] = time.perf_counter() - t0
        res["seal_s"] = seal(root).seconds
        for key, threads in (("verify_s", None), ("verify_1thread_s", 1)):
            t0 = time.perf_counter()
            assert verify(root, threads=threads) == "verified"
            res[key] = time.perf_counter() - t0
        drop_cache(root)
        t0 = time.perf_counter()
        assert verify(root) == "verified"
        res["cold_verify_s"] = time.perf_counter() - t0
        res["algorithms_gb_s"] = algorithms(root / "dcp/__0_0.distcp")
        res = {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}
        res["verify_gb_s"] = round(res["bytes"] / 1e9 / res["verify_s"], 2)
        res["cold_verify_gb_s"] = round(res["bytes"] / 1e9 / res["cold_verify_s"], 2)
        print(json.dumps(res), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
