#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install what the tests need, then run every tier.
# Tests start (and stop) their own services on free ports with throwaway state; pass pytest arguments through,
# e.g. `bash scripts/test.sh -m unit` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh --for-tests
echo "test.sh: set-up took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
# FLAGRELEASE_TEST_LANES=2 runs two lanes (pytest-xdist, one test file at a time each, longest first, each lane's
# engines bound to a core of their own: tests/conftest.py). Not the default: on the 2-core VM the lanes' builds,
# pulls and engine start-ups overlap and cases time out (docs/tests.md).
lanes=${FLAGRELEASE_TEST_LANES:-1}
lane_args=()
if (( lanes > 1 )); then
    lane_args=(-n "$lanes" --dist loadfile --no-loadscope-reorder)
fi
# Nothing the tests start may outlive them: engines, services, evaluation containers (tests/leftovers.py).
before=$(mktemp)
.venv/bin/python -m tests.leftovers snapshot "$before"
.venv/bin/python -m pytest "${lane_args[@]}" "$@" &
pytest_pid=$!
# SIGTERM (a CI timeout, kill) and Ctrl-C reach pytest as SIGTERM, which ends the run as Ctrl-C does: the fixtures'
# finalizers stop what the tests started (tests/conftest.py).
trap 'kill -TERM "$pytest_pid" 2>/dev/null' TERM INT
status=0
while kill -0 "$pytest_pid" 2>/dev/null; do
    wait "$pytest_pid" && status=0 || status=$?
done
.venv/bin/python -m tests.leftovers check "$before" || (( status )) || status=1
rm -f "$before"
exit "$status"
