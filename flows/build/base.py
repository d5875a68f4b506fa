"""Base images that are made here, never pulled: a Debian root filesystem from debootstrap, imported into the Docker
Engine under a tag derived from its recipe. The tarball is cached per machine by recipe; the image is imported
again only when the engine lacks that tag."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import docker

from flows.build.cache import complete_entry, entry_key, publish_entry, staging_entry
from flows.errors import FlagReleaseError
from flows.matrix import DebootstrapRecipe

SLIM_PATHS = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale",
              "var/log")


class BaseImageUnavailable(FlagReleaseError):
    pass


def base_tag(chip: str, recipe: DebootstrapRecipe) -> str:
    return f"local/flagrelease-base-{chip}:{entry_key('debootstrap', recipe.model_dump())}"


def base_tarball(recipe: DebootstrapRecipe, log: Callable[[str], None]) -> Path:
    """debootstrap the recipe once per machine (about a minute and a half), slimmed, as a numeric-owner tarball."""
    key = entry_key("debootstrap", recipe.model_dump())
    done = complete_entry(key)
    if done is not None:
        return done / "rootfs.tar"
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        raise BaseImageUnavailable("debootstrap is not installed: apt-get install debootstrap (or bash scripts/setup.sh)")
    staging = staging_entry(key)
    rootfs = staging / "rootfs"
    log(f"debootstrap {recipe.suite} ({recipe.variant}, +{','.join(recipe.packages)}) from {recipe.mirror}")
    result = subprocess.run([debootstrap, f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}",
                             recipe.suite, str(rootfs), recipe.mirror], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BaseImageUnavailable(f"debootstrap of {recipe.suite} failed (exit {result.returncode}): "
                                   f"{(result.stderr or result.stdout)[-1500:]}")
    for relative in SLIM_PATHS:
        for child in (rootfs / relative).glob("*"):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(staging / "rootfs.tar"), "."], check=True)
    shutil.rmtree(rootfs)
    return publish_entry(key, staging, recipe.model_dump()) / "rootfs.tar"


def ensure_base_image(client: docker.DockerClient, chip: str, recipe: DebootstrapRecipe,
                      log: Callable[[str], None]) -> str:
    """The engine holds the recipe's base image under its tag; import it from the cached tarball if not."""
    tag = base_tag(chip, recipe)
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    tarball = base_tarball(recipe, log)
    repository, _, version = tag.rpartition(":")
    log(f"importing {tarball} as {tag}")
    client.api.import_image_from_file(str(tarball), repository=repository, tag=version,
                                      changes=["ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]'])
    client.images.get(tag)  # raises ImageNotFound if the import did not land
    return tag
