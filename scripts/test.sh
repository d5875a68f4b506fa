#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install what the tests need, then run every tier.
# Tests start (and stop) their own services on free ports with throwaway state; pass pytest arguments through,
# e.g. `bash scripts/test.sh -m unit` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh --for-tests
echo "test.sh: set-up took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
exec .venv/bin/python -m pytest "$@"
