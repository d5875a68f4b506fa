"""A small client for the two ModelScope REST endpoints a download needs (the `modelscope` package's public
`get_model_files` drops the per-file sha256, so the listing is read directly):

- `GET {endpoint}/api/v1/models/{repo}/repo/files?Revision={rev}&Recursive=True`
  -> `{"Code": 200, "Data": {"Files": [{"Name", "Path", "Type": "blob"|"tree", "Size", "Sha256", "Revision"}]}}`
- `GET {endpoint}/api/v1/models/{repo}/repo?Revision={rev}&FilePath={path}` -> the file; `Range: bytes=N-` resumes.

Files are hashed while they download (a resumed file hashes its kept part once, then the rest as it arrives), so
no file is read twice. The endpoint is `MODELSCOPE_ENDPOINT` (or the older `MODELSCOPE_URL_SCHEME` +
`MODELSCOPE_DOMAIN`; the modelscope package's own variables; default https://www.modelscope.cn); the token is
`MODELSCOPE_API_TOKEN`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import requests

from flows.errors import BadInput, FlagReleaseError

CHUNK = 2**20  # what a broken transfer can lose at most: the piece in flight
ATTEMPTS = 4


class ModelScopeError(FlagReleaseError):
    pass


def endpoint() -> str:
    explicit = os.environ.get("MODELSCOPE_ENDPOINT")
    if explicit:
        return explicit.rstrip("/")
    return f"{os.environ.get('MODELSCOPE_URL_SCHEME', 'https://')}{os.environ.get('MODELSCOPE_DOMAIN', 'www.modelscope.cn')}"


def _headers() -> dict[str, str]:
    token = os.environ.get("MODELSCOPE_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def list_files(repo: str, revision: str, timeout_s: float = 30) -> list[dict]:
    url = f"{endpoint()}/api/v1/models/{repo}/repo/files"
    response = requests.get(url, params={"Revision": revision, "Recursive": "True"}, headers=_headers(), timeout=timeout_s)
    if response.status_code in (401, 403):
        raise BadInput(f"model source modelscope:{repo} refused the listing (HTTP {response.status_code}): "
                       "set MODELSCOPE_API_TOKEN to a token with access")
    if response.status_code == 404:
        raise BadInput(f"model source modelscope:{repo}: no such repository or revision {revision!r}")
    body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
    if response.status_code != 200 or body.get("Code") not in (200, None):
        raise ModelScopeError(f"modelscope:{repo} listing failed: HTTP {response.status_code} {body.get('Message', '')}")
    return [f for f in body["Data"]["Files"] if f.get("Type") == "blob"]


def download(repo: str, revision: str, path: str, dest: Path, size: int, log: Callable[[str], None]) -> str:
    """Download one file to `dest` (via `dest.partial`, resuming it), return its sha256 computed on the way."""
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    if partial.exists():
        with partial.open("rb") as kept:
            while block := kept.read(CHUNK):
                digest.update(block)
        log(f"resuming {path} at {partial.stat().st_size:,} of {size:,} bytes")
    url = f"{endpoint()}/api/v1/models/{repo}/repo"
    for attempt in range(ATTEMPTS):
        done = partial.stat().st_size if partial.exists() else 0
        headers = {**_headers(), **({"Range": f"bytes={done}-"} if done else {})}
        try:
            with requests.get(url, params={"Revision": revision, "FilePath": path}, headers=headers, stream=True,
                              timeout=60) as response:
                if response.status_code == 200 and done:  # the server ignored the range: start over
                    digest, done = hashlib.sha256(), 0
                    partial.unlink()
                elif response.status_code not in (200, 206):
                    raise ModelScopeError(f"modelscope:{repo} {path}: HTTP {response.status_code}")
                with partial.open("ab") as sink:
                    for block in response.iter_content(CHUNK):
                        sink.write(block)
                        digest.update(block)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt == ATTEMPTS - 1:
                raise ModelScopeError(f"modelscope:{repo} {path}: download failed after {ATTEMPTS} attempts ({exc})") from None
            log(f"{path}: transfer broke at {partial.stat().st_size:,} bytes ({type(exc).__name__}); resuming")
    if partial.stat().st_size != size:
        raise ModelScopeError(f"modelscope:{repo} {path}: got {partial.stat().st_size:,} bytes, the listing says {size:,}")
    partial.replace(dest)
    return digest.hexdigest()
