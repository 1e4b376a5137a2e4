"""Writing HF-format model directories bucket by bucket, atomically.

`HFExportWriter` takes the buckets of `rl.grpo.sync.buckets` one at a time (each becomes one safetensors shard),
so an export of a model that does not fit in one process's memory needs about one bucket of it at a time. The
directory is assembled under `<out_dir>.tmp`, fsynced and renamed at the end: a reader never sees a half-written
model, also after a crash.
Tied LM heads are not written (as `save_pretrained` does); `config.json` records the dtype of the weights.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from rl.grpo.ckpt_manifest import fsync_dir, fsync_file


class HFExportWriter:
    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out = Path(out_dir)
        self.tmp = self.out.with_name(self.out.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self.total = 0
        self.dtype: torch.dtype | None = None

    def add(self, bucket: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self.files):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in bucket.items()}, str(self.tmp / name), metadata={"format": "pt"})
        self.files.append(name)
        for k, v in bucket.items():
            self.weight_map[k] = name
            self.total += v.numel() * v.element_size()
            if v.is_floating_point():
                self.dtype = v.dtype

    def finish(self, config, tokenizer_from: str | None = None) -> Path:
        """Name the shards as HF does, write the index, config (with the weights' dtype) and tokenizer, and
        move the directory into place."""
        n = len(self.files)
        names = {f: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                 for i, f in enumerate(self.files)}
        for old, new in names.items():
            os.rename(self.tmp / old, self.tmp / new)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        config = copy.deepcopy(config)
        if self.dtype is not None:
            config.dtype = self.dtype
        config.save_pretrained(self.tmp)
        if tokenizer_from:
            from transformers import AutoTokenizer, GenerationConfig

            AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(self.tmp)
            try:
                GenerationConfig.from_pretrained(tokenizer_from).save_pretrained(self.tmp)
            except OSError:
                pass
        for f in self.tmp.iterdir():   # durable before it becomes visible under its final name
            fsync_file(f)
        fsync_dir(self.tmp)
        if self.out.exists():
            shutil.rmtree(self.out)
        os.rename(self.tmp, self.out)
        fsync_dir(self.out.parent)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
