"""Render a release's Docker build context: Dockerfile, wheels with hashes, the kernels package and manifest, the
serve configuration. Everything is rendered from the plan with StrictUndefined; nothing is typed by hand."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from engine.report import BUILD_RECORD
from flows.errors import FlagReleaseError
from flows.files import sha256_file
from flows.kernel_artifacts import KernelArtifacts
from flows.matrix import ServeSpec
from flows.plan import Plan

FLAGOS_HOME = "/opt/flagos"
TRITON_CACHE = f"{FLAGOS_HOME}/triton-cache"
MODEL_MOUNT = "/models"  # weights are mounted read-only here at run time, never baked in
CACHE_MOUNT = "/var/cache/flagos"  # the engine's writable cache (a GGUF's one-time conversion), a volume at run time
SERVE_CONFIG = "vllm.yaml"  # FlagScale's serve configuration, rendered from templates/serve/vllm.yaml.j2
IMAGE_SOURCES = {"kernels": ("*.py",), "engine": ("*.py",)}  # copied into the image, folder by folder
SPLIT_LAYERS = Path(__file__).with_name("split_layers.py")  # runs in the environment stage, beside the wheels
ENVIRONMENT_LAYERS = 3  # the installed wheels as this many layers of about equal size (pushed side by side)
CLAIMS = "claims.json"  # the chip profile's `versions`, checked inside the image by engine/claims.py
BACKEND_ENV = {"interpreter": {"TRITON_INTERPRET": "1"}}  # image environment per Triton backend
SERVE_NAMES = {"Qwen3MoeForCausalLM": "qwen3", "llama": "llama"}  # FlagScale's example name per architecture


class TemplateError(FlagReleaseError):
    pass


@dataclass(frozen=True)
class BuildContext:
    path: Path
    dockerfile: str
    version: str
    labels: dict[str, str]


def render(template_dir: Path, name: str, **values: object) -> str:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(template_dir), undefined=jinja2.StrictUndefined,
                                     autoescape=False, keep_trailing_newline=True)
    try:
        return environment.get_template(name).render(**values)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"template {template_dir / name}: {exc.message}") from None
    except jinja2.TemplateNotFound:
        raise TemplateError(f"template {template_dir / name} does not exist") from None


def dockerfile_template(plan: Plan, project_dir: Path) -> tuple[Path, str]:
    """A chip's own images/<chip>/Dockerfile.j2 if it has one, else the one templates/Dockerfile.j2 of every chip."""
    own = project_dir / "images" / plan.chip.name / "Dockerfile.j2"
    if own.exists():
        return own.parent, own.name
    return project_dir / "templates", "Dockerfile.j2"


def render_dockerfile(plan: Plan, base_image: str, project_dir: Path, wheels: bool) -> str:
    folder, name = dockerfile_template(plan, project_dir)
    return render(folder, name, base_image=base_image, chip=plan.chip.name, flagos_home=FLAGOS_HOME,
                  triton_cache=TRITON_CACHE, aot_targets=plan.chip.triton.aot_targets, serve_port=plan.chip.serve.port,
                  serve_config=SERVE_CONFIG, serve_name=serve_name(plan), wheels=wheels,
                  split_layers=SPLIT_LAYERS.name, environment_layers=ENVIRONMENT_LAYERS,
                  image_env=BACKEND_ENV.get(plan.chip.triton.backend, {"TRITON_CACHE_DIR": TRITON_CACHE}))


def serve_name(plan: Plan) -> str:
    return SERVE_NAMES.get(plan.model.architecture, plan.model_name)


def serve_config_text(project_dir: Path, serve: ServeSpec, served_name: str, serve_name: str, gguf: str | None, *,
                      host: str, port: int, model_mount: str, cache_dir: str, exp_dir: str) -> str:
    """FlagScale's serve configuration; a GGUF is served from the link its conversion step points at the cache."""
    model_path = f"{cache_dir}/serving/{served_name}" if gguf else model_mount
    return render(project_dir / "templates" / "serve", f"{SERVE_CONFIG}.j2", served_name=served_name,
                  serve_name=serve_name, exp_dir=exp_dir, engine_env=serve.engine_env, gguf_file=gguf,
                  model_mount=model_mount, cache_dir=f"{cache_dir}/checkpoints", model_path=model_path, host=host,
                  port=port, tensor_parallel_size=serve.tensor_parallel_size, dtype=serve.dtype,
                  max_model_len=serve.max_model_len, gpu_memory_utilization=serve.gpu_memory_utilization,
                  enforce_eager=serve.enforce_eager)


