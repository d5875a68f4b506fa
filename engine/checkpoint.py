"""The checkpoint the engine serves: a transformers folder as mounted, or a GGUF file dequantised once into a
transformers folder in the engine's cache (transformers serve cannot start from a GGUF config: it has no
`architectures`). The conversion is keyed by the GGUF's sha256 and published by one rename, so a killed start
leaves nothing that a later start would take for complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.operators import EngineError


def architecture_of(model_dir: Path) -> tuple[str, dict]:
    config = json.loads((model_dir / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not architectures:
        raise EngineError(f"{model_dir / 'config.json'} names no architectures; the engine cannot tell which "
                          "operators to bind")
    return architectures[0], config


@dataclass(frozen=True)
class Checkpoint:
    """The folder `transformers serve` loads and the sha256 that names what was served: of the GGUF, or of a
    folder's config.json with every file's name and size (hashing tens of GB at each start would be too slow;
    the weights stage hashed them)."""

    folder: Path
    sha256: str


def servable(model_dir: Path, cache_dir: Path, log: Callable[[str], None], gguf_file: str | None = None) -> Checkpoint:
    """A folder `transformers serve` can load: `model_dir` itself, or the cached conversion of its GGUF (the named
    one, which is the file the weights stage verified, else the only one there)."""
    if gguf_file is not None:
        gguf = model_dir / gguf_file
        if not gguf.is_file():
            raise EngineError(f"{model_dir} has no {gguf_file} (the serve configuration's gguf_file)")
        return _converted(gguf, cache_dir, log)
    if (model_dir / "config.json").is_file():
        digest = hashlib.sha256((model_dir / "config.json").read_bytes())
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            digest.update(f"\n{path.relative_to(model_dir)} {path.stat().st_size}".encode())
        return Checkpoint(model_dir, digest.hexdigest())
    ggufs = sorted(model_dir.glob("*.gguf")) if model_dir.is_dir() else []
    if len(ggufs) != 1:
        found = ", ".join(p.name for p in ggufs) or "nothing servable"
        raise EngineError(f"{model_dir} must hold a transformers checkpoint (config.json) or exactly one .gguf file; "
                          f"found {found}")
    return _converted(ggufs[0], cache_dir, log)


def _converted(gguf: Path, cache_dir: Path, log: Callable[[str], None]) -> Checkpoint:
    digest = hashlib.sha256()
    with gguf.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    dest = cache_dir / f"{gguf.stem}-{digest.hexdigest()[:16]}"
    checkpoint = Checkpoint(dest, digest.hexdigest())
    if (dest / "config.json").is_file():
        log(f"checkpoint: {gguf.name} already converted at {dest}")
        return checkpoint
    log(f"checkpoint: dequantising {gguf.name} into {dest} (once per cache)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
    try:
        _convert(gguf, staging)
        os.rename(staging, dest)
    except OSError:
        if not (dest / "config.json").is_file():  # lost a race with another start: theirs is complete
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return checkpoint


def _convert(gguf: Path, dest: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tied = bool(model.config.tie_word_embeddings)
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}  # tied: the file holds the embedding once
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    model.config.save_pretrained(dest)  # config.json last: its presence marks a complete conversion
