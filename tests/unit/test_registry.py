"""The distribution API client's error handling: transient 5xx retried, an unreachable registry named with the
command that starts it, auth failures named. The registry here is a stand-in on loopback that follows the
distribution API's documented HEAD-manifest shape; the real registry is exercised in tests/services."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from flows.errors import ServiceUnavailable
from flows.registry import RegistryClient, RegistryError, Repository
from tests.conftest import free_port
from tests.loopback import start

DIGEST = "sha256:" + "ab" * 32


class FlakyRegistry(BaseHTTPRequestHandler):
    """Fails the first `failures` requests with 503, then serves one manifest; `/v2/private/...` wants auth."""

    failures = 0
    seen_accept: list[str] = []

    def do_HEAD(self) -> None:  # noqa: N802 (http.server API)
        FlakyRegistry.seen_accept.append(self.headers.get("Accept", ""))
        if FlakyRegistry.failures > 0:
            FlakyRegistry.failures -= 1
            self.send_response(503)
        elif self.path.startswith("/v2/private/"):
            self.send_response(401)
        elif self.path == "/v2/flagrelease/demo/manifests/v1":
            self.send_response(200)
            self.send_header("Docker-Content-Digest", DIGEST)
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def registry() -> Iterator[str]:
    server = start(FlakyRegistry)
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_transient_5xx_is_retried_and_manifests_are_asked_for_with_docker_v2_and_oci_types(registry: str):
    FlakyRegistry.failures, FlakyRegistry.seen_accept = 2, []
    client = RegistryClient(Repository.parse(f"{registry}/flagrelease/demo"))
    assert client.manifest_digest("v1") == DIGEST
    assert len(FlakyRegistry.seen_accept) == 3
    assert all("application/vnd.docker.distribution.manifest.v2+json" in a and
               "application/vnd.oci.image.manifest.v1+json" in a for a in FlakyRegistry.seen_accept)
    assert client.manifest_digest("v2") is None


def test_authentication_failure_names_the_variables(registry: str):
    FlakyRegistry.failures = 0
    with pytest.raises(RegistryError, match="set FLAGRELEASE_REGISTRY_USER and FLAGRELEASE_REGISTRY_PASSWORD"):
        RegistryClient(Repository.parse(f"{registry}/private/x")).manifest_digest("v1")


def test_unreachable_registry_says_how_to_start_it():
    client = RegistryClient(Repository.parse(f"127.0.0.1:{free_port()}/flagrelease/demo"))
    with pytest.raises(ServiceUnavailable) as caught:
        client.manifest_digest("v1")
    assert "cannot connect" in str(caught.value) and "after 4 attempts" in str(caught.value)
    assert "flagrelease services up registry" in str(caught.value)


def test_docker_engine_down_says_how_to_start_it(tmp_path):
    from flows.connections import docker_client
    from flows.settings import Settings

    with pytest.raises(ServiceUnavailable, match="Docker Engine is not available: .*flagrelease services up docker"):
        docker_client(Settings(docker_host=f"unix://{tmp_path}/no-docker.sock", state_dir=tmp_path))


def test_a_token_scope_is_the_same_whatever_order_the_registry_names_its_actions():
    from flows.registry import _scope_key

    assert _scope_key("repository:flagrelease/x:pull,push") == _scope_key("repository:flagrelease/x:push,pull")
    assert _scope_key("repository:flagrelease/x:pull") != _scope_key("repository:flagrelease/x:pull,push")
    assert _scope_key("repository:flagrelease/x:pull") != _scope_key("repository:flagrelease/y:pull")
