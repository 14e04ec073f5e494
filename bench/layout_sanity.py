"""What the layout score means: its sanity table per genre on constructed images.

For random layouts of every genre (side bands included): the truth, the truth blurred (radius 2) or
noised (sigma 40), blank, white, random noise, a solid image in the theme colour, the right colour in
another layout of the genre, and the right layout in another colour. Printed per case and genre: the
median headline score, its range, and the medians of structure and colour, then whether the table holds
(truth and damaged truths >= 0.8; blank, white, noise, solid <= 0.1; right colour wrong layout <= 0.3).

    python bench/layout_sanity.py --per-kind 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ernie_lora.eval.layout import SANITY_CASES, sanity_table  # noqa: E402

AT_LEAST = {"truth": 0.8, "blur 2": 0.8, "noise 40": 0.8}
AT_MOST = {
    "blank": 0.1,
    "white": 0.1,
    "noise": 0.1,
    "solid colour": 0.1,
    "right colour, wrong layout": 0.3,
    "right layout, wrong colour": 0.1,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    table = sanity_table(args.per_kind, args.seed)
    print(
        f"{args.per_kind} layouts per genre, seed {args.seed}; cells: median score (min-max) "
        "S median structure C median colour"
    )
    print(f"{'case':27s}" + "".join(f"{kind:>29s}" for kind in table))
    failures = []
    for case in SANITY_CASES:
        cells = []
        for kind, rows in table.items():
            scores = [s.score for s in rows[case]]
            median = statistics.median(scores)
            structure = statistics.median(s.structure for s in rows[case])
            colour = statistics.median(s.colour for s in rows[case])
            cells.append(f"{median:.2f} ({min(scores):.2f}-{max(scores):.2f}) S{structure:.2f} C{colour:.2f}")
            if (case in AT_LEAST and median < AT_LEAST[case]) or (case in AT_MOST and median > AT_MOST[case]):
                failures.append(f"{kind} / {case}: median {median:.2f}")
        print(f"{case:27s}" + "".join(f"{cell:>29s}" for cell in cells))
    print("the sanity table holds for every genre" if not failures else "FAILS: " + "; ".join(failures))


if __name__ == "__main__":
    main()
