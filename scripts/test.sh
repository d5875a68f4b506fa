#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install what the tests need, then run every tier.
# Tests start (and stop) their own services on free ports with throwaway state; pass pytest arguments through,
# e.g. `bash scripts/test.sh -m unit` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh --for-tests
echo "test.sh: set-up took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
# Two lanes (pytest-xdist, one test file at a time each, longest first): a vLLM CPU engine keeps one core busy, so
# each lane's engines get a core of their own (tests/conftest.py). FLAGRELEASE_TEST_LANES=1 runs in one process.
lanes=${FLAGRELEASE_TEST_LANES:-$(( $(nproc) < 2 ? $(nproc) : 2 ))}
if (( lanes > 1 )); then
    exec .venv/bin/python -m pytest -n "$lanes" --dist loadfile --no-loadscope-reorder "$@"
fi
exec .venv/bin/python -m pytest "$@"
