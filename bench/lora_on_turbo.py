"""A LoRA trained on the base, used on the Turbo student: what survives at 2, 4 and 8 steps, and the fix.

On micro: a Turbo LoRA is distilled with configs/micro-turbo.yaml (a 2-step student, CFG 1). A concept
LoRA (posters with a side title band, which micro never saw; 64 train-split images, the demo's settings)
is trained twice from the same data and seed:

- "on base":    the usual way, on micro itself;
- "on student": on micro with the Turbo LoRA fused as a fixed assistant (``model.assistant_lora``), so it
  learns on the model it will be used with. The Turbo LoRA is not in the written file.
- "de-distilled": on micro with the Turbo LoRA fused at strength -1 (``model.assistant_strength: -1``), the
  other fix users try: train against the base with the distillation taken out.

Scored on 48 test-split prompts (none a training caption), the same noise for every row: the concept
LoRA on the base at 24 steps with CFG 3 (what users trained for), then base + Turbo + each concept LoRA
at 2 / 4 / 8 steps with CFG 1, and base + Turbo alone. Paired-bootstrap intervals: each fix minus
"on base" at each step count.

    OMP_NUM_THREADS=1 python bench/lora_on_turbo.py --seeds 0 1 2 --prompts 48
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.config import DistillRunConfig, TrainRunConfig, load_run_config  # noqa: E402
from ernie_lora.data.synthetic import HELD_OUT, pretraining_colours, split_captions, write_synthetic_dataset  # noqa: E402
from ernie_lora.eval.stats import paired_bootstrap  # noqa: E402
from ernie_lora.generate import LoraSpec, generate  # noqa: E402
from ernie_lora.proofs import score_images  # noqa: E402
from ernie_lora.recipes.distill import run_distill  # noqa: E402
from ernie_lora.recipes.lora import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORLD = {"kind": "poster", "colours": pretraining_colours(), "bands": HELD_OUT["bands"]}
STEPS = (2, 4, 8)


def concept_lora(dataset: Path, seed: int, out: Path, assistant: Path | None, strength: float = 1.0) -> Path:
    cfg = TrainRunConfig.model_validate({
        "model": {"name": "micro", "dtype": "fp32", "assistant_lora": str(assistant) if assistant else None,
                  "assistant_strength": strength},
        "data": {"path": str(dataset), "resolution": 64, "caption_dropout": 0.1, "cache_dir": str(out / "cache")},
        "lora": {"rank": 8, "alpha": 8, "targets": "attn_mlp"},
        "train": {"steps": 500, "batch_size": 8, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 20,
                  "mixed_precision": "no", "gradient_checkpointing": False, "seed": seed},
        "checkpoint": {"every": 10_000, "keep": 1},
    })
    train(cfg, out / "run", progress=False)
    return out / "run" / "lora.safetensors"


def score_case(prompts: list[str], loras: list[Path], steps: int, guidance: float, seed: int, out: Path
               ) -> dict[str, list[float]]:
    paths = generate(prompts, model="micro", loras=[LoraSpec(p, 1.0) for p in loras], out_dir=out, seed=1000 + seed,
                     steps=steps, guidance=guidance, width=64, height=64, dtype="fp32", fuse=True)
    return score_images(paths, prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prompts", type=int, default=48)
    args = ap.parse_args()
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    rows: dict[str, list[dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        turbo_cfg = load_run_config(REPO / "configs" / "micro-turbo.yaml", DistillRunConfig,
                                    [f"data.cache_dir={tmp / 'turbo-cache'}"])
        turbo_cfg.proof = None
        turbo = run_distill(turbo_cfg, tmp / "turbo", progress=False).output / "lora.safetensors"
        print(f"Turbo LoRA: {turbo_cfg.distill.student_steps}-step student, {turbo_cfg.train.steps} steps "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        for seed in args.seeds:
            folder = tmp / f"seed-{seed}"
            dataset = write_synthetic_dataset(folder / "data", 64, seed=seed * 10, split="train", **WORLD)
            prompts = split_captions(args.prompts, "test", seed=seed * 10 + 5, **WORLD)
            on_base = concept_lora(dataset, seed, folder / "on-base", None)
            on_student = concept_lora(dataset, seed, folder / "on-student", turbo)
            de_distilled = concept_lora(dataset, seed, folder / "de-distilled", turbo, strength=-1.0)

            cases = [("on base, base model, 24 steps CFG 3", [on_base], 24, 3.0)]
            for steps in STEPS:
                cases += [(f"Turbo alone, {steps} steps", [turbo], steps, 1.0),
                          (f"on base + Turbo, {steps} steps", [turbo, on_base], steps, 1.0),
                          (f"on student + Turbo, {steps} steps", [turbo, on_student], steps, 1.0),
                          (f"de-distilled + Turbo, {steps} steps", [turbo, de_distilled], steps, 1.0)]
            for name, loras, steps, guidance in cases:
                rows.setdefault(name, []).append(score_case(prompts, loras, steps, guidance, seed,
                                                            folder / "eval" / name.replace(" ", "_")))
            print(f"seed {seed}: " + "; ".join(f"{name} {statistics.mean(r[-1]['structure']):.3f}"
                                               for name, r in rows.items()), flush=True)
    print(f"\n{len(args.seeds)} concept seeds x {args.prompts} test-split prompts; means over all "
          f"{args.prompts * len(args.seeds)} samples")
    print(f"{'':40s} {'score':>7s} {'structure':>10s} {'colour':>7s}")
    for name, runs in rows.items():
        cells = [statistics.mean(v for r in runs for v in r[k]) for k in ("score", "structure", "colour")]
        print(f"{name:40s} {cells[0]:7.3f} {cells[1]:10.3f} {cells[2]:7.3f}")
    for fix in ("on student", "de-distilled"):
        print(f"\n{fix} - on base (both with Turbo), score, per seed [95 % paired bootstrap]:")
        for steps in STEPS:
            a, b = rows[f"{fix} + Turbo, {steps} steps"], rows[f"on base + Turbo, {steps} steps"]
            print(f"  {steps} steps: " + ", ".join(str(paired_bootstrap(x["score"], y["score"], seed=i))
                                                  for i, (x, y) in enumerate(zip(a, b, strict=True))))


if __name__ == "__main__":
    main()
