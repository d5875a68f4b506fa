"""A tiny Qwen3-MoE-shaped checkpoint written by the tests with safetensors + numpy: 3 shards, an index, a config,
and the other files a real model repo carries (a BPE tokenizer trained here with `tokenizers`, its vocab and merges,
tokenizer and generation configs, README, LICENSE, .gitattributes)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from flows.matrix import License, Model, ModelSource, Parameters

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, ACTIVE, INTER, VOCAB = 2, 64, 4, 2, 16, 4, 2, 32, 128


def tiny_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        shapes.update({f"{p}.input_layernorm.weight": (HIDDEN,), f"{p}.post_attention_layernorm.weight": (HIDDEN,),
                       f"{p}.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
                       f"{p}.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       f"{p}.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                       f"{p}.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
                       f"{p}.self_attn.q_norm.weight": (HEAD_DIM,), f"{p}.self_attn.k_norm.weight": (HEAD_DIM,),
                       f"{p}.mlp.gate.weight": (EXPERTS, HIDDEN)})
        for e in range(EXPERTS):
            shapes.update({f"{p}.mlp.experts.{e}.gate_proj.weight": (INTER, HIDDEN),
                           f"{p}.mlp.experts.{e}.up_proj.weight": (INTER, HIDDEN),
                           f"{p}.mlp.experts.{e}.down_proj.weight": (HIDDEN, INTER)})
    return shapes


def counts() -> tuple[int, int]:
    shapes = tiny_shapes()
    total = sum(math.prod(s) for s in shapes.values())
    expert = sum(math.prod(s) for n, s in shapes.items() if ".mlp.experts." in n)
    return total, total - expert + expert * ACTIVE // EXPERTS


def write_checkpoint(folder: Path, shards: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng()
    names = list(tiny_shapes())
    weight_map = {}
    for index in range(shards):
        shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: rng.standard_normal(tiny_shapes()[n]).astype(np.float16) for n in names[index::shards]}
        save_file(part, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                                                    "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                                                    "num_experts": EXPERTS, "num_experts_per_tok": ACTIVE}))
    write_repo_files(folder)
    return folder


REPO_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json",
              "README.md", "LICENSE", ".gitattributes"]


def write_repo_files(folder: Path) -> None:
    """The non-weight files of a real repo, made the way their tools make them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["the FlagOS stack answers like the native stack", "weights are verified before they are served"] * 20
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"]))
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer",
                                                              "eos_token": "<|endoftext|>", "model_max_length": 32768}))
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny-Qwen3-MoE\n")
    (folder / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")


def write_lock(project: Path, model_name: str, folder: Path, names: list[str] | None = None) -> None:
    """locks/<model>.json for `names` (default: every file of the folder, as `flagrelease lock` records it)."""
    from flows.weights.expected import folder_files

    files = {n: {"size": (folder / n).stat().st_size, "sha256": hashlib.sha256((folder / n).read_bytes()).hexdigest()}
             for n in (folder_files(folder) if names is None else names)}
    (project / "locks").mkdir(parents=True, exist_ok=True)
    (project / "locks" / f"{model_name}.json").write_text(json.dumps({"model": model_name, "files": files}))


def tiny_model(folder: Path, **overrides: object) -> Model:
    total, active = counts()
    values = {"display_name": "Tiny-Qwen3-MoE", "source": ModelSource(hub="local", repo=str(folder)),
              "format": "safetensors", "architecture": "Qwen3MoeForCausalLM",
              "parameters": Parameters(total=total, active=active, layers=LAYERS, experts=EXPERTS, experts_active=ACTIVE),
              "license": License(id="apache-2.0", url="https://www.apache.org/licenses/LICENSE-2.0"),
              "served_name": "tiny-qwen3-moe"}
    values.update(overrides)
    return Model(**values)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "weights" / "tiny")


def pin_and_fetch(model: Model, root: Path, log=print, reverify: bool = False):
    """Resolve the model's revision against its (stand-in) hub, then run the weights stage into root/weights."""
    from flows.revisions import resolve_revision
    from flows.weights.manifest import prepare_weights

    pinned = resolve_revision(model.source, offline=False, timeout_s=5, pypi_index="unused")
    manifest, hashed = prepare_weights("tiny", model, pinned, root / "weights", root, root / "state", reverify, log)
    return pinned, manifest, hashed
