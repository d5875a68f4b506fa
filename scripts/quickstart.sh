#!/usr/bin/env bash
# The main job on the embedded default: install, start the services, release `smollm2-cpu` through its Prefect
# deployment, and say where to look. Stop everything afterwards with: .venv/bin/flagrelease services down
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/flagrelease services up
.venv/bin/flagrelease run smollm2-cpu
echo
echo "Prefect UI: http://127.0.0.1:4200/deployments  (services keep running; stop them with: .venv/bin/flagrelease services down)"
