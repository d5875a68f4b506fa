"""Stored per-item results, so a stack is asked a benchmark once per key and a chip without a native stack can be
compared with native results recorded elsewhere (e.g. the NVIDIA run of the same model).

A result set is comparable with another only when the model revision, the suite and benchmark versions, the
generation settings and the exact prompts agree: that is the `ResultKey`. Repeats are not part of it: repeat k is
always asked with seed SEED + k, so a stored set with more repeats serves a request for fewer, and more are added. The stack that answered (image digest and
environment, or an endpoint URL) is recorded beside it. Files: `<root>/<model>/<benchmark>/<digest>.jsonl` and a
`.json` with the key and the stack, both written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flows.errors import FlagReleaseError
from flows.evaluate.client import ItemResult, read_results, write_results
from flows.evaluate.logprobs import ItemScores, text_hash
from flows.evaluate.operators import OperatorUse
from flows.evaluate.perf import PERF_METHOD_KEY, PerfPoint
from flows.files import write_atomic, write_model


class ReferenceUnavailable(FlagReleaseError):
    pass


class ResultKey(BaseModel):
    """What must match for two stacks' results to be paired item by item."""

    model_config = ConfigDict(frozen=True)

    model: str
    revision: str
    suite: str
    suite_version: int
    benchmarks_version: int
    benchmark: str
    generation: dict[str, float | int]
    prompts: str  # sha256 over every item's prompt hash, in order

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


class Stack(BaseModel):
    """Which stack answered: its role, the release that ran it, and the image or endpoint."""

    model_config = ConfigDict(frozen=True)

    role: str  # "native" or "flagos"
    release: str
    served_by: str  # image digest reference + environment, or the endpoint URL

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def second_run(self) -> Stack:
        """This stack asked the same requests again: the native-vs-native baseline of the finer signals."""
        return self.model_copy(update={"served_by": f"{self.served_by} [second run]"})


class StoredResults(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: ResultKey
    stack: Stack
    items: int
    operators: OperatorUse | None = None  # what the stack's engine reported running while it answered


def scored_replies(results: list[ItemResult]) -> dict[str, str]:
    """The replies the token-level signal scores: each item's first answer (repeat 0) that is not an error."""
    return {r.id: r.response for r in results if r.repeat == 0 and r.error is None}


def prompts_digest(prompt_hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(prompt_hashes).encode()).hexdigest()


class ResultStore:
    def __init__(self, root: Path):
        self.root = root

    def _folder(self, key: ResultKey) -> Path:
        return self.root / key.model / key.benchmark

    def save(self, key: ResultKey, stack: Stack, results: list[ItemResult], operators: OperatorUse | None = None) -> Path:
        """Results first, then the record that names them: a record always points at complete results."""
        stem = self._folder(key) / f"{key.digest}-{stack.digest}"
        write_results(results, stem.with_suffix(".jsonl"))
        write_model(stem.with_suffix(".json"), StoredResults(key=key, stack=stack, items=len(results),
                                                             operators=operators))
        return stem.with_suffix(".jsonl")

    def load(self, key: ResultKey, stack: Stack) -> tuple[list[ItemResult], OperatorUse | None] | None:
        """The results this exact stack gave for this key (and its operator use), if recorded completely."""
        stem = self._folder(key) / f"{key.digest}-{stack.digest}"
        results = self._complete(stem)
        return None if results is None else (results, self._record(stem).operators)

    def reference(self, key: ResultKey, release: str) -> tuple[Stack, list[ItemResult], OperatorUse | None]:
        """Native results for this key recorded by `release`; a named error showing the differing key fields when
        only results under other keys exist."""
        records = [(path, StoredResults.model_validate_json(path.read_text()))
                   for path in sorted(self._folder(key).glob("*.json"))]
        native = [(path, record) for path, record in records
                  if record.stack.role == "native" and record.stack.release == release]
        for path, record in native:
            if record.key == key:
                results = self._complete(path.with_suffix(""))
                if results is not None:
                    return record.stack, results, record.operators
        if not native:
            raise ReferenceUnavailable(
                f"{key.benchmark}: no stored native results of {key.model} from release {release!r} in {self._folder(key)}; "
                f"run `flagrelease run {release}` first, or give a running native endpoint in FLAGRELEASE_REFERENCE_URL")
        newest = max(native, key=lambda pair: pair[0].stat().st_mtime)[1].key
        differences = [f"{field}: stored {getattr(newest, field)!r}, needed {getattr(key, field)!r}"
                       for field in ResultKey.model_fields if getattr(newest, field) != getattr(key, field)]
        raise ReferenceUnavailable(
            f"{key.benchmark}: the stored native results of {key.model} from {release!r} were made under another key, "
            f"so they cannot be paired: " + "; ".join(differences) + f". Re-run `flagrelease run {release}`")

    def complete_sets(self, model: str) -> list[tuple[StoredResults, list[ItemResult]]]:
        """Every completely recorded result set of a model, with its record."""
        sets = []
        for record_path in sorted((self.root / model).glob("*/*.json")):
            results = self._complete(record_path.with_suffix(""))
            if results is not None:
                sets.append((self._record(record_path.with_suffix("")), results))
        return sets

    def _scores_path(self, key: ResultKey, stack: Stack, replies: dict[str, str]) -> Path:
        """Keyed by what was scored: the benchmark's key, the stack, and every (item, reply) text."""
        texts = hashlib.sha256("\n".join(f"{i}:{text_hash('', r)}" for i, r in sorted(replies.items())).encode())
        return self._folder(key) / "scores" / f"{key.digest}-{stack.digest}-{texts.hexdigest()[:16]}.jsonl"

    def save_scores(self, key: ResultKey, stack: Stack, replies: dict[str, str], scores: list[ItemScores]) -> Path:
        return write_atomic(self._scores_path(key, stack, replies), "".join(s.model_dump_json() + "\n" for s in scores))

    def load_scores(self, key: ResultKey, stack: Stack, replies: dict[str, str]) -> list[ItemScores] | None:
        path = self._scores_path(key, stack, replies)
        if not path.exists():
            return None
        return [ItemScores.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]

    def save_perf(self, stack: Stack, points: list[PerfPoint]) -> Path:
        return write_atomic(self._perf_path(stack),
                            json.dumps([p.model_dump() for p in points], indent=2) + "\n")

    def load_perf(self, stack: Stack) -> list[PerfPoint] | None:
        path = self._perf_path(stack)
        return [PerfPoint.model_validate(p) for p in json.loads(path.read_text())] if path.exists() else None

    def _perf_path(self, stack: Stack) -> Path:
        """Keyed by the measuring method too: numbers of another client are not these numbers."""
        return self.root / "perf" / f"{stack.digest}.{PERF_METHOD_KEY}.json"

    @staticmethod
    def _record(stem: Path) -> StoredResults:
        return StoredResults.model_validate_json(stem.with_suffix(".json").read_text())

    @classmethod
    def _complete(cls, stem: Path) -> list[ItemResult] | None:
        if not (stem.with_suffix(".json").exists() and stem.with_suffix(".jsonl").exists()):
            return None
        results = read_results(stem.with_suffix(".jsonl"))
        return results if len(results) == cls._record(stem).items else None


def stack_description(image: str, environment: dict[str, str]) -> str:
    return f"{image} {json.dumps(environment, sort_keys=True)}"
