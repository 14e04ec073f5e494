"""Swiss pairing vs random pairing: comparisons needed to reach SRCC 0.9 with a hidden quality.

Simulated annotators judge N images of hidden quality q ~ N(0, 1): a beats b with probability
sigmoid((q_a - q_b) / noise), and call a tie with probability tie * exp(-|q_a - q_b|). Both schemes
vote in rounds of N/2 pairs (no rematches); after every round Bradley-Terry is fitted and its Spearman
correlation with q is measured. Printed: the comparisons each needed to reach the target (median over
seeds) and their ratio.

    python bench/swiss_vs_random.py --images 200 --seeds 10
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
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--noise", type=float, default=0.5, help="annotator noise (logistic scale, quality units)")
    ap.add_argument("--tie", type=float, default=0.1)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--max-rounds", type=int, default=60)
    args = ap.parse_args()
    print(f"{args.images} images, annotator noise {args.noise}, ties {args.tie}, target SRCC {args.target}, "
          f"{args.seeds} seeds")
    needed = {}
    for scheme in ("swiss", "random"):
        counts = [run(scheme, args.images, args.noise, args.tie, args.target, args.max_rounds, s)
                  for s in range(args.seeds)]
        reached = [c for c in counts if c is not None]
        needed[scheme] = statistics.median(reached) if reached else float("inf")
        per_image = needed[scheme] * 2 / args.images
        print(f"{scheme:>7}: median {needed[scheme]:.0f} comparisons ({per_image:.1f} per image), reached target in "
              f"{len(reached)}/{len(counts)} seeds; all: {counts}")
    print(f"random / swiss = {needed['random'] / needed['swiss']:.2f}x the comparisons")


if __name__ == "__main__":
    main()
