"""The weight transports (file and shared memory) with several writers (sync.shards=local): every trainer rank
writes its FSDP pieces, the reader concatenates them; bytes, checksums, back-pressure, a dead reader and cleanup;
the shared-memory slots' reuse, growth and replacement."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from rl.grpo.sync import FileTransport, SyncError, local_buckets, tensor_sums
from rl.grpo.sync.shm import ShmTransport
from rl.grpo.sync.transport import make_transport

TRANSPORTS = pytest.mark.parametrize("cls", [FileTransport, ShmTransport], ids=["file", "shm"])


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(5, 8, generator=g), "b.weight": torch.randn(1, 8, generator=g),
            "c.bias": torch.randn(7, generator=g), "d.weight": torch.randn(64, 16, generator=g).to(torch.bfloat16)}


def _pieces(full: dict[str, torch.Tensor], world: int, replicated: set[str]):
    """What iter_local_shards yields on each rank: dim-0 pieces as FSDP2 cuts them (ceil-sized chunks, the
    last ranks short or empty), replicated tensors whole."""
    per_rank = []
    for r in range(world):
        rows = []
        for name, t in full.items():
            if name in replicated:
                rows.append((name, t, tuple(t.shape), False))
                continue
            chunk = -(-t.shape[0] // world)
            rows.append((name, t[r * chunk:(r + 1) * chunk], tuple(t.shape), True))
        per_rank.append(rows)
    return per_rank


def _write(transport, version, rows, rank, bucket_bytes, sums_out, errors):
    try:
        k = 0
        sums = {}
        for bucket in local_buckets(rows, bucket_bytes, rank):
            sums.update(tensor_sums(bucket))
            transport.send(version, k, bucket, writer=rank)
            k += 1
        if rank == 0:
            transport.finish(version, k)
        sums_out[rank] = sums
    except Exception as e:   # surfaced by the test
        errors.append(e)


@TRANSPORTS
@pytest.mark.parametrize("inflight", [1, 2])
def test_pieces_of_every_rank_arrive_whole_with_the_ranks_checksums(tmp_path, cls, inflight):
    """(inflight 2: rank 1's bucket of the replicated c.bias is empty, a fresh slot of no bytes)"""
    full = _model()
    world = 2
    writers = [cls(str(tmp_path), "t", readers=1, writers=world, timeout_s=30, max_inflight=inflight)
               for _ in range(world)]
    writers[0].open_writer()
    reader = make_transport(writers[0].spec())
    assert type(reader) is cls
    reader.collect_sums = True
    received, sums, errors = {}, {}, []
    per_rank = _pieces(full, world, replicated={"c.bias"})
    threads = [threading.Thread(target=_write, args=(writers[r], 3, per_rank[r], r, 200, sums, errors))
               for r in range(world)]
    for t in threads:
        t.start()
    received.update(dict(reader.receive(3, 0)))   # bucket_bytes=200: one tensor per bucket, back-pressure at 1
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert set(received) == set(full)
    for name, t in full.items():
        assert received[name].dtype == t.dtype and torch.equal(received[name], t), name
    combined: dict[str, float] = {}
    for r in range(world):                          # what the driver does: rank order
        for name, v in sums[r].items():
            combined[name] = combined.get(name, 0.0) + v
    assert combined == reader.piece_sums            # exact: the same float64 additions on both sides
    assert "c.bias" not in sums[1]                  # a replicated tensor is written once, by rank 0
    left = [p.name for p in writers[0].dir.glob("v*") if p.suffix != ".end"]   # the end marker stays (docstring)
    assert not left and not list(writers[0].dir.glob("*.r0")), left   # every bucket consumed and deleted
    writers[0].close()
    assert not writers[0].dir.exists()


def test_every_rank_cuts_the_same_buckets_by_full_sizes():
    full = _model(1)
    per_rank = _pieces(full, 3, replicated={"c.bias"})
    cuts = [[sorted(b) for b in local_buckets(rows, 300, r)] for r, rows in enumerate(per_rank)]
    assert len({len(c) for c in cuts}) == 1 and len(cuts[0]) > 1
    # rank 2's pieces of b.weight (1 row over 3 ranks) are empty, and it holds no replicated tensor
    assert all(set(c2) <= set(c0) for c0, c2 in zip(cuts[0], cuts[2]))
    assert not any("c.bias" in b for b in cuts[2])


@TRANSPORTS
def test_a_dead_reader_stops_every_writer_with_a_clear_error(tmp_path, cls):
    full = _model(2)
    world = 2
    writers = [cls(str(tmp_path), "dead", readers=1, writers=world, timeout_s=0.5, max_inflight=1)
               for _ in range(world)]
    writers[0].open_writer()
    sums, errors = {}, []
    per_rank = _pieces(full, world, replicated=set())
    threads = [threading.Thread(target=_write, args=(writers[r], 1, per_rank[r], r, 200, sums, errors))
               for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)   # nobody hangs on the reader that never came
    assert len(errors) == 2 and all(isinstance(e, SyncError) for e in errors)
    assert any("did not load bucket 0" in str(e) for e in errors)
    assert any("was not consumed" in str(e) for e in errors)
    writers[0].close()
    assert not writers[0].dir.exists()


def test_config_refuses_local_shards_where_pieces_are_not_the_engine_layout():
    from rl.config import ConfigError, load_config
    from rl.grpo.config import GRPOConfig

    with pytest.raises(ConfigError, match="sync.shards.*LoRA"):
        load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["sync.shards=local", "model.lora_r=8"])
    assert load_config(GRPOConfig, "configs/tiny_grpo.yaml", ["sync.shards=gather"]).sync.shards == "gather"


