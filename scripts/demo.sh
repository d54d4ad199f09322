#!/usr/bin/env bash
# Set up, then reconstruct the shipped 4D quad-scan example; prints emittances and the run folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
psr fit --config configs/quad_scan_4d.yaml "$@"
