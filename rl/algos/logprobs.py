"""Memory-bounded token log-probs and entropy straight from hidden states.

What it computes: for N scored positions with final hidden states h [N, H], the output embedding W [V, H] (the
LM head), target tokens y [N] and a sampling temperature T,
    z      = (h @ W^T) / T                     logits of the sampling distribution      [N, V]
    logp_n = z[n, y_n] - logsumexp(z[n])       log-prob of the sampled token            [N]
    ent_n  = logsumexp(z[n]) - sum_v p[n,v] z[n,v]   entropy of the next-token distribution  [N]
with exactly the gradients of the obvious implementation (`reference_token_logprobs`), but without ever holding
the [N, V] logits: the forward runs over chunks of rows and keeps only h and the per-row logsumexp; the
backward recomputes each chunk's logits. Peak extra memory is one chunk of fp32 logits (chunk x V x 4 bytes)
and, in the backward, W's gradient plus one slice of the vocabulary's logit gradients for all rows, no larger
than that gradient (`vocab_slices`), instead of several fp32 copies of all of them (at N = 16k and V = 151,936
that is ~10 GB per copy).

Numerics: the matmul runs in the dtype of h and W (bf16 under mixed precision, like the model's own LM head),
softmax/logsumexp in fp32. The backward walks the vocabulary in slices: a slice's logit gradients need only
that slice's logits, the row's logsumexp and (for the entropy) E_p[z] = logsumexp - entropy, both kept from the
forward. Each slice's rows of W's gradient are one GEMM over all rows' logit gradients (cast to h's dtype, as
for h's gradient), accumulated in fp32 inside the GEMM and rounded once, written straight into the gradient:
no fp32 [V, H] accumulator. h's gradient is the chunk's product when there is one slice and a sum of the
slices' products in fp32 otherwise.
Differences from peers: like Liger's fused linear cross-entropy this never materialises the logits, but it
returns per-token log-probs and entropies (what PPO/GRPO losses need), not a reduced loss, so any loss can be
built on top; gradients arrive through autograd as usual.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 0               # 0: rows per chunk so that one fp32 chunk of logits is ~CHUNK_BYTES
CHUNK_BYTES = 64 << 20


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    z = F.linear(h, w, bias).float()
    return z.div_(temperature) if temperature != 1.0 else z   # in place: every pass over [chunk, V] counts


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, bias, targets, temperature: float, chunk: int, with_entropy: bool):
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        ent = torch.empty(n, dtype=torch.float32, device=h.device) if with_entropy else None
        for s in range(0, n, chunk):
            z = _chunk_logits(h[s:s + chunk], w, bias, temperature)
            # log_softmax is one fused kernel (faster than logsumexp on CPU); lse = z - log p at any column
            lp = torch.log_softmax(z, dim=-1)
            lse[s:s + chunk] = z[:, 0] - lp[:, 0]
            logp[s:s + chunk] = lp.gather(-1, targets[s:s + chunk, None]).squeeze(-1)
            del z
            if ent is not None:   # -sum_v p log p as a batched dot product (one pass over the chunk)
                ent[s:s + chunk] = -torch.bmm(lp.exp().unsqueeze(1), lp.unsqueeze(2)).view(-1)
            del lp
        if ent is None:
            ent = torch.zeros(0, dtype=torch.float32, device=h.device)
        ctx.save_for_backward(h, w, bias, targets, lse, ent)   # ent: E_p[z] = lse - ent in the backward
        ctx.set_materialize_grads(False)   # an output nobody differentiates (entropy, when only logged) -> None
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, bias, targets, lse, ent = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        (n, H), V = h.shape, w.shape[0]
        use_ent = ctx.with_entropy and g_ent is not None and g_ent.numel() > 0
        if g_logp is None:
            g_logp = torch.zeros(n, dtype=torch.float32, device=h.device)
        mean_z = (lse - ent)[:, None] if use_ent else None      # E_p[z] = logsumexp(z) - entropy, per row
        slices = vocab_slices(n, H) if need_w else 1
        width = -(-V // slices)
        rows = min(n, chunk * slices)       # about the forward's fp32 chunk bytes: rows x width ~ chunk x V
        grad_w = torch.empty(V, H, dtype=h.dtype, device=h.device) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=w.device) if need_b else None
        grad_h = None
        if need_h:   # one slice: each chunk's product is h's whole gradient; several: summed in fp32
            grad_h = torch.empty_like(h) if slices == 1 else torch.zeros(n, H, dtype=torch.float32, device=h.device)
        for v0 in range(0, V, width):
            v1 = min(V, v0 + width)
            ws, bs = w[v0:v1], (bias[v0:v1] if bias is not None else None)
            # this slice's logit gradients for every row, in h's dtype: one [v, n] x [n, H] GEMM for W's rows
            buf = torch.empty(n, v1 - v0, dtype=h.dtype, device=h.device) if need_w else None
            for s in range(0, n, rows):
                e = min(n, s + rows)
                gz = _chunk_grad(h[s:e], ws, bs, targets[s:e] - v0, lse[s:e, None], g_logp[s:e, None],
                                 g_ent[s:e, None] if use_ent else None, mean_z[s:e] if use_ent else None, T)
                if need_b:
                    grad_b[v0:v1] += gz.sum(0)
                gz = buf[s:e].copy_(gz) if need_w else gz.to(h.dtype)
                if need_h:
                    if slices == 1:
                        grad_h[s:e] = gz @ ws
                    else:
                        grad_h[s:e] += gz @ ws
                del gz
            if need_w:
                torch.matmul(buf.t(), h, out=grad_w[v0:v1])   # accumulated in fp32 by the GEMM, rounded once
                del buf
        return (grad_h.to(h.dtype) if need_h else None, grad_w.to(w.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None)


def vocab_slices(rows: int, hidden: int) -> int:
    """Slices of the vocabulary the backward works through when W needs a gradient: each slice's logit gradients
    for all `rows` ([rows, V / slices] in h's dtype) take at most the bytes of W's gradient itself ([V, H]), so
    rows <= H is one slice. At Qwen2.5-0.5B's shape (V 151,936, H 896, bf16) and 2,080 rows: 3 slices, a 211 MB
    buffer beside the 272 MB gradient, where summing row blocks needed a 545 MB fp32 accumulator, a 545 MB
    block and a 272 MB product (1.36 GB)."""
    return max(1, -(-rows // hidden))


def _chunk_grad(hs, w, bias, targets, lse, gl, ge, mean_z, T: float) -> torch.Tensor:
    """d loss / d z [rows, v] fp32 (z = logits / T) of one chunk of rows over one slice of the vocabulary (w [v, H]
    its rows of W; targets relative to the slice's first token, outside [0, v) when the target lies in another
    slice), from the upstream gradients of logp (gl) and of the entropy (ge, None when it has none; then mean_z =
    E_p[z] over the whole vocabulary). lse, gl, ge, mean_z: [rows, 1]."""
    z = _chunk_logits(hs, w, bias, T)
    if ge is not None:
        # d logp/dz = onehot(y) - p ;  d ent/dz = -p * (z - E_p[z])
        p = torch.exp(z - lse)
        gz = z.sub_(mean_z).mul_(ge).add_(gl).mul_(p).neg_()
        del p
    else:
        gz = z.sub_(lse).exp_().mul_(-gl)   # in place: one chunk buffer
    inside = (targets >= 0) & (targets < gz.shape[1])
    gz.scatter_add_(-1, targets.clamp(0, gz.shape[1] - 1)[:, None], gl * inside[:, None])
    if T != 1.0:
        gz.div_(T)  # z = logits / T
    return gz


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           temperature: float = 1.0, bias: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK,
                           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V, H] (bias [V]), targets [N] -> (logp [N] fp32, entropy [N] fp32 or None).

    Differentiable in hidden, weight and bias (through the entropy too when with_entropy). Rows are
    processed `chunk` at a time (0: about CHUNK_BYTES of fp32 logits per chunk): peak extra memory is a few
    chunks plus an fp32 gradient accumulator for the weight, forward and backward."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk <= 0:
        chunk = max(16, CHUNK_BYTES // (4 * weight.shape[0]))
    logp, ent = _ChunkedLogprobs.apply(hidden, weight, bias, targets.long(), float(temperature),
                                       int(chunk), bool(with_entropy))
    return logp, (ent if with_entropy else None)


def reference_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             temperature: float = 1.0, bias: torch.Tensor | None = None,
                             with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The obvious implementation (full [N, V] fp32 logits), for tests and the memory benchmark."""
    z = F.linear(hidden, weight, bias).float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets[:, None].long()).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, ent


def scatter_positions(values: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """values [N] at (row, col) `positions` [N, 2] -> dense [B, L] (0 elsewhere), differentiable in values."""
    out = values.new_zeros(shape)
    return out.index_put((positions[:, 0], positions[:, 1]), values)
