"""A free TCP port for a process group's rendezvous (the trainer group's MASTER_PORT, tests, benches)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS had free on `host` a moment ago (bind to port 0, read it, close). Another process may take it
    before it is used; rendezvous code that retries or fails loudly is fine with that."""
    s = socket.socket()
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()
