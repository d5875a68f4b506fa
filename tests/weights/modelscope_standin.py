"""A stand-in for ModelScope on loopback, serving one folder as one model repo. It answers the endpoints the
project calls, in the API's documented shapes (`{"Code": 200, "Data": ...}` envelopes):
- `GET /api/v1/models/{repo}/revisions` -> `Data.RevisionMap.{Branches,Tags}` of `{"Revision", "CommitId",
  "CreatedAt"}` (what modelscope's `get_valid_revision_detail` reads; `CommitId` is the pin);
- `GET /api/v1/models/{repo}/repo/files?Revision=&Recursive=True` -> `Data.Files` of
  `{"Name", "Path", "Type": "blob", "Size", "Sha256", "Revision"}`;
- `GET /api/v1/models/{repo}/repo?Revision=&FilePath=` -> the file, `Range: bytes=N-` -> 206.
An unknown repo or revision -> 404 with `{"Code": 10010205001, "Message": ...}`.
"""

from __future__ import annotations

import hashlib
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from tests.loopback import send_json, start
from tests.weights.hub_standin import COMMIT, StandInRepo, send_body


class ModelScopeRepo(StandInRepo):
    pass


def serve(hub: ModelScopeRepo) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _json(self, status: int, body: dict) -> None:
            send_json(self, status, body)

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            match = re.fullmatch(r"/api/v1/models/(.+?)/(revisions|repo/files|repo)", url.path)
            if not match or match.group(1) != hub.repo:
                return self._json(404, {"Code": 10010205001, "Message": "model not found"})
            revision = query.get("Revision", "master")
            if match.group(2) != "revisions" and revision not in ("master", COMMIT):
                return self._json(404, {"Code": 10010205001, "Message": f"revision {revision} not found"})
            if match.group(2) == "revisions":
                branch = {"Revision": "master", "CommitId": COMMIT, "CreatedAt": 1764000000}
                return self._json(200, {"Code": 200, "Data": {"RevisionMap": {"Branches": [branch], "Tags": []}}})
            if match.group(2) == "repo/files":
                files = [{"Name": p.name, "Path": p.name, "Type": "blob", "Size": p.stat().st_size, "Revision": COMMIT,
                          "Sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in sorted(hub.folder.iterdir())]
                return self._json(200, {"Code": 200, "Data": {"Files": files}})
            path = hub.folder / query.get("FilePath", "")
            if not path.is_file():
                return self._json(404, {"Code": 10010205001, "Message": "file not found"})
            requested = self.headers.get("Range")
            if requested:
                hub.ranges.append((path.name, requested))
            hub.count(send_body(self, path.read_bytes(), requested, hub.drop_after.pop(path.name, None)))

        def log_message(self, *args: object) -> None:
            pass

    server = start(Handler)
    return server, f"127.0.0.1:{server.server_address[1]}"
