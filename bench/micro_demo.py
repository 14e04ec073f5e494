"""The demo's wall time by phase, and the step time of LoRA training on micro ERNIE.

    python bench/micro_demo.py [--steps 300]

Runs ``ernie-lora demo`` in a temporary folder and prints its phases; then times the LoRA recipe on
micro at two step counts in the same run, so the per-step time excludes set-up and caching:
(t(long) - t(short)) / (long - short).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ernie_lora.config import TrainRunConfig
from ernie_lora.data.synthetic import write_synthetic_dataset
from ernie_lora.demo import run_demo
from ernie_lora.recipes.lora import train


def lora_seconds(dataset: Path, out: Path, steps: int, batch: int) -> float:
    cfg = TrainRunConfig.model_validate({
        "model": {"name": "micro", "dtype": "fp32"},
        "data": {"path": str(dataset), "resolution": 64, "cache_dir": str(out.parent / "cache")},
        "lora": {"rank": 8, "alpha": 8},
        "train": {"steps": steps, "batch_size": batch, "mixed_precision": "no", "gradient_checkpointing": False},
        "checkpoint": {"every": 10_000},
    })
    start = time.perf_counter()
    train(cfg, out, overwrite=True, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500, help="demo LoRA steps")
    args = parser.parse_args()
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        summary = run_demo(tmp / "demo", steps=args.steps)
        concepts = [k for k, v in summary.items() if isinstance(v, dict) and "before" in v]
        total = summary["seconds"]["total"]
        print("demo phases (s): " + ", ".join(f"{k} {v:.1f} ({v / total:.0%})" for k, v in summary["seconds"].items()
                                           if k != "total") + f"; total {total:.1f}")
        for c in concepts:
            print(f"demo {c}: structure {summary[c]['before']['structure']['mean']:.3f} -> "
                  f"{summary[c]['after']['structure']['mean']:.3f}, score {summary[c]['before']['score']['mean']:.3f} "
                  f"-> {summary[c]['after']['score']['mean']:.3f}")
        dataset = write_synthetic_dataset(tmp / "posters", 50, "poster", 0, ("purple",))
        for batch in (1, 8):
            short = lora_seconds(dataset, tmp / "short", 20, batch)
            long = lora_seconds(dataset, tmp / "long", 120, batch)
            per_step = (long - short) / 100 * 1000
            print(f"micro LoRA step (rank 8, attn_mlp, 64x64, batch {batch}): {per_step:.1f} ms/step")


if __name__ == "__main__":
    main()
