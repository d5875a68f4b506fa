"""Start and stop the real services the pipeline runs on: Docker Engine, a CNCF distribution registry, a Prefect
server and the process that serves the release deployments.

Every start is idempotent (a service that already answers is left alone and reported as such), every stop only
stops what this state folder started (by pidfile), and every failure to start says which log to read.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from flows.errors import BadInput, ServiceUnavailable
from flows.files import write_atomic
from flows.settings import Settings

REGISTRY_USER_ENV = "FLAGRELEASE_REGISTRY_USER"
REGISTRY_PASSWORD_ENV = "FLAGRELEASE_REGISTRY_PASSWORD"


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: list[str]
    healthy: Callable[[], bool]
    start_timeout_s: float
    stop_timeout_s: float = 30.0
    env: dict[str, str] | None = None
    cwd: Path | None = None
    prepare: Callable[[], None] | None = None


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # "started", "running", "running (not ours)", "stopped", "not running"
    detail: str


def child_env(settings: Settings) -> dict[str, str]:
    """The settings as FLAGRELEASE_* variables plus the Prefect environment: what every child process must see."""
    settings_env = {f"FLAGRELEASE_{name.upper()}": str(value) for name, value in settings.model_dump().items()
                    if value is not None}
    return {**settings_env, **prefect_env(settings)}


def prefect_env(settings: Settings) -> dict[str, str]:
    """Environment for every Prefect client, server and runner of this state folder (no telemetry, local home)."""
    return {
        "PREFECT_HOME": str(settings.state_dir / "prefect"),
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        **({"PREFECT_API_DATABASE_CONNECTION_URL": settings.prefect_database_url} if settings.prefect_database_url else {}),
    }


class Services:
    """The four services of one state folder, in start order."""

    ORDER = ("docker", "registry", "prefect", "deployments")

    def __init__(self, settings: Settings, expected_deployments: list[str] | None = None):
        self.settings = settings
        self.run_dir = settings.state_dir / "run"
        self.log_dir = settings.state_dir / "logs"
        self.expected_deployments = expected_deployments or []

    # ---- public API -------------------------------------------------------------------------------------------
    def up(self, names: tuple[str, ...] = ORDER) -> list[ServiceStatus]:
        return [self._start(self.spec(name)) for name in self._ordered(names)]

    def down(self, names: tuple[str, ...] = ORDER) -> list[ServiceStatus]:
        return [self._stop(self.spec(name)) for name in reversed(self._ordered(names))]

    def status(self, names: tuple[str, ...] = ORDER) -> list[ServiceStatus]:
        result = []
        for name in self._ordered(names):
            spec, pid = self.spec(name), self._pid(name)
            if spec.healthy():
                result.append(ServiceStatus(name, "running" if pid else "running (not ours)", self._where(name)))
            else:
                result.append(ServiceStatus(name, "not running", f"start with: flagrelease services up {name}"))
        return result

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # ---- service definitions ----------------------------------------------------------------------------------
    def spec(self, name: str) -> ServiceSpec:
        s = self.settings
        if name == "docker":
            return ServiceSpec(
                name="docker",
                argv=[_binary("dockerd", "apt-get install docker.io"), "-H", s.docker_host,
                      "--pidfile", str(self.run_dir / "dockerd.daemon.pid")],
                healthy=self._docker_healthy, start_timeout_s=60,
            )
        if name == "registry":
            config = s.state_dir / "registry" / "config.yml"
            return ServiceSpec(
                name="registry",
                argv=[_binary("docker-registry", "apt-get install docker-registry"), "serve", str(config)],
                healthy=self._registry_healthy, start_timeout_s=30, prepare=self._write_registry_config,
            )
        if name == "prefect":
            return ServiceSpec(
                name="prefect",
                argv=[venv_tool("prefect"), "server", "start", "--host", s.prefect_host, "--port", str(s.prefect_port)],
                healthy=self._prefect_healthy, start_timeout_s=180, env=child_env(s),
            )
        if name == "deployments":
            return ServiceSpec(
                name="deployments",
                argv=[sys.executable, "-m", "flows.cli", "serve"],
                healthy=self._deployments_healthy, start_timeout_s=120, env=child_env(s), cwd=s.project_dir,
            )
        raise BadInput(f"unknown service {name!r}; known services: {', '.join(self.ORDER)}")

    # ---- health checks ----------------------------------------------------------------------------------------
    def _docker_healthy(self) -> bool:
        import docker

        try:
            client = docker.DockerClient(base_url=self.settings.docker_host, timeout=5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # any failure to reach the engine means "not healthy"; the caller reports it
            return False

    def _registry_healthy(self) -> bool:
        return _http_ok(f"http://{self.settings.registry_host}:{self.settings.registry_port}/v2/", ok=(200, 401))

    def _prefect_healthy(self) -> bool:
        try:
            response = requests.get(f"{self.settings.prefect_api_url}/health", timeout=3)
            return response.status_code == 200 and response.json() is True
        except (requests.RequestException, ValueError):
            return False

    def _deployments_healthy(self) -> bool:
        """Every expected deployment exists, is not paused, and a runner polled for its runs within the last minute
        (registration alone outlives the process that serves it; a runner that stops pauses its deployments, seconds
        after its last poll)."""
        if not self._prefect_healthy():
            return False
        for name in self.expected_deployments:
            try:
                response = requests.get(f"{self.settings.prefect_api_url}/deployments/name/{name}", timeout=3)
                deployment = response.json() if response.status_code == 200 else {}
            except (requests.RequestException, ValueError):
                return False
            last_polled = deployment.get("last_polled")
            if last_polled is None or deployment.get("paused"):
                return False
            age = datetime.now(timezone.utc) - datetime.fromisoformat(last_polled.replace("Z", "+00:00"))
            if age > timedelta(seconds=60):
                return False
        return True

    # ---- registry configuration -------------------------------------------------------------------------------
    def _write_registry_config(self) -> None:
        root = self.settings.state_dir / "registry"
        (root / "data").mkdir(parents=True, exist_ok=True)
        auth = ""
        user, password = os.environ.get(REGISTRY_USER_ENV), os.environ.get(REGISTRY_PASSWORD_ENV)
        s = self.settings
        if s.registry_token_realm:  # the issuer holds the users; the registry only checks its signed tokens
            auth = (f"auth:\n  token:\n    realm: {s.registry_token_realm}\n    service: {s.registry_token_service}\n"
                    f"    issuer: {s.registry_token_issuer}\n    rootcertbundle: {s.registry_token_certs}\n")
        elif user and password:
            htpasswd = root / "htpasswd"
            # bcrypt (-B) is the only scheme distribution accepts; the password goes through stdin, never argv.
            subprocess.run([_binary("htpasswd", "apt-get install apache2-utils"), "-iBc", str(htpasswd), user],
                           input=password, text=True, check=True, capture_output=True)
            auth = f"auth:\n  htpasswd:\n    realm: flagrelease\n    path: {htpasswd}\n"
        write_atomic(root / "config.yml", (
            "version: 0.1\n"
            "log:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.settings.registry_host}:{self.settings.registry_port}\n"
            "  headers:\n    X-Content-Type-Options: [nosniff]\n"
            + auth
        ))

    # ---- process control --------------------------------------------------------------------------------------
    def _ordered(self, names: tuple[str, ...]) -> list[str]:
        unknown = [n for n in names if n not in self.ORDER]
        if unknown:
            raise BadInput(f"unknown service {unknown[0]!r}; known services: {', '.join(self.ORDER)}")
        return [n for n in self.ORDER if n in names]

    def _start(self, spec: ServiceSpec) -> ServiceStatus:
        if spec.healthy():
            ours = self._pid(spec.name) is not None
            return ServiceStatus(spec.name, "running" if ours else "running (not ours)", self._where(spec.name))
        if spec.prepare:
            spec.prepare()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(spec.env or {})}
        with self.log_path(spec.name).open("ab") as log:
            process = subprocess.Popen(
                spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=spec.cwd,
                start_new_session=True, preexec_fn=_default_signals,
            )
        write_atomic(self._pidfile(spec.name), f"{process.pid}\n")
        deadline = time.monotonic() + spec.start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._pidfile(spec.name).unlink(missing_ok=True)
                raise ServiceUnavailable(spec.name, f"exited with code {process.returncode}; last log lines:\n"
                                         f"{self._log_tail(spec.name)}", f"flagrelease services up {spec.name}")
            if spec.healthy():
                return ServiceStatus(spec.name, "started", self._where(spec.name))
            time.sleep(0.5)
        self._stop(spec)
        raise ServiceUnavailable(spec.name, f"not healthy after {spec.start_timeout_s:.0f} s; last log lines:\n"
                                 f"{self._log_tail(spec.name)}", f"flagrelease services up {spec.name}")

    def _stop(self, spec: ServiceSpec) -> ServiceStatus:
        pid = self._pid(spec.name)
        if pid is None:
            state = "running (not ours)" if spec.healthy() else "not running"
            return ServiceStatus(spec.name, state, "not started from this state folder; left alone")
        terminate(pid, spec.stop_timeout_s)
        self._pidfile(spec.name).unlink(missing_ok=True)
        return ServiceStatus(spec.name, "stopped", f"pid {pid}")

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _pid(self, name: str) -> int | None:
        """The pid we recorded, if that process still exists (a stale pidfile is removed)."""
        path = self._pidfile(name)
        try:
            pid = int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not _alive(pid):
            path.unlink(missing_ok=True)
            return None
        return pid

    def _where(self, name: str) -> str:
        s = self.settings
        return {
            "docker": s.docker_host,
            "registry": f"http://{s.registry_host}:{s.registry_port}",
            "prefect": s.prefect_ui_url,
            "deployments": f"{len(self.expected_deployments)} deployments served",
        }[name]

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _default_signals() -> None:
    # A child of a non-interactive shell inherits SIGINT as ignored; Prefect's runner relies on it to stop.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM the process group, wait, then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pid):
                return
            time.sleep(0.2)


def _http_ok(url: str, ok: tuple[int, ...] = (200,)) -> bool:
    try:
        return requests.get(url, timeout=3).status_code in ok
    except requests.RequestException:
        return False


def _binary(name: str, install_hint: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    raise ServiceUnavailable(name, "the program is not installed", f"`{install_hint}` (or `bash scripts/setup.sh`)")


def venv_tool(name: str) -> str:
    tool = Path(sys.executable).parent / name
    return str(tool) if tool.exists() else _binary(name, "pip install -e . (or `bash scripts/setup.sh`)")
