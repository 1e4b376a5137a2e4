"""Shared-memory weight transport (sync.method=shm): trainer and engines of one node exchange buckets through
memory both map, with no serialisation and no file written per bucket.

Each writer owns `max_inflight` slot files in the run's directory (in sync.dir, /dev/shm by default), mapped
once per process and reused by every sync: bucket k goes to slot k % max_inflight. A bucket is published by a
small JSON index (names, dtypes, shapes, byte offsets in the slot, the slot's size and inode), renamed into place
where `FileTransport` puts its safetensors file (with `.bucket.json` for a suffix), so everything else is
FileTransport's protocol:
back-pressure (the writer reuses a slot only after every reader marked the bucket that was in it), dead readers
and writers, several writers (sync.shards=local), checksums of what arrived, sweeping a dead run's directory.

What changes against the file transport, per bucket: the writer copies each tensor into its mapped slot (one
memcpy; after the first sync the slot's pages exist, so no page faults and no tmpfs allocation), and the reader
copies each tensor out of its own mapping of the same pages (no deserialisation; the pieces of several writers
are copied once, by concatenating them). The reader copies instead of
handing the engine views of the slot because vLLM's layer-wise reload keeps loaded tensors until every tensor of
their layer has arrived: a view could be overwritten by bucket k + max_inflight before its layer is processed.

A slot grows (posix_fallocate, so that a full RAM disk is a clear error now rather than a SIGBUS when the mapped
pages are first written; then a new mapping) when a bucket does not fit; readers map again when the index names a
larger size or another file (a restarted writer recreates its slots). A reader keeps its mappings between syncs
when its transport object is kept (rl.rollout.worker_ext caches it per spec).
"""
from __future__ import annotations

import errno
import json
import mmap
import os
from pathlib import Path

import torch

from rl.grpo.sync.transport import FileTransport, SyncError, no_room

ALIGN = 64   # byte alignment of every tensor in a slot (any dtype's view, cache lines)


def _layout(bucket: dict[str, torch.Tensor]) -> tuple[list[dict], int]:
    """Each tensor's place in a slot, and the bytes the slot needs."""
    entries, offset = [], 0
    for name, t in bucket.items():
        nbytes = t.numel() * t.element_size()
        entries.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                        "offset": offset, "nbytes": nbytes})
        offset += -(-nbytes // ALIGN) * ALIGN
    return entries, offset


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class ShmTransport(FileTransport):
    """Buckets in shared-memory slots that the writer and the readers of one node map."""
    kind = "shm"
    SUFFIX = ".bucket.json"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # slot -> (inode, bytes, its mapping): the writer's slots and the reader's mappings apart, so that a reader
        # dropping its mappings (another writer process) never drops a writer's of the same object (tests use one
        # object from two threads; a run has one role per process)
        self._wmaps: dict[Path, tuple[int, int, torch.Tensor]] = {}
        self._maps: dict[Path, tuple[int, int, torch.Tensor]] = {}
        self._owner: dict | None = None   # reader: the writer process its mappings are of

    def _map(self, path: Path, size: int, inode: int | None = None) -> torch.Tensor:
        """This process's mapping of slot `path`, at least `size` bytes. Writer (inode None): the file is created
        or grown first. Reader: mapped again when the writer's file is another (inode) or larger; the file is
        opened once and checked and mapped through that descriptor (never created by a reader)."""
        maps = self._wmaps if inode is None else self._maps
        have = maps.get(path)
        if have is not None and have[1] >= size and (inode is None or have[0] == inode):
            return have[2]
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if inode is None else 0), 0o600)
        except FileNotFoundError as e:
            raise SyncError(f"weight sync: shared-memory slot {path} is gone (the writer closed the run's "
                            "directory)") from e
        try:
            if inode is None and os.fstat(fd).st_size < size:   # allocated now: a full tmpfs fails here (ENOSPC),
                os.posix_fallocate(fd, 0, size)                  # not as a SIGBUS when the mapped pages are written
            st = os.fstat(fd)
            if inode is not None and st.st_ino != inode:
                raise SyncError(f"weight sync: shared-memory slot {path} was replaced while a bucket in it was read")
            mem = torch.frombuffer(mmap.mmap(fd, st.st_size), dtype=torch.uint8)   # MAP_SHARED, read-write
        finally:
            os.close(fd)
        maps[path] = (st.st_ino, st.st_size, mem)
        return mem

    # ------------------------------------------------------------------------------------------ writer
    def _write(self, path: Path, k: int, writer: int, bucket: dict[str, torch.Tensor]) -> None:
        slot = self.dir / f"slot-w{writer}-{k % self.max_inflight}.bin"
        entries, size = _layout(bucket)
        size = max(size, ALIGN)   # an empty bucket (a rank without pieces in it) still maps a non-empty slot
        try:
            mem = self._map(slot, size)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise no_room(self.root, k, size) from e
        for entry, t in zip(entries, bucket.values()):
            mem[entry["offset"]:entry["offset"] + entry["nbytes"]].copy_(_as_bytes(t))
        inode, nbytes, _ = self._wmaps[slot]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"slot": slot.name, "inode": inode, "size": nbytes, "tensors": entries}))
        os.replace(tmp, path)   # publishes the bucket: its bytes are in the slot already

    def close(self) -> None:
        self._wmaps.clear()
        self._maps.clear()
        super().close()

    # ------------------------------------------------------------------------------------------ reader
    def _begin_receive(self, owner: dict | None) -> None:
        """A reader kept between syncs drops its mappings when another writer process owns the directory (a
        restarted trainer group recreated the slots: the old pages are freed, not held)."""
        if owner != self._owner:
            self._maps.clear()
            self._owner = owner

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()   # out of the slot, which the writer reuses two buckets later

    def _open_bucket(self, path: Path) -> "_SlotBucket":
        index = json.loads(path.read_text())
        mem = self._map(self.dir / index["slot"], index["size"], inode=index["inode"])
        return _SlotBucket(mem, index["tensors"])


class _SlotBucket:
    """One published bucket as the reader sees it: the slot's bytes, read through its index."""

    def __init__(self, mem: torch.Tensor, entries: list[dict]):
        self.mem, self.entries = mem, {e["name"]: e for e in entries}

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        """A view into the slot: the transport copies it out (`ShmTransport._own`, or concatenating pieces)."""
        e = self.entries[name]
        raw = self.mem[e["offset"]:e["offset"] + e["nbytes"]]
        return raw.view(getattr(torch, e["dtype"])).reshape(e["shape"])
