"""The ModelScope source against the loopback stand-in (tests/weights/modelscope_standin.py): the revision pinned
to its commit, files hashed while downloading and checked against the listing's sha256, resume after a broken
transfer, and the service's refusals named."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.errors import BadInput
from flows.matrix import ModelSource
from flows.revisions import resolve_revision
from flows.weights.manifest import prepare_weights
from tests.weights.conftest import pin_and_fetch, tiny_model, write_checkpoint
from tests.weights.hub_standin import COMMIT
from tests.weights.modelscope_standin import ModelScopeRepo, serve

REPO = "FlagRelease/Tiny-Qwen3-MoE"
SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture
def modelscope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelScopeRepo]:
    repo = ModelScopeRepo(REPO, write_checkpoint(tmp_path / "published"))
    server, domain = serve(repo)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://{domain}")
    yield repo
    server.shutdown()


def ms_model(tmp_path: Path, revision: str = "master"):
    return tiny_model(tmp_path, source=ModelSource(hub="modelscope", repo=REPO, revision=revision))


def test_pinned_download_is_hashed_once_while_it_arrives(modelscope: ModelScopeRepo, tmp_path: Path):
    model = ms_model(tmp_path)
    pinned = resolve_revision(model.source, offline=False, timeout_s=5, pypi_index="unused")
    assert pinned.resolved == COMMIT
    log: list[str] = []
    manifest, hashed = prepare_weights("tiny", model, pinned, tmp_path / "weights", tmp_path, tmp_path / "state", False, log.append)
    assert hashed == 0  # every file was hashed on the way in: verification read none of them again
    assert any("hashing 0 files, 0 MiB (13 hashed while downloading)" in line for line in log)
    assert manifest.expected_from == "hub metadata" and manifest.revision == COMMIT
    for record in manifest.files:
        assert (Path(manifest.folder) / record.path).read_bytes() == (modelscope.folder / record.path).read_bytes()


def test_a_broken_transfer_resumes_from_where_it_stopped(modelscope: ModelScopeRepo, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    from flows.weights import modelscope as client

    monkeypatch.setattr(client, "CHUNK", 4096)  # the test file is small: read it in pieces, as large files are
    size = (modelscope.folder / SHARD).stat().st_size
    modelscope.drop_after[SHARD] = size // 3
    model = ms_model(tmp_path)
    _, manifest, _ = pin_and_fetch(model, tmp_path, print, False)
    kept = (size // 3) // 4096 * 4096
    assert modelscope.ranges == [(SHARD, f"bytes={kept}-")]
    total = sum(p.stat().st_size for p in modelscope.folder.iterdir())
    assert modelscope.bytes_served == total + (size // 3 - kept)  # only the torn piece was sent twice
    assert SHARD in [f.path for f in manifest.files]


def test_a_partial_file_left_by_a_killed_run_is_resumed(modelscope: ModelScopeRepo, tmp_path: Path):
    model = ms_model(tmp_path)
    pinned = resolve_revision(model.source, offline=False, timeout_s=5, pypi_index="unused")
    folder = tmp_path / "weights" / "tiny" / COMMIT
    folder.mkdir(parents=True)
    data = (modelscope.folder / SHARD).read_bytes()
    (folder / f"{SHARD}.partial").write_bytes(data[:1000])  # what a SIGKILLed download leaves
    manifest, _ = prepare_weights("tiny", model, pinned, tmp_path / "weights", tmp_path, tmp_path / "state", False, print)
    assert modelscope.ranges == [(SHARD, "bytes=1000-")]
    assert (folder / SHARD).read_bytes() == data and not (folder / f"{SHARD}.partial").exists()
    assert SHARD in [f.path for f in manifest.files]


def test_a_local_file_that_no_longer_matches_the_listing_is_fetched_again(modelscope: ModelScopeRepo, tmp_path: Path):
    model = ms_model(tmp_path)
    pinned, _, _ = pin_and_fetch(model, tmp_path, print, False)
    local = tmp_path / "weights" / "tiny" / COMMIT / SHARD
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0x10
    local.write_bytes(bytes(data))
    log: list[str] = []
    prepare_weights("tiny", model, pinned, tmp_path / "weights", tmp_path, tmp_path / "state", False, log.append)
    assert any(f"{SHARD}: sha256" in line and "once more" in line for line in log)  # re-fetched, then right
    assert local.read_bytes() == (modelscope.folder / SHARD).read_bytes()


def test_unknown_revision_and_repository_are_named(modelscope: ModelScopeRepo, tmp_path: Path):
    with pytest.raises(BadInput, match="has no revision"):
        resolve_revision(ms_model(tmp_path, "v9").source, offline=False, timeout_s=5, pypi_index="unused")
    other = tiny_model(tmp_path, source=ModelSource(hub="modelscope", repo="nobody/nothing", revision="master"))
    with pytest.raises(BadInput, match="modelscope:nobody/nothing: no such repository or revision"):
        prepare_weights("tiny", other, resolve_revision(other.source, offline=True, timeout_s=1, pypi_index="x"),
                        tmp_path / "weights", tmp_path, tmp_path / "state", False, print)


def test_a_download_that_will_not_fit_stops_before_the_first_byte(modelscope: ModelScopeRepo, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    import shutil as real_shutil
    from collections import namedtuple

    from flows.weights import sources
    from flows.weights.sources import WeightsSourceError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(WeightsSourceError, match="the weights need .* GiB in .* but only 0.0 GiB are free"):
        pin_and_fetch(ms_model(tmp_path), tmp_path)
    monkeypatch.setattr(sources.shutil, "disk_usage", real_shutil.disk_usage)
    assert modelscope.bytes_served == 0
