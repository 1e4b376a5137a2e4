"""The file transport with several writers (sync.shards=local): every trainer rank writes its FSDP pieces, the
reader concatenates them; bytes, checksums, back-pressure, a dead reader and cleanup."""
from __future__ import annotations

import threading

import pytest
import torch

from rl.grpo.sync import FileTransport, SyncError, local_buckets, tensor_sums


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


def test_pieces_of_every_rank_arrive_whole_with_the_ranks_checksums(tmp_path):
    full = _model()
    world = 2
    writers = [FileTransport(str(tmp_path), "t", readers=1, writers=world, timeout_s=30, max_inflight=1)
               for _ in range(world)]
    writers[0].open_writer()
    reader = FileTransport(**{k: v for k, v in writers[0].spec().items() if k != "kind"})
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
    assert not list(writers[0].dir.glob("*.safetensors")) and not list(writers[0].dir.glob("*.r0"))
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


def test_a_dead_reader_stops_every_writer_with_a_clear_error(tmp_path):
    full = _model(2)
    world = 2
    writers = [FileTransport(str(tmp_path), "dead", readers=1, writers=world, timeout_s=0.5, max_inflight=1)
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
