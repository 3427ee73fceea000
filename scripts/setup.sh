#!/usr/bin/env bash
# Creates .venv (once) and installs latentcache with its test extras.
# torch goes in first: a CPU wheel unless the environment already has a torch build
# (a GPU user can `pip install torch` with their CUDA index before running this).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${LATENTCACHE_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import latentcache, torch, ray, diffusers; print('latentcache ready: torch', torch.__version__, 'ray', ray.__version__, 'diffusers', diffusers.__version__)"
