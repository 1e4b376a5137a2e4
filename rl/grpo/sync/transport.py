"""How weight buckets travel from trainer rank 0 to the rollout engines.

A transport has a writer side (trainer rank 0: `send` each bucket, then `finish`) and a reader side (each
rollout engine: `receive` yields (name, tensor) as buckets arrive). Writer and readers run at the same time
(the driver calls both and waits for both): the engine loads bucket k while the trainers gather bucket k+1, and
the writer never gets more than `max_inflight` buckets ahead of the slowest reader, so the memory a sync needs
is a couple of buckets, not the model. New transports (NCCL broadcast, CUDA IPC handles) implement the same
four methods and register in `TRANSPORTS`; `sync.method` picks one.

`ShmTransport` (sync.method=shm, the default on one node; rl.grpo.sync.shm) keeps this protocol and moves the
bytes through reused shared-memory slots instead of one file per bucket.

`FileTransport` (sync.method=file): safetensors files in `sync.dir` (a RAM disk such as /dev/shm on one node; a
shared file system across nodes). Each bucket is written to a temporary name and renamed, so a reader never
sees half a file; each reader marks the buckets it has loaded; the writer deletes a bucket once every reader has
it, and removes the run's directory when it closes. A directory left by a run that was killed is swept by the
next writer that starts on the same host (its owner process is gone).

Dead receivers and dead writers (rl.grpo.recovery): a transfer may address a subset of the readers (`begin`:
a replacement engine is loaded alone), and the writer asks a `gone()` callback, at most twice a second while it
waits, which readers have stopped (on Ray: their load calls ended in an error, the actor died): it stops waiting
for those, so a killed rollout worker never holds the trainers for `timeout_s`. A reader that waits for a bucket
checks that the writer's process (owner.json) is alive when it is on the same host, and fails at once when it is
not; across hosts it fails after `timeout_s`.

Several writers (`writers` > 1, sync.shards=local): every trainer rank writes its own FSDP pieces of bucket k
(`v..-b..-w<rank>`), nothing is all-gathered; a reader waits for all of a bucket's files and concatenates each
tensor's pieces on dim 0 in rank order (`rl.grpo.sync.gather.iter_local_shards`). Writer 0 owns the protocol
(end marker, waiting for the readers, deleting what they have loaded); the other writers only wait until their
piece of bucket k - max_inflight is gone before writing bucket k. With `collect_sums`, a reader records each
tensor's float64 sum as the sum of its pieces' sums in rank order, the same arithmetic the trainer ranks' sums
add up to, so the exact comparison of the checksum step still holds.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from rl.grpo.sync.checksum import tensor_sum

PREFIX = "r1lab-sync-"


class SyncError(RuntimeError):
    """A weight transfer failed or timed out; the message says which side waited for what."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def no_room(root: Path, k: int, nbytes: int, at_start: int = 0) -> SyncError:
    """The error for a sync.dir that cannot hold a bucket (a container's /dev/shm is 64 MB unless raised);
    `at_start`: checked before the first sync, for that many buckets in flight."""
    try:
        st = os.statvfs(root)
        free = f"{st.f_bavail * st.f_frsize / 2**20:.0f} MB free of {st.f_blocks * st.f_frsize / 2**20:.0f} MB"
    except OSError:
        free = "free space unknown"
    what = (f"the {at_start} buckets in flight of a weight sync ({at_start} x {nbytes / 2**20:.0f} MB" if at_start
            else f"bucket {k} ({nbytes / 2**20:.0f} MB")
    return SyncError(f"weight sync: sync.dir={root} has no room for {what}; {free}). "
                     "Give it more (docker run --shm-size=8g, or a larger tmpfs), point sync.dir at a larger RAM "
                     "disk or a local disk, or lower sync.bucket_mb (a sync holds 2 buckets at a time, all writing "
                     "trainer ranks' pieces together)")


