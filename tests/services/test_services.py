"""The service scripts against the real programs: Debian's dockerd and CNCF distribution's registry.

Each test uses its own state folder and free ports; whatever a test starts, it stops.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests

from flows.services import REGISTRY_PASSWORD_ENV, REGISTRY_USER_ENV, Services
from flows.settings import Settings
from tests.conftest import free_port

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", registry_port=free_port(), prefect_port=free_port(), offline=True)


@pytest.fixture
def engine(settings: Settings) -> Iterator[docker.DockerClient]:
    """The machine's Docker Engine, started through the service script if nobody runs it (and then stopped)."""
    services = Services(settings)
    [status] = services.up(("docker",))
    client = docker.DockerClient(base_url=settings.docker_host)
    yield client
    client.close()
    if status.state == "started":
        services.down(("docker",))


def registry_url(settings: Settings) -> str:
    return f"http://{settings.registry_host}:{settings.registry_port}"


def test_registry_starts_idempotently_stores_under_the_state_folder_and_stops(settings: Settings):
    services = Services(settings)
    assert [s.state for s in services.up(("registry",))] == ["started"]
    try:
        assert requests.get(f"{registry_url(settings)}/v2/", timeout=5).status_code == 200
        assert requests.get(f"{registry_url(settings)}/v2/_catalog", timeout=5).json() == {"repositories": []}
        assert [s.state for s in services.up(("registry",))] == ["running"]  # second start: nothing new
        config = (settings.state_dir / "registry" / "config.yml").read_text()
        assert f"rootdirectory: {settings.state_dir / 'registry' / 'data'}" in config
    finally:
        assert [s.state for s in services.down(("registry",))] == ["stopped"]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{registry_url(settings)}/v2/", timeout=5)
    assert [s.state for s in services.status(("registry",))] == ["not running"]


def test_registry_with_bcrypt_htpasswd_auth_keeps_the_password_out_of_files_and_logs(settings: Settings, monkeypatch):
    password = "marker-pw-7f3a9c"
    monkeypatch.setenv(REGISTRY_USER_ENV, "ci")
    monkeypatch.setenv(REGISTRY_PASSWORD_ENV, password)
    services = Services(settings)
    services.up(("registry",))
    try:
        url = f"{registry_url(settings)}/v2/"
        assert requests.get(url, timeout=5).status_code == 401
        assert requests.get(url, auth=("ci", "wrong"), timeout=5).status_code == 401
        assert requests.get(url, auth=("ci", password), timeout=5).status_code == 200
        assert (settings.state_dir / "registry" / "htpasswd").read_text().startswith("ci:$2y$")
    finally:
        services.down(("registry",))
    for path in settings.state_dir.rglob("*"):
        if path.is_file():
            assert password not in path.read_text(errors="replace"), path


def test_engine_and_registry_push_an_image_and_read_it_back_by_digest(settings: Settings, engine: docker.DockerClient):
    services = Services(settings)
    services.up(("registry",))
    repository = f"{settings.registry_host}:{settings.registry_port}/flagrelease/service-check"
    try:
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            payload = os.urandom(64)  # fresh content: a new layer, never one the engine already had
            info = tarfile.TarInfo("check.bin")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        engine.api.import_image_from_data(layer.getvalue(), repository=repository, tag="1")
        chunks = list(engine.images.push(repository, tag="1", stream=True, decode=True))
        assert not [c for c in chunks if "error" in c], chunks
        digest = next(c["aux"]["Digest"] for c in chunks if "aux" in c and "Digest" in c["aux"])
        manifest = requests.get(f"{registry_url(settings)}/v2/flagrelease/service-check/manifests/{digest}",
                                headers={"Accept": f"{DOCKER_V2}, {OCI}"}, timeout=10)
        assert manifest.status_code == 200
        assert manifest.headers["Docker-Content-Digest"] == digest
        assert manifest.headers["Content-Type"] == DOCKER_V2
    finally:
        engine.images.remove(f"{repository}:1", force=True)
        services.down(("registry",))


def test_engine_start_and_stop_only_touch_an_engine_this_state_folder_started(settings: Settings):
    services = Services(settings)
    was_running = services.spec("docker").healthy()
    [started] = services.up(("docker",))
    if was_running:
        assert started.state == "running (not ours)"
        assert services.down(("docker",))[0].state == "running (not ours)"
        assert services.spec("docker").healthy()  # somebody else's engine is left alone
    else:
        assert started.state == "started"
        assert docker.DockerClient(base_url=settings.docker_host).version()["Version"]
        assert services.down(("docker",))[0].state == "stopped"
        assert not services.spec("docker").healthy()


def test_a_service_that_cannot_start_says_why_with_its_log(settings: Settings):
    from flows.errors import ServiceUnavailable

    blocker = Services(settings.model_copy(update={"state_dir": settings.state_dir.parent / "other"}))
    blocker.up(("registry",))  # holds the port, so a second registry on it must fail to bind
    try:
        second = Services(settings)
        # the health check would see the first registry answering: ask for a real start regardless
        doomed = dataclasses.replace(second.spec("registry"), healthy=lambda: False, start_timeout_s=10)
        with pytest.raises(ServiceUnavailable) as caught:
            second._start(doomed)
        assert "registry is not available: exited with code" in str(caught.value)
        assert "address already in use" in str(caught.value)
        assert not (settings.state_dir / "run" / "registry.pid").exists()
    finally:
        blocker.down(("registry",))
