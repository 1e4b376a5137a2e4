"""Turning rollouts into training batches: dynamic sampling, overlong filtering, padding, rank shards.

Pure functions (no Ray, no model), so they are tested directly.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Group:
    """One prompt and its n samples."""
    row: dict[str, Any]
    prompt_ids: list[int]
    samples: list[dict[str, Any]]          # token_ids, text, logprobs, finish_reason
    rewards: list[float] = field(default_factory=list)

    @property
    def uniform(self) -> bool:
        return max(self.rewards) - min(self.rewards) < 1e-9


def fill_batch(make_groups: Callable[[int], list[Group]], target: int, dynamic: bool, max_rounds: int
               ) -> tuple[list[Group], dict[str, float]]:
    """Collect `target` groups. With dynamic sampling (DAPO), groups whose rewards are all equal carry no
    GRPO signal: they are dropped and more prompts are generated, up to max_rounds generation rounds.
    Returns (groups, metrics); fewer than `target` groups only when the rounds run out."""
    kept: list[Group] = []
    generated = dropped = rounds = 0
    while len(kept) < target and rounds < max_rounds:
        need = target - len(kept)
        groups = make_groups(need)
        rounds += 1
        generated += len(groups)
        for g in groups:
            if dynamic and g.uniform:
                dropped += 1
            else:
                kept.append(g)
        if not dynamic:
            break
    kept = kept[:target]
    return kept, {"rollout/gen_rounds": rounds, "rollout/groups_generated": generated,
                  "rollout/groups_dropped": dropped, "rollout/groups_kept": len(kept)}


def build_batch(groups: list[Group], advantages: torch.Tensor, pad_id: int, overlong_filter: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors for all samples of `groups` (sample order: group by group).

    input_ids/attention_mask [B, L]; response_mask [B, L] (1 on response tokens; 0 for truncated responses
    when overlong_filter); rollout_logp [B, L] aligned with the tokens; adv [B]."""
    seqs, masks_info = [], []
    for g in groups:
        for s in g.samples:
            seqs.append(g.prompt_ids + list(s["token_ids"]))
            keep = not (overlong_filter and s["finish_reason"] == "length")
            masks_info.append((len(g.prompt_ids), len(s["token_ids"]), s["logprobs"], keep))
    B, L = len(seqs), max(len(x) for x in seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    resp = torch.zeros(B, L)
    roll = torch.zeros(B, L)
    for b, (seq, (p, r, lps, keep)) in enumerate(zip(seqs, masks_info)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attn[b, : len(seq)] = 1
        if keep:
            resp[b, p: p + r] = 1
        if lps:
            roll[b, p: p + r] = torch.tensor(lps[:r])
    return {"input_ids": input_ids, "attention_mask": attn, "response_mask": resp, "rollout_logp": roll,
            "adv": advantages.float()}


def shard(batch: dict[str, torch.Tensor], world: int) -> tuple[list[dict[str, torch.Tensor]], list[list[int]]]:
    """Split rows over data-parallel ranks, balancing token counts (longest first, round robin)."""
    lengths = batch["attention_mask"].sum(-1)
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    parts = [order[r::world] for r in range(world)]
    return [{k: v[idx] for k, v in batch.items()} for idx in parts], parts


def unshard(pieces: list[torch.Tensor], parts: list[list[int]], total: int) -> torch.Tensor:
    out = torch.zeros((total,) + tuple(pieces[0].shape[1:]), dtype=pieces[0].dtype)
    for piece, idx in zip(pieces, parts):
        out[idx] = piece
    return out
