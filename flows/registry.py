"""A small client for the OCI distribution API (CNCF distribution 2.8 and compatible registries).

Manifests are always asked for with the Docker v2 *and* OCI media types: distribution 2.8 answers a tag lookup
that lacks the Docker v2 type with a schema1 rewrite under another digest. Transient failures (connection errors,
5xx) are retried with increasing delays; a registry that never answers says how to start the local one.

Authentication follows the registry's challenge (`WWW-Authenticate` on a 401): `Basic` sends the credentials;
`Bearer realm=...,service=...,scope=...` is the distribution token-authentication flow (Harbor, ACR and most hosted
registries): GET the realm with the service and scope, with the credentials as Basic auth or anonymously (anonymous
pull tokens), and send `Authorization: Bearer <token>`; a token is reused for later requests until `expires_in`
(default 60 s) runs out, and a new one is asked for when the registry challenges for another scope. Written here
rather than taken from a library: the `docker` SDK leaves this to the engine, and the requests this client makes
(artifact manifests, the referrers fallback tag) are ones the engine does not make.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from flows.errors import FlagReleaseError, ServiceUnavailable

MANIFEST_TYPES = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
))
RETRY_DELAYS_S = (1.0, 2.0, 4.0)
DEFAULT_TOKEN_TTL_S = 60  # the token spec's default when the issuer gives no expires_in
TOKEN_RENEW_MARGIN_S = 5  # ask for a new token this long before the old one runs out
CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(FlagReleaseError):
    pass


@dataclass(frozen=True)
class Repository:
    """`host[:port]/path` split into the registry host and the repository name."""

    host: str
    name: str

    @classmethod
    def parse(cls, repository: str) -> "Repository":
        host, _, name = repository.partition("/")
        return cls(host=host, name=name)

    def __str__(self) -> str:
        return f"{self.host}/{self.name}"

    @property
    def base_url(self) -> str:
        local = self.host.startswith(("127.", "localhost", "[::1]"))
        return f"{'http' if local else 'https'}://{self.host}/v2"


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict[str, str]

    @classmethod
    def of(cls, response: requests.Response) -> "Challenge | None":
        header = response.headers.get("WWW-Authenticate", "")
        scheme, _, rest = header.partition(" ")
        return cls(scheme.lower(), dict(CHALLENGE_PARAM.findall(rest))) if scheme else None

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


def _scope_key(scope: str | None) -> tuple[str, frozenset[str]] | None:
    """`repository:name:pull,push` as (resource, actions), so the actions' order does not matter."""
    if scope is None:
        return None
    resource, _, actions = scope.rpartition(":")
    return resource, frozenset(actions.split(","))


@dataclass
class _Token:
    value: str
    scope: str | None
    renew_at: float


