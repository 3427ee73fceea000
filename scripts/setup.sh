#!/usr/bin/env bash
# Creates .venv (once) and installs latentcache from this clone with its test extras.
#
# torch goes in first, and only when the environment has none: the CPU build from PyTorch's CPU
# index (a plain `pip install torch` on Linux brings the multi-GB CUDA build). For a GPU, install
# the CUDA build you want first, or point LATENTCACHE_TORCH_INDEX at its index, e.g.
#   LATENTCACHE_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
# Installing into an environment you already have: see docs/install.md (`pip install -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${LATENTCACHE_TORCH_VERSION:-2.13.0}"
TORCH_INDEX="${LATENTCACHE_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"

# pip's and setuptools' chatter (the editable-install notice among it) goes to a log that is
# shown only when the install fails.
quiet_pip() {
  local log
  log="$(mktemp)"
  if ! python -m pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: pip install $* failed (output above)" >&2
    return 1
  fi
  rm -f "$log"
}

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
quiet_pip --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # --timeout/--retries: an unreachable index (an offline mirror) falls through to the other sources quickly
  quiet_pip "torch==${TORCH_VERSION}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --timeout 10 --retries 0}
fi
quiet_pip -e ".[test]"
# tcmalloc for Ray's workers (latentcache/allocator.py: about half the CPU encoder's time goes to page faults
# under glibc malloc); optional and best effort: without it glibc is used.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || echo "setup: libtcmalloc-minimal4 not installed; glibc malloc is used"
fi
python - <<'PY'
import diffusers, ray, torch
import latentcache
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
print(f"latentcache {latentcache.__version__} ready: torch {torch.__version__} ({build}), ray {ray.__version__}, "
      f"diffusers {diffusers.__version__}")
PY
