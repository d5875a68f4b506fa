#!/usr/bin/env bash
# The fault suite alone: one fault per case injected into a real `smollm2-cpu` release run, then the table
# (fault, expected, observed, nothing lost). Assumes `bash scripts/setup.sh` has run once.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest tests/faults -m faults -p no:cacheprovider "$@"
