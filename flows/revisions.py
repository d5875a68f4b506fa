"""Pin a model's requested revision (branch, tag, package version) to an immutable id.

A reachable hub gives a commit id (ModelScope, Hugging Face) or the wheel's sha256 (PyPI). An unreachable hub is
not an error: the revision is recorded as unpinned with the reason, and the fingerprint says so. A hub that answers
"no such revision" or "no access" is the user's mistake and raises BadInput.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable

import requests
from pydantic import BaseModel, ConfigDict

from flows.errors import BadInput
from flows.matrix import ModelSource

COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")


class PinnedRevision(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    requested: str
    resolved: str | None
    note: str

    @property
    def pinned(self) -> bool:
        return self.resolved is not None

    @property
    def fingerprint_value(self) -> str:
        return self.resolved if self.resolved is not None else f"unpinned:{self.requested}"


class HubUnreachable(Exception):
    """The hub did not answer (DNS, connection, timeout, 5xx): record the revision as unpinned."""


def resolve_revision(source: ModelSource, *, offline: bool, timeout_s: float, pypi_index: str) -> PinnedRevision:
    where = f"{source.hub}:{source.repo}"
    if offline:
        return PinnedRevision(source=where, requested=source.revision, resolved=None, note="offline mode: hub not contacted")
    if source.hub == "local":
        return PinnedRevision(source=where, requested=source.revision, resolved=None,
                              note="local folder: content is pinned by the weights stage's lock file")
    resolver = _RESOLVERS[source.hub]
    try:
        resolved = resolver(source, timeout_s, pypi_index)
    except HubUnreachable as exc:
        return PinnedRevision(source=where, requested=source.revision, resolved=None, note=f"hub unreachable: {exc}")
    return PinnedRevision(source=where, requested=source.revision, resolved=resolved, note="pinned")


def _modelscope(source: ModelSource, timeout_s: float, _index: str) -> str:
    from modelscope.hub.api import HubApi
    from modelscope.hub.errors import NotExistError

    from flows.weights.modelscope import endpoint

    # The client retries unreachable hosts for ~15 s before giving up; one TCP connect answers that question faster.
    _connectable(endpoint(), timeout_s)
    try:
        detail = HubApi(endpoint=endpoint()).get_valid_revision_detail(source.repo, revision=source.revision)
    except NotExistError as exc:
        raise BadInput(f"model source modelscope:{source.repo}: {exc}") from None
    except Exception as exc:  # the client wraps transport errors in its own types; any of them means "no answer"
        raise HubUnreachable(_short(exc)) from None
    commit = detail.get("CommitId") or detail.get("Revision")
    if not isinstance(commit, str) or not COMMIT_ID.match(commit):
        raise HubUnreachable(f"ModelScope reported no commit id for revision {source.revision!r}")
    return commit


def huggingface_model_info(repo: str, revision: str, **kwargs: object) -> object:
    """`HfApi.model_info` at `HF_ENDPOINT`, with the hub's refusals turned into BadInput naming repo and revision."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(repo, revision=revision, **kwargs)
    except RevisionNotFoundError:
        raise BadInput(f"model source huggingface:{repo}: unknown revision {revision!r}") from None
    except GatedRepoError:
        raise BadInput(f"model source huggingface:{repo} is gated: set HF_TOKEN to a token with access") from None
    except RepositoryNotFoundError:
        raise BadInput(f"model source huggingface:{repo}: no such repository (or it is private: set HF_TOKEN)") from None


def _huggingface(source: ModelSource, timeout_s: float, _index: str) -> str:
    try:
        info = huggingface_model_info(source.repo, source.revision, timeout=timeout_s)
    except BadInput:
        raise
    except Exception as exc:  # transport errors (httpx in huggingface_hub 2.x): the hub did not answer
        raise HubUnreachable(_short(exc)) from None
    if not info.sha:
        raise HubUnreachable("Hugging Face reported no commit sha")
    return info.sha


def _pypi(source: ModelSource, timeout_s: float, index: str) -> str:
    """The package index's JSON simple API (PEP 691) lists every file with its sha256; the wheel's is the pin."""
    project = re.sub(r"[-_.]+", "-", source.repo).lower()
    url = f"{index.rstrip('/')}/{project}/"
    try:
        response = requests.get(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"}, timeout=timeout_s)
    except requests.RequestException as exc:
        raise HubUnreachable(_short(exc)) from None
    if response.status_code == 404:
        raise BadInput(f"model source pypi:{source.repo}: no such project on {index}")
    if response.status_code >= 400:
        raise HubUnreachable(f"{url} answered HTTP {response.status_code}")
    wheel_prefix = f"{project.replace('-', '_')}-{source.revision}-"
    for entry in response.json().get("files", []):
        name = entry.get("filename", "")
        if name.lower().startswith(wheel_prefix) and name.endswith(".whl") and not entry.get("yanked"):
            return f"{name}@sha256:{entry['hashes']['sha256']}"
    raise BadInput(f"model source pypi:{source.repo}: version {source.revision!r} has no wheel on {index}")


def _connectable(url: str, timeout_s: float) -> None:
    default_port = 80 if url.startswith("http://") else 443
    host, _, port = url.removeprefix("https://").removeprefix("http://").split("/")[0].partition(":")
    try:
        socket.create_connection((host, int(port or default_port)), timeout=timeout_s).close()
    except OSError as exc:
        raise HubUnreachable(f"cannot connect to {host}:{port or default_port} ({exc})") from None


def _short(exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}"[:200]


_RESOLVERS: dict[str, Callable[[ModelSource, float, str], str]] = {
    "modelscope": _modelscope,
    "huggingface": _huggingface,
    "pypi": _pypi,
}