def test_tensor_sum_is_the_same_for_any_thread_count_and_close_to_an_exact_sum():
    """The checksum both sides compute: chunks of one thread's share, so 1 and 2 threads give the same float
    (a whole-tensor float64 sum of fp32 values need not: torch splits it over threads, and on the first case here
    it differed in the last digits on the development machine; not asserted, as that depends on the machine);
    within rounding of the exact (fp64 of fsum) sum; bf16 and fp32, sizes around the chunk, empty,
    non-contiguous."""
    import math

    from rl.grpo.sync.checksum import SUM_CHUNK, tensor_sum

    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(4864, 896, generator=g) * torch.rand(4864, 1, generator=g) ** 8,
             torch.randn(3 * SUM_CHUNK + 5, generator=g).to(torch.bfloat16), torch.randn(SUM_CHUNK - 1, generator=g),
             torch.zeros(0), torch.randn(64, 70, generator=g).t()]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [tensor_sum(t) for t in cases]
        torch.set_num_threads(2)
        two = [tensor_sum(t) for t in cases]
    finally:
        torch.set_num_threads(threads)
    assert one == two
    for t, s in zip(cases, one):
        exact = math.fsum(t.double().reshape(-1).tolist())
        assert abs(s - exact) <= 1e-12 * max(1.0, t.double().abs().sum().item()), (s, exact)


def _send_all(writer, version, tensors: dict[str, torch.Tensor], bucket_bytes: int, errors: list) -> None:
    try:
        from rl.grpo.sync import buckets

        k = 0
        for bucket in buckets(tensors.items(), bucket_bytes):
            writer.send(version, k, bucket)
            k += 1
        writer.finish(version, k)
    except Exception as e:   # surfaced by the test
        errors.append(e)


def _sync(writer, reader, version, tensors, bucket_bytes=300):
    errors: list = []
    t = threading.Thread(target=_send_all, args=(writer, version, tensors, bucket_bytes, errors))
    t.start()
    got = dict(reader.receive(version, 0))
    t.join(timeout=30)
    assert not errors and not t.is_alive()
    return got


