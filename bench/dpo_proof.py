"""The DPO proof on micro over data seeds and training seeds, DPO and SFT each tuned on validation.

The proof of configs/micro-dpo.yaml: a concept LoRA (side-band posters, a layout micro never saw) is
trained, pairs are ranked from its samples of train-split prompts, and DPO aligns it (its reference).

1. For each data seed: the concept LoRA and its pairs (the seed draws the concept's images, the pair
   prompts and the samples' noise).
2. Tuning, on validation-split prompts (the first data seed and training seed): DPO and SFT on the
   chosen images each get the same sweep of lr x steps, both starting from the concept LoRA; each keeps
   its best setting by the mean layout score (the start's own score printed beside them).
3. Report, on test-split prompts (disjoint from every pair prompt, checked): the start, tuned SFT and
   tuned DPO for every (training seed, data seed); per run the mean scores and paired-bootstrap
   intervals (same prompts and noise on every side); then mean and spread over runs, how many intervals
   exclude zero, and pair quality and DPO-loss saturation for reading why.

    python bench/dpo_proof.py --data-seeds 1 2 --train-seeds 0 1 2 --lrs 1e-4 3e-4 --steps 25 50 100 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.config import DpoRunConfig, load_run_config  # noqa: E402
from ernie_lora.data.preference import read_pairs  # noqa: E402
from ernie_lora.eval.stats import mean_and_spread, paired_bootstrap  # noqa: E402
from ernie_lora.generate import LoraSpec, generate  # noqa: E402
from ernie_lora.proofs import (  # noqa: E402
    evaluation_prompts,
    score_images,
    sft_on_chosen,
    train_concept_lora,
    write_synthetic_pairs,
)
from ernie_lora.recipes.dpo import run_dpo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("DPO", "SFT")


def evaluate(cfg: DpoRunConfig, prompts: list[str], lora: Path, out: Path) -> list[float]:
    p, side = cfg.proof, cfg.data.resolution
    paths = generate(prompts, model=cfg.model.name, loras=[LoraSpec(lora, 1.0)], out_dir=out, seed=50_000 + p.seed,
                     steps=p.steps, guidance=p.guidance, width=side, height=side, dtype="fp32")
    return score_images(paths, prompts)["score"]


def train(cfg: DpoRunConfig, method: str, lr: float, steps: int, seed: int, out: Path) -> tuple[Path, int | None]:
    """One LoRA of ``method`` from the concept LoRA; for DPO also the first step its loss fell below 0.01."""
    cfg = cfg.model_copy(deep=True)
    cfg.train.lr, cfg.train.steps, cfg.train.seed, cfg.checkpoint.every = lr, steps, seed, steps
    if method == "SFT":
        cfg.proof.sft_lr, cfg.proof.sft_steps = lr, steps
        return sft_on_chosen(cfg, read_pairs(Path(cfg.data.pairs)), out), None
    result = run_dpo(cfg, out, progress=False)
    return result.output / "lora.safetensors", next((r["step"] for r in result.history if r["dpo_loss"] < 0.01), None)


def prepare(cfg: DpoRunConfig, data_seed: int, folder: Path) -> DpoRunConfig:
    """The concept LoRA and the pairs of one data seed; returns the config that trains on them."""
    cfg = cfg.model_copy(deep=True)
    p = cfg.proof
    p.seed = data_seed
    cfg.lora.init_from = str(train_concept_lora(cfg, folder / "concept"))
    side = cfg.data.resolution
    report = write_synthetic_pairs(folder / "pairs", model=cfg.model.name, kind=p.kind, prompts=p.pair_prompts,
                                   candidates=p.candidates, min_margin=p.min_margin, seed=data_seed,
                                   sampling={"steps": p.steps, "guidance": p.guidance, "width": side, "height": side,
                                             "dtype": "fp32"},
                                   bands=tuple(p.bands or ()) or None, lora=Path(cfg.lora.init_from))
    cfg.data.pairs = str(folder / "pairs" / "pairs.jsonl")
    distinct = len({pair.prompt for pair in read_pairs(Path(cfg.data.pairs))})
    print(f"data seed {data_seed}: {report.pairs} pairs from {distinct} of {report.prompts} train-split prompts; "
          f"chosen mean score {report.chosen_mean:.3f}, rejected {report.rejected_mean:.3f}", flush=True)
    return cfg


def held_out(cfg: DpoRunConfig, split: str) -> list[str]:
    p = cfg.proof
    seen = [pair.prompt for pair in read_pairs(Path(cfg.data.pairs))]
    return evaluation_prompts(p.eval_prompts, split, p.kind, p.seed + 10_007, p.eval_seeds, seen,
                              tuple(p.bands or ()) or None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "micro-dpo.yaml")
    ap.add_argument("--data-seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4])
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200])
    args = ap.parse_args()
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    base_cfg = load_run_config(args.config, DpoRunConfig)
    print(f"DPO beta {base_cfg.dpo.beta:g}, SFT anchor {base_cfg.dpo.sft_weight:g}; sweep lr {args.lrs} x steps "
          f"{args.steps}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfgs = {ds: prepare(base_cfg, ds, tmp / f"data-{ds}") for ds in args.data_seeds}

        # -- tuning on the validation split
        ds0, seed0 = args.data_seeds[0], args.train_seeds[0]
        cfg0 = cfgs[ds0]
        val = held_out(cfg0, "validation")
        start_val = statistics.mean(evaluate(cfg0, val, Path(cfg0.lora.init_from), tmp / "val-start"))
        print(f"validation: start (concept LoRA) {start_val:.3f}")
        best: dict[str, tuple[float, tuple[float, int]]] = {}
        for lr in args.lrs:
            for steps in args.steps:
                for method in METHODS:
                    lora, saturated = train(cfg0, method, lr, steps, seed0, tmp / f"sweep-{method}-{lr:g}-{steps}")
                    score = statistics.mean(evaluate(cfg0, val, lora, tmp / f"val-{method}-{lr:g}-{steps}"))
                    note = f" (DPO loss first below 0.01 at step {saturated})" if method == "DPO" else ""
                    print(f"validation: {method} lr {lr:g}, {steps} steps: {score:.3f}{note}", flush=True)
                    if method not in best or score > best[method][0]:
                        best[method] = (score, (lr, steps))
        print("tuned on validation: " + ", ".join(f"{m} lr {best[m][1][0]:g} x {best[m][1][1]} steps ({best[m][0]:.3f})"
                                                  for m in METHODS) + f"; start {start_val:.3f}", flush=True)

        # -- report on the test split
        rows = []
        for ds, cfg in cfgs.items():
            test = held_out(cfg, "test")
            start = evaluate(cfg, test, Path(cfg.lora.init_from), tmp / f"test-start-{ds}")
            for seed in args.train_seeds:
                row = {"seed": seed, "data": ds, "start": start}
                for method in METHODS:
                    lr, steps = best[method][1]
                    lora, saturated = train(cfg, method, lr, steps, seed, tmp / f"final-{method}-{ds}-{seed}")
                    row[method] = evaluate(cfg, test, lora, tmp / f"test-{method}-{ds}-{seed}")
                    row["saturated"] = saturated if method == "DPO" else row.get("saturated")
                rows.append(row)
                print(f"test: seed {seed}, data {ds}: start {statistics.mean(start):.3f}, SFT "
                      f"{statistics.mean(row['SFT']):.3f}, DPO {statistics.mean(row['DPO']):.3f}; DPO - start "
                      f"{paired_bootstrap(row['DPO'], start, seed=seed)}, DPO - SFT "
                      f"{paired_bootstrap(row['DPO'], row['SFT'], seed=seed)}, SFT - start "
                      f"{paired_bootstrap(row['SFT'], start, seed=seed)}; DPO loss below 0.01 from step "
                      f"{row['saturated']}", flush=True)
    print(f"\n{len(rows)} runs on {len(test)} test samples each:")
    for a, b in (("DPO", "start"), ("SFT", "start"), ("DPO", "SFT")):
        gains = [statistics.mean(r[a]) - statistics.mean(r[b]) for r in rows]
        intervals = [paired_bootstrap(r[a], r[b], seed=r["seed"]) for r in rows]
        mean, spread = mean_and_spread(gains)
        print(f"  {a} - {b}: {mean:+.3f} +- {spread:.3f} over runs; interval above zero in "
              f"{sum(i.low > 0 for i in intervals)}/{len(rows)}, below zero in {sum(i.high < 0 for i in intervals)}")
    for name in ("start", "SFT", "DPO"):
        mean, spread = mean_and_spread([statistics.mean(r[name]) for r in rows])
        print(f"  {name:5s} mean score {mean:.3f} +- {spread:.3f}")


if __name__ == "__main__":
    main()
