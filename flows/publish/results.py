"""A release's native per-item results travel with its image, so a release on another host can pair with them.

`qwen3-iluvatar` is compared with `qwen3-nvidia`'s native stack, which runs on an NVIDIA host. The reference release
attaches its native result sets (records and answers, for its suite, model revision and benchmarks) to its image
as one OCI artifact before `latest` moves, with the token-level scorings of the native replies (the native stack's
and its second run's), so the dependent's token-level gate reads them against its own FlagOS scoring; the dependent release, before it evaluates, reads the artifact of the
reference's `latest` image from the registry and adds the sets to its own store. Only a published reference is
used this way: it passed its own gate. Every set keeps its `ResultKey`, so pairing refuses anything not asked
exactly as the dependent asks.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from flows.evaluate.client import ItemResult
from flows.evaluate.logprobs import ItemScores
from flows.evaluate.store import ResultStore, Stack, StoredResults, scored_replies
from flows.publish.release import ARTIFACT_TYPES, MOVING_TAG, Attachment, attachment, referrers
from flows.registry import RegistryClient, RegistryError


class ScoreSet(BaseModel):
    """One stack's token-level scoring of the set's replies."""

    model_config = ConfigDict(frozen=True)

    stack: Stack
    scores: list[ItemScores]


class ResultSet(BaseModel):
    model_config = ConfigDict(frozen=True)

    record: StoredResults
    results: list[ItemResult]
    scores: list[ScoreSet] = []


class PublishedResults(BaseModel):
    model_config = ConfigDict(frozen=True)

    release: str
    model: str
    sets: list[ResultSet]


def native_results(store: ResultStore, release: str, model: str, suite: str, suite_version: int,
                   revision: str) -> PublishedResults:
    """The native sets this release recorded for its current suite and model revision, with their scorings."""
    sets = []
    for record, results in store.complete_sets(model):
        if (record.stack.role, record.stack.release, record.key.suite, record.key.suite_version,
                record.key.revision) != ("native", release, suite, suite_version, revision):
            continue
        replies = scored_replies(results)
        scored = [(stack, store.load_scores(record.key, stack, replies))
                  for stack in (record.stack, record.stack.second_run())]
        sets.append(ResultSet(record=record, results=results,
                              scores=[ScoreSet(stack=stack, scores=scores) for stack, scores in scored if scores]))
    return PublishedResults(release=release, model=model, sets=sets)


def results_attachment(published: PublishedResults) -> Attachment:
    return attachment("results", published.model_dump_json().encode())


def import_published(registry: RegistryClient, store: ResultStore, release: str, model: str,
                     log: Callable[[str], None]) -> int:
    """Add the native sets attached to `release`'s published image to `store`; returns how many were new."""
    digest = registry.manifest_digest(MOVING_TAG)
    if digest is None:
        log(f"{release} has not been published to {registry.repository} yet: no native results to fetch")
        return 0
    descriptors = [d for d in referrers(registry, digest) if d.get("artifactType") == ARTIFACT_TYPES["results"][0]]
    if not descriptors:
        log(f"{registry.repository}@{digest[:19]} ({release}) carries no native results artifact")
        return 0
    body, _, _ = registry.manifest(descriptors[0]["digest"])
    blob = registry.blob(json.loads(body)["layers"][0]["digest"])
    try:
        published = PublishedResults.model_validate_json(blob)
    except ValidationError as exc:
        raise RegistryError(f"the native results attached to {registry.repository}@{digest} are not readable: "
                            f"{exc.errors()[0]['msg']}") from None
    if (published.release, published.model) != (release, model):
        raise RegistryError(f"{registry.repository}@{digest} carries the results of {published.release}/"
                            f"{published.model}, not {release}/{model}")
    new = 0
    for result_set in published.sets:
        record = result_set.record
        if store.load(record.key, record.stack) is None:
            store.save(record.key, record.stack, result_set.results, record.operators)
            new += 1
        replies = scored_replies(result_set.results)
        for scored in result_set.scores:
            if store.load_scores(record.key, scored.stack, replies) is None:
                store.save_scores(record.key, scored.stack, replies, scored.scores)
    log(f"native results of {release} from {registry.repository}@{digest[:19]}: {len(published.sets)} sets, "
        f"{new} new here")
    return new
