"""Run-time settings, read once from the environment (FLAGRELEASE_*) and passed explicitly to what needs them."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flows.build.cache import cache_root

PROJECT_DIR = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLAGRELEASE_", frozen=True)

    project_dir: Path = PROJECT_DIR
    matrix: Path = PROJECT_DIR / "releases.yaml"
    images_dir: Path = PROJECT_DIR / "images"
    state_dir: Path = Field(default=PROJECT_DIR / ".state", description="run-time state: Prefect home, registry storage, plans")
    offline: bool = Field(default=False, description="never contact a model hub or package index; revisions stay unpinned")
    hub_timeout_s: float = Field(default=10.0, gt=0)
    pypi_index: str = "https://pypi.org/simple"
    prefect_host: str = "127.0.0.1"
    prefect_port: int = Field(default=4200, ge=1, le=65535)
    prefect_database_url: str | None = Field(default=None, description="the Prefect server's database (production: "
                                             "postgresql+asyncpg://user@host:port/db; default: SQLite in PREFECT_HOME)")
    registry_host: str = "127.0.0.1"
    registry_port: int = Field(default=5000, ge=1, le=65535)
    registry_token_realm: str | None = Field(default=None, description="run the local registry behind a token "
                                             "issuer at this URL (distribution `auth: token`, as Harbor does) instead "
                                             "of htpasswd")
    registry_token_service: str = Field(default="flagrelease-registry", description="the token's audience")
    registry_token_issuer: str | None = Field(default=None, description="the `iss` the registry trusts")
    registry_token_certs: Path | None = Field(default=None, description="PEM bundle of the issuer's signing certificates")
    docker_host: str = "unix:///var/run/docker.sock"
    weights_dir: Path = Field(default_factory=lambda: cache_root() / "weights",
                              description="where downloaded weights live (large: a machine or NFS path, not the clone)")
    reverify: bool = Field(default=False, description="re-hash weights even when a verified manifest is current")
    candidate_url: str | None = Field(default=None, description="an already-running FlagOS endpoint (OpenAI base URL "
                                      "ending in /v1) to evaluate instead of starting the image here (chip hosts)")
    reference_url: str | None = Field(default=None, description="an already-running native endpoint to compare with")
    candidate_name: str | None = Field(default=None, description="what the candidate endpoint serves, for an engine "
                                       "that reports no identity (its answers are stored under this name)")
    reference_name: str | None = Field(default=None, description="what the reference endpoint serves, likewise")
    candidate_env: dict[str, str] = Field(default_factory=dict, description="extra environment of the FlagOS "
                                          "container (JSON object), for diagnosis: e.g. FLAGOS_OPS to switch a subset "
                                          "of our operators, FLAGOS_FAULT for the must-fail control; recorded in the "
                                          "stack's identity and the report")
    engine_cache_dir: Path = Field(default_factory=lambda: cache_root() / "engine",
                                   description="the engine's writable cache, mounted into served stacks (one-time "
                                   "GGUF conversions, keyed by the file's sha256)")
    eval_concurrency: int = Field(default=64, ge=1, le=256, description="requests in flight per stack; the engine "
                                  "batches what arrives together (continuous batching)")
    bisect_timeout_s: float = Field(default=3600.0, gt=0, description="no culprit-bisection pass of a FAILed "
                                    "benchmark starts after this many seconds")
    serve_timeout_s: float = Field(default=300.0, gt=0, description="how long a served stack may take to answer /v1/models")
    engine_cpus: str | None = Field(default=None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$", description="the host cores "
                                    "a served stack's model worker binds its threads to (e.g. 1 or 0-3,8; vLLM's CPU "
                                    "worker otherwise takes the machine's first core): two runs on one CPU host each "
                                    "get their own; placement only, never part of a stack's identity")
    hub_org: str = Field(default="FlagRelease", description="organisation of the hub repos the cards are pushed to")
    registry_override: str | None = Field(default=None, description="host:port that replaces the registry of every "
                                          "release repository (test and staging registries); not part of fingerprints")

    @model_validator(mode="before")
    @classmethod
    def _images_beside_the_matrix(cls, data: object) -> object:
        """A matrix elsewhere (`--matrix other/releases.yaml`) reads the chip profiles beside it, not this checkout's."""
        if isinstance(data, dict) and data.get("matrix") and not data.get("images_dir"):
            return {**data, "images_dir": Path(data["matrix"]).resolve().parent / "images"}
        return data

    @model_validator(mode="after")
    def _token_auth_is_complete(self) -> "Settings":
        if self.registry_token_realm and not (self.registry_token_issuer and self.registry_token_certs):
            raise ValueError("FLAGRELEASE_REGISTRY_TOKEN_REALM needs FLAGRELEASE_REGISTRY_TOKEN_ISSUER and "
                             "FLAGRELEASE_REGISTRY_TOKEN_CERTS (the issuer's certificate bundle)")
        return self

    @model_validator(mode="after")
    def _names_need_endpoints(self) -> "Settings":
        for side in ("candidate", "reference"):
            if getattr(self, f"{side}_name") and not getattr(self, f"{side}_url"):
                raise ValueError(f"FLAGRELEASE_{side.upper()}_NAME names an endpoint but FLAGRELEASE_{side.upper()}_URL "
                                 "is not set")
        return self

    def repository_for(self, repository: str) -> str:
        if not self.registry_override:
            return repository
        return f"{self.registry_override}/{repository.partition('/')[2]}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.prefect_host}:{self.prefect_port}/api"

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{self.prefect_host}:{self.prefect_port}"

    @property
    def releases_dir(self) -> Path:
        return self.state_dir / "releases"

    def release_dir(self, release: str, fingerprint: str) -> Path:
        """Every stage output of one release at one fingerprint: plan.json, kernels.json, ..."""
        return self.releases_dir / release / fingerprint
