"""Trainer -> rollout-engine weight sync: gather one bucket at a time (`gather`), move it (`transport`: files;
`shm`: shared-memory slots), check what arrived (`checksum`); on a CPU node, share its cores between the
writers and the loading engines while a transfer runs (`threads`)."""
from rl.grpo.sync.gather import buckets, iter_full_tensors, iter_local_shards, local_buckets, tensor_sums
from rl.grpo.sync.transport import FileTransport, SyncError, make_transport, sweep_stale

__all__ = ["buckets", "iter_full_tensors", "iter_local_shards", "local_buckets", "tensor_sums", "FileTransport",
           "SyncError", "make_transport", "sweep_stale"]
