"""Build benchmark: cold build of the cpu image (no layer cache) against a warm rebuild (layer cache, new registry),
and an unchanged-matrix rebuild across every release (resolve + one registry request each, no build, no push).

    python -m flows.build.bench      # starts its own engine/registry as needed, on free ports; prints a table
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from pathlib import Path

import docker

from flows.build.image import build_release_image, existing_image
from flows.kernel_artifacts import check_and_compile
from flows.matrix import load_matrix
from flows.plan import resolve
from flows.registry import RegistryClient, Repository
from flows.services import Services
from flows.settings import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CountingRegistry(RegistryClient):
    requests = 0

    def _request(self, method, path, headers=None):  # type: ignore[no-untyped-def]
        CountingRegistry.requests += 1
        return super()._request(method, path, headers)


def _build_cpu(settings: Settings, no_cache: bool) -> tuple[float, bool]:
    matrix = load_matrix(settings.matrix, settings.images_dir)
    plan = resolve(matrix, "smollm2-cpu", settings)
    kernels = check_and_compile(plan, settings.state_dir, settings.project_dir)
    started = time.perf_counter()
    image = build_release_image(plan, kernels, docker.DockerClient(base_url=settings.docker_host),
                                RegistryClient(Repository.parse(plan.repository)),
                                settings.release_dir(plan.release, plan.fingerprint) / "context", settings.project_dir,
                                None, lambda line: None, no_cache=no_cache)
    return time.perf_counter() - started, image.built


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="flagrelease-build-bench-") as folder:
        results = []
        for label, no_cache in (("cold build (no layer cache)", True), ("warm rebuild (layer cache, empty registry)", False)):
            port = _free_port()
            settings = Settings(state_dir=Path(folder) / label.split()[0], registry_port=port, offline=True,
                                registry_override=f"127.0.0.1:{port}")
            services = Services(settings)
            started = services.up(("docker", "registry"))
            try:
                seconds, built = _build_cpu(settings, no_cache)
                results.append((label, seconds, int(built), int(built)))
                if not no_cache:
                    matrix = load_matrix(settings.matrix, settings.images_dir)
                    CountingRegistry.requests = 0
                    t0 = time.perf_counter()
                    found = 0
                    for name in matrix.spec.releases:
                        plan = resolve(matrix, name, settings)
                        found += existing_image(plan, CountingRegistry(Repository.parse(plan.repository))) is not None
                    unchanged = time.perf_counter() - t0
                    results.append((f"unchanged matrix, {len(matrix.spec.releases)} releases ({found} with an image, "
                                    f"{CountingRegistry.requests} registry requests)", unchanged, 0, 0))
            finally:
                services.down(tuple(s.name for s in started if s.state == "started"))
    print("| step | seconds | builds | pushes |\n|---|---|---|---|")
    for label, seconds, builds, pushes in results:
        print(f"| {label} | {seconds:.2f} | {builds} | {pushes} |")
    cold, warm, unchanged = results[0][1], results[1][1], results[2][1]
    print(f"\nwarm/cold = {warm / cold:.2f}; unchanged matrix {unchanged:.2f} s (goal <= 10 s, 0 builds, 0 pushes)")
    return 0 if unchanged <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