def test_shm_slots_are_reused_grown_and_remapped(tmp_path):
    """Every version goes through the same max_inflight slot files (no file per bucket), each bucket's bytes
    arrive exactly; a bucket larger than its slot grows it and the reader maps it again; the reader's tensors are
    its own (a later sync does not change what an earlier one returned)."""
    writer = ShmTransport(str(tmp_path), "slots", readers=1, timeout_s=30, max_inflight=2)
    writer.open_writer()
    reader = make_transport(writer.spec())
    first = None
    for version in (1, 2, 3):
        tensors = {k: v * version for k, v in _model(version).items()}
        if version == 3:
            tensors["big.weight"] = torch.randn(64, 64)   # 16 KB: larger than any slot so far
        got = _sync(writer, reader, version, tensors)
        assert set(got) == set(tensors)
        for name, t in tensors.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (version, name)
        first = first or got
        slots = sorted(p.name for p in writer.dir.glob("slot-*"))
        assert slots == ["slot-w0-0.bin", "slot-w0-1.bin"], slots
    assert torch.equal(first["a.weight"], _model(1)["a.weight"])   # a copy, not a view of the reused slot
    assert max(size for _, size, _ in reader._maps.values()) >= 64 * 64 * 4
    writer.close()
    assert not writer.dir.exists()


def test_shm_reader_follows_a_restarted_writer(tmp_path):
    """A trainer group restarted with the same run id recreates the slot files: a reader that kept its mappings
    from before maps the new files (by inode) instead of reading the old, unlinked pages."""
    old = ShmTransport(str(tmp_path), "restart", readers=1, timeout_s=30, max_inflight=1)
    old.open_writer()
    reader = make_transport(old.spec())
    _sync(old, reader, 1, _model(1), bucket_bytes=10_000)
    old.close()
    new = ShmTransport(str(tmp_path), "restart", readers=1, timeout_s=30, max_inflight=1)
    new.open_writer()
    want = _model(5)
    got = _sync(new, reader, 2, want, bucket_bytes=10_000)
    assert all(torch.equal(got[n], t) for n, t in want.items())
    now = {os.stat(p).st_ino for p in new.dir.glob("slot-*")}
    assert {inode for inode, _, _ in reader._maps.values()} <= now   # the old slots' pages are not held
    new.close()


def test_shm_writer_slots_survive_a_reader_dropping_its_mappings(tmp_path):
    """One ShmTransport object used as writer and reader (as the recovery tests do, from two threads): the reader
    dropping its mappings for another writer process leaves the writer's slots mapped, so a bucket written while a
    reader starts can still be published (it raised KeyError on the slot once, in a fresh clone's run)."""
    t = ShmTransport(str(tmp_path), "both", readers=1, timeout_s=30, max_inflight=1)
    t.open_writer()
    t.send(1, 0, {"w": torch.ones(4)})
    slot = t.dir / "slot-w0-0.bin"
    mapped = t._wmaps[slot][2]
    t._begin_receive({"pid": -1})             # what a reader's first receive does for a writer it has not seen
    assert t._wmaps[slot][2] is mapped and not t._maps
    finish = threading.Thread(target=t.finish, args=(1, 1))
    finish.start()
    got = dict(t.receive(1, 0))
    finish.join(timeout=30)
    assert torch.equal(got["w"], torch.ones(4)) and not finish.is_alive()
    t.close()


def test_shm_published_index_names_a_replaced_slot(tmp_path):
    """A slot whose file is not the one a bucket's index names is an error naming the slot, never stale bytes."""
    writer = ShmTransport(str(tmp_path), "stale", readers=1, timeout_s=30, max_inflight=1)
    writer.open_writer()
    writer.send(1, 0, {"x": torch.ones(4)})
    slot = writer.dir / "slot-w0-0.bin"
    slot.unlink()
    slot.write_bytes(b"\0" * 64)   # another file under the same name
    reader = make_transport(writer.spec())
    with pytest.raises(SyncError, match="slot-w0-0.bin was replaced"):
        list(reader.receive(1, 0))
    writer.close()


