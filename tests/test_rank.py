"""Swiss pairing and scores from pairwise votes (issue 7's core; the app and scorer come next)."""

import math
import random

import pytest

from ernie_lora.errors import UserError
from ernie_lora.rank.scores import bootstrap_intervals, bradley_terry, elo, levels, spearman
from ernie_lora.rank.swiss import standings, swiss_round


def test_swiss_pairs_equal_scores_and_never_rematches():
    rng = random.Random(0)
    items = list(range(16))
    results, played = [], set()
    for _ in range(5):
        score = standings(items, results)
        pairs, bye = swiss_round(score, played, rng=rng)
        assert bye is None and sorted(i for p in pairs for i in p) == items
        for a, b in pairs:
            assert frozenset((a, b)) not in played
            played.add(frozenset((a, b)))
            results.append((a, b, 1.0 if a < b else 0.0))  # lower id always wins
        gaps = [abs(score[a] - score[b]) for a, b in pairs]
        assert max(gaps) <= 1.0 and sum(g == 0 for g in gaps) >= len(pairs) // 2


def test_bye_goes_to_the_lowest_without_one():
    score = {"a": 2.0, "b": 1.0, "c": 0.0}
    pairs, bye = swiss_round(score, set())
    assert bye == "c" and pairs == [("a", "b")]
    _, bye = swiss_round(score, set(), byes={"c"})
    assert bye == "b"


def test_matching_succeeds_where_greedy_top_down_fails():
    # greedy pairs a-b (equal top scores) and strands c-d, who have met; the matching pairs a-c, b-d
    score = {"a": 2.0, "b": 2.0, "c": 1.0, "d": 1.0}
    pairs, _ = swiss_round(score, {frozenset("cd")})
    assert {frozenset(p) for p in pairs} == {frozenset("ac"), frozenset("bd")} or \
        {frozenset(p) for p in pairs} == {frozenset("ad"), frozenset("bc")}


def test_exhausted_pairings_are_one_clear_error():
    with pytest.raises(UserError, match="met every possible opponent"):
        swiss_round({"a": 0.0, "b": 0.0}, {frozenset("ab")})


def test_bradley_terry_recovers_hidden_order_with_ties_as_half():
    rng = random.Random(1)
    quality = {i: rng.gauss(0, 1) for i in range(30)}
    results = []
    for _ in range(1500):
        a, b = rng.sample(range(30), 2)
        p = 1 / (1 + math.exp(-(quality[a] - quality[b]) / 0.5))
        results.append((a, b, 0.5 if rng.random() < 0.1 else float(rng.random() < p)))
    strength = bradley_terry(list(quality), results)
    assert spearman([strength[i] for i in quality], list(quality.values())) > 0.9
    assert abs(sum(strength.values())) < 1e-6  # mean log-strength 0
    assert spearman([elo(list(quality), results)[i] for i in quality], list(quality.values())) > 0.8


def test_ties_count_half_and_perfect_winners_stay_finite():
    even = bradley_terry(["a", "b"], [("a", "b", 0.5)] * 10)
    assert even["a"] == pytest.approx(even["b"])
    one_sided = bradley_terry(["a", "b"], [("a", "b", 1.0)] * 10)
    assert math.isfinite(one_sided["a"]) and one_sided["a"] > one_sided["b"]
    more = bradley_terry(["a", "b"], [("a", "b", 1.0)] * 10 + [("a", "b", 0.5)] * 10)
    assert 0 < more["a"] < one_sided["a"]


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_votes():
    rng = random.Random(2)
    results = [("a", "b", float(rng.random() < 0.7)) for _ in range(40)]
    few = bootstrap_intervals(["a", "b"], results, samples=100)
    many = bootstrap_intervals(["a", "b"], results * 10, samples=100)
    estimate = bradley_terry(["a", "b"], results)["a"]
    assert few["a"][0] <= estimate <= few["a"][1]
    assert many["a"][1] - many["a"][0] < few["a"][1] - few["a"][0]


def test_levels_are_quantiles_1_to_10():
    scores = {i: float(i) for i in range(100)}
    lv = levels(scores)
    assert lv[0] == 1 and lv[99] == 10 and all(sum(v == k for v in lv.values()) == 10 for k in range(1, 11))
