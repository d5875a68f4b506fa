"""The real registry (distribution 2.8, `auth: token`) behind the loopback stand-in for a hosted registry's token
issuer (tests/services/token_issuer.py): push, artifact attach, tag move and read-back through Bearer tokens, from
this project's client and from the Docker Engine; tokens reused until they expire; anonymous pull of a public
repository; refusals that name the registry and the scope."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests

from flows.build.image import PushFailed, push
from flows.publish.release import MOVING_TAG, attached_record, attachment, publish_release, referrers
from flows.registry import RegistryClient, RegistryError, Repository
from flows.services import Services
from flows.settings import Settings
from tests.conftest import free_port
from tests.services.test_publish import push_image, record_for
from tests.services.token_issuer import ISSUER, TokenIssuer

PASSWORD = "token-pw-51c0e2"


@pytest.fixture(scope="module")
def issuer() -> Iterator[tuple[TokenIssuer, str]]:
    standin = TokenIssuer(users={"ci": PASSWORD}, public={"flagrelease/public"})
    server, realm = standin.serve()
    yield standin, realm
    server.shutdown()


@pytest.fixture(scope="module")
def token_registry(issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    standin, realm = issuer
    root = tmp_path_factory.mktemp("token-auth")
    settings = Settings(state_dir=root / "state", registry_port=free_port(), prefect_port=free_port(), offline=True,
                        registry_token_realm=realm, registry_token_issuer=ISSUER,
                        registry_token_certs=standin.write_certificate(root / "issuer.pem"))
    services = Services(settings)
    services.up(("registry",))
    yield settings
    services.down(("registry",))


def client(settings: Settings, name: str, auth: tuple[str, str] | None = ("ci", PASSWORD), **kwargs) -> RegistryClient:
    return RegistryClient(Repository.parse(f"127.0.0.1:{settings.registry_port}/flagrelease/{name}"), auth, **kwargs)


def test_the_registry_demands_a_bearer_token_from_the_issuer(token_registry: Settings, issuer):
    _, realm = issuer
    answer = requests.get(f"http://127.0.0.1:{token_registry.registry_port}/v2/flagrelease/x/tags/list", timeout=5)
    assert answer.status_code == 401
    challenge = answer.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{realm}",service="flagrelease-registry",scope="repository:flagrelease/x:pull"')
    forged = requests.get(f"http://127.0.0.1:{token_registry.registry_port}/v2/flagrelease/x/tags/list", timeout=5,
                          auth=("ci", PASSWORD))  # Basic credentials are not a token: still refused
    assert forged.status_code == 401


def test_push_attach_tag_move_and_read_back_through_tokens(token_registry: Settings, issuer):
    standin, _ = issuer
    registry = client(token_registry, "attach")
    before = standin.issued
    image = push_image(registry, b"token layer")
    card = attachment("card", b"# card\n")
    record, _, changed = publish_release(registry, image, lambda: record_for(image), [card], list, lambda line: None)
    assert changed and registry.manifest_digest(MOVING_TAG) == image.digest
    assert attached_record(registry, image.digest) == record
    assert len(referrers(registry, image.digest)) == 2
    assert registry.tokens_fetched == standin.issued - before
    assert 1 <= registry.tokens_fetched <= 2  # pull then pull,push at most: one token serves many requests


def test_a_token_is_reused_until_it_expires(token_registry: Settings, issuer):
    standin, _ = issuer
    now = [1000.0]
    registry = client(token_registry, "attach", clock=lambda: now[0])
    for _ in range(5):
        registry.manifest_digest(MOVING_TAG)
    assert registry.tokens_fetched == 1
    now[0] += standin.ttl_s  # past its expiry: asked for again before the registry could refuse it
    registry.manifest_digest(MOVING_TAG)
    assert registry.tokens_fetched == 2


def test_anonymous_pull_of_a_public_repository_and_refusals_naming_registry_and_scope(token_registry: Settings, issuer):
    standin, realm = issuer
    image = push_image(client(token_registry, "public"), b"public layer")
    anonymous = client(token_registry, "public", auth=None)
    assert anonymous.manifest_digest(image.version) == image.digest
    host = f"127.0.0.1:{token_registry.registry_port}"
    # distribution names the actions in no fixed order (Go map iteration): either is the same scope
    with pytest.raises(RegistryError, match=rf"registry {host} refused .*\(scope repository:flagrelease/public:(pull,push|push,pull)\)"):
        push_image(anonymous, b"not allowed")
    with pytest.raises(RegistryError, match=rf"registry {host} refused manifest .*\(scope repository:flagrelease/attach:pull\)"):
        client(token_registry, "attach", auth=None).manifest_digest(MOVING_TAG)
    refused = standin.refused
    with pytest.raises(RegistryError, match=rf"registry {host}: its token issuer {realm} refused the credentials of "
                                            r"'ci' for scope repository:flagrelease/attach:pull;"):
        client(token_registry, "attach", auth=("ci", "wrong")).manifest_digest(MOVING_TAG)
    assert standin.refused == refused + 1


def test_the_engine_pushes_and_pulls_through_the_token_flow(token_registry: Settings, tmp_path: Path):
    services = Services(Settings(state_dir=tmp_path / "engine"))
    [status] = services.up(("docker",))
    engine = docker.DockerClient(base_url=token_registry.docker_host)
    repository = f"127.0.0.1:{token_registry.registry_port}/flagrelease/engine"
    try:
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            payload = os.urandom(64)
            info = tarfile.TarInfo("check.bin")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        engine.api.import_image_from_data(layer.getvalue(), repository=repository, tag="1")
        with pytest.raises(PushFailed, match=f"push of {repository}:1 failed: .*(unauthorized|authentication required)"):
            push(engine, repository, "1", {"username": "ci", "password": "wrong"}, lambda line: None)
        digest = push(engine, repository, "1", {"username": "ci", "password": PASSWORD}, lambda line: None)
        assert client(token_registry, "engine").manifest_digest("1") == digest
        engine.images.remove(f"{repository}:1", force=True)
        engine.images.pull(repository, tag=digest, auth_config={"username": "ci", "password": PASSWORD})
        assert engine.images.get(f"{repository}@{digest}")
    finally:
        for tag in (f"{repository}:1", repository):
            try:
                engine.images.remove(tag, force=True)
            except docker.errors.ImageNotFound:
                pass
        engine.close()
        if status.state == "started":
            services.down(("docker",))
