"""The kernels stage: operator consistency of the FlagOS kernels and their ahead-of-time cache for the chip's targets.

Both run in child processes: Triton reads TRITON_INTERPRET when the kernels are imported, and the orchestrating
process should not carry torch and Triton. The AOT cache is keyed by what changes it (kernel sources, toolchain
pins, targets), so releases that share kernels share one cache and an unchanged re-run compiles nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flows.errors import FlagReleaseError
from flows.plan import Plan
from kernels.report import OpResult, consistency_markdown

CONSISTENCY_TOKENS = 16  # the CPU interpreter runs ~1-3 ms per program: production widths, few tokens


class KernelCheckFailed(FlagReleaseError):
    """A kernel disagrees with its reference, or the AOT compile failed."""


class KernelArtifacts(BaseModel):
    """What the build stage bakes into the image and the card reports."""

    model_config = ConfigDict(frozen=True)

    device: str
    consistency: list[OpResult]
    aot_targets: list[str]
    aot_cache_dir: str | None
    aot_manifest: str | None
    aot_kernels: int
    aot_reused: bool

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.consistency)


def kernels_key(plan: Plan) -> str:
    """Hash of the inputs that change the AOT cache: kernel sources, toolchain pins, targets."""
    relevant = {k: v for k, v in plan.inputs.items() if k.startswith(("kernel/", "package/"))}
    relevant["targets"] = ",".join(plan.chip.triton.aot_targets)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def check_and_compile(plan: Plan, state_dir: Path, project_dir: Path) -> KernelArtifacts:
    # inputs drawn from the fingerprint: new inputs for every change, the same table (and image) for the same inputs
    consistency = run_consistency(project_dir, seed=int(plan.fingerprint[:8], 16))
    failed = [row for row in consistency if not row.passed]
    if failed:
        listing = ", ".join(f"{r.op}/{r.dtype} (max abs err {r.max_abs_err:.3g} > atol {r.atol:.3g} + rtol {r.rtol:.3g})"
                            for r in failed)
        raise KernelCheckFailed(f"{len(failed)} operator(s) disagree with their reference: {listing}")
    # Upstream Triton compiles here; a vendor Triton (FlagTree) compiles only inside the chip's builder image.
    targets = list(plan.chip.triton.aot_targets) if plan.chip.triton.compiler == "triton" else []
    if not targets:
        return KernelArtifacts(device="cpu (Triton interpreter)", consistency=consistency, aot_targets=[],
                               aot_cache_dir=None, aot_manifest=None, aot_kernels=0, aot_reused=False)
    cache_dir = state_dir / "kernels" / kernels_key(plan)[:16]
    manifest = cache_dir / "aot-manifest.json"
    reused = manifest.exists()
    if not reused:
        run_aot(targets, cache_dir, project_dir)
    kernels = len(json.loads(manifest.read_text())["kernels"])
    return KernelArtifacts(device="cpu (Triton interpreter)", consistency=consistency, aot_targets=targets,
                           aot_cache_dir=str(cache_dir), aot_manifest=str(manifest), aot_kernels=kernels,
                           aot_reused=reused)


def run_consistency(project_dir: Path, seed: int, tokens: int = CONSISTENCY_TOKENS) -> list[OpResult]:
    """The consistency table under the interpreter; one thread, so a reference's reduction order (and so the
    measured errors the image records) does not depend on the host's core count."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "kernels.consistency", "--device", "cpu", "--tokens", str(tokens),
                             "--json", "--seed", str(seed)], cwd=project_dir, env=env, capture_output=True, text=True,
                            timeout=1800)
    if result.returncode not in (0, 1):  # 1 = some row failed: reported from the rows themselves
        raise KernelCheckFailed(f"the operator consistency check crashed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return [OpResult(**row) for row in json.loads(result.stdout)]


def run_aot(targets: list[str], cache_dir: Path, project_dir: Path) -> None:
    """Compile at the final path (Triton's index files hold absolute paths). The manifest is written last and
    atomically, so a cache without one is incomplete and the next run fills it again."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    argv = [sys.executable, "-m", "kernels.aot", "--out", str(cache_dir)]
    for target in targets:
        argv += ["--target", target]
    result = subprocess.run(argv, cwd=project_dir, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise KernelCheckFailed(f"ahead-of-time compile for {', '.join(targets)} failed:\n{result.stderr[-2000:]}")


def consistency_report(artifacts: KernelArtifacts) -> str:
    lines = [f"# Kernels: operator consistency on {artifacts.device}", "", consistency_markdown(artifacts.consistency)]
    if artifacts.aot_targets:
        how = "reused (same kernel inputs)" if artifacts.aot_reused else "compiled"
        lines.append(f"AOT cache for {', '.join(artifacts.aot_targets)}: {artifacts.aot_kernels} kernels, {how}, "
                     f"manifest `{artifacts.aot_manifest}`.")
    else:
        lines.append("No AOT targets on this chip's host side (CPU: interpreter; vendor Triton: compiled in the "
                     "chip's builder image by the same `python -m kernels.aot` command).")
    return "\n".join(lines) + "\n"


def recorded_operators(release_dir: Path) -> list[OpResult]:
    """The operator checks recorded for this fingerprint (kernels.json), or none when kernels did not run here."""
    path = release_dir / "kernels.json"
    return KernelArtifacts.model_validate_json(path.read_text()).consistency if path.exists() else []
