"""Peak memory of log-prob + loss forward/backward at Qwen2.5-0.5B's head size: today's method vs the chunked one.

"old": what the trainer did before: the LM head's full [tokens x vocab] logits, `token_logprobs` (fp32 log-softmax
of all of them) and `entropy_from_logits` with its graph kept (the update always asked for entropy).
"new": `rl.algos.logprobs.chunked_token_logprobs` over the response positions, entropy included.
Both compute the same GRPO-style loss sum(adv * logp) + 0.01 * sum(entropy) in bf16 compute (hidden 896,
vocab 151,936) and its gradient w.r.t. the hidden states and the head. Each measurement runs in a fresh
subprocess; peak = the process's high-water RSS during the op minus its RSS before (inputs already allocated).

The old method needs ~6 fp32 copies of the logits (~5 GB each at 8,192 tokens): that does not fit this 24 GiB
machine, so it is measured at the largest token count that fits (memory is linear in tokens: logits dominate)
and extrapolated to 8,192, and both methods are also compared at that same measured size. Prints
`peak_ratio=X` (new / old at 8,192 tokens) and the max abs gradient difference at the shared size.

  .venv/bin/python bench/bench_logprob_memory.py [--tokens 8192] [--old-tokens 2048]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN, VOCAB = 896, 151_936


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def worker(method: str, tokens: int, grads_out: str | None) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from rl.algos.logprobs import chunked_token_logprobs
    from rl.algos.losses import entropy_from_logits, token_logprobs

    torch.manual_seed(0)
    h = (torch.randn(tokens, HIDDEN) * 1.0).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN) * 0.02).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, VOCAB, (tokens,))
    adv = torch.randn(tokens)
    before = _rss_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    if method == "old":
        logits = torch.nn.functional.linear(h, w)[None]                     # [1, N, V] (positions shifted)
        ids = torch.cat([y[:1], y])[None]                                     # token t scored by position t-1
        full = torch.cat([logits, logits[:, :1]], dim=1)                      # N+1 positions, like a sequence
        lp = token_logprobs(full, ids, 1.0)[0, 1:]
        ent = entropy_from_logits(full, 1.0)[0, 1:]
    else:
        lp, ent = chunked_token_logprobs(h, w, y, temperature=1.0, with_entropy=True)
    loss = (adv * lp).sum() + 0.01 * ent.sum()
    loss.backward()
    peak = _rss_kb("VmHWM:") - before
    if grads_out:
        torch.save({"h": h.grad.float(), "w": w.grad.float(), "loss": float(loss)}, grads_out)
    print(json.dumps({"method": method, "tokens": tokens, "peak_mb": peak / 1024}))


def measure(method: str, tokens: int, grads_out: str | None = None) -> float:
    cmd = [sys.executable, __file__, "--worker", method, "--tokens", str(tokens)]
    if grads_out:
        cmd += ["--grads", grads_out]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{method} at {tokens} tokens failed (rc {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--old-tokens", type=int, default=2048, help="largest size the old method is run at")
    ap.add_argument("--worker")
    ap.add_argument("--grads")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.tokens, a.grads)
    import torch

    small = a.old_tokens
    old_small = measure("old", small, "/tmp/r1lab_grads_old.pt")
    new_small = measure("new", small, "/tmp/r1lab_grads_new.pt")
    new_big = measure("new", a.tokens)
    go, gn = torch.load("/tmp/r1lab_grads_old.pt"), torch.load("/tmp/r1lab_grads_new.pt")
    diff = max(float((go[k] - gn[k]).abs().max()) for k in ("h", "w"))
    scale = max(float(go[k].abs().max()) for k in ("h", "w"))
    old_big = old_small * a.tokens / small
    print(f"hidden {HIDDEN}, vocab {VOCAB}, bf16 compute, loss = sum(adv*logp) + 0.01*sum(entropy), fwd+bwd")
    print(f"{'method':<6} {'tokens':>7} {'peak MB':>10}")
    print(f"{'old':<6} {small:>7} {old_small:>10.0f}   (measured)")
    print(f"{'new':<6} {small:>7} {new_small:>10.0f}   (measured)")
    print(f"{'old':<6} {a.tokens:>7} {old_big:>10.0f}   (extrapolated x{a.tokens / small:g}: does not fit this machine)")
    print(f"{'new':<6} {a.tokens:>7} {new_big:>10.0f}   (measured)")
    print(f"peak_ratio_at_{small}={new_small / old_small:.3f}")
    print(f"grad max abs diff at {small} tokens: {diff:.3e} (largest gradient entry {scale:.3e}); "
          f"loss old {go['loss']:.4f} new {gn['loss']:.4f}")
    print(f"peak_ratio={new_big / old_big:.3f}")


if __name__ == "__main__":
    main()
