"""What isolation this machine offers, detected once per process."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

SANDBOX_PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")


class SandboxUnavailable(RuntimeError):
    """No safe sandbox here; the message says what is missing and how to opt into the weak mode."""


@dataclass(frozen=True)
class Capabilities:
    bwrap: str | None           # path of bubblewrap, if it works here
    bwrap_error: str | None     # why bubblewrap cannot be used
    python: str | None          # interpreter readable by the unprivileged sandbox uid
    is_root: bool               # root: each slot runs as its own unprivileged host uid

    @property
    def strong(self) -> bool:
        return self.bwrap is not None and self.python is not None


def _world_readable_python() -> str | None:
    override = os.environ.get("R1LAB_SANDBOX_PYTHON")
    for cand in ([override] if override else []) + list(SANDBOX_PYTHON_CANDIDATES):
        real = os.path.realpath(cand)
        if os.path.exists(real) and os.stat(real).st_mode & 0o005 == 0o005:
            return cand
    return None


@functools.lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    python = _world_readable_python()
    bwrap = shutil.which("bwrap")
    error = None
    if bwrap is None:
        error = "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    else:
        probe = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--die-with-parent",
                 "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
                 "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--", "/usr/bin/true"]
        kw = {}
        if os.geteuid() == 0:
            kw = dict(user=65534, group=65534, extra_groups=[])
        try:
            out = subprocess.run(probe, capture_output=True, text=True, timeout=20, **kw)
            if out.returncode != 0:
                error = f"bubblewrap failed a probe run (user namespaces off?): {out.stderr.strip()[:300]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            error = f"bubblewrap probe failed: {e}"
    if error:
        bwrap = None
    return Capabilities(bwrap, error, python, os.geteuid() == 0)
