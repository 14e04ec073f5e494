"""Scores from pairwise votes: Bradley-Terry maximum likelihood (ties as half wins), bootstrap
confidence intervals, Elo for comparison, and aesthetic levels 1-10 by quantile."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence

import numpy as np

Result = tuple[Hashable, Hashable, float]  # (a, b, outcome for a: 1 win, 0.5 tie, 0 loss)


def bradley_terry(items: Sequence[Hashable], results: Sequence[Result], iters: int = 1000,
                  prior: float = 1.0) -> dict[Hashable, float]:
    """Log-strengths (mean 0) by the MM algorithm (Hunter 2004). ``prior`` adds that many virtual ties
    against an opponent of strength 1 per item, so an image that won or lost everything stays finite."""
    index = {item: n for n, item in enumerate(items)}
    n = len(items)
    i = np.array([index[a] for a, _, _ in results], dtype=np.int64)
    j = np.array([index[b] for _, b, _ in results], dtype=np.int64)
    outcome = np.array([o for _, _, o in results], dtype=np.float64)
    wins = prior / 2 + np.bincount(i, outcome, n) + np.bincount(j, 1.0 - outcome, n)
    strength = np.ones(n)
    for _ in range(iters):
        d = 1.0 / (strength[i] + strength[j])
        denom = prior / (strength + 1.0) + np.bincount(i, d, n) + np.bincount(j, d, n)
        new = wins / denom
        new /= np.exp(np.log(new).mean())
        done = np.abs(np.log(new) - np.log(strength)).max() < 1e-10
        strength = new
        if done:
            break
    log_strength = np.log(strength)
    return {item: float(log_strength[index[item]]) for item in items}


def bootstrap_intervals(items: Sequence[Hashable], results: Sequence[Result], samples: int = 200,
                        level: float = 0.95, seed: int = 0) -> dict[Hashable, tuple[float, float]]:
    """Percentile intervals of the Bradley-Terry log-strength, resampling votes with replacement."""
    rng = random.Random(seed)
    draws: dict[Hashable, list[float]] = {item: [] for item in items}
    for _ in range(samples):
        resampled = [results[rng.randrange(len(results))] for _ in results]
        for item, value in bradley_terry(items, resampled, iters=200).items():
            draws[item].append(value)
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for item, values in draws.items():
        values.sort()
        out[item] = (values[int(lo * (len(values) - 1))], values[int(hi * (len(values) - 1))])
    return out


def elo(items: Sequence[Hashable], results: Sequence[Result], k: float = 16.0) -> dict[Hashable, float]:
    """Sequential Elo from 1500 in vote order (depends on the order, unlike Bradley-Terry)."""
    rating = {item: 1500.0 for item in items}
    for a, b, outcome in results:
        expected = 1 / (1 + 10 ** ((rating[b] - rating[a]) / 400))
        rating[a] += k * (outcome - expected)
        rating[b] -= k * (outcome - expected)
    return rating


def levels(scores: dict[Hashable, float], n_levels: int = 10) -> dict[Hashable, int]:
    """Aesthetic level 1..n by quantile of the score (equal-sized groups; ties share the lower level)."""
    ordered = sorted(scores, key=lambda i: scores[i])
    out = {}
    for position, item in enumerate(ordered):
        out[item] = 1 + position * n_levels // len(ordered)
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else 0.0
