#!/usr/bin/env bash
# One command for a fresh machine: set up, build sample shards and a small random VAE, encode them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/latentcache demo --workdir "${1:-demo}"
