"""The `derived` weights source: a model whose weights no hub serves, made from another model of the matrix by the
release image's own engine (`python3 -m engine.upcycle`), so they are made with exactly the torch the image serves
them with. The base's weights are verified first (its own lock); what comes out is verified like any download,
against the derived model's lock, so a different torch, recipe or base shows up as named files that differ.

The image runs without network, as the caller's user, with the base folder read-only and the weights folder's
parent writable. `engine.upcycle` publishes its output by one rename: a killed run leaves no folder that looks
complete. Files found wrong later are made again into a sibling folder and moved over the wrong ones.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker

from flows.errors import FlagReleaseError
from flows.evaluate.container import run_to_completion
from flows.matrix import Upcycle

BASE_MOUNT = "/base"
OUT_MOUNT = "/out"
TIMEOUT_S = 900.0
LOG_TAIL = 12

# (argv, volumes) -> (exit code, the last lines of its output)
ImageCommand = Callable[[list[str], list[str]], tuple[int, str]]


class DerivationFailed(FlagReleaseError):
    pass


@dataclass(frozen=True)
class Derivation:
    """What a derived model is made from and with: the base's verified folder (and its GGUF file, when the base is
    one) and a way to run the release image."""

    base_folder: Path
    base_gguf: str | None
    run: ImageCommand


def upcycle_arguments(recipe: Upcycle, base_dir: str, out_dir: str, base_gguf: str | None) -> list[str]:
    """engine.upcycle's command line for `recipe` (the card prints the same one)."""
    return ["python3", "-m", "engine.upcycle", base_dir, out_dir, *(["--gguf-file", base_gguf] if base_gguf else []),
            "--experts", str(recipe.experts), "--top-k", str(recipe.top_k), "--seed", str(recipe.seed),
            "--noise", repr(recipe.noise)]


def make(recipe: Upcycle, derivation: Derivation, folder: Path, files: list[str] | None,
         log: Callable[[str], None]) -> None:
    """Make `folder` (when it is not there), or with `files`, make those again and put them in place."""
    if folder.is_dir() and files is None:
        return
    target = folder if files is None else folder.with_name(f".{folder.name}.again")
    shutil.rmtree(target, ignore_errors=True)  # a sibling left by an earlier, killed attempt
    folder.parent.mkdir(parents=True, exist_ok=True)
    argv = upcycle_arguments(recipe, BASE_MOUNT, f"{OUT_MOUNT}/{target.name}", derivation.base_gguf)
    log(f"making the weights in the release image: {' '.join(argv)}")
    code, tail = derivation.run(argv, [f"{derivation.base_folder}:{BASE_MOUNT}:ro", f"{folder.parent}:{OUT_MOUNT}:rw"])
    if code != 0:
        raise DerivationFailed(f"engine.upcycle in the release image exited with {code}; its last lines:\n{tail}")
    if files is not None:
        for name in files:
            os.replace(target / name, folder / name)
        shutil.rmtree(target)


def image_command(client: docker.DockerClient, image: str) -> ImageCommand:
    """Commands in throwaway containers of `image`: no network, the caller's user, a writable HOME in /tmp."""
    def run(argv: list[str], volumes: list[str]) -> tuple[int, str]:
        return run_to_completion(client, image, argv, volumes, "weights", TIMEOUT_S, LOG_TAIL, network_disabled=True,
                                 user=f"{os.getuid()}:{os.getgid()}", environment={"HOME": "/tmp", "HF_HUB_OFFLINE": "1"})
    return run
