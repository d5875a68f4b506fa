"""Serve a release image for evaluation: `docker run` with the chip's flags, the verified weights mounted read-only,
wait for `/v1/models`, and always stop and remove the container (its log is kept when it fails).

The chip's flags go through `flows.runflags`, so the container we evaluate is started exactly as the card tells users.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import requests

from flows.build.context import CACHE_MOUNT, MODEL_MOUNT
from flows.errors import FlagReleaseError
from flows.runflags import run_options


# vLLM's CPU worker, which runs the model, binds its threads to these cores (by default the machine's first, so two
# engines on one host would share a core). Only the worker: the API server and the engine core (which polls without
# sleeping) stay free to run elsewhere; a container confined to one core with them all missed a 240 s start-up
# limit in the suite (2026-12-06; about 60 s unconfined). vLLM on an accelerator ignores the variable.
ENGINE_CPUS_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


class ServingFailed(FlagReleaseError):
    pass


@dataclass(frozen=True)
class ServeRequest:
    """One stack to serve: which image, with which environment, the weights folder and the chip's flags."""

    image: str
    name: str
    weights: Path
    port: int
    flags: list[str]
    environment: dict[str, str]
    cache: Path | None = None  # mounted read-write at the image's cache path
    cpus: str | None = None  # host cores the model's worker binds (placement: not part of the stack's identity)


def stack_volumes(weights: Path, cache: Path | None, cache_mode: str = "rw") -> list[str]:
    """The weights (read-only) and the engine's cache where the image expects them."""
    return [f"{weights}:{MODEL_MOUNT}:ro", *([f"{cache}:{CACHE_MOUNT}:{cache_mode}"] if cache is not None else [])]


def run_to_completion(client: docker.DockerClient, image: str, argv: list[str], volumes: list[str], role: str,
                      timeout_s: float, log_tail: int, **options: object) -> tuple[int, str]:
    """One throwaway container of `image` running `argv` to its end: its exit code and the last lines of its log.
    The container is removed whatever happens (a timeout included)."""
    container = client.containers.run(image, argv, volumes=volumes, labels={"flagrelease.role": role}, detach=True,
                                      **options)
    try:
        code = container.wait(timeout=timeout_s)["StatusCode"]
        return code, container.logs(tail=log_tail).decode(errors="replace")
    finally:
        container.remove(force=True)


@contextmanager
def served(client: docker.DockerClient, request: ServeRequest, log: Callable[[str], None],
           timeout_s: float = 180.0) -> Iterator[str]:
    """Run the image until the block ends; yield its OpenAI base URL once `/v1/models` answers."""
    options = run_options(request.flags)
    options.setdefault("environment", {}).update(request.environment)
    if request.cpus:
        options["environment"][ENGINE_CPUS_VARIABLE] = request.cpus
    host_network = options.get("network_mode") == "host"
    if request.cache is not None:
        request.cache.mkdir(parents=True, exist_ok=True)
    volumes = [*options.pop("volumes", []), *stack_volumes(request.weights, request.cache)]
    ports = {} if host_network else {f"{request.port}/tcp": ("127.0.0.1", None)}
    _remove_stale(client, request.name)
    container = client.containers.run(request.image, name=request.name, detach=True, volumes=volumes, ports=ports,
                                      labels={"flagrelease.role": "evaluation"}, **options)
    try:
        base_url = _wait_ready(client, container, request, host_network, timeout_s)
        log(f"{request.name}: serving {request.image} at {base_url}")
        yield base_url
        container.reload()
        if container.status != "running":
            raise ServingFailed(f"{request.name} stopped during the evaluation (status {container.status}); "
                                f"last log lines:\n{_tail(container)}")
    finally:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass


def _wait_ready(client: docker.DockerClient, container, request: ServeRequest, host_network: bool,
                timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    base_url = None
    while time.monotonic() < deadline:
        container.reload()
        if container.status in ("exited", "dead"):
            raise ServingFailed(f"{request.name} exited with code {container.attrs['State']['ExitCode']} before "
                                f"serving; last log lines:\n{_tail(container)}")
        if base_url is None:
            base_url = _base_url(container, request.port, host_network)
        if base_url is not None:
            try:
                if requests.get(f"{base_url}/models", timeout=2).status_code == 200:
                    return base_url
            except requests.RequestException:
                pass
        time.sleep(0.5)
    raise ServingFailed(f"{request.name} did not answer {request.port}/v1/models within {timeout_s:.0f} s; "
                        f"last log lines:\n{_tail(container)}")


def _base_url(container, port: int, host_network: bool) -> str | None:
    if host_network:
        return f"http://127.0.0.1:{port}/v1"
    bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{port}/tcp") or []
    return f"http://127.0.0.1:{bindings[0]['HostPort']}/v1" if bindings else None


def _tail(container, lines: int = 30) -> str:
    try:
        return container.logs(tail=lines).decode(errors="replace").rstrip() or "(no output)"
    except docker.errors.APIError:
        return "(log unavailable)"


def _remove_stale(client: docker.DockerClient, name: str) -> None:
    """A container left by a killed run would block the name; it is ours (same name), so it goes."""
    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass
