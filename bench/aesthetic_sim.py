"""The judgement pipeline end to end on simulated annotations: Swiss votes -> Bradley-Terry scores and
levels -> aesthetic scorer (builtin features) -> SRCC / PLCC / KRCC on held-out images.

Images: `rank synth` (synthetic layouts degraded by a hidden quality q in [0, 1]). Annotators: noisy
Bradley-Terry judges voting through the annotation database, as the web app does. Printed per
annotator noise: how well the Bradley-Terry scores recover q (the ceiling for anything trained on
them), and the scorer trained on levels (regression) and on the votes (pairwise loss), evaluated on
the 20 % of images held out of training against q.

    python bench/aesthetic_sim.py --prompts 100 --per-prompt 4 --votes-per-image 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.data.categories import list_images  # noqa: E402
from ernie_lora.eval.aesthetic import Encoder, agreement, encode_files, train_scorer  # noqa: E402
from ernie_lora.rank.scores import bradley_terry, levels  # noqa: E402
from ernie_lora.rank.simulate import hidden_quality, simulate_annotators, write_quality_dataset  # noqa: E402
from ernie_lora.rank.store import OUTCOMES, AnnotationStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--votes-per-image", type=float, default=8)
    ap.add_argument("--noise", default="0.05,0.1,0.2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_quality_dataset(Path(tmp) / "images", args.prompts, args.per_prompt, args.seed)
        quality = hidden_quality(root)
        names = [e.path for e in list_images(root)]
        features = encode_files(Encoder("builtin"), root, names, progress=False)
        votes = int(args.votes_per_image * len(names))
        print(f"{len(names)} images, {votes} simulated votes (3 annotators) per noise level, builtin features")
        print(f"{'noise':>6} {'BT vs q SRCC':>13} {'target':>8} {'SRCC':>7} {'PLCC':>7} {'KRCC':>7}  (held-out, vs q)")
        for noise in (float(v) for v in args.noise.split(",")):
            store = AnnotationStore.create_or_open(Path(tmp) / f"votes-{noise}.sqlite", root, list_images(root))
            simulate_annotators(store, quality, votes, annotators=3, noise=noise, seed=args.seed, progress=False)
            results = [(v.left, v.right, OUTCOMES[v.outcome]) for v in store.votes() if v.outcome != "skip"]
            strength = bradley_terry(names, results)
            ceiling = agreement(np.array([strength[n] for n in names]), np.array([quality[n] for n in names]))
            for target in ("levels", "pairs"):
                lv = levels(strength)
                scorer = train_scorer(features, names, targets={n: float(lv[n]) for n in names} if target == "levels"
                                      else None, votes=results if target == "pairs" else None, seed=args.seed)
                held = [names.index(n) for n in scorer.holdout]
                r = agreement(scorer.score_features(features[held]), np.array([quality[names[i]] for i in held]))
                print(f"{noise:>6} {ceiling.srcc:>13.3f} {target:>8} {r.srcc:>7.3f} {r.plcc:>7.3f} {r.krcc:>7.3f}")


if __name__ == "__main__":
    main()