def sweep_stale(root: str | Path) -> list[str]:
    """Remove sync directories under `root` whose writer process (on this host) no longer exists."""
    removed = []
    host = socket.gethostname()
    for d in Path(root).glob(PREFIX + "*"):
        owner = d / "owner.json"
        try:
            info = json.loads(owner.read_text())
        except (OSError, ValueError):
            # no owner file: a writer that died between mkdir and writing it, or foreign; only if old
            if time.time() - d.stat().st_mtime < 60:
                continue
            info = {"host": host, "pid": -1}
        if info.get("host") == host and not _pid_alive(int(info.get("pid", -1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


class FileTransport:
    """Buckets as safetensors files in a directory that the writer and every reader can see."""
    kind = "file"

    def __init__(self, root: str, run_id: str, readers: int, *, timeout_s: float = 300.0, max_inflight: int = 2,
                 writers: int = 1):
        self.root, self.run_id, self.readers, self.writers = Path(root), run_id, readers, max(1, writers)
        self.dir = self.root / f"{PREFIX}{run_id}"
        self.timeout_s, self.max_inflight = timeout_s, max(1, max_inflight)
        self.collect_sums = False
        self.piece_sums: dict[str, float] = {}
        self.active: list[int] = list(range(readers))
        self._owner_seen: dict[int, dict] = {}
        self.gone: Callable[[], set[int]] = set

    def begin(self, readers: Iterable[int] | None = None, gone: Callable[[], set[int]] | None = None) -> None:
        """Writer 0, before a transfer: the readers it addresses (default all) and a callback naming readers that
        stopped (their marks are then not waited for)."""
        self.active = list(range(self.readers)) if readers is None else sorted(set(readers))
        bad = [j for j in self.active if not 0 <= j < self.readers]
        if bad:
            raise SyncError(f"weight sync: readers {bad} out of range (the transport has {self.readers})")
        self.gone = gone or set

    def spec(self) -> dict:
        """What a reader in another process needs to build its side (plain data: crosses Ray and RPCs)."""
        return {"kind": self.kind, "root": str(self.root), "run_id": self.run_id, "readers": self.readers,
                "timeout_s": self.timeout_s, "max_inflight": self.max_inflight, "writers": self.writers}

    # ------------------------------------------------------------------------------------------ writer
    def open_writer(self) -> list[str]:
        """Create the run's directory (owned by this process); sweep directories of dead runs first."""
        self.root.mkdir(parents=True, exist_ok=True)
        swept = sweep_stale(self.root)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        return swept

    def check_room(self, need: int) -> None:
        """Writer 0 at start-up: fail now, not at the first sync, when sync.dir cannot hold `need` bytes."""
        st = os.statvfs(self.root)
        if st.f_bavail * st.f_frsize < need:
            raise no_room(self.root, 0, need // self.max_inflight, at_start=self.max_inflight)

    def _bucket(self, version: int, k: int, writer: int = 0) -> Path:
        w = f"-w{writer}" if self.writers > 1 else ""
        return self.dir / f"v{version:06d}-b{k:05d}{w}{self.SUFFIX}"

    SUFFIX = ".safetensors"   # of the file whose appearance publishes a bucket

    def send(self, version: int, k: int, bucket: dict[str, torch.Tensor], writer: int = 0) -> None:
        if k == 0 and writer == 0:  # the previous version's end marker: every reader has finished with it
            (self.dir / f"v{version - 1:06d}.end").unlink(missing_ok=True)
        if k >= self.max_inflight:
            if writer == 0:
                self._wait_consumed(version, k - self.max_inflight)
            else:
                self._wait_gone(self._bucket(version, k - self.max_inflight, writer), version)
        self._write(self._bucket(version, k, writer), k, writer, bucket)

    def _write(self, path: Path, k: int, writer: int, bucket: dict[str, torch.Tensor]) -> None:
        """Publish one bucket at `path`, atomically (a reader never sees half of it)."""
        from safetensors.torch import save_file

        tmp = path.with_suffix(".tmp")
        try:
            save_file(bucket, str(tmp), metadata={"format": "pt"})
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if "No space left" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
                raise no_room(self.root, k, sum(t.numel() * t.element_size() for t in bucket.values())) from e
            raise
        os.replace(tmp, path)

    def finish(self, version: int, count: int) -> None:
        """All buckets sent: tell the readers how many, wait until each has loaded all, delete them. The end
        marker stays until the next version starts (a reader may look for it after marking its last bucket)."""
        end = self.dir / f"v{version:06d}.end"
        tmp = end.with_suffix(".tmp")
        tmp.write_text(str(count))
        os.replace(tmp, end)  # atomic: a reader never reads a half-written count
        for k in range(max(0, count - self.max_inflight), count):
            self._wait_consumed(version, k)

    def _wait_gone(self, path: Path, version: int) -> None:
        """Writers > 0: writer 0 deletes a bucket's files once every reader has loaded them."""
        deadline = time.monotonic() + self.timeout_s
        while path.exists():
            if time.monotonic() > deadline:
                raise SyncError(f"weight sync v{version}: {path.name} was not consumed within "
                                f"sync.timeout_s={self.timeout_s}s (a rollout reader or trainer rank 0 stopped)")
            time.sleep(0.002)

    def _wait_consumed(self, version: int, k: int) -> None:
        path = self._bucket(version, k)
        marks = {j: path.with_name(path.name + f".r{j}") for j in self.active}
        deadline = time.monotonic() + self.timeout_s
        while True:
            missing = [j for j, m in marks.items() if not m.exists()]
            if missing:
                missing = [j for j in missing if j not in self.gone()]   # stopped readers are not waited for
            if not missing:
                break
            if time.monotonic() > deadline:
                raise SyncError(f"weight sync v{version}: rollout reader(s) {missing} did not load bucket {k} "
                                f"within sync.timeout_s={self.timeout_s}s ({path})")
            time.sleep(0.002)
        for w in range(1, self.writers):
            self._bucket(version, k, w).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        for m in marks.values():
            m.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ reader
    def receive(self, version: int, reader: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every tensor of version `version`, bucket by bucket, as the writer(s) produce them."""
        k = 0
        end = self.dir / f"v{version:06d}.end"
        self.piece_sums = {}
        try:   # the writer this transfer started with (see _check_writer)
            owner = json.loads((self.dir / "owner.json").read_text())
        except (OSError, ValueError):
            owner = None
        self._owner_seen = {version: owner} if owner is not None else {}
        self._begin_receive(owner)
        while True:
            paths = [self._bucket(version, k, w) for w in range(self.writers)]
            deadline = time.monotonic() + self.timeout_s
            next_check = time.monotonic() + 1.0
            while not all(p.exists() for p in paths):
                if end.exists() and k >= int(end.read_text() or 0):
                    return
                now = time.monotonic()
                if now > deadline:
                    raise SyncError(f"weight sync v{version}: reader {reader} waited {self.timeout_s}s for bucket "
                                    f"{k} in {self.dir} (is sync.dir visible to the trainer's node?)")
                if now > next_check:
                    next_check = now + 1.0
                    self._check_writer(version, reader)
                time.sleep(0.002)
            files = [self._open_bucket(p) for p in paths]
            keys = [list(f.keys()) for f in files]
            held = [set(k_) for k_ in keys]
            for name in dict.fromkeys(n for k_ in keys for n in k_):
                pieces = [f.get_tensor(name) for f, h in zip(files, held) if name in h]
                if self.collect_sums:
                    self.piece_sums[name] = sum(tensor_sum(p) for p in pieces)
                yield name, self._own(pieces[0]) if len(pieces) == 1 else torch.cat(pieces, 0)
            del files
            paths[0].with_name(paths[0].name + f".r{reader}").touch()
            k += 1

    def _begin_receive(self, owner: dict | None) -> None:
        """A reader's transfer starts; `owner`: owner.json's writer process (None when unreadable)."""

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        """A piece from `_open_bucket` as a tensor the reader may hand on (pieces of several writers are
        concatenated, which copies them anyway)."""
        return t

    def _open_bucket(self, path: Path):
        """A bucket's tensors: `keys()` in the writer's order, `get_tensor(name)` each tensor (or its piece)."""
        from safetensors import safe_open

        return safe_open(str(path), framework="pt")

    def _check_writer(self, version: int, reader: int) -> None:
        """Fail at once when the writer (trainer rank 0) is a dead process of this host, or was replaced by a
        restarted trainer group (owner.json names another process than when this transfer started)."""
        try:
            info = json.loads((self.dir / "owner.json").read_text())
        except (OSError, ValueError):
            return
        first = self._owner_seen.setdefault(version, info)
        if info != first or (info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))):
            raise SyncError(f"weight sync v{version}: reader {reader}: the writer (trainer rank 0, pid "
                            f"{first.get('pid')}) died while bucket files were expected in {self.dir}")


# kind (sync.method) -> "module:class"; named, not imported, so that a transport's module may import this one
TRANSPORTS = {"file": "rl.grpo.sync.transport:FileTransport", "shm": "rl.grpo.sync.shm:ShmTransport"}


def make_transport(spec: dict) -> FileTransport:
    """Rebuild a transport from its `spec()` (in the reader's process)."""
    import importlib

    spec = dict(spec)
    kind = spec.pop("kind")
    if kind not in TRANSPORTS:
        raise SyncError(f"unknown weight-sync transport {kind!r}; known: {sorted(TRANSPORTS)}")
    module, cls = TRANSPORTS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(spec.pop("root"), spec.pop("run_id"), spec.pop("readers"),
                                                           **spec)
