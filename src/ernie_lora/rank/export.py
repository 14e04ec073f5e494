"""From an annotation database to files: scores.csv, DPO preference pairs, aesthetic labels.

- ``scores.csv``: per image Bradley-Terry log-strength with a bootstrap 95 % interval, Elo, level 1-10
  (by quantile of Bradley-Terry), wins / losses / ties; best first.
- ``pairs.jsonl``: ``{"prompt", "chosen", "rejected"}`` for the DPO recipe. Diffusion-DPO compares two
  images of one prompt, so only pairs of the same prompt are written: every decisive vote between two
  of them (``"source": "vote"``), and per prompt the best against the worst by score when their
  intervals do not overlap (``"source": "scores"``: a pair no annotator saw side by side).
- ``aesthetic.jsonl``: ``{"file_name", "score", "level", "category"}``: the scorer's training labels
  and the weights of hierarchical sampling.
Image paths are absolute (the dataset folder joined with the stored relative path).
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_text
from .scores import bootstrap_intervals, bradley_terry, elo, levels
from .store import OUTCOMES, AnnotationStore

OUTPUT_FILES = ("scores.csv", "pairs.jsonl", "aesthetic.jsonl")


@dataclass
class ScoreSummary:
    images: int
    votes: int
    pairs_from_votes: int
    pairs_from_scores: int
    out: Path


def export_scores(db: str | Path, out: str | Path, *, bootstrap: int = 200, overwrite: bool = False,
                  seed: int = 0) -> ScoreSummary:
    store = AnnotationStore(db)
    out = Path(out)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out}: already holds {', '.join(existing)}; pass --overwrite or another --out")
    root = store.root
    images = store.images()
    votes = [v for v in store.votes() if v.outcome != "skip"]
    if not votes:
        raise UserError(f"{db}: no votes yet")
    items = [e.path for e in images]
    results = [(v.left, v.right, OUTCOMES[v.outcome]) for v in votes]
    strength = bradley_terry(items, results)
    intervals = bootstrap_intervals(items, results, samples=bootstrap, seed=seed)
    ratings = elo(items, results)
    level = levels(strength)
    record = {p: [0, 0, 0] for p in items}  # wins, losses, ties
    for a, b, outcome in results:
        if outcome == 0.5:
            record[a][2] += 1
            record[b][2] += 1
        else:
            winner, loser = (a, b) if outcome == 1.0 else (b, a)
            record[winner][0] += 1
            record[loser][1] += 1

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "category", "bt", "ci_low", "ci_high", "elo", "level", "wins", "losses", "ties",
                     "comparisons"])
    category = {e.path: e.category for e in images}
    for p in sorted(items, key=lambda p: -strength[p]):
        w, lo, t = record[p]
        writer.writerow([p, category[p], f"{strength[p]:.4f}", f"{intervals[p][0]:.4f}", f"{intervals[p][1]:.4f}",
                         f"{ratings[p]:.1f}", level[p], w, lo, t, w + lo + t])

    pairs = []
    for v in votes:
        if v.outcome in ("left", "right") and v.left_prompt and v.left_prompt == v.right_prompt:
            chosen, rejected = (v.left, v.right) if v.outcome == "left" else (v.right, v.left)
            pairs.append({"prompt": v.left_prompt, "chosen": str(root / chosen), "rejected": str(root / rejected),
                          "source": "vote"})
    from_votes = len(pairs)
    seen = {(p["chosen"], p["rejected"]) for p in pairs}
    by_prompt: dict[str, list[str]] = defaultdict(list)
    for e in images:
        if e.prompt:
            by_prompt[e.prompt].append(e.path)
    for prompt, group in by_prompt.items():
        if len(group) < 2:
            continue
        best, worst = max(group, key=strength.get), min(group, key=strength.get)
        key = (str(root / best), str(root / worst))
        if intervals[worst][1] < intervals[best][0] and key not in seen:
            pairs.append({"prompt": prompt, "chosen": key[0], "rejected": key[1], "source": "scores"})

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scores.csv", buf.getvalue())
    atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    atomic_write_text(out / "aesthetic.jsonl", "".join(
        json.dumps({"file_name": p, "score": round(strength[p], 6), "level": level[p], "category": category[p]})
        + "\n" for p in items))
    return ScoreSummary(len(items), len(votes), from_votes, len(pairs) - from_votes, out)
