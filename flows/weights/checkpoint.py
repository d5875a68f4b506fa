"""A checkpoint folder is the model the matrix declares: every shard parses, the index names every tensor once and
every shard it names holds exactly those tensors, config.json names the declared architecture, and the parameter
counts from the headers match the declared sizes within PARAMS_TOLERANCE."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from flows.matrix import Model
from flows.weights.formats import FileTensors, WeightsInvalid, read_gguf, read_safetensors

INDEX = "model.safetensors.index.json"
PARAMS_TOLERANCE = 0.03  # declared sizes are rounded ("30.5B", "134.5M")
EXPERT_TENSOR = re.compile(r"\.(mlp|block_sparse_moe)\.experts\.\d+\.")  # Qwen3-MoE's and Mixtral's names


@dataclass(frozen=True)
class Structure:
    files: list[str]
    total_params: int
    active_params: int
    dtype: str


def verify_structure(folder: Path, model: Model) -> Structure:
    if model.format == "gguf":
        return _verify_gguf(folder, model)
    return _verify_safetensors(folder, model)


def _verify_gguf(folder: Path, model: Model) -> Structure:
    name = Path(model.source.file or "").name
    files = [folder / name] if name else sorted(folder.glob("*.gguf"))
    if len(files) != 1 or not files[0].exists():
        raise WeightsInvalid(str(folder), f"expected one GGUF file{f' named {name}' if name else ''}, found "
                                          f"{[p.name for p in folder.glob('*.gguf')] or 'none'}")
    weights = read_gguf(files[0])
    if weights.architecture != model.architecture:
        raise WeightsInvalid(files[0].name, f"architecture is {weights.architecture!r}, the matrix declares {model.architecture!r}")
    _check_params(files[0].name, "total", weights.params, model.parameters.total)
    dtypes = Counter(t.dtype for t in weights.tensors.values())
    return Structure(files=[files[0].name], total_params=weights.params, active_params=weights.params,
                     dtype=dtypes.most_common(1)[0][0])


def _verify_safetensors(folder: Path, model: Model) -> Structure:
    shards = _shards(folder)
    read = {name: read_safetensors(folder / name) for name in shards}
    _check_index(folder, read)
    config = _json(folder / "config.json")
    architectures = config.get("architectures") or []
    if model.architecture not in architectures:
        raise WeightsInvalid("config.json", f"architectures is {architectures}, the matrix declares {model.architecture!r}")
    total = sum(f.params for f in read.values())
    expert = sum(t.numel for f in read.values() for t in f.tensors.values() if EXPERT_TENSOR.search(t.name))
    experts, active_experts = model.parameters.experts, model.parameters.experts_active
    active = total - expert + (expert * active_experts // experts if experts and active_experts else expert)
    _check_params("checkpoint", "total", total, model.parameters.total)
    if model.parameters.active is not None:
        _check_params("checkpoint", "active", active, model.parameters.active)
    dtypes = Counter(t.dtype for f in read.values() for t in f.tensors.values())
    return Structure(files=sorted([*shards, "config.json", *([INDEX] if (folder / INDEX).exists() else [])]),
                     total_params=total, active_params=active, dtype=dtypes.most_common(1)[0][0])


def _shards(folder: Path) -> list[str]:
    index = folder / INDEX
    if index.exists():
        weight_map = _weight_map(index)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise WeightsInvalid(INDEX, f"names shard(s) that do not exist: {', '.join(missing)}")
        return names
    single = folder / "model.safetensors"
    if not single.exists():
        raise WeightsInvalid(str(folder), f"neither {INDEX} nor model.safetensors is there")
    return [single.name]


def _check_index(folder: Path, read: dict[str, FileTensors]) -> None:
    index = folder / INDEX
    if not index.exists():
        return
    weight_map = _weight_map(index)
    holders: dict[str, list[str]] = {}
    for shard, tensors in read.items():
        for name in tensors.tensors:
            holders.setdefault(name, []).append(shard)
    for name, shards in holders.items():
        if len(shards) > 1:
            raise WeightsInvalid(name, f"tensor is in {len(shards)} shards: {', '.join(sorted(shards))}")
    for name, shard in weight_map.items():
        if name not in holders:
            raise WeightsInvalid(INDEX, f"names tensor {name} in {shard}, but no shard holds it")
        if holders[name][0] != shard:
            raise WeightsInvalid(INDEX, f"places tensor {name} in {shard}, but it is in {holders[name][0]}")
    unlisted = sorted(set(holders) - set(weight_map))
    if unlisted:
        raise WeightsInvalid(INDEX, f"does not name {len(unlisted)} tensor(s) the shards hold, e.g. {unlisted[0]}")


def _weight_map(index: Path) -> dict[str, str]:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        counts = Counter(key for key, _ in pairs)
        repeated = [key for key, n in counts.items() if n > 1]
        if repeated:
            raise WeightsInvalid(INDEX, f"names tensor {repeated[0]} more than once")
        return dict(pairs)

    try:
        data = json.loads(index.read_text(), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise WeightsInvalid(INDEX, f"not valid JSON ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsInvalid(INDEX, "has no weight_map")
    return weight_map


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsInvalid(path.name, "is missing") from None
    except json.JSONDecodeError as exc:
        raise WeightsInvalid(path.name, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WeightsInvalid(path.name, "is not a JSON object")
    return data


def _check_params(where: str, kind: str, counted: int, declared: float) -> None:
    if abs(counted - declared) > PARAMS_TOLERANCE * declared:
        raise WeightsInvalid(where, f"{kind} parameters from the headers are {counted:,}, the matrix declares "
                                    f"{declared:,.0f} (tolerance {PARAMS_TOLERANCE:.0%})")
