"""The checkpoint vLLM serves: a safetensors folder as mounted, or a GGUF file dequantised once into a safetensors
folder in the engine's cache (vLLM on CPU cannot load GGUF: its GGUF path needs CUDA vLLM's kernels). The conversion
is keyed by the GGUF's sha256, records that sha256 beside it (the operator report names the served weights by it)
and is published by one rename, so a killed start leaves nothing that a later start would take for complete.

    python3 -m engine.checkpoint <model dir> <cache dir> <link> [--gguf-file NAME]

points `link` at what to serve (the FlagScale serve config's `before_start`, before vLLM reads `link`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.operators import EngineError
from engine.report import SOURCE_RECORD, checkpoint_sha256

LOADING_FLAGS = ("local_files_only", "is_local")


@dataclass(frozen=True)
class Checkpoint:
    """The folder vLLM loads and the sha256 that names what was served: of the GGUF, or of a folder's config.json
    with every file's name and size (hashing tens of GB at each start would be too slow; the weights stage hashed
    them)."""

    folder: Path
    sha256: str


def servable(model_dir: Path, cache_dir: Path, log: Callable[[str], None], gguf_file: str | None = None) -> Checkpoint:
    """A folder vLLM can load: `model_dir` itself, or the cached conversion of its GGUF (the named one, which is
    the file the weights stage verified, else the only one there)."""
    if gguf_file is not None:
        gguf = model_dir / gguf_file
        if not gguf.is_file():
            raise EngineError(f"{model_dir} has no {gguf_file} (the serve configuration's gguf_file)")
        return _converted(gguf, cache_dir, log)
    if (model_dir / "config.json").is_file():
        return Checkpoint(model_dir, checkpoint_sha256(model_dir))
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
        _convert(gguf, staging, checkpoint.sha256)
        os.rename(staging, dest)
    except OSError:
        if not (dest / "config.json").is_file():  # lost a race with another start: theirs is complete
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return checkpoint


def _convert(gguf: Path, dest: Path, sha256: str) -> None:
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
    if hasattr(model.config, "quantization_config"):  # the saved tensors are dequantised: vLLM must not read GGUF
        del model.config.quantization_config
    model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _drop_loading_flags(dest / "tokenizer_config.json")
    (dest / SOURCE_RECORD).write_text(json.dumps({"file": gguf.name, "sha256": sha256}) + "\n")
    model.config.save_pretrained(dest)  # config.json last: its presence marks a complete conversion


def _drop_loading_flags(path: Path) -> None:
    """transformers saves how the tokenizer was loaded (`local_files_only` follows HF_HUB_OFFLINE): not part of the
    model, and it would give the same GGUF other bytes in another environment (the up-cycled MoE's lock saw it)."""
    config = json.loads(path.read_text())
    for key in LOADING_FLAGS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def point_at(link: Path, folder: Path) -> None:
    """Make `link` name `folder`, replaced in one rename (a start never sees it missing or half-made). The target is
    relative: the same cache is mounted at another path in a container than on the host (an engine started on the
    host, then the benchmark client in the image, found a host path there), and relative it resolves in both."""
    link.parent.mkdir(parents=True, exist_ok=True)
    staging = link.with_name(f".{link.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    staging.symlink_to(os.path.relpath(folder.resolve(), link.parent.resolve()), target_is_directory=True)
    os.replace(staging, link)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m engine.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("link", type=Path)
    parser.add_argument("--gguf-file", help="the GGUF in model_dir to serve (the file the weights stage verified)")
    args = parser.parse_args(argv)
    try:
        checkpoint = servable(args.model_dir, args.cache_dir, lambda line: print(line, flush=True), args.gguf_file)
        point_at(args.link, checkpoint.folder)
    except (OSError, ValueError, EngineError) as exc:
        print(f"flagos-engine: error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: serving {checkpoint.folder} (sha256 {checkpoint.sha256}) as {args.link}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
