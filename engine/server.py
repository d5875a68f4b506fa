"""Start the engine: read the serve configuration, switch operators per `USE_FLAGGEMS` / `FLAGOS_OPS`, then run
transformers' OpenAI server with two routes of ours: `GET /flagos/operators` (the operator report) and a
`GET /v1/models` that lists the served name. A setting the engine cannot honour stops it before it serves,
with one line naming the setting (exit 2)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.checkpoint import Checkpoint, architecture_of, servable
from engine.operators import OPERATORS, OPS_VARIABLE, EngineError, Operators, install

SWITCH = "USE_FLAGGEMS"
SWITCH_VALUES = {"1": True, "true": True, "0": False, "false": False}
FAULT_VARIABLE = "FLAGOS_FAULT"
HOME_VARIABLE = "FLAGOS_HOME"
BUILD_RECORD = "build.json"
log = logging.getLogger("flagos.engine")


class ServeConfig(BaseModel):
    """The image's serve configuration (rendered from templates/serve/transformers.json.j2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "0.0.0.0"
    port: int = Field(ge=1, le=65535)
    served_name: str
    model_dir: Path
    gguf_file: str | None = Field(default=None, description="the GGUF in model_dir to serve (the verified file)")
    cache_dir: Path = Path(tempfile.gettempdir()) / "flagos-checkpoints"
    device: str = "auto"
    dtype: str = "auto"
    continuous_batching: bool = True
    cb_max_batch_tokens: int | None = None
    cb_max_memory_percent: float | None = None
    # off: a replayed CUDA graph runs kernels without the Python that counts them, so the report would undercount
    cb_use_cuda_graph: bool = False


def switch_from_env(environ: dict[str, str]) -> bool:
    value = environ.get(SWITCH, "0").strip().lower()
    if value not in SWITCH_VALUES:
        raise EngineError(f"{SWITCH}={environ[SWITCH]!r} is not a switch; allowed: 0, 1, true, false")
    return SWITCH_VALUES[value]


def operators_from_env(environ: dict[str, str]) -> Operators:
    """The native stack switches nothing on; the FlagOS stack every operator, or the FLAGOS_OPS subset."""
    if not switch_from_env(environ):
        return Operators(set(), mode="native")
    import triton

    chosen = environ.get(OPS_VARIABLE, "").strip()
    enabled = {name.strip() for name in chosen.split(",") if name.strip()} if chosen else set(OPERATORS)
    # what Triton itself decided when it read TRITON_INTERPRET, not what the environment is believed to say
    return Operators(enabled, fault=environ.get(FAULT_VARIABLE) or None,
                     mode="interpreted" if triton.knobs.runtime.interpret else "compiled")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "torch", "triton", "fastapi", "uvicorn"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def build_record(environ: dict[str, str]) -> dict[str, Any] | None:
    """What the image build wrote about itself ($FLAGOS_HOME/build.json: release, fingerprint, model revision);
    None for an engine run from a source checkout."""
    home = environ.get(HOME_VARIABLE)
    path = Path(home) / BUILD_RECORD if home else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def report(config: ServeConfig, architecture: str, checkpoint: Checkpoint, operators: Operators, device: str,
           installed: dict[str, str], build: dict[str, Any] | None) -> dict[str, Any]:
    """Everything a client needs to tell which stack answers: the build, the checkpoint and every switch (the
    evaluate stage keys stored answers by it), plus the counters."""
    return {"engine": "transformers-serve", "versions": installed, "served_name": config.served_name,
            "build": build, "checkpoint": checkpoint.sha256, "architecture": architecture, "device": device,
            "dtype": config.dtype, **operators.report()}


def _with_flagos_routes(build_server, describe):
    """Wrap transformers' app factory: our routes go first, so `/v1/models` lists the served name."""

    def build(*args, **kwargs):
        from fastapi.responses import JSONResponse

        app = build_server(*args, **kwargs)
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/v1/models"]

        @app.get("/flagos/operators")
        def operators_route():
            return JSONResponse(describe())

        @app.get("/v1/models")
        def models_route():
            name = describe()["served_name"]
            return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "flagos"}]})

        return app

    return build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="serve configuration (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s flagos-engine %(message)s")
    try:
        config = ServeConfig.model_validate_json(args.config.read_text())
        operators = operators_from_env(dict(os.environ))
        checkpoint = servable(config.model_dir, config.cache_dir, log.info, config.gguf_file)
        architecture, model_config = architecture_of(checkpoint.folder)
        install(architecture, operators, model_config)
        build = build_record(dict(os.environ))
    except (OSError, ValueError, EngineError) as exc:  # ValidationError and a malformed build.json are ValueErrors
        print(f"flagos-engine: error: {exc}", file=sys.stderr)
        return 2
    import torch
    from transformers.cli.serving import server as serving_server
    from transformers.cli.serve import Serve

    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    installed = versions()

    def describe() -> dict[str, Any]:
        return report(config, architecture, checkpoint, operators, device, installed, build)

    log.info("operators: %s", json.dumps(describe()))
    serving_server.build_server = _with_flagos_routes(serving_server.build_server, describe)
    # transformers serve pins the model by the name requests use; a link of that name in the working folder
    # points it at the checkpoint, so clients ask for the served name, as with vLLM's --served-model-name
    workdir = Path(tempfile.mkdtemp(prefix="flagos-serve-"))
    (workdir / config.served_name).symlink_to(checkpoint.folder.resolve(), target_is_directory=True)
    os.chdir(workdir)
    Serve(force_model=config.served_name, continuous_batching=config.continuous_batching, device=device,
          dtype=config.dtype, host=config.host, port=config.port, log_level="warning",
          cb_max_batch_tokens=config.cb_max_batch_tokens, cb_max_memory_percent=config.cb_max_memory_percent,
          cb_use_cuda_graph=config.cb_use_cuda_graph)
    return 0
