"""The Hugging Face source against the loopback stand-in hub (tests/weights/hub_standin.py): pinned revision,
published LFS sha256 (git blob ids for the small files) as the expected hashes, resume of an interrupted download, and the hub's errors."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.matrix import ModelSource
from flows.revisions import resolve_revision
from flows.weights.manifest import prepare_weights
from tests.weights.conftest import pin_and_fetch, tiny_model, write_checkpoint
from tests.weights.hub_standin import COMMIT, HubRepo, serve

REPO = "flagos-test/Tiny-Qwen3-MoE"
SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubRepo]:
    repo = HubRepo(REPO, write_checkpoint(tmp_path / "published"))
    server, url = serve(repo)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield repo
    server.shutdown()


def hf_model(folder_hint: Path, revision: str = "main"):
    return tiny_model(folder_hint, source=ModelSource(hub="huggingface", repo=REPO, revision=revision))


def test_revision_pins_to_the_commit_and_files_match_the_published_hashes(hub: HubRepo, tmp_path: Path):
    model = hf_model(tmp_path)
    pinned = resolve_revision(model.source, offline=False, timeout_s=5, pypi_index="unused")
    assert pinned.resolved == COMMIT
    manifest, hashed = prepare_weights("tiny", model, pinned, tmp_path / "weights", tmp_path, tmp_path / "state", False, print)
    assert manifest.expected_from == "hub metadata" and manifest.revision == COMMIT
    published = {p.name: p.read_bytes() for p in hub.folder.iterdir()}
    for record in manifest.files:
        assert (Path(manifest.folder) / record.path).read_bytes() == published[record.path]
    assert hashed == manifest.total_bytes


def test_an_interrupted_download_resumes_instead_of_restarting(hub: HubRepo, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # the client writes in 4 KiB pieces (10 MiB normally)
    size = (hub.folder / SHARD).stat().st_size
    hub.drop_after[SHARD] = size // 2
    model = hf_model(tmp_path)
    _, manifest, _ = pin_and_fetch(model, tmp_path, print, False)
    kept = (size // 2) // 4096 * 4096  # the whole pieces written before the connection dropped
    assert hub.ranges == [(SHARD, f"bytes={kept}-")]  # the client asked for the rest, not the whole file
    total = sum(p.stat().st_size for p in hub.folder.iterdir())
    assert hub.bytes_served == total + (size // 2 - kept)  # only the torn piece was sent twice
    assert SHARD in [f.path for f in manifest.files]


def test_a_corrupted_file_is_fetched_again_from_the_hub(hub: HubRepo, tmp_path: Path):
    model = hf_model(tmp_path)
    pinned, first, _ = pin_and_fetch(model, tmp_path, print, False)
    local = Path(first.folder) / SHARD
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0x40
    local.write_bytes(bytes(data))
    log: list[str] = []
    again, _ = prepare_weights("tiny", model, pinned, tmp_path / "weights", tmp_path, tmp_path / "state", True, log.append)
    assert any(SHARD in line and "once more" in line for line in log)
    assert local.read_bytes() == (hub.folder / SHARD).read_bytes()
    assert [(f.path, f.sha256) for f in again.files] == [(f.path, f.sha256) for f in first.files]


def test_a_small_file_is_checked_by_its_git_blob_id_and_fetched_again(hub: HubRepo, tmp_path: Path):
    model = hf_model(tmp_path)
    pinned, first, _ = pin_and_fetch(model, tmp_path, print, False)
    tokenizer = Path(first.folder) / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text().replace("32768", "99999"))  # same size, other bytes: not LFS, no sha256
    log: list[str] = []
    again, _ = prepare_weights("tiny", model, pinned, tmp_path / "weights", tmp_path, tmp_path / "state", False, log.append)
    assert any("tokenizer_config.json: git blob" in line and "once more" in line for line in log)
    assert tokenizer.read_bytes() == (hub.folder / "tokenizer_config.json").read_bytes()
    assert {f.path for f in again.files} >= {"tokenizer.json", "vocab.json", "merges.txt", "README.md", ".gitattributes"}


def test_a_file_the_hub_serves_wrong_fails_naming_it(hub: HubRepo, tmp_path: Path):
    model = hf_model(tmp_path)
    pinned = resolve_revision(model.source, offline=False, timeout_s=5, pypi_index="unused")
    published = hub.folder / SHARD
    original = published.read_bytes()
    expected = hub.sibling(published)  # what the hub's metadata keeps saying
    hub.sibling = lambda path, real=hub.sibling: expected if path.name == SHARD else real(path)  # type: ignore[method-assign]
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 1  # inside the tensor data: the headers still parse
    published.write_bytes(bytes(corrupted))
    from flows.weights.manifest import WeightsMismatch

    with pytest.raises(WeightsMismatch, match=f"{SHARD}: sha256"):
        prepare_weights("tiny", model, pinned, tmp_path / "weights", tmp_path, tmp_path / "state", False, print)


def test_unknown_revision_and_repository_are_named(hub: HubRepo, tmp_path: Path):
    from flows.errors import BadInput

    with pytest.raises(BadInput, match="unknown revision 'v9'"):
        resolve_revision(hf_model(tmp_path, "v9").source, offline=False, timeout_s=5, pypi_index="unused")
    other = tiny_model(tmp_path, source=ModelSource(hub="huggingface", repo="nobody/nothing", revision="main"))
    with pytest.raises(BadInput, match="huggingface:nobody/nothing: no such repository"):
        prepare_weights("tiny", other, resolve_revision(other.source, offline=True, timeout_s=1, pypi_index="x"),
                        tmp_path / "weights", tmp_path, tmp_path / "state", False, print)
    shutil.rmtree(tmp_path / "weights", ignore_errors=True)
