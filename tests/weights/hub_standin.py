"""A stand-in for the Hugging Face Hub on loopback, serving one folder as one model repo at one commit.

It answers exactly the endpoints huggingface_hub 2.4 calls for `model_info(files_metadata=True)` and
`hf_hub_download`, with the shapes of the real API:
- `GET /api/models/{repo}/revision/{rev}` -> `{"id", "sha", "siblings": [{"rfilename", "size", "blobId",
  "lfs": {"sha256", "size", "pointerSize"}}]}` (`lfs` only for LFS files: here the *.safetensors);
- `HEAD /{repo}/resolve/{rev}/{file}` -> 200 with `X-Repo-Commit`, `ETag` (the LFS sha256, or the git blob id) and
  `Content-Length` (the real hub answers LFS files with a redirect to its CDN; the client follows it to the same
  headers);
- `GET /{repo}/resolve/{rev}/{file}` with `Range: bytes=N-` support (206 + `Content-Range`).
Unknown repo -> 404 `RepositoryNotFound`; unknown revision -> 404 `RevisionNotFound` (the `X-Error-Code` header
huggingface_hub reads). `drop_after` makes the first GET of a file close the connection midway.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.loopback import send_json, start

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class StandInRepo:
    """One folder served as one repo, with what the test needs to see: Range requests and bytes sent."""

    repo: str
    folder: Path
    drop_after: dict[str, int] = field(default_factory=dict)
    ranges: list[tuple[str, str]] = field(default_factory=list)
    bytes_served: int = 0
    _counting: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, sent: int) -> None:
        """Add bytes sent by one handler thread. (`bytes_served += send_body(...)` read the total before a send that
        can block while another connection is served, and lost that connection's bytes: a flaky count.)"""
        with self._counting:
            self.bytes_served += sent


class HubRepo(StandInRepo):

    def sibling(self, path: Path) -> dict[str, object]:
        data = path.read_bytes()
        entry: dict[str, object] = {"rfilename": path.name, "size": len(data),
                                    "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if path.suffix == ".safetensors":
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


def send_body(handler: BaseHTTPRequestHandler, data: bytes, requested_range: str | None, drop_after: int | None,
              extra_headers: dict[str, str] | None = None, head: bool = False) -> int:
    """Answer with `data` (206 from `bytes=N-`), or only its headers for HEAD; `drop_after` closes the connection
    after that many body bytes, as a broken transfer. Returns the body bytes sent."""
    start = int(re.fullmatch(r"bytes=(\d+)-", requested_range).group(1)) if requested_range else 0
    handler.send_response(206 if start else 200)
    for name, value in (extra_headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data) - start))
    handler.send_header("Accept-Ranges", "bytes")
    if start:
        handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    handler.end_headers()
    if head:
        return 0
    body = data[start:] if drop_after is None else data[start:start + drop_after]
    handler.wfile.write(body)
    if drop_after is not None:
        handler.close_connection = True
    return len(body)


def serve(hub: HubRepo) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _not_found(self, code: str) -> None:
            send_json(self, 404, {"error": code}, {"X-Error-Code": code})

        def _file(self, head: bool) -> None:
            match = re.fullmatch(rf"/{re.escape(hub.repo)}/resolve/([^/]+)/(.+)", self.path.split("?")[0])
            if not match:
                return self._not_found("RepoNotFound")
            if match.group(1) not in (COMMIT, "main"):
                return self._not_found("RevisionNotFound")
            path = hub.folder / match.group(2)
            if not path.is_file():
                return self._not_found("EntryNotFound")
            data, entry = path.read_bytes(), hub.sibling(path)
            requested = None if head else self.headers.get("Range")
            if requested:
                hub.ranges.append((path.name, requested))
            extra = {"X-Repo-Commit": COMMIT,
                     "ETag": f'"{entry["lfs"]["sha256"] if "lfs" in entry else entry["blobId"]}"'}
            hub.count(send_body(self, data, requested, None if head else hub.drop_after.pop(path.name, None), extra, head))

        def do_HEAD(self) -> None:  # noqa: N802 (http.server API)
            self._file(head=True)

        def do_GET(self) -> None:  # noqa: N802
            info = re.fullmatch(rf"/api/models/{re.escape(hub.repo)}/revision/([^/?]+)(\?.*)?", self.path)
            if self.path.startswith("/api/models/") and not info:
                return self._not_found("RepoNotFound")
            if info:
                if info.group(1) not in (COMMIT, "main"):
                    return self._not_found("RevisionNotFound")
                return send_json(self, 200, {"id": hub.repo, "modelId": hub.repo, "sha": COMMIT, "private": False,
                                             "siblings": [hub.sibling(p) for p in sorted(hub.folder.iterdir()) if p.is_file()]})
            self._file(head=False)

        def log_message(self, *args: object) -> None:
            pass

    server = start(Handler)
    return server, f"http://127.0.0.1:{server.server_address[1]}"