@TRANSPORTS
def test_a_full_sync_dir_is_a_clear_error_naming_it(tmp_path, cls, monkeypatch):
    """A RAM disk without room for a bucket (a container's 64 MB /dev/shm) is a SyncError naming sync.dir, the
    bucket's size and the fixes; nothing half-written is left (shm: the slot is allocated before it is mapped, so
    the writer cannot die of SIGBUS on a full tmpfs)."""
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", full)
    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    writer = cls(str(tmp_path), "full", readers=1, timeout_s=5)
    writer.open_writer()
    with pytest.raises(SyncError, match=rf"sync.dir={tmp_path} has no room for bucket 0 \(1 MB; .* MB free.*"
                                        r"--shm-size.*sync.bucket_mb"):
        writer.send(1, 0, {"w": torch.zeros(2**18)})
    assert not list(writer.dir.glob("v*")) and not list(writer.dir.glob("*.tmp"))
    writer.close()


def test_largest_bucket_is_what_the_bucket_cut_makes_and_start_up_checks_room(tmp_path, monkeypatch):
    """The start-up room check (trainer rank 0 after open_writer): the largest bucket is computed from shapes
    alone, equal to the largest one `buckets` cuts from the tensors in the engine dtype (a tied head left out);
    a sync.dir with less free space than max_inflight of them fails at once, naming it."""
    from rl.grpo.sync import buckets
    from rl.grpo.sync.gather import largest_bucket_bytes

    model = torch.nn.Module()
    for i, shape in enumerate([(64, 16), (300, 8), (5,), (40, 40), (7, 3)]):
        model.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(*shape)))
    model.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    model.lm_head = torch.nn.Linear(16, 64, bias=False)
    for size in (1, 500, 4_000, 10_000, 10**9):
        cast = [(k, v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in model.state_dict().items()]
        want = max(sum(t.numel() * t.element_size() for t in b.values()) for b in buckets(cast, size))
        assert largest_bucket_bytes(model, torch.bfloat16, size) == want, size
        cut = [(k, v) for k, v in cast if k != "lm_head.weight"]
        want = max(sum(t.numel() * t.element_size() for t in b.values()) for b in buckets(cut, size))
        assert largest_bucket_bytes(model, torch.bfloat16, size, tied_head=True) == want, size

    # a LoRA policy (PEFT's names): adapters are merged, not sent; a tied head under PEFT's prefix is left out too
    peft = torch.nn.Module()
    peft.base_model = torch.nn.Module()
    peft.base_model.model = inner = torch.nn.Module()
    inner.q = torch.nn.Module()
    inner.q.base_layer = torch.nn.Linear(16, 16, bias=False)
    inner.q.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(16, 4, bias=False)})
    inner.q.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 16, bias=False)})
    inner.lm_head = torch.nn.Linear(16, 64, bias=False)
    assert largest_bucket_bytes(peft, torch.bfloat16, 10**9, tied_head=True) == 16 * 16 * 2

    writer = ShmTransport(str(tmp_path), "room", readers=1, max_inflight=2)
    writer.open_writer()
    writer.check_room(2 * 2**20)   # a real directory with room
    real = os.statvfs(tmp_path)
    small = type("S", (), {"f_bavail": 3 * 2**20 // real.f_frsize, "f_frsize": real.f_frsize,
                           "f_blocks": 16 * 2**20 // real.f_frsize})
    monkeypatch.setattr(os, "statvfs", lambda path: small)
    with pytest.raises(SyncError, match=rf"sync.dir={tmp_path} has no room for the 2 buckets in flight of a weight "
                                        r"sync \(2 x 2 MB; 3 MB free of 16 MB\).*--shm-size"):
        writer.check_room(2 * 2 * 2**20)
    writer.close()
