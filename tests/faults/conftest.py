"""The fault suite's bench: real Docker Engine and registries, the `release` flow run in this process (Prefect's
ephemeral API), a project copy with a small cpu suite, private weights, loopback proxies that inject faults, and
the table every case adds a row to (printed at the end of the session; `bash scripts/faults.sh` runs it alone)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from flows.build.cache import cache_root
from flows.registry import MANIFEST_TYPES
from flows.services import Services
from flows.settings import Settings
from tests.conftest import PROJECT_DIR, free_port
from tests.evaluate.conftest import smollm2_gguf  # noqa: F401  (the fixture, shared with the evaluate tests)

RELEASE = "smollm2-cpu"
REPOSITORY = "flagrelease/smollm2-135m-cpu"
ROWS: list[tuple[str, str, str, str]] = []
SMALL_SUITE_ITEMS = 60  # fewer and the gate cannot decide at its 3 pp margin (32 items: INCONCLUSIVE, 2026-12-06)
SMALL_SUITE = f"""  cpu-smoke:
    version: 1
    benchmarks:
      arithmetic: {{margin_pp: 3.0, limit: {SMALL_SUITE_ITEMS}, token_items: 8}}
"""


def record(fault: str, expected: str, observed: str, nothing_lost: str) -> None:
    ROWS.append((fault, expected, observed, nothing_lost))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A lane (pytest-xdist worker) hands its rows to the controller, which prints the table."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["fault_rows"] = ROWS


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    ROWS.extend(tuple(row) for row in getattr(node, "workeroutput", {}).get("fault_rows", []))


def pytest_terminal_summary(terminalreporter) -> None:
    if not ROWS:
        return
    widths = [max(len(row[i]) for row in [("fault", "expected", "observed", "nothing lost"), *ROWS]) for i in range(4)]
    line = lambda row: " | ".join(cell.ljust(width) for cell, width in zip(row, widths))  # noqa: E731
    terminalreporter.write_sep("=", "fault suite")
    terminalreporter.write_line(line(("fault", "expected", "observed", "nothing lost")))
    terminalreporter.write_line("-+-".join("-" * w for w in widths))
    for row in ROWS:
        terminalreporter.write_line(line(row))


class Proxy:
    """A loopback HTTP proxy in front of `target`: fails the first `fail_first` requests with 503, and may rewrite
    response bodies (`rewrite(path, body) -> body`)."""

    def __init__(self, target: str, fail_first: int = 0, rewrite: Callable[[str, bytes], bytes] | None = None):
        self.target, self.remaining, self.rewrite, self.seen = target.rstrip("/"), fail_first, rewrite, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                proxy.seen += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.remaining > 0:
                    proxy.remaining -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream = requests.request(self.command, proxy.target + self.path, headers=headers, data=body,
                                            allow_redirects=False, timeout=300)
                content = upstream.content
                if proxy.rewrite is not None and self.command == "POST":
                    content = proxy.rewrite(self.path, content)
                self.send_response(upstream.status_code)
                for key, value in upstream.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content) if self.command != "HEAD" else
                                                       upstream.headers.get("Content-Length", 0)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 128  # the evaluator opens 64 connections at once; a real proxy's backlog is larger

        self.server = Server(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Bench:
    """Everything a fault case needs: where things live and how to run the release against a given registry."""

    root: Path
    project: Path
    weights: Path
    state: Path
    started: list[Services]

    def registry(self, name: str, snapshot: Path | None = None) -> Settings:
        """A fresh registry of its own (started), optionally holding a copy of a snapshot's storage."""
        settings = Settings(state_dir=self.root / "registries" / name, registry_port=free_port())
        if snapshot is not None:  # hard links: a registry never rewrites a blob, and ten 2 GB copies fill a disk
            shutil.copytree(snapshot, settings.state_dir / "registry" / "data", copy_function=os.link)
        services = Services(settings)
        services.up(("registry",))
        self.started.append(services)
        return settings

    def environment(self, registry_host: str, **extra: str) -> dict[str, str]:
        return {"FLAGRELEASE_STATE_DIR": str(self.state), "FLAGRELEASE_OFFLINE": "1",
                "FLAGRELEASE_PROJECT_DIR": str(self.project), "FLAGRELEASE_MATRIX": str(self.project / "releases.yaml"),
                "FLAGRELEASE_IMAGES_DIR": str(self.project / "images"), "FLAGRELEASE_WEIGHTS_DIR": str(self.weights),
                "FLAGRELEASE_REGISTRY_OVERRIDE": registry_host, "FLAGRELEASE_SERVE_TIMEOUT_S": "240", **extra}

    def run(self, registry_host: str, release_name: str = RELEASE, **extra: str):
        """The real `release` flow, in this process; returns its final state (never raises for a failed run)."""
        from flows.release import release

        with pytest.MonkeyPatch.context() as patch:
            for key, value in self.environment(registry_host, **extra).items():
                patch.setenv(key, value)
            return release(release_name, return_state=True)


