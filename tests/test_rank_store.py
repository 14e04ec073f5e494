"""The annotation database: Swiss rounds handed out pair by pair, votes, undo, restarts; scores export;
the aesthetic scorer; hierarchical sampling."""

import csv
import json
import sqlite3

import numpy as np
import pytest

from conftest import run_cli
from ernie_lora.data.categories import ImageEntry, list_images
from ernie_lora.errors import UserError
from ernie_lora.rank.export import export_scores
from ernie_lora.rank.simulate import hidden_quality, simulate_annotators, write_quality_dataset
from ernie_lora.rank.store import AnnotationStore


def _store(tmp_path, n: int = 6, prompt=lambda i: f"p{i // 2}") -> AnnotationStore:
    images = [ImageEntry(f"img{i}.png", prompt(i), "cat") for i in range(n)]
    return AnnotationStore.create_or_open(tmp_path / "a.sqlite", tmp_path, images)


def test_annotators_get_different_pairs_and_a_round_completes_before_the_next(tmp_path):
    store = _store(tmp_path)
    first = [store.next_pair(f"ann{k}") for k in range(3)]
    assert len({p["pair_id"] for p in first}) == 3 and all(p["round"] == 1 for p in first)
    assert store.next_pair("ann0")["pair_id"] == first[0]["pair_id"]  # a reload gets the same pair
    for k, p in enumerate(first):
        assert store.vote(p["pair_id"], "left", f"ann{k}")
    nxt = store.next_pair("ann3")
    assert nxt["round"] == 2
    # round 2 is Swiss: the three winners of round 1 and the three losers form the groups
    winners = {p["left"]["path"] for p in first}
    played = {frozenset((p["left"]["path"], p["right"]["path"])) for p in first}
    round2 = [nxt] + [store.next_pair(f"ann{k}") for k in range(2)]
    assert len({p["pair_id"] for p in round2}) == 3 and all(p["round"] == 2 for p in round2)
    for p in round2:
        pair = frozenset((p["left"]["path"], p["right"]["path"]))
        assert pair not in played
    mixed = sum(len(winners & {p["left"]["path"], p["right"]["path"]}) == 1 for p in round2)
    assert mixed <= 1  # 3 winners: at most one of them must meet a loser


def test_a_vote_counts_once_and_undo_gives_the_pair_back(tmp_path):
    store = _store(tmp_path)
    pair = store.next_pair("ann")
    assert store.vote(pair["pair_id"], "tie", "ann") is True
    assert store.vote(pair["pair_id"], "left", "ann") is False  # a retried request is not a second vote
    assert [v.outcome for v in store.votes()] == ["tie"]
    assert store.next_pair("ann")["pair_id"] != pair["pair_id"]
    assert store.undo("ann")["pair_id"] == pair["pair_id"] and store.votes() == []
    assert store.next_pair("ann")["pair_id"] == pair["pair_id"]  # and again on a reload
    assert store.undo("other") is None
    with pytest.raises(UserError, match="outcome"):
        store.vote(pair["pair_id"], "maybe", "ann")


def test_nobody_waits_for_the_round_an_open_pair_is_shared_and_both_votes_count(tmp_path):
    store = _store(tmp_path, n=4)
    a, b = store.next_pair("a", now=1.0), store.next_pair("b", now=2.0)
    assert a["pair_id"] != b["pair_id"]
    c = store.next_pair("c", now=3.0)  # round 1's two pairs are out: the one held longest is shared
    assert c["round"] == 1 and c["pair_id"] == a["pair_id"]
    assert store.vote(a["pair_id"], "left", "a") and store.vote(a["pair_id"], "tie", "c")
    assert store.next_pair("c")["pair_id"] == b["pair_id"]  # still open: b has not answered
    assert store.vote(b["pair_id"], "right", "b")
    assert store.next_pair("c")["round"] == 2  # b answered first: c moves on
    assert sorted(v.outcome for v in store.votes()) == ["left", "right", "tie"]


def test_rounds_end_when_every_image_has_met_every_other(tmp_path):
    store = _store(tmp_path, n=3)
    votes = 0
    for _ in range(10):
        p = store.next_pair("ann")
        if p.get("done"):
            break
        store.vote(p["pair_id"], "right", "ann")
        votes += 1
    assert votes == 3 and store.next_pair("ann")["done"]  # 3 images: 3 possible pairs, one per round


