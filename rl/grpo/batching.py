"""Turning rollouts into training batches: failed rewards, dynamic sampling, advantages, overlong filtering,
padding, rank shards.

A sample whose reward *failed* (grader timeout or crash, unparsable gold, sandbox outage; see
rewards/outcome.py) is neither right nor wrong: it is left out of its group's statistics (mean, std, the
dynamic-sampling check) and out of the loss (advantage 0, response mask 0), never scored as 0.
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
    failed: list[bool] = field(default_factory=list)   # reward could not be computed (excluded)
    version: int = 0                                    # policy version that generated the samples

    def valid_rewards(self) -> list[float]:
        return [r for r, f in zip(self.rewards, self.failed or [False] * len(self.rewards)) if not f]

    @property
    def uniform(self) -> bool:
        """No GRPO signal: fewer than two scored samples, or all scored rewards equal."""
        v = self.valid_rewards()
        return len(v) < 2 or max(v) - min(v) < 1e-9


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


def group_advantages(estimator: str, groups: list[Group]) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages [B] for all samples of `groups` (group by group) from their scored samples only; failed
    samples get 0. Metrics: the estimator's, plus reward statistics over scored samples."""
    from rl.algos import compute_advantages

    flat = [(i, r, f) for i, g in enumerate(groups)
            for r, f in zip(g.rewards, g.failed or [False] * len(g.rewards))]
    adv = torch.zeros(len(flat))
    keep = [k for k, (_, _, f) in enumerate(flat) if not f]
    metrics: dict[str, float] = {}
    if keep:
        rewards = torch.tensor([flat[k][1] for k in keep], dtype=torch.float64)
        gids = torch.tensor([flat[k][0] for k in keep])
        a, metrics = compute_advantages(estimator, rewards, gids)
        adv[keep] = a
        metrics["rollout/reward_mean"] = float(rewards.mean())
        metrics["rollout/reward_std"] = float(rewards.std()) if len(keep) > 1 else 0.0
    metrics["rollout/scored_frac"] = len(keep) / max(1, len(flat))
    return adv, metrics


def pad_id_of(tokenizer) -> int:
    """The id used for padding: pad token, else EOS (Llama 3 has no pad token), else 0. Padded positions are
    masked out everywhere, so the choice only has to be a valid id."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(tid, int):
            return tid
        if isinstance(tid, (list, tuple)) and tid:
            return int(tid[0])
    return 0


def build_batch(groups: list[Group], advantages: torch.Tensor, pad_id: int, overlong_filter: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors for all samples of `groups` (sample order: group by group).

    input_ids/attention_mask [B, L]; response_mask [B, L] (1 on response tokens that take part in the loss: 0
    for failed-reward samples, for truncated responses when overlong_filter, and for tokens a sample marks
    with a 0 in its optional `loss_mask` (e.g. inserted tool output)); rollout_logp [B, L] aligned with the
    tokens; adv [B]; version [B] (policy version that generated each sample). When samples carry the engine's
    `routed_experts` (rollout.return_routed_experts): routed_experts [B, L, MoE layers, top-k] int16, aligned
    with input_ids, -1 where there is no record (padding, the last sampled token, a sample without one; never
    replayed: rl.moe.replay.pad_routing)."""
    seqs, masks_info, versions = [], [], []
    for g in groups:
        failed = g.failed or [False] * len(g.samples)
        for s, f in zip(g.samples, failed):
            seqs.append(g.prompt_ids + list(s["token_ids"]))
            versions.append(g.version)
            keep = not f and not (overlong_filter and s["finish_reason"] == "length")
            masks_info.append((len(g.prompt_ids), len(s["token_ids"]), s["logprobs"], keep, s.get("loss_mask")))
    B, L = len(seqs), max(len(x) for x in seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    resp = torch.zeros(B, L)
    roll = torch.zeros(B, L)
    for b, (seq, (p, r, lps, keep, lmask)) in enumerate(zip(seqs, masks_info)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attn[b, : len(seq)] = 1
        if keep:
            resp[b, p: p + r] = 1 if lmask is None else torch.tensor(lmask[:r], dtype=resp.dtype)
        if lps:
            roll[b, p: p + r] = torch.tensor(lps[:r])
    out = {"input_ids": input_ids, "attention_mask": attn, "response_mask": resp, "rollout_logp": roll,
           "adv": advantages.float(), "version": torch.tensor(versions, dtype=torch.long)}
    records = [s.get("routed_experts") for g in groups for s in g.samples]
    if any(r is not None for r in records):
        from rl.moe.replay import pad_routing

        names = [f"group {i} sample {k}" for i, g in enumerate(groups) for k in range(len(g.samples))]
        out["routed_experts"] = pad_routing(records, [len(x) for x in seqs], L, names).to(torch.int16)
    return out


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
