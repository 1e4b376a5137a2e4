"""Packed (varlen) attention and Ulysses sequence parallelism for the trainer's HF models.

Packed attention. With `trainer.packing` a micro-batch is one row of sequences back to back (`rl.packing.
PackedLayout`), positions restarting per sequence. The HF model is loaded with `attn_implementation=
"r1lab_packed"`, an attention function registered in transformers' `AttentionInterface`: HF's modeling code
projects q/k/v, applies rotary embeddings (from the restarting `position_ids`) and calls it with
[B, heads, S, head_dim] tensors; it gets the row's sequence boundaries (`cu_seqlens`) through the forward's
keyword arguments (`r1lab_packed=PackedAttention(...)`; HF passes unknown kwargs down to the attention call) and
runs causal attention inside each sequence only:
  - flash-attention's `flash_attn_varlen_func` when the `flash_attn` package is installed, on CUDA, in
    bf16/fp16 (the varlen kernel, as verl's `use_remove_padding`; NOT exercised on this CPU-only machine);
  - otherwise PyTorch SDPA with is_causal: the row's sequences, bucketed by length (within BUCKET_RATIO), are
    gathered into padded batches, one call per bucket; one sequence is one call on the row as it is. No mask
    exists: memory is linear in the row's length (a block-diagonal [T, T] mask, or one call per sequence, were
    measured slower: 5x and 2x the padded path's update on the tiny config).
A token never attends to another sequence's tokens: changing one sequence changes nothing else in the row
(tests/test_long_context.py checks bit-for-bit). HF builds no mask for an attention implementation it does not
know (`masking_utils`), so nothing of size rows^2 exists outside the attention function.

Ulysses sequence parallelism (`trainer.sequence_parallel: k`; verl: `ulysses_sequence_parallel_size`). The
trainer ranks form groups of k consecutive ranks; the ranks of a group get the same rows, and rank j of a group
holds tokens [j T/k, (j+1) T/k) of the packed row (T padded to a multiple of k). Everything but attention is
per token, so each rank runs embeddings, MLPs, norms and the LM head (`rl.algos.logprobs`) on its own 1/k of the
tokens. In attention, q/k/v arrive split by sequence with all heads; one `all_to_all_single` per tensor turns them
into the full sequence for heads/k of the heads, attention runs as above, and one more all-to-all turns the output
back (verl's `gather_seq_scatter_heads` / `gather_heads_scatter_seq`; we use `all_to_all_single`, which gloo and
NCCL both have, and autograd functions of our own whose backward is the reverse all-to-all).
GQA: KV heads are split like query heads when k divides them; when k is a multiple of the KV heads, each KV head is
repeated k / kv_heads times first (as verl does), so every rank holds the one KV head its query heads use. Any other
combination is refused by `check_heads`, naming the numbers.
The per-token log-probs of a rank's share are all-gathered in the group (`gather_seq`, whose backward keeps the
rank's own slice of the gradient: every rank of the group computes the same loss from the same gathered values,
so the gradient reaching each token is counted once). FSDP2 shards parameters and optimizer state over the whole
world (dp x sp ranks), so both the static state and the activations shrink with k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

ATTN_IMPL = "r1lab_packed"
BUCKET_RATIO = 2.0      # SDPA path: segments within this length ratio share one padded attention call


# ------------------------------------------------------------------------------------------------ groups, checks
@dataclass(frozen=True)
class SPGroup:
    """This rank's sequence-parallel group: `size` ranks holding 1/size of each row's tokens; `rank` in it."""
    group: Any = None
    size: int = 1
    rank: int = 0


def make_sp_group(world: int, rank: int, sp: int) -> SPGroup:
    """Groups of `sp` consecutive ranks (every rank creates every group, in the same order, as
    torch.distributed requires); returns this rank's. sp == 1: no group, no communication."""
    if sp <= 1:
        return SPGroup()
    if world % sp:
        raise ValueError(f"world size {world} is not divisible by sequence_parallel={sp}")
    mine = SPGroup()
    for g in range(world // sp):
        ranks = list(range(g * sp, (g + 1) * sp))
        pg = dist.new_group(ranks)
        if rank in ranks:
            mine = SPGroup(pg, sp, rank - g * sp)
    return mine


def heads_problem(num_heads: int, num_kv_heads: int, sp: int) -> str | None:
    """Why a model with these attention heads cannot be split over `sp` ranks (None: it can)."""
    if sp <= 1:
        return None
    divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
    if num_heads % sp:
        return (f"the model has {num_heads} attention heads, not divisible by {sp} (Ulysses gives each rank "
                f"heads/{sp} of the heads); divisors of {num_heads}: {divisors}")
    if num_kv_heads % sp and sp % num_kv_heads:
        return (f"the model has {num_kv_heads} KV heads: {sp} must divide them, or be a multiple of them (each KV "
                f"head is then repeated {sp}/{num_kv_heads} times), and it is neither")
    return None


def check_heads(hf_config, sp: int, key: str = "trainer.sequence_parallel") -> None:
    """ConfigError naming the numbers when `hf_config`'s heads cannot be split over `sp` ranks."""
    from rl.config import ConfigError

    heads = int(hf_config.num_attention_heads)
    kv = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    problem = heads_problem(heads, kv, sp)
    if problem:
        raise ConfigError(f"{key}={sp}: {problem}")


# ------------------------------------------------------------------------------------------------ collectives
def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into `size` chunks along scatter_dim, send chunk j to rank j, concatenate what arrives (rank i's
    chunk i-th) along gather_dim."""
    size = dist.get_world_size(group)
    send = torch.stack([c.contiguous() for c in x.chunk(size, dim=scatter_dim)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def seq_to_heads(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """[B, H, S/k, D] (this rank's tokens, all heads) -> [B, H/k, S, D] (all tokens, this rank's heads)."""
    return _AllToAll.apply(x, sp.group, 1, 2) if sp.size > 1 else x


def heads_to_seq(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """[B, H/k, S, D] -> [B, H, S/k, D]: the inverse of seq_to_heads."""
    return _AllToAll.apply(x, sp.group, 2, 1) if sp.size > 1 else x


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, rank: int):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.n, ctx.rank = x.shape[0], rank
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # every rank of the group computes the same loss from the same gathered tensor: its own slice of the
        # gradient is the whole gradient of its tokens (summing over the group would count it size times)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None


def gather_seq(x: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """[n, ...] on each rank of the group -> [size * n, ...] (rank order); differentiable (see _GatherSeq)."""
    return _GatherSeq.apply(x, sp.group, sp.rank) if sp.size > 1 else x


# ------------------------------------------------------------------------------------------------ attention
class PackedAttention:
    """What the attention function needs about the packed row (passed as the forward's `r1lab_packed` kwarg).

    A plain class on purpose, not a dataclass: FSDP2's mixed-precision input cast rebuilds dataclasses found in a
    forward's kwargs (torch's `_apply_to_tensors`), so the attention calls would count, and cache their plan, on a
    copy (bf16 training then failed the "does not route attention" check)."""

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int, sp: SPGroup | None = None) -> None:
        self.cu_seqlens = cu_seqlens      # int32 [segments + 1] over the FULL row (all sp ranks' tokens)
        self.max_len = max_len            # longest segment
        self.sp = sp or SPGroup()
        self.calls = 0                    # attention calls seen (0 after a forward: the model bypasses the interface)
        self.plan: Any = None             # the SDPA path's bucket_plan, made at the first layer


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _buckets(lengths: list[int], ratio: float) -> list[list[int]]:
    """Segment indices, longest first, in buckets whose shortest is >= longest / ratio."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and lengths[i] * ratio >= lengths[out[-1][0]]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def bucket_plan(cu_seqlens: torch.Tensor, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """For the SDPA path: per bucket, the token index of each lane [segments, longest] (pad lanes: the segment's
    own first token), and `order` [T]: where each token of the row sits among all buckets' lanes, flattened."""
    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    lanes, order, at = [], torch.empty(bounds[-1], dtype=torch.long), 0
    for bucket in _buckets(lengths, BUCKET_RATIO):
        pos = torch.arange(lengths[bucket[0]])[None]
        start = torch.tensor([starts[i] for i in bucket])[:, None]
        real = pos < torch.tensor([lengths[i] for i in bucket])[:, None]      # [segments, L]
        idx = torch.where(real, start + pos, start)
        order[idx[real]] = at + real.flatten().nonzero()[:, 0]
        at += idx.numel()
        lanes.append(idx.to(device))
    return lanes, order.to(device)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scaling: float | None, dropout: float = 0.0, plan=None) -> torch.Tensor:
    """Causal attention within each segment of one packed row. q [1, H, T, D], k/v [1, Hkv, T, D] (H a multiple
    of Hkv) -> [1, H, T, D]. plan: bucket_plan(cu_seqlens) when already made (one per forward, not per layer).

    Without flash-attention: segments of similar length (within BUCKET_RATIO) are gathered into a padded batch
    [segments, H, longest, D] and run through one causal SDPA call per bucket; a single segment is one plain
    causal call (no copy). A real query at position p of its segment attends to positions <= p, all its own,
    so the pad lanes (filled with the segment's own first token, never another segment's) reach no real output,
    and their outputs are dropped (zero gradient). Attention memory and compute are those of the bucket's
    padded rows: linear in T for one long sequence."""
    flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        out = flash(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, max_len, max_len,
                    dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out.transpose(0, 1)[None]
    rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, rep), _repeat_kv(v, rep)
    if cu_seqlens.numel() == 2:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
    lanes, order = plan or bucket_plan(cu_seqlens, q.device)
    q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))                     # token-major [T, H, D]
    outs = [F.scaled_dot_product_attention(q[idx].transpose(1, 2), k[idx].transpose(1, 2), v[idx].transpose(1, 2),
                                           dropout_p=dropout, scale=scaling, is_causal=True).transpose(1, 2)
            .flatten(0, 1) for idx in lanes]                               # [segments x L, H, D] each
    return torch.cat(outs)[order].transpose(0, 1)[None]


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                     r1lab_packed: PackedAttention | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: query [1, H, S, D], key/value [1, Hkv, S, D] (S: this rank's
    tokens) -> ([1, S, H, D], None)."""
    ctx = r1lab_packed
    if ctx is None:
        raise RuntimeError(f"attention implementation {ATTN_IMPL!r} needs a packed row: call the model through "
                           "rl.grpo.fsdp_model.TokenLogprobModel (trainer.packing), not directly")
    if sliding_window is not None or kwargs.get("is_causal") is False or query.shape[0] != 1:
        raise NotImplementedError(f"{ATTN_IMPL}: causal attention over one packed row only (sliding_window="
                                  f"{sliding_window}, is_causal={kwargs.get('is_causal')}, rows={query.shape[0]})")
    ctx.calls += 1
    sp = ctx.sp
    if sp.size > 1:
        hkv = key.shape[1]
        rep = 1 if hkv % sp.size == 0 else sp.size // hkv
        query = seq_to_heads(query, sp)
        key, value = seq_to_heads(_repeat_kv(key, rep), sp), seq_to_heads(_repeat_kv(value, rep), sp)
    flash = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None
    if ctx.plan is None and ctx.cu_seqlens.numel() > 2 and not flash:
        ctx.plan = bucket_plan(ctx.cu_seqlens, query.device)
    out = varlen_attention(query, key, value, ctx.cu_seqlens, ctx.max_len, scaling, dropout, ctx.plan)
    out = heads_to_seq(out, sp)
    return out.transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Register `packed_attention` with transformers (idempotent); returns its name for attn_implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, packed_attention)
    return ATTN_IMPL
