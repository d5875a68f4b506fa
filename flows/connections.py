"""Connections a stage opens: the Docker Engine and the release's registry, with credentials from the environment
or a Prefect Secret block. Never logged."""

from __future__ import annotations

import os

import docker

from flows.errors import ServiceUnavailable
from flows.plan import Plan
from flows.registry import RegistryClient, Repository
from flows.services import REGISTRY_PASSWORD_ENV, REGISTRY_USER_ENV
from flows.settings import Settings

REGISTRY_SECRET_BLOCK = "flagrelease-registry-password"


def registry_auth() -> dict[str, str] | None:
    """Registry credentials from the environment, or the password from the Prefect Secret block
    `flagrelease-registry-password`; never logged."""
    user, password = os.environ.get(REGISTRY_USER_ENV), os.environ.get(REGISTRY_PASSWORD_ENV)
    if user and not password:
        from prefect.blocks.system import Secret

        password = Secret.load(REGISTRY_SECRET_BLOCK).get()
    return {"username": user, "password": password} if user and password else None


def docker_client(settings: Settings) -> docker.DockerClient:
    try:
        client = docker.DockerClient(base_url=settings.docker_host, timeout=600)
        client.ping()
    except docker.errors.DockerException as exc:
        raise ServiceUnavailable("Docker Engine", f"{settings.docker_host}: {exc}", "flagrelease services up docker") from None
    return client


def registry_client(repository: str) -> tuple[RegistryClient, dict[str, str] | None]:
    """A client for `host/path` with this environment's credentials, and those credentials (for the engine)."""
    auth = registry_auth()
    return RegistryClient(Repository.parse(repository), (auth["username"], auth["password"]) if auth else None), auth


def registry_for(plan: Plan) -> tuple[RegistryClient, dict[str, str] | None]:
    return registry_client(plan.repository)