class RegistryClient:
    def __init__(self, repository: Repository, auth: tuple[str, str] | None = None, timeout_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic):
        self.repository = repository
        self.auth = auth
        self.timeout_s = timeout_s
        self.clock = clock
        self._basic = False  # the registry asked for Basic: send the credentials from now on
        self._token: _Token | None = None
        self.tokens_fetched = 0

    def manifest_digest(self, reference: str) -> str | None:
        """The digest the registry serves for a tag or digest, or None if it has no such manifest."""
        response = self._request("HEAD", f"/{self.repository.name}/manifests/{reference}",
                                 headers={"Accept": MANIFEST_TYPES})
        if response.status_code == 404:
            return None
        self._raise_for(response, f"manifest {self.repository}:{reference}")
        return response.headers["Docker-Content-Digest"]

    def image_labels(self, reference: str) -> dict[str, str]:
        """The config labels of an image manifest."""
        return self.image_config(reference).get("config", {}).get("Labels") or {}

    def image_config(self, reference: str) -> dict:
        """The image's config blob (labels, `docker_version`, os): two requests, the manifest then the blob."""
        body, _, _ = self.manifest(reference)
        blob = self._request("GET", f"/{self.repository.name}/blobs/{json.loads(body)['config']['digest']}")
        self._raise_for(blob, f"config blob of {reference}")
        return blob.json()

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(bytes exactly as stored, media type, digest) of a manifest or index."""
        response = self._request("GET", f"/{self.repository.name}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES})
        self._raise_for(response, f"manifest {self.repository}:{reference}")
        return response.content, response.headers["Content-Type"], response.headers["Docker-Content-Digest"]

    def put_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        """Store a manifest under a tag or its digest; returns the digest the registry computed."""
        response = self._request("PUT", f"/{self.repository.name}/manifests/{reference}",
                                 headers={"Content-Type": media_type}, data=body)
        self._raise_for(response, f"manifest upload {self.repository}:{reference}")
        return response.headers["Docker-Content-Digest"]

    def blob(self, digest: str) -> bytes:
        response = self._request("GET", f"/{self.repository.name}/blobs/{digest}")
        self._raise_for(response, f"blob {digest}")
        if "sha256:" + hashlib.sha256(response.content).hexdigest() != digest:
            raise RegistryError(f"registry {self.repository.host} returned blob {digest} with other content")
        return response.content

    def push_blob(self, data: bytes, media_type: str) -> dict:
        """Upload a blob (skipped when the registry has it) and return its OCI descriptor."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        descriptor = {"mediaType": media_type, "digest": digest, "size": len(data)}
        head = self._request("HEAD", f"/{self.repository.name}/blobs/{digest}")
        if head.status_code == 200:
            return descriptor
        started = self._request("POST", f"/{self.repository.name}/blobs/uploads/")
        self._raise_for(started, f"blob upload to {self.repository}")
        location = started.headers["Location"]
        url = location if location.startswith("http") else f"{self.repository.base_url[:-3]}{location}"
        finished = self._request("PUT", "", url=f"{url}{'&' if '?' in url else '?'}digest={digest}", data=data,
                                 headers={"Content-Type": "application/octet-stream"})
        self._raise_for(finished, f"blob {digest}")
        return descriptor

    def _request(self, method: str, path: str, headers: dict[str, str] | None = None, data: bytes | None = None,
                 url: str | None = None) -> requests.Response:
        """One registry request, authenticated as the registry's challenge asks (at most one new credential per call)."""
        url = url or f"{self.repository.base_url}{path}"
        response = self._send(method, url, headers, data, *self._credentials())
        challenge = Challenge.of(response) if response.status_code == 401 else None
        if challenge is None:
            return response
        if challenge.scheme == "basic" and self.auth and not self._basic:
            self._basic = True
        elif challenge.scheme == "bearer" and "realm" in challenge.params and not self._holds(challenge.scope):
            self._token = self._fetch_token(challenge)
        else:
            return response
        return self._send(method, url, headers, data, *self._credentials())

    def _credentials(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        """(extra headers, Basic credentials) for the next request: a current token, else Basic once asked for."""
        if self._token is not None and self.clock() < self._token.renew_at:
            return {"Authorization": f"Bearer {self._token.value}"}, None
        return {}, self.auth if self._basic else None

    def _holds(self, scope: str | None) -> bool:
        """A current token was already granted for this scope (so a second 401 is a refusal, not a missing token).
        Actions compare as a set: distribution names them in no fixed order (`pull,push` or `push,pull`)."""
        return (self._token is not None and _scope_key(self._token.scope) == _scope_key(scope)
                and self.clock() < self._token.renew_at)

    def _fetch_token(self, challenge: Challenge) -> _Token:
        realm = challenge.params["realm"]
        query = {"service": challenge.params.get("service", ""), **({"scope": challenge.scope} if challenge.scope else {})}
        if self.auth:
            query["account"] = self.auth[0]
        asked = self.clock()
        response = self._send("GET", realm, None, None, {}, self.auth, params=query)
        who = f"the credentials of {self.auth[0]!r}" if self.auth else "anonymous access"
        if response.status_code in (401, 403):
            raise RegistryError(f"registry {self.repository.host}: its token issuer {realm} refused {who} for scope "
                                f"{challenge.scope or '(none)'}; check FLAGRELEASE_REGISTRY_USER and "
                                "FLAGRELEASE_REGISTRY_PASSWORD")
        try:
            body = response.json() if response.status_code == 200 else {}
            value = body.get("token") or body.get("access_token")
            ttl = float(body.get("expires_in") or DEFAULT_TOKEN_TTL_S)
        except (ValueError, AttributeError, TypeError):
            value = None
        if not value:
            raise RegistryError(f"registry {self.repository.host}: its token issuer {realm} answered HTTP "
                                f"{response.status_code} without a token for scope {challenge.scope or '(none)'}")
        self.tokens_fetched += 1
        return _Token(value=value, scope=challenge.scope, renew_at=asked + max(ttl - TOKEN_RENEW_MARGIN_S, ttl / 2))

    def _send(self, method: str, url: str, headers: dict[str, str] | None, data: bytes | None,
              authorization: dict[str, str], basic: tuple[str, str] | None, **extra: object) -> requests.Response:
        last_error = ""
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S)):
            time.sleep(delay)
            try:
                response = requests.request(method, url, headers={**(headers or {}), **authorization}, data=data,
                                            auth=basic, timeout=self.timeout_s, **extra)
            except requests.ConnectionError as exc:
                last_error = f"cannot connect ({type(exc).__name__})"
                continue
            except requests.Timeout:
                last_error = f"no answer within {self.timeout_s:.0f} s"
                continue
            if response.status_code < 500:
                return response
            last_error = f"HTTP {response.status_code}"
        raise ServiceUnavailable(f"registry {self.repository.host}", f"{last_error} after {attempt + 1} attempts ({url})",
                                 "flagrelease services up registry (or check the registry in releases.yaml)")

    def _raise_for(self, response: requests.Response, what: str) -> None:
        if response.status_code == 401:
            challenge = Challenge.of(response)
            scope = f" (scope {challenge.scope})" if challenge and challenge.scope else ""
            raise RegistryError(f"registry {self.repository.host} refused {what}{scope}: authentication required or "
                                "not enough; set FLAGRELEASE_REGISTRY_USER and FLAGRELEASE_REGISTRY_PASSWORD")
        if response.status_code >= 400:
            raise RegistryError(f"registry {self.repository.host} answered HTTP {response.status_code} for {what}: "
                                f"{response.text[:300]}")