def render_serve_config(plan: Plan, project_dir: Path) -> str:
    """The image's serve configuration: weights at the mount, the engine's cache at its volume."""
    return serve_config_text(project_dir, plan.chip.serve, plan.model.served_name, serve_name(plan),
                             plan.model.gguf_file, host="0.0.0.0", port=plan.chip.serve.port, model_mount=MODEL_MOUNT,
                             cache_dir=CACHE_MOUNT,
                             exp_dir=f"outputs/{plan.model.served_name}")


def build_record(plan: Plan) -> dict[str, str]:
    """What the engine reports about the image it runs in, so an endpoint names what it serves."""
    return {"release": plan.release, "chip": plan.chip.name, "model": plan.model_name,
            "model_revision": plan.revision.fingerprint_value, "fingerprint": plan.fingerprint}


def image_labels(plan: Plan, kernels_manifest_sha256: str, project_dir: Path) -> dict[str, str]:
    revision, source, committed = _git_identity(project_dir)
    labels = {
        "org.opencontainers.image.title": f"{plan.model.display_name}-{plan.chip.vendor}-FlagOS",
        "org.opencontainers.image.source": source,
        "org.opencontainers.image.revision": revision,
        # the commit's time, not the build's (SOURCE_DATE_EPOCH's rule): the same inputs make the same image anywhere
        "org.opencontainers.image.created": committed,
        "org.opencontainers.image.version": plan.short_fingerprint,
        "org.opencontainers.image.licenses": plan.model.license.id,
        "flagrelease.release": plan.release,
        "flagrelease.chip": plan.chip.name,
        "flagrelease.model": plan.model_name,
        "flagrelease.model-revision": plan.revision.fingerprint_value,
        "flagrelease.fingerprint": plan.fingerprint,
        "flagrelease.kernels-manifest": f"{FLAGOS_HOME}/kernels-manifest.json@sha256:{kernels_manifest_sha256}",
    }
    labels.update({f"flagrelease.tool.{name}": version for name, version in plan.chip.versions.items()})
    return labels


def assemble_context(plan: Plan, kernels: KernelArtifacts, base_image: str, wheels: list[Path], dest: Path,
                     project_dir: Path) -> BuildContext:
    """Write the whole context into `dest` (emptied first) and return it with its labels."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "wheels").mkdir(parents=True)
    requirements = []
    for wheel in sorted(wheels):
        shutil.copyfile(wheel, dest / "wheels" / wheel.name)
        name, version = wheel.name.split("-")[:2]
        requirements.append(f"{name}=={version} --hash=sha256:{sha256_file(wheel)}")
    (dest / "wheels" / "requirements.txt").write_text("\n".join(requirements) + "\n")
    shutil.copyfile(SPLIT_LAYERS, dest / "wheels" / SPLIT_LAYERS.name)
    for folder, patterns in IMAGE_SOURCES.items():
        (dest / folder).mkdir()
        for pattern in patterns:
            for source in sorted((project_dir / folder).glob(pattern)):
                shutil.copyfile(source, dest / folder / source.name)
    (dest / "flagos").mkdir()
    manifest = _kernels_manifest(kernels)
    (dest / "flagos" / "kernels-manifest.json").write_text(manifest)
    (dest / "flagos" / BUILD_RECORD).write_text(json.dumps(build_record(plan), indent=2, sort_keys=True) + "\n")
    (dest / "flagos" / CLAIMS).write_text(json.dumps(plan.chip.versions, indent=2, sort_keys=True) + "\n")
    (dest / "serve").mkdir()
    (dest / "serve" / SERVE_CONFIG).write_text(render_serve_config(plan, project_dir))
    dockerfile = render_dockerfile(plan, base_image, project_dir, wheels=bool(wheels))
    (dest / "Dockerfile").write_text(dockerfile)
    labels = image_labels(plan, hashlib.sha256(manifest.encode()).hexdigest(), project_dir)
    return BuildContext(path=dest, dockerfile=dockerfile, version=plan.short_fingerprint, labels=labels)


def _kernels_manifest(kernels: KernelArtifacts) -> str:
    """What the image carries about its kernels: the consistency table, and the AOT manifest where one was built."""
    aot = json.loads(Path(kernels.aot_manifest).read_text()) if kernels.aot_manifest else None
    return json.dumps({"consistency_device": kernels.device,
                       "consistency": [asdict(row) for row in kernels.consistency],
                       "aot": aot}, indent=1, sort_keys=True) + "\n"


def _git_identity(project_dir: Path) -> tuple[str, str, str]:
    """(commit, source URL, commit time in UTC) of the checkout that built the image; `-dirty` marks uncommitted
    changes."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(project_dir), *args], capture_output=True, text=True,
                                env={**os.environ, "TZ": "UTC"})
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    committed = git("log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%dT%H:%M:%SZ") or "unknown"
    return (commit + ("-dirty" if dirty else ""), git("config", "--get", "remote.origin.url") or f"file://{project_dir}",
            committed)
