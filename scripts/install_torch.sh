#!/usr/bin/env bash
# Installs torch==$TORCH_VERSION into the active venv, choosing the build for this machine:
#  - with an NVIDIA GPU (nvidia-smi answers): PyPI's Linux wheel, which is a CUDA build;
#  - without one: a CPU build. If pip can already see a CPU wheel (a local wheel folder, as on
#    our dev and CI machines) it takes that; otherwise it asks PyTorch's CPU index. It never lets
#    a CPU-only machine download the multi-GB CUDA wheel.
set -euo pipefail
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
PY="${PYTHON:-python}"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install_torch: NVIDIA GPU found, installing torch==$TORCH_VERSION (CUDA build)"
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
  exit 0
fi

report="$(mktemp)"
trap 'rm -f "$report"' EXIT
"$PY" -m pip install -q --dry-run --no-deps --ignore-installed --report "$report" "torch==$TORCH_VERSION" >/dev/null 2>&1 || true
if "$PY" - "$report" <<'PYEOF'
import json, sys
try:
    items = json.load(open(sys.argv[1])).get("install", [])
except Exception:
    sys.exit(1)
for item in items:
    if item["metadata"]["name"].lower() == "torch":
        url = item.get("download_info", {}).get("url", "")
        version = item["metadata"]["version"]
        sys.exit(0 if ("+cpu" in version or url.startswith("file:")) else 1)
sys.exit(1)
PYEOF
then
  echo "install_torch: no NVIDIA GPU, installing the local CPU build of torch==$TORCH_VERSION"
  "$PY" -m pip install -q --no-deps "torch==$TORCH_VERSION"
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
else
  echo "install_torch: no NVIDIA GPU, installing torch==$TORCH_VERSION from $CPU_INDEX"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
fi
"$PY" -c "import torch; assert torch.version.cuda is None, 'a CUDA build of torch was installed on a machine without a GPU'; print('install_torch: torch', torch.__version__)"
