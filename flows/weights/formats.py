"""Structure checks of weight files, read straight from their headers: safetensors (header JSON + data offsets that
tile the file exactly) and GGUF (through the `gguf` package's reader). No tensor data is loaded."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from flows.errors import FlagReleaseError

SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                        "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 2**20


class WeightsInvalid(FlagReleaseError):
    def __init__(self, file: str, problem: str):
        self.file = file
        super().__init__(f"{file}: {problem}")


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileTensors:
    path: Path
    tensors: dict[str, Tensor]
    architecture: str | None = None  # GGUF files say it themselves

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values())


def read_safetensors(path: Path) -> FileTensors:
    """Parse the header and prove that the tensors' byte ranges tile the data section exactly."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsInvalid(path.name, f"only {size} bytes: not a safetensors file (truncated?)")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise WeightsInvalid(path.name, f"header length {header_len} does not fit a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsInvalid(path.name, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsInvalid(path.name, "header is not a JSON object")
    data_len = size - 8 - header_len
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise WeightsInvalid(path.name, f"tensor {name}: dtype {dtype!r} is not allowed ({', '.join(SAFETENSORS_ITEMSIZE)})")
        tensor = Tensor(name, dtype, tuple(shape))
        begin, end = offsets
        if end - begin != tensor.numel * SAFETENSORS_ITEMSIZE[dtype]:
            raise WeightsInvalid(path.name, f"tensor {name}: {end - begin} bytes for shape {list(shape)} of {dtype}")
        tensors[name] = tensor
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise WeightsInvalid(path.name, f"tensor {name} starts at byte {begin} of the data, expected {position} "
                                            "(a gap or an overlap)")
        position = end
    if position != data_len:
        raise WeightsInvalid(path.name, f"tensors cover {position} data bytes but the file holds {data_len} "
                                        f"({'truncated' if data_len < position else 'trailing bytes'})")
    return FileTensors(path, tensors)


def read_gguf(path: Path) -> FileTensors:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
        tensors = {t.name: Tensor(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise WeightsInvalid(path.name, f"not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    return FileTensors(path, tensors, architecture=architecture)