def test_the_database_is_the_state_and_belongs_to_one_folder(tmp_path):
    store = _store(tmp_path)
    pair = store.next_pair("ann")
    store.vote(pair["pair_id"], "left", "ann")
    again = AnnotationStore.create_or_open(tmp_path / "a.sqlite", tmp_path, [])  # a restart
    assert len(again.votes()) == 1 and again.next_pair("ann")["pair_id"] != pair["pair_id"]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(UserError, match="made for"):
        AnnotationStore.create_or_open(tmp_path / "a.sqlite", other, [])
    with sqlite3.connect(tmp_path / "a.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.execute("PRAGMA user_version = 99")  # a database of another schema is refused, not altered
    with pytest.raises(UserError, match="schema"):
        AnnotationStore.create_or_open(tmp_path / "a.sqlite", tmp_path, [])
    with pytest.raises(UserError, match="schema"):
        AnnotationStore(tmp_path / "a.sqlite")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """40 prompts x 3 images of hidden quality, 700 simulated votes, scores exported."""
    root = write_quality_dataset(tmp_path_factory.mktemp("sim") / "data", prompts=40, per_prompt=3, seed=2)
    store = AnnotationStore.create_or_open(root / "annotations.sqlite", root, list_images(root))
    cast = simulate_annotators(store, hidden_quality(root), votes=700, annotators=3, noise=0.1, seed=1,
                               progress=False)
    assert cast == 700
    export_scores(store.path, root.parent / "scores", bootstrap=50)
    return root


def test_scores_levels_and_pairs_agree_with_the_hidden_quality(simulated):
    from scipy.stats import spearmanr

    quality = hidden_quality(simulated)
    scores = root_scores = list(csv.DictReader((simulated.parent / "scores" / "scores.csv").open()))
    assert len(scores) == 120
    bt = [float(r["bt"]) for r in root_scores]
    assert bt == sorted(bt, reverse=True)
    assert spearmanr(bt, [quality[r["file_name"]] for r in scores]).statistic > 0.85
    assert all(float(r["ci_low"]) <= float(r["bt"]) <= float(r["ci_high"]) for r in scores)
    levels = [int(r["level"]) for r in scores]
    assert levels[0] == 10 and levels[-1] == 1 and levels == sorted(levels, reverse=True)
    pairs = [json.loads(line) for line in (simulated.parent / "scores" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and {p["source"] for p in pairs} <= {"vote", "scores"}
    prompts = {e.path: e.prompt for e in list_images(simulated)}
    rel = lambda p: str(p).removeprefix(str(simulated.resolve()) + "/")  # noqa: E731
    right = 0
    for p in pairs:
        assert prompts[rel(p["chosen"])] == prompts[rel(p["rejected"])] == p["prompt"]
        right += quality[rel(p["chosen"])] > quality[rel(p["rejected"])]
    assert right / len(pairs) > 0.85
    labels = [json.loads(line) for line in (simulated.parent / "scores" / "aesthetic.jsonl").read_text().splitlines()]
    assert {row["file_name"] for row in labels} == set(quality) and all(1 <= row["level"] <= 10 for row in labels)


def test_scores_refuse_to_overwrite(simulated, capsys):
    code, _, err = run_cli(["rank", "scores", str(simulated / "annotations.sqlite"), "--out",
                            str(simulated.parent / "scores")], capsys)
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize("target", ["levels", "pairs"])
def test_aesthetic_scorer_ranks_held_out_images_by_hidden_quality(simulated, tmp_path, capsys, target):
    source = (["--labels", str(simulated.parent / "scores" / "aesthetic.jsonl")] if target == "levels"
              else ["--db", str(simulated / "annotations.sqlite")])
    model = tmp_path / "aes.safetensors"
    code, out, err = run_cli(["aes", "train", str(simulated), *source, "--out", str(model), "--epochs", "300"],
                             capsys)
    assert code == 0, err
    plot = tmp_path / "scatter.png"
    code, out, err = run_cli(["aes", "eval", str(simulated), "--model", str(model), "--key", "quality",
                              "--plot", str(plot)], capsys)
    assert code == 0, err
    assert "24 images (the images held out of training)" in out and "after the 4-parameter logistic" in out
    srcc = float(out.split("SRCC ")[1].split()[0])
    plcc = float(out.split("PLCC ")[1].split()[0])
    assert srcc > 0.8 and plcc > 0.8, out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(["aes", "score", str(simulated), "--model", str(model)], capsys)
    scored = [line.split(None, 1) for line in out.splitlines()]
    assert len(scored) == 120 and [float(s) for s, _ in scored] == sorted((float(s) for s, _ in scored), reverse=True)


def test_the_aesthetic_head_is_its_seed_alone():
    """Same seed, whatever the caller's RNG did before: the same head; another seed: another head."""
    import torch

    from ernie_lora.eval.aesthetic import train_scorer

    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, 6)).astype(np.float32)
    names = [f"img{i}.png" for i in range(20)]
    targets = {n: float(features[i, 0]) for i, n in enumerate(names)}

    def head(seed, noise):
        torch.manual_seed(noise)  # the caller's global RNG state
        state = train_scorer(features, names, targets=targets, epochs=3, seed=seed).head.state_dict()
        return torch.cat([v.flatten() for v in state.values()])

    assert torch.equal(head(1, noise=5), head(1, noise=6))
    assert not torch.allclose(head(1, noise=5), head(2, noise=5))
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    train_scorer(features, names, targets=targets, epochs=3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left as it was


def test_agreement_uses_the_logistic_fit_and_rank_statistics():
    from ernie_lora.eval.aesthetic import agreement

    x = np.linspace(-3, 3, 40)
    y = 1 / (1 + np.exp(-2 * x))  # monotone, not linear: SRCC 1, linear PLCC < 1, fitted PLCC ~1
    result = agreement(x, y)
    assert result.srcc == pytest.approx(1.0) and result.krcc == pytest.approx(1.0)
    assert result.fitted is not None and result.plcc > 0.999
    assert np.corrcoef(x, y)[0, 1] < 0.97


def test_hf_encoder_loads_a_local_clip(tmp_path):
    """The pluggable path, on a tiny random CLIP saved locally (no download)."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ernie_lora.eval.aesthetic import Encoder

    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 99},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    feats = Encoder(f"hf:{tmp_path / 'clip'}")([Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40))])
    assert feats.shape == (2, 16) and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="cannot load"):
        Encoder(f"hf:{tmp_path / 'missing'}")


def test_category_weights_are_count_times_mean_aesthetic(tmp_path):
    from ernie_lora.data.sampling import category_stats, sample_weights

    entries = ([ImageEntry(f"a{i}.png", "", "Design/Poster") for i in range(6)]
               + [ImageEntry(f"b{i}.png", "", "Design/UI") for i in range(2)]
               + [ImageEntry(f"c{i}.png", "", "Photo") for i in range(4)])
    aes = {**{f"a{i}.png": 2.0 for i in range(6)}, **{f"b{i}.png": 9.0 for i in range(2)},
           **{f"c{i}.png": 6.0 for i in range(4)}}
    stats = {s.name: s for s in category_stats(entries, aes)}
    assert stats["Design/Poster"].weight == pytest.approx(12 / 54) and stats["Photo"].weight == pytest.approx(24 / 54)
    flat = {s.name: s.weight for s in category_stats(entries, aes, temperature=1e6)}
    assert all(w == pytest.approx(1 / 3, abs=1e-4) for w in flat.values())  # T -> inf: uniform over categories
    top = {s.name: s for s in category_stats(entries, aes, depth=1)}
    assert set(top) == {"Design", "Photo"} and top["Design"].images == 8
    weights = sample_weights(entries, aes)
    assert sum(weights) == pytest.approx(1.0) and weights[0] == pytest.approx(12 / 54 / 6)
    with pytest.raises(UserError, match="temperature"):
        category_stats(entries, aes, temperature=0)


def test_dataset_stats_prints_the_table_and_writes_the_chart(simulated, tmp_path, capsys):
    chart, sheet = tmp_path / "stats.png", ["--sheet", str(tmp_path / "sheet.png")]
    code, out, err = run_cli(["dataset", "stats", str(simulated), "--aesthetic",
                              str(simulated.parent / "scores" / "aesthetic.jsonl"), "--chart", str(chart), *sheet],
                             capsys)
    assert code == 0, err
    assert "Graphic Design/Poster" in out and "mean aes" in out and chart.read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_cli(["dataset", "stats", str(simulated), "--depth", "1", "--chart", str(chart), *sheet], capsys)
    assert "Graphic Design " in out and "Graphic Design/Poster" not in out


def test_training_draws_categories_by_weight(poster_dataset, tmp_path):
    """Hierarchical sampling in the LoRA recipe: the epoch's draws follow the category weights."""
    from collections import Counter
    from pathlib import Path

    from conftest import tiny_config
    from ernie_lora.data.batches import BucketBatches
    from ernie_lora.data.buckets import Bucket
    from ernie_lora.data.cache import CachedSample
    from ernie_lora.data.sampling import sampling_weights
    from ernie_lora.recipes.lora import train

    images = sorted(poster_dataset.glob("*.png"))
    meta = [json.loads(line) for line in (poster_dataset / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(meta):  # two categories: 2 images rated 9, 4 images rated 1
        row["category"] = "good" if i < 2 else "plain"
    (poster_dataset / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    labels = tmp_path / "aesthetic.jsonl"
    labels.write_text("".join(json.dumps({"file_name": r["file_name"], "score": 0.0, "level": 9 if i < 2 else 1})
                              + "\n" for i, r in enumerate(meta)))
    cfg = tiny_config(poster_dataset, tmp_path / "cache", data={"sampling": {"by": "category",
                                                                             "aesthetic": str(labels)}})
    bucket = Bucket(32, 32)
    samples = [CachedSample(Path("x"), [Path("t")], bucket, "", img) for img in images]
    weights = sampling_weights("category", poster_dataset, images, str(labels), 1.0, None)
    good = {poster_dataset / r["file_name"] for r in meta[:2]}
    assert sum(w for w, s in zip(weights, samples, strict=True) if s.image in good) == pytest.approx(18 / 22)
    batches = BucketBatches(samples, 1, seed=0, weights=weights)
    drawn = Counter(batches.next()[0].image in good for _ in range(600))
    assert drawn[True] / 600 == pytest.approx(18 / 22, abs=0.05)

    result = train(cfg, tmp_path / "run", progress=False)  # the recipe runs with it, end to end
    assert (result.output / "lora.safetensors").exists()
