"""Resolution curriculum vs a single stage on micro: layout score reached and training wall time.

The demo's structural concept (posters with the title band at the left or right edge, which micro never
saw): a LoRA trained on 64 train-split images, scored on 16 test-split prompts (none a training caption)
sampled at 64 px. Per data seed, every schedule is trained in turn (interleaved, one thread, each with its
own cache folder, so its wall time includes caching its resolutions):

- single: 500 steps at 64 px (the demo's schedule);
- half:   250 steps at 32 px (2x2 tokens), then 250 at 64 px; the same with 48 px (3x3 tokens) first
  (micro was pretrained at 64 px only, so a low stage is also off its training distribution);
- short:  the single schedule's 64 px steps cut to 300 (the comparison a curriculum must beat: the same
  wall time spent at full resolution only).

    OMP_NUM_THREADS=1 python bench/curriculum.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.config import TrainRunConfig  # noqa: E402
from ernie_lora.data.synthetic import HELD_OUT, pretraining_colours, split_captions, write_synthetic_dataset  # noqa: E402
from ernie_lora.eval.stats import mean_and_spread, paired_bootstrap  # noqa: E402
from ernie_lora.generate import LoraSpec, generate  # noqa: E402
from ernie_lora.proofs import score_images  # noqa: E402
from ernie_lora.recipes.lora import train  # noqa: E402

WORLD = {"kind": "poster", "colours": pretraining_colours(), "bands": HELD_OUT["bands"]}
SCHEDULES = {
    "single 64px x 500": [{"resolution": 64, "steps": 500}],
    "32px x 250 + 64px x 250": [{"resolution": 32, "steps": 250}, {"resolution": 64, "steps": 250}],
    "48px x 250 + 64px x 250": [{"resolution": 48, "steps": 250}, {"resolution": 64, "steps": 250}],
    "single 64px x 300": [{"resolution": 64, "steps": 300}],
}
SAMPLING = dict(steps=24, guidance=3.0, width=64, height=64, dtype="fp32")


def train_schedule(dataset: Path, stages: list[dict], seed: int, out: Path) -> float:
    cfg = TrainRunConfig.model_validate({
        "model": {"name": "micro", "dtype": "fp32"},
        "data": {"path": str(dataset), "caption_dropout": 0.1, "cache_dir": str(out / "cache")},
        "lora": {"rank": 8, "alpha": 8, "targets": "attn_mlp"},
        "train": {"stages": stages, "batch_size": 8, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 20,
                  "mixed_precision": "no", "gradient_checkpointing": False, "seed": seed},
        "checkpoint": {"every": 10_000, "keep": 1},
    })
    start = time.perf_counter()
    train(cfg, out / "run", progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); side-band posters, 64 training images, "
          "16 test-split prompts per seed")
    results: dict[str, list[tuple[float, list[float], list[float]]]] = {name: [] for name in SCHEDULES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"seed-{seed}"
            dataset = write_synthetic_dataset(folder / "data", 64, seed=seed * 10, split="train", **WORLD)
            prompts = split_captions(16, "test", seed=seed * 10 + 5, **WORLD)
            for name, stages in SCHEDULES.items():
                out = folder / name.replace(" ", "_")
                seconds = train_schedule(dataset, stages, seed, out)
                paths = generate(prompts, model="micro", loras=[LoraSpec(out / "run" / "lora.safetensors", 1.0)],
                                 out_dir=out / "eval", seed=1000 + seed, fuse=True, **SAMPLING)
                scores = score_images(paths, prompts)
                results[name].append((seconds, scores["score"], scores["structure"]))
                print(f"seed {seed}: {name:24s} train {seconds:6.1f} s, score {statistics.mean(scores['score']):.3f}, "
                      f"structure {statistics.mean(scores['structure']):.3f}", flush=True)
    reference = next(iter(SCHEDULES))
    print(f"\nover {len(args.seeds)} seeds (mean +- spread of the per-seed means); time ratio and score difference "
          f"against {reference} within each seed")
    for name, rows in results.items():
        seconds, score, structure = (mean_and_spread([statistics.mean(r[i]) if i else r[0] for r in rows])
                                     for i in range(3))
        ratio = statistics.mean(r[0] / b[0] for r, b in zip(rows, results[reference], strict=True))
        diffs = [paired_bootstrap(r[1], b[1], seed=i) for i, (r, b) in enumerate(zip(rows, results[reference],
                                                                                       strict=True))]
        shown = "" if name == reference else "; score - reference per seed: " + ", ".join(str(d) for d in diffs)
        print(f"  {name:24s} train {seconds[0]:6.1f} +- {seconds[1]:4.1f} s ({ratio:.2f}x), score {score[0]:.3f} +- "
              f"{score[1]:.3f}, structure {structure[0]:.3f} +- {structure[1]:.3f}{shown}")


if __name__ == "__main__":
    main()
