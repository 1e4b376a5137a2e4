"""Where GRPO's actors run: one Ray placement group, checked against the cluster before anything waits on it.

Separate bundles (default): one bundle per trainer worker ({CPU: trainer_cpus, GPU: trainer_gpus}) and one per
rollout worker. Colocated (`resources.colocate=true`): rollout worker j shares trainer j's bundle, which holds
both workers' CPUs and the trainer's GPUs; on GPUs each worker asks for a fraction of that bundle's GPU
(`resources.rollout_gpu_share` for the rollout worker, the rest for the trainer), so Ray puts both on the same
device, and vLLM sleeps while the trainer trains (see the driver).

`check_fits` compares the plan with the cluster's nodes *before* the placement group is created: a job that
can never be scheduled fails at once, naming per resource what is needed (and why) and what exists, instead of
waiting for Ray's timeout. `wait_ready` reports what is still pending while it waits.

After a lost node (rl.grpo.recovery): `placed_bundles` says which bundles sit on a live node, `wait_for_bundles`
gives Ray `resources.wait_s` to place the others again, and `shrink_plan` is the plan for the workers left,
for a new placement group (Ray cannot drop a bundle from a group; an unplaceable one keeps its GCS busy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


class InsufficientResources(RuntimeError):
    """The cluster cannot host the run's workers; the message names the resource, the need and the supply."""


@dataclass
class Placement:
    bundles: list[dict[str, float]]
    strategy: str
    trainer: list[tuple[int, dict[str, float]]]    # (bundle index, {num_cpus, num_gpus}) per trainer rank
    rollout: list[tuple[int, dict[str, float]]]    # same per rollout worker
    why: dict[str, str] = field(default_factory=dict)  # resource -> how the need adds up


def _res(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def plan_placement(cfg) -> Placement:
    r, nt, nr = cfg.resources, cfg.trainer.num_workers, cfg.rollout.num_workers
    trainer_opts = {"num_cpus": r.trainer_cpus, "num_gpus": r.trainer_gpus}
    if not r.colocate:
        bundles = [_res(r.trainer_cpus, r.trainer_gpus)] * nt + [_res(r.rollout_cpus, r.rollout_gpus)] * nr
        why = {"CPU": f"{nt} trainer workers x {r.trainer_cpus:g} + {nr} rollout workers x {r.rollout_cpus:g}",
               "GPU": f"{nt} trainer workers x {r.trainer_gpus:g} + {nr} rollout workers x {r.rollout_gpus:g}"}
        return Placement(bundles, r.placement_strategy, [(i, dict(trainer_opts)) for i in range(nt)],
                         [(nt + j, {"num_cpus": r.rollout_cpus, "num_gpus": r.rollout_gpus}) for j in range(nr)], why)
    share = r.rollout_gpu_share if r.trainer_gpus else 0.0
    bundles, trainers = [], []
    for i in range(nt):
        has_rollout = i < nr
        bundles.append(_res(r.trainer_cpus + (r.rollout_cpus if has_rollout else 0.0), r.trainer_gpus))
        gpus = r.trainer_gpus * (1.0 - share) if has_rollout else r.trainer_gpus
        trainers.append((i, {"num_cpus": r.trainer_cpus, "num_gpus": gpus}))
    rollouts = [(j, {"num_cpus": r.rollout_cpus, "num_gpus": r.trainer_gpus * share}) for j in range(nr)]
    why = {"CPU": f"{nt} trainer workers x {r.trainer_cpus:g} + {nr} colocated rollout workers x {r.rollout_cpus:g}",
           "GPU": f"{nt} bundles x {r.trainer_gpus:g} (trainer and colocated rollout worker share each)"}
    return Placement(bundles, r.placement_strategy, trainers, rollouts, why)


HINTS = {"CPU": "lower resources.trainer_cpus / resources.rollout_cpus (fractions such as 0.5 are allowed), use "
                "fewer workers (trainer.num_workers, rollout.num_workers), or add nodes",
         "GPU": "lower resources.trainer_gpus / resources.rollout_gpus, set resources.colocate=true to share GPUs, "
                "use fewer workers, or add GPU nodes"}


def check_fits(p: Placement, nodes: list[dict[str, float]]) -> None:
    """Raise InsufficientResources when the bundles can never be placed on `nodes` (each node's total
    resources). Checks totals per resource, each bundle against the largest node, STRICT_PACK against one
    node, and a first-fit-decreasing placement for the rest."""
    need: dict[str, float] = {}
    for b in p.bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    for k, v in sorted(need.items()):
        have = sum(n.get(k, 0.0) for n in nodes)
        if v > have + 1e-9:
            raise InsufficientResources(f"the run needs {v:g} {k} ({p.why.get(k, 'bundles')}), the cluster has "
                                        f"{have:g} ({len(nodes)} node(s)): {HINTS.get(k, 'add nodes')}")
    if p.strategy == "STRICT_PACK":
        if not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for n in nodes):
            raise InsufficientResources(f"placement_strategy=STRICT_PACK needs {need} on one node; the largest "
                                        f"nodes have {_largest(nodes)}: use PACK or SPREAD, or smaller workers")
        return
    free = [dict(n) for n in nodes]
    for i, b in sorted(enumerate(p.bundles), key=lambda ib: -sum(ib[1].values())):
        host = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items())), None)
        if host is None:
            raise InsufficientResources(f"bundle {i} {b} fits on no node (node resources: {nodes}); "
                                        f"{HINTS.get('GPU' if b.get('GPU') else 'CPU')}")
        for k, v in b.items():
            host[k] -= v


