"""The delta W each loader applies from a LoRA file, against the trained one (relative error).

    python bench/lora_loaders.py [--rank 4] [--alpha 8]

Trains a tiny LoRA with alpha != rank, then for the raw checkpoint file (alpha only in the header, as
ernie-lora wrote its files before they were folded) and for each format we write, computes the delta W
each loader applies: diffusers through its own ``load_lora_weights`` on the tiny pipeline, ComfyUI,
peft and kohya-style loaders by their rules (``lora/layouts.py``). Prints the largest relative error
over modules, or why the loader does not load the file.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from ernie_lora.config import TrainRunConfig
from ernie_lora.data.synthetic import write_synthetic_dataset
from ernie_lora.lora.formats import FORMATS, loader_view, read_lora_file, read_modules, write_modules
from ernie_lora.lora.layouts import LOADERS
from ernie_lora.models import build_tiny_pipeline
from ernie_lora.recipes.lora import train


def diffusers_deltas(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    pipe = build_tiny_pipeline(0)
    layers = dict(pipe.transformer.named_modules())
    base = {n: layers[n].weight.detach().double() for n in names}
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora(adapter_names=["x"], lora_scale=1.0)
    pipe.unload_lora_weights()
    layers = dict(pipe.transformer.named_modules())
    return {n: layers[n].weight.detach().double() - base[n] for n in names}


def worst(deltas: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> float:
    return max(float((deltas[n] - t).norm() / t.norm()) for n, t in trained.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_synthetic_dataset(tmp / "data", count=4, kind="poster", seed=1, size=32)
        cfg = TrainRunConfig.model_validate({
            "model": {"name": "tiny", "dtype": "fp32"},
            "data": {"path": str(data), "resolution": 32, "cache_dir": str(tmp / "cache")},
            "lora": {"rank": args.rank, "alpha": args.alpha},
            "train": {"steps": 2, "batch_size": 2, "lr": 5e-2, "mixed_precision": "no",
                      "gradient_checkpointing": False},
            "checkpoint": {"every": 2, "keep": 1}})
        train(cfg, tmp / "run", progress=False)
        raw_file = tmp / "run" / "checkpoints" / "step-000002" / "lora.safetensors"
        raw, scale = load_file(raw_file), args.alpha / args.rank
        trained = {k.removeprefix("transformer.").removesuffix(".lora_A.weight"):
                   scale * raw[k.replace("lora_A", "lora_B")].double() @ raw[k].double()
                   for k in raw if k.endswith(".lora_A.weight")}
        files = {"unfolded (alpha in header only)": raw_file}
        modules = read_modules(tmp / "run" / "lora.safetensors")[0]
        for fmt in FORMATS:
            out = tmp / "out" / fmt if fmt == "peft" else tmp / "out" / f"{fmt}.safetensors"
            files[f"ernie-lora --format {fmt}"] = write_modules(out, modules, fmt)
        print(f"rank {args.rank}, alpha {args.alpha:g} (scale {scale:g}); largest relative error of delta W over "
              f"{len(trained)} modules, per loader")
        print(f"{'file':34s}" + "".join(f"{loader.name:>14s}" for loader in LOADERS))
        for label, path in files.items():
            lora = read_lora_file(path)
            cells = []
            for loader in LOADERS:
                view = loader_view(loader, lora.tensors, lora.header, path)
                if not view.loads:
                    cells.append("not loaded")
                elif loader.name == "diffusers":  # the real loader
                    cells.append(f"{worst(diffusers_deltas(path, list(trained)), trained):.2e}")
                else:
                    cells.append(f"{worst({n: m.delta() for n, m in view.modules.items()}, trained):.2e}")
            print(f"{label:34s}" + "".join(f"{c:>14s}" for c in cells))


if __name__ == "__main__":
    main()
