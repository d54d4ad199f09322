#!/usr/bin/env bash
# Set up, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# two workers (these machines have 2 cores; tests/conftest.py gives each its share of threads); each test file
# stays in one worker, so its module fixtures are made once
python -m pytest tests -n 2 --dist loadfile "$@"
