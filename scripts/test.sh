#!/usr/bin/env bash
# Set up, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# two workers, one per core; each test file stays in one worker (its module fixtures are made once)
python -m pytest tests -n 2 --dist loadfile "$@"
