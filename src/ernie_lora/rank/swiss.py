"""Swiss-system pairing for pairwise image annotation (the ERNIE-Image report's tournaments).

Each round pairs images whose scores so far (wins, ties as half) are equal or close, never the same
pair twice; with an odd count the lowest-ranked image without a bye sits out. Pairing is a minimum-cost
perfect matching (networkx's blossom algorithm) on cost = (score gap)², with rematches forbidden, so
it never fails where a greedy top-down pass would strand the last images with old opponents. It is
solved on consecutive runs of the standings, each widened until it can be matched (see CHUNK).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable

import networkx as nx

from ..errors import UserError

# the standings are matched in runs of this many images: an exact matching of each run costs O(CHUNK^3)
# instead of O(n^3) for all (1000 images: 66 s a round), and the best opponents are near in the standings
CHUNK = 64


def standings(items: Iterable[Hashable], results: Iterable[tuple[Hashable, Hashable, float]]) -> dict:
    """Score per item: 1 per win, 0.5 per tie. ``results`` holds (a, b, outcome for a: 1, 0.5 or 0)."""
    score = {item: 0.0 for item in items}
    for a, b, outcome in results:
        score[a] += outcome
        score[b] += 1.0 - outcome
    return score


def swiss_round(
    score: dict[Hashable, float],
    played: set[frozenset],
    byes: set[Hashable] = frozenset(),
    rng: random.Random | None = None,
) -> tuple[list[tuple[Hashable, Hashable]], Hashable | None]:
    """Pairs for one round, and the item given a bye (None with an even count)."""
    rng = rng or random.Random(0)
    items = list(score)
    rng.shuffle(items)  # ties in score are broken at random, not by file name
    items.sort(key=lambda i: -score[i])
    bye = None
    if len(items) % 2:
        bye = next((i for i in reversed(items) if i not in byes), items[-1])
        items.remove(bye)
    if not items:
        return [], bye
    rank = {item: n for n, item in enumerate(items)}
    pairs: list[tuple[Hashable, Hashable]] = []
    start = 0
    while start < len(items):
        end = start + CHUNK
        while True:
            if len(items) - end < CHUNK // 2:
                end = len(items)  # a short tail joins the last chunk
            matched = _min_cost_pairs(items[start:end], score, rank, played)
            if matched is not None:
                break
            if end == len(items):
                raise UserError(f"no Swiss round left: {len(items)} images have met every possible opponent")
            end += CHUNK  # this stretch of the standings has met itself: widen it
        pairs += matched
        start = end
    pairs.sort(key=lambda p: rank[p[0]])
    return pairs, bye


def _min_cost_pairs(items: list, score: dict, rank: dict, played: set[frozenset]) -> list | None:
    """Minimum-cost perfect matching of an even run of the standings, or None where none exists."""
    graph = nx.Graph()
    for i, a in enumerate(items):
        for b in items[i + 1:]:
            if frozenset((a, b)) in played:
                continue
            # score gap first, then the distance in the standings, so equal groups pair top with next
            gap = (score[a] - score[b]) ** 2 * 1000 + abs(rank[a] - rank[b])
            graph.add_edge(a, b, weight=-gap)
    matching = nx.max_weight_matching(graph, maxcardinality=True)
    if 2 * len(matching) < len(items):
        return None
    return [tuple(sorted(pair, key=lambda i: rank[i])) for pair in matching]
