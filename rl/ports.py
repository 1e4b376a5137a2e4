"""Free TCP ports for a process group's rendezvous (the trainer group's MASTER_PORT, tests, benches)."""
from __future__ import annotations

import random
import socket

# Ray's worker processes listen on 10002-19999 by default (min_worker_port / max_worker_port)
_RAY_WORKER_PORTS_END = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS had free on `host` a moment ago (bind to port 0, read it, close). Another process may take it
    before it is used; rendezvous code that retries or fails loudly is fine with that."""
    s = socket.socket()
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def ephemeral_range() -> tuple[int, int]:
    """The OS's range for ports handed out by bind(port 0) and outgoing connections (Linux's default if unreadable)."""
    try:
        lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def rendezvous_port(host: str = "", tries: int = 64) -> int:
    """A port free on `host` now, drawn at random *below* the ephemeral range and above Ray's worker ports.

    `free_port`'s answer comes from the ephemeral range, which every process that binds port 0 or connects out
    draws from too: between picking it and rank 0's bind, a Ray worker or a vLLM engine starting on the same node
    took it (measured: rank 0 failed with EADDRINUSE, the other ranks waited on a stranger's socket). Outside that
    range a port is only taken by an explicit bind. Falls back to `free_port` when that range is empty or full."""
    lo, _ = ephemeral_range()
    if lo - 1 > _RAY_WORKER_PORTS_END:
        rng = random.SystemRandom()
        for _ in range(tries):
            port = rng.randrange(_RAY_WORKER_PORTS_END, lo)
            s = socket.socket()
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
            finally:
                s.close()
    return free_port(host)
