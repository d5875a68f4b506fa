"""Ahead-of-time compile every FlagOS kernel for its production signatures, without the target GPU.

    python -m kernels.aot --target cuda:90 --target hip:gfx942 --out /opt/flagos/triton-cache

The result is a Triton cache directory plus `aot-manifest.json` (kernel, signature, constexprs, target, cache key,
sha256 of every file). It is filled through Triton's own JIT path (`warmup` with the launches the wrappers make, under
a stand-in driver that reports the target), so its keys are the ones the first real launch computes. Build it at the
absolute path the image will use at run time (Triton's index files store absolute paths), from exactly the kernel
sources that ship (line numbers are part of the key), with the same Triton as the image. The Iluvatar image runs
this same command inside its builder stage with FlagTree's Triton.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

TARGETS: dict[str, tuple[str, int | str, int]] = {
    "cuda:80": ("cuda", 80, 32),
    "cuda:90": ("cuda", 90, 32),
    "hip:gfx942": ("hip", "gfx942", 64),
    # Iluvatar BI-V150 (ivcore20) through FlagTree's `corex` backend: like CUDA, the arch is the device capability
    # (FlagTree's compiler makes it f"sm{arch}", parses it with ^sm(\d+)$ and maps 80 to ivcore20, 71 to ivcore11);
    # warp 64. Only FlagTree's Triton has that backend.
    "corex:ivcore20": ("corex", 80, 64),
}
# Triton's backend package (triton/backends/<name>) for each target backend; FlagTree ships corex as `iluvatar`.
BACKEND_PLUGIN = {"cuda": "nvidia", "hip": "amd", "corex": "iluvatar"}
MANIFEST = "aot-manifest.json"
OP_MODULES = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "topk_softmax", "moe_sum", "softmax")
FP32_OPS = ("topk_softmax", "softmax")  # the router and the sampler also run in fp32


class TargetDriver:
    """The few driver calls `warmup` makes, answered for a GPU that is not here."""

    def __init__(self, backend: str, arch: int | str, warp_size: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(backend, arch, warp_size)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> Any:
        import torch

        return torch.device("cpu")


def _signature(args: tuple[Any, ...], arg_names: list[str]) -> dict[str, str]:
    import torch

    def kind(value: Any) -> str:
        if isinstance(value, torch.dtype):
            return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                          torch.int64: "i64", torch.int32: "i32"}[value]
        return "fp32" if isinstance(value, float) else "i32"

    return {name: kind(value) for name, value in zip(arg_names, args)}


def compile_all(targets: list[str], out: Path) -> dict[str, Any]:
    """Fill `out` as a Triton cache for every target; return the manifest (also written to out/aot-manifest.json)."""
    os.environ["TRITON_CACHE_DIR"] = str(out)
    import importlib

    import torch
    import triton
    from triton import knobs
    from triton.runtime.driver import driver

    compiled_groups: list[dict[str, Any]] = []

    def listener(*, src: Any, metadata: dict[str, Any], metadata_group: dict[str, str], times: Any, cache_hit: bool) -> None:
        compiled_groups.append({"metadata": metadata, "files": metadata_group, "cache_hit": cache_hit})

    modules = [importlib.import_module(f"kernels.{name}") for name in OP_MODULES]
    entries = []
    knobs.compilation.listener = listener
    try:
        for target in targets:
            driver.set_active(TargetDriver(*TARGETS[target]))
            for module in modules:
                dtypes = [torch.bfloat16, torch.float16] + ([torch.float32] if module.__name__.split(".")[-1] in FP32_OPS else [])
                for dtype in dtypes:
                    for launch in module.production_launches(dtype):
                        launch.kernel.device_caches.clear()  # the binder caches the target per device id
                        compiled_groups.clear()
                        compiled = launch.warmup()
                        [group] = compiled_groups
                        entries.append({
                            "kernel": launch.kernel.fn.__name__,
                            "module": module.__name__,
                            "target": target,
                            "signature": _signature(launch.args, launch.kernel.arg_names),
                            "constexprs": launch.constexprs,
                            "num_warps": launch.num_warps,
                            "cache_key": compiled.hash,
                            "files": {Path(path).name: _sha256(Path(path)) for path in sorted(group["files"].values())},
                        })
    finally:
        knobs.compilation.listener = None  # the stand-in driver stays: this process compiles, it never launches
    manifest = {"triton_version": triton.__version__, "cache_dir": str(out), "targets": targets,
                "kernels": entries}
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--target", action="append", required=True, metavar="TARGET",
                        help=f"compile for this target (repeatable); known: {', '.join(TARGETS)}")
    parser.add_argument("--out", required=True, type=Path, help="the cache directory, at its run-time absolute path")
    args = parser.parse_args(argv)
    unknown = [t for t in args.target if t not in TARGETS]
    if unknown:
        print(f"error: unknown target {unknown[0]!r}; known targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    from triton.backends import backends

    missing = sorted({TARGETS[t][0] for t in args.target if BACKEND_PLUGIN[TARGETS[t][0]] not in backends})
    if missing:
        print(f"error: this Triton has no {', '.join(missing)} backend (it has: {', '.join(sorted(backends))}); "
              "compile those targets with the vendor's Triton, e.g. FlagTree in the chip's builder image", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set: the interpreter compiles nothing; unset it to compile", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = compile_all(list(dict.fromkeys(args.target)), out)
    fresh = len({k["cache_key"] for k in manifest["kernels"]})
    print(f"compiled {len(manifest['kernels'])} launches ({fresh} distinct binaries) for {', '.join(manifest['targets'])} "
          f"into {out}; manifest {out / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
