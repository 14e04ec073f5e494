"""The demo over training seeds and data seeds: does the LoRA teach the held-out layout every time?

Runs ``ernie-lora demo`` for every (training seed, data seed) pair and prints, per concept (the side-band
layout, the colour purple), structure, colour and the headline score before and after, per run; then
the mean and spread over runs and the paired-bootstrap interval of after - before within each run (the
same test-split prompts and noise before and after).

    python bench/demo_seeds.py --train-seeds 0 1 2 --data-seeds 0 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.demo import CONCEPTS, SCORES, run_demo  # noqa: E402
from ernie_lora.eval.stats import mean_and_spread, paired_bootstrap  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=500)
    args = ap.parse_args()
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for data_seed in args.data_seeds:
            for seed in args.train_seeds:
                print(f"== demo: training seed {seed}, data seed {data_seed}", flush=True)
                runs[seed, data_seed] = run_demo(Path(tmp) / f"demo-{seed}-{data_seed}", steps=args.steps, seed=seed,
                                                 data_seed=data_seed)
    print(f"\n{len(runs)} demos ({args.steps} LoRA steps each); per run: before -> after (mean over the "
          "concept's test prompts), the after - before interval of the score")
    for concept in CONCEPTS:
        print(f"\n{concept}:")
        print(f"{'seed/data':>10} " + " ".join(f"{name:>15}" for name in SCORES) + "   score after - before [95 %]")
        for (seed, data_seed), summary in runs.items():
            b, a = summary[concept]["before"], summary[concept]["after"]
            cells = " ".join(f"{b[n]['mean']:.3f} -> {a[n]['mean']:.3f}" for n in SCORES)
            interval = paired_bootstrap(a["score"]["values"], b["score"]["values"], seed=seed)
            print(f"{seed:>6}/{data_seed:<3} {cells}   {interval}")
        for name in SCORES:
            before = mean_and_spread([s[concept]["before"][name]["mean"] for s in runs.values()])
            after = mean_and_spread([s[concept]["after"][name]["mean"] for s in runs.values()])
            lowest = min(s[concept]["after"][name]["mean"] for s in runs.values())
            print(f"  {name:9s} before {before[0]:.3f} +- {before[1]:.3f}, after {after[0]:.3f} +- {after[1]:.3f} "
                  f"(lowest run after {lowest:.3f})")


if __name__ == "__main__":
    main()
