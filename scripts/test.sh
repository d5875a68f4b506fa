#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install what the tests need, then run every tier.
# Tests start (and stop) their own services on free ports with throwaway state; pass pytest arguments through,
# e.g. `bash scripts/test.sh -m unit` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-browser
exec .venv/bin/python -m pytest "$@"
