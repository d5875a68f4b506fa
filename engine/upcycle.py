"""A Mixtral-style MoE checkpoint made from a dense Llama one (sparse up-cycling), so a CPU can serve a model whose
router, expert activation and expert combine are ours to bind: every expert is a copy of the dense MLP with its own
small seeded perturbation, and a seeded router picks the top-k of them with renormalised weights. A renormalised
mixture of near-identical experts is close to the dense MLP, so the model still answers like the dense one, while
which experts are chosen, and with what weights, now changes the numbers.

    python3 -m engine.upcycle <dense folder> <out folder> [--gguf-file NAME] [--experts 4] [--top-k 2] [--seed 0]
                              [--noise 0.01]

A folder holding a GGUF (the one --gguf-file names, else its only one) is dequantised first, as the engine serves it
(engine.checkpoint).

The output is a function of the dense checkpoint and these arguments (same torch: same bytes); it is published by one
rename, so an interrupted run leaves no folder that looks complete."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import servable
from engine.operators import EngineError

MLP_WEIGHT = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # Mixtral's names for gate, up, down
KEPT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "special_tokens_map.json")


@dataclass(frozen=True)
class Recipe:
    """How the experts and the router are made; recorded in the output's config as `flagrelease_upcycle`."""

    experts: int = 4
    top_k: int = 2
    seed: int = 0
    noise: float = 0.01  # each expert's perturbation, relative to the dense weight's standard deviation
    router_std: float = 0.02  # the router's initial weights (Mixtral's initializer range)

    def check(self) -> None:
        if not 2 <= self.experts <= 64:
            raise ValueError(f"--experts must be between 2 and 64, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"--top-k must be between 1 and --experts ({self.experts}), got {self.top_k}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"--noise must be in [0, 1), got {self.noise}")


def moe_config(dense: dict, recipe: Recipe) -> dict:
    if dense.get("model_type") != "llama" or dense.get("mlp_bias"):
        raise ValueError(f"only a Llama checkpoint without MLP biases can be up-cycled; config.json says "
                         f"model_type={dense.get('model_type')!r}, mlp_bias={dense.get('mlp_bias')!r}")
    config = {key: value for key, value in dense.items() if key not in ("mlp_bias", "pretraining_tp")}
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=recipe.experts,
                  num_experts_per_tok=recipe.top_k, router_aux_loss_coef=0.0, output_router_logits=False,
                  sliding_window=None, flagrelease_upcycle=vars(recipe))
    return config


def moe_tensors(dense: dict[str, torch.Tensor], recipe: Recipe) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(recipe.seed)
    out: dict[str, torch.Tensor] = {}
    layers: set[int] = set()
    for name in sorted(dense):
        match = MLP_WEIGHT.fullmatch(name)
        if match is None:
            out[name] = dense[name]
            continue
        layer, projection = int(match[1]), match[2]
        layers.add(layer)
        weight = dense[name]
        scale = recipe.noise * weight.float().std().item()
        for expert in range(recipe.experts):
            noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * scale
            out[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{EXPERT_NAMES[projection]}.weight"] = (
                (weight.float() + noise).to(weight.dtype))
    if not layers:
        raise ValueError("the checkpoint has no model.layers.N.mlp.{gate,up,down}_proj weights to up-cycle")
    hidden = dense["model.embed_tokens.weight"].shape[1]
    for layer in sorted(layers):
        router = torch.randn((recipe.experts, hidden), generator=generator, dtype=torch.float32) * recipe.router_std
        out[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = router.to(dense["model.embed_tokens.weight"].dtype)
    return out


def upcycle(dense_dir: Path, out_dir: Path, recipe: Recipe) -> Path:
    recipe.check()
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output folder")
    config = moe_config(json.loads((dense_dir / "config.json").read_text()), recipe)
    shards = sorted(dense_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{dense_dir} holds no .safetensors weights")
    dense: dict[str, torch.Tensor] = {}
    for shard in shards:
        dense.update(load_file(shard))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(moe_tensors(dense, recipe), staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in KEPT_FILES:
            if (dense_dir / name).is_file():
                shutil.copyfile(dense_dir / name, staging / name)
        for path in (staging, *staging.iterdir()):  # mkdtemp's 0700 and save_file's 0600: served read-only by others
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m engine.upcycle", description=__doc__.split("\n\n")[0])
    parser.add_argument("dense", type=Path, help="a dense Llama checkpoint folder (config.json, *.safetensors), "
                                                     "or a folder holding its GGUF")
    parser.add_argument("out", type=Path, help="the MoE checkpoint folder to create (must not exist)")
    parser.add_argument("--gguf-file", help="the GGUF in the dense folder to dequantise and up-cycle")
    defaults = Recipe()
    for field in ("experts", "top_k", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    parser.add_argument("--noise", type=float, default=defaults.noise)
    args = parser.parse_args(argv)
    recipe = Recipe(args.experts, args.top_k, args.seed, args.noise)
    try:
        with tempfile.TemporaryDirectory(prefix="dequantised-") as cache:  # used only when the input is a GGUF
            dense = servable(args.dense, Path(cache), lambda line: print(line, flush=True), args.gguf_file)
            path = upcycle(dense.folder, args.out, recipe)
    except (ValueError, OSError, EngineError) as exc:
        print(f"upcycle: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