def run_with_fault(bench: Bench, registry_host: str, inject: Callable[[], bool], poll_s: float = 0.5):
    """Run the release while a watcher calls `inject` every `poll_s` until it reports the fault injected (True);
    returns the run's final state and whether the fault was injected."""
    injected = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not injected.is_set():
            if inject():
                injected.set()
                return
            time.sleep(poll_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    state = bench.run(registry_host)
    watcher.join(timeout=5)
    return state, injected.is_set()


def latest_digest(registry_host: str, repository: str = REPOSITORY) -> str | None:
    response = requests.head(f"http://{registry_host}/v2/{repository}/manifests/latest",
                             headers={"Accept": MANIFEST_TYPES}, timeout=10)
    return response.headers.get("Docker-Content-Digest") if response.status_code == 200 else None


def blobs_complete(registry_host: str, repository: str = REPOSITORY) -> str:
    """Every tag of the repository read back by digest, with its config and layer blobs: 'yes' or what is missing."""
    tags = requests.get(f"http://{registry_host}/v2/{repository}/tags/list", timeout=10).json().get("tags") or []
    for tag in tags:
        manifest = requests.get(f"http://{registry_host}/v2/{repository}/manifests/{tag}",
                                headers={"Accept": MANIFEST_TYPES}, timeout=10)
        body = manifest.json()
        for blob in [body.get("config"), *body.get("layers", []), *body.get("manifests", [])]:
            if blob is None:
                continue
            kind = "manifests" if "manifests" in body else "blobs"
            if requests.head(f"http://{registry_host}/v2/{repository}/{kind}/{blob['digest']}",
                             headers={"Accept": MANIFEST_TYPES}, timeout=10).status_code != 200:
                return f"tag {tag}: {blob['digest']} missing"
    return f"yes ({len(tags)} tags)"


def keep_only_native_results(evaluations: Path) -> None:
    """Remove every stored answer set but the native stacks', so the next run must ask its candidate again while
    the image's native answers (and scores) are reused, as on a host that evaluated this image before."""
    for record in evaluations.rglob("*.json"):
        if record.parent.name != "perf" and json.loads(record.read_text())["stack"]["role"] != "native":
            record.with_suffix(".jsonl").unlink(missing_ok=True)
            record.unlink()


def weights_manifests(state: Path) -> list[Path]:
    return sorted((state / "weights").rglob("*.json"))


def weights_manifest_state(state: Path) -> str:
    """'complete' when the verified manifest names files that all exist with their sizes, 'absent' when there is none."""
    manifests = weights_manifests(state)
    if not manifests:
        return "absent"
    for path in manifests:
        manifest = json.loads(path.read_text())
        for entry in manifest["files"]:
            file = Path(manifest["folder"]) / entry["path"]
            if not file.exists() or file.stat().st_size != entry["size"]:
                return f"INCOMPLETE: {entry['path']}"
    return "complete"


@pytest.fixture(scope="session")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    root = tmp_path_factory.mktemp("faults")
    project = root / "project"
    project.mkdir()
    for name in ("releases.yaml", "pyproject.toml", "benchmarks.yaml"):
        shutil.copy(PROJECT_DIR / name, project / name)
    for name in ("images", "templates", "kernels", "engine", "locks"):
        shutil.copytree(PROJECT_DIR / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    matrix = (project / "releases.yaml").read_text()
    start = matrix.index("  cpu-smoke:")
    end = matrix.index("\nreleases:")
    (project / "releases.yaml").write_text(matrix[:start] + SMALL_SUITE + matrix[end:])
    weights = root / "weights"
    shutil.copytree(cache_root() / "test-weights", weights)
    services = Services(Settings(state_dir=root / "engine"))
    started = services.up(("docker",))
    bed = Bench(root=root, project=project, weights=weights, state=root / "state", started=[])
    try:
        yield bed
    finally:
        for registry in bed.started:
            registry.down(("registry",))
        services.down(tuple(s.name for s in started if s.state == "started"))