def _largest(nodes: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def wait_ready(refs: list[Any], names: list[str], timeout_s: float, what: str, report_every_s: float = 15.0,
               log=print) -> list[Any]:
    """ray.get(refs) with a report of what is still pending every `report_every_s` seconds. A call that failed
    raises at once, not when the others answer: ranks of a group whose peer died may wait for it for as long as
    their rendezvous timeout (30 minutes)."""
    import ray

    pending = dict(zip(refs, names))
    deadline = time.monotonic() + timeout_s
    report_at = time.monotonic() + report_every_s
    while pending:
        now = time.monotonic()
        if now >= deadline:
            raise InsufficientResources(f"{what}: still pending after {timeout_s:.0f}s: {sorted(pending.values())}; "
                                        f"cluster available now: {ray.available_resources()}")
        # back at the first answer (each is checked as it comes), else at the next report or the deadline
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, min(report_at, deadline) - now))
        for d in done:
            ray.get(d)                     # raises the failure now
            pending.pop(d, None)
        if pending and time.monotonic() >= report_at:
            report_at = time.monotonic() + report_every_s
            log(f"[r1lab] {what}: waiting for {sorted(pending.values())} (cluster available: "
                f"{ {k: v for k, v in ray.available_resources().items() if k in ('CPU', 'GPU', 'memory')} })",
                flush=True)
    return ray.get(refs)


def placed_bundles(pg) -> set[int]:
    """The bundles of `pg` that sit on a live node now. A bundle whose node died is unplaced until Ray finds it a
    new node (the group is RESCHEDULING meanwhile); it may never come back."""
    import ray
    from ray.util.placement_group import placement_group_table

    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    return {int(b) for b, node in placement_group_table(pg)["bundles_to_node_id"].items() if node in alive}


def wait_for_bundles(pg, bundles: list[int], timeout_s: float, what: str, log=print,
                     report_every_s: float = 15.0, poll_s: float = 1.0) -> set[int]:
    """Wait up to `timeout_s` until every bundle of `bundles` is placed (Ray moves a lost node's bundles when
    capacity appears), reporting what it waits for. Returns the ones placed at the end, which may be fewer."""
    deadline = time.monotonic() + timeout_s
    next_report = time.monotonic()
    while True:
        placed = placed_bundles(pg) & set(bundles)
        if len(placed) == len(set(bundles)) or time.monotonic() >= deadline:
            return placed
        if time.monotonic() >= next_report:
            log(f"[r1lab] {what}: bundle(s) {sorted(set(bundles) - placed)} lost their node; waiting up to "
                f"{deadline - time.monotonic():.0f}s more (resources.wait_s) for Ray to place them again", flush=True)
            next_report = time.monotonic() + report_every_s
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def shrink_plan(p: Placement, placed: set[int], sequence_parallel: int, min_trainers: int,
                min_rollouts: int) -> Placement:
    """The plan for the workers whose bundles are still `placed` after a lost node, for a new, smaller placement
    group (bundles renumbered in order). Trainer ranks keep their order, cut to a multiple of sequence_parallel.
    Raises InsufficientResources, naming the knob, below trainer.min_workers or rollout.min_workers."""
    trainers = [(b, o) for b, o in p.trainer if b in placed]
    n = len(trainers) // sequence_parallel * sequence_parallel
    if n < max(sequence_parallel, min_trainers):
        raise InsufficientResources(
            f"{len(p.trainer) - len(trainers)} of the {len(p.trainer)} trainer workers lost their node and Ray placed "
            f"their bundles on no other node within resources.wait_s; {n} worker(s) would be left (a multiple of "
            f"trainer.sequence_parallel={sequence_parallel}) < trainer.min_workers={min_trainers}: add a node, or "
            f"lower trainer.min_workers")
    trainers = trainers[:n]
    rollouts = [(b, o) for b, o in p.rollout if b in placed]
    if len(rollouts) < min_rollouts:
        raise InsufficientResources(
            f"{len(p.rollout) - len(rollouts)} of the {len(p.rollout)} rollout workers lost their node and Ray placed "
            f"their bundles on no other node within resources.wait_s; {len(rollouts)} left < rollout.min_workers="
            f"{min_rollouts}: add a node, or lower rollout.min_workers")
    keep = sorted({b for b, _ in trainers + rollouts})
    new = {b: i for i, b in enumerate(keep)}
    return Placement([p.bundles[b] for b in keep], p.strategy, [(new[b], dict(o)) for b, o in trainers],
                     [(new[b], dict(o)) for b, o in rollouts], p.why)
