"""Swiss pairing vs random pairing: comparisons needed to reach SRCC 0.9 with a hidden quality.

Simulated annotators judge N images of hidden quality q ~ N(0, 1): a beats b with probability
sigmoid((q_a - q_b) / noise), and call a tie with probability tie * exp(-|q_a - q_b|). Both schemes
vote in rounds of N/2 pairs (no rematches); after every round Bradley-Terry is fitted and its Spearman
correlation with q is measured. Printed: the comparisons each needed to reach the target (median over
seeds) and their ratio.

    python bench/swiss_vs_random.py --images 200 --seeds 20 --noise 0.25 0.5 1.0
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.rank.scores import bradley_terry, spearman  # noqa: E402
from ernie_lora.rank.simulate import judge  # noqa: E402
from ernie_lora.rank.swiss import standings, swiss_round  # noqa: E402


def random_round(items: list[int], played: set[frozenset], rng: random.Random) -> list[tuple[int, int]]:
    for _ in range(100):
        order = items[:]
        rng.shuffle(order)
        pairs = [(order[k], order[k + 1]) for k in range(0, len(order) - 1, 2)]
        if not any(frozenset(p) in played for p in pairs):
            return pairs
    return [p for p in pairs if frozenset(p) not in played]


def run(scheme: str, n: int, noise: float, tie: float, target: float, max_rounds: int, seed: int) -> int | None:
    rng = random.Random(seed)
    quality = [rng.gauss(0, 1) for _ in range(n)]
    items = list(range(n))
    results, played, byes = [], set(), set()
    for _ in range(max_rounds):
        if scheme == "swiss":
            pairs, bye = swiss_round(standings(items, results), played, byes, rng)
            if bye is not None:
                byes.add(bye)
        else:
            pairs = random_round(items, played, rng)
        for a, b in pairs:
            results.append((a, b, judge(quality[a], quality[b], noise, tie, rng)))
            played.add(frozenset((a, b)))
        strength = bradley_terry(items, results)
        if spearman([strength[i] for i in items], quality) >= target:
            return len(results)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                    help="annotator noise levels (logistic scale, quality units)")
    ap.add_argument("--tie", type=float, default=0.1)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--max-rounds", type=int, default=80)
    args = ap.parse_args()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"{args.images} images, ties {args.tie}, target SRCC {args.target}, seeds {seeds.start}-{seeds.stop - 1}; "
          "swiss and random interleaved per seed (the same hidden qualities)")
    for noise in args.noise:
        counts: dict[str, list[int | None]] = {"swiss": [], "random": []}
        for seed in seeds:
            for scheme in counts:
                counts[scheme].append(run(scheme, args.images, noise, args.tie, args.target, args.max_rounds, seed))
        print(f"annotator noise {noise}:")
        needed = {}
        for scheme, values in counts.items():
            reached = [c for c in values if c is not None]
            needed[scheme] = statistics.median(reached) if reached else float("inf")
            print(f"  {scheme:>6}: median {needed[scheme]:.0f} comparisons ({needed[scheme] * 2 / args.images:.1f} "
                  f"per image), reached the target in {len(reached)}/{len(values)} seeds; all: {values}")
        ratios = sorted(r / s for s, r in zip(counts["swiss"], counts["random"], strict=True) if s and r)
        fewer = sum(r > s for s, r in zip(counts["swiss"], counts["random"], strict=True) if s and r)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"  random / swiss = {needed['random'] / needed['swiss']:.2f}x the comparisons (medians); per seed: "
              f"median {statistics.median(ratios):.2f}x, quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}x, "
              f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x; swiss needed fewer in {fewer}/{len(ratios)} seeds")


if __name__ == "__main__":
    main()
