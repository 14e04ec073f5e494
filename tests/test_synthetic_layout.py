import json
import random
import statistics

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import run_cli
from ernie_lora.data import check_dataset
from ernie_lora.data.synthetic import (
    COLOURS,
    HELD_OUT,
    KINDS,
    Layout,
    caption,
    parse_caption,
    pretraining_colours,
    render,
    sample_layout,
    write_synthetic_dataset,
)
from ernie_lora.errors import UserError
from ernie_lora.eval.layout import score_image


def _world(n: int, seed: int, kind=None):
    rng = random.Random(seed)
    layouts = [sample_layout(rng, kind, tuple(COLOURS)) for _ in range(n)]
    return layouts, [render(layout, seed=i) for i, layout in enumerate(layouts)]


def test_generators_are_deterministic_by_seed_and_captions_round_trip():
    a = [sample_layout(random.Random(3)) for _ in range(5)]
    b = [sample_layout(random.Random(3)) for _ in range(5)]
    assert a == b
    for layout in a:
        assert np.array_equal(np.asarray(render(layout, seed=1)), np.asarray(render(layout, seed=1)))
    layouts, _ = _world(200, 0)
    for layout in layouts:
        assert parse_caption(caption(layout)) == layout
    assert {layout.kind for layout in layouts} == set(KINDS)
    assert parse_caption("a girl smiling") is None


def test_held_out_concepts_never_appear_in_pretraining_layouts():
    rng = random.Random(0)
    themes = {sample_layout(rng).theme for _ in range(2000)}
    assert themes == set(pretraining_colours())
    assert not themes & set(HELD_OUT["colours"])


def test_fidelity_validation_ground_truth_and_shuffled_captions():
    layouts, images = _world(240, 11)
    captions = [caption(layout) for layout in layouts]
    truth = [score_image(im, c).score for im, c in zip(images, captions, strict=True)]
    shuffled = captions[:]
    random.Random(1).shuffle(shuffled)
    wrong = [score_image(im, c).score for im, c in zip(images, shuffled, strict=True)]
    assert statistics.median(truth) >= 0.95
    assert statistics.median(wrong) <= 0.4


@pytest.mark.parametrize("kind", KINDS)
def test_fidelity_per_genre_is_robust_to_blur_and_fails_wrong_layouts(kind):
    layouts, images = _world(40, 21, kind)
    captions = [caption(layout) for layout in layouts]
    blurred = [score_image(im.filter(ImageFilter.GaussianBlur(1)), c).score
               for im, c in zip(images, captions, strict=True)]
    assert statistics.median(blurred) >= 0.95  # generated images are soft; the checks must not need crisp edges
    rotated = captions[1:] + captions[:1]  # same genre, other layout
    wrong = [score_image(im, c).score for im, c in zip(images, rotated, strict=True) if c != captions[0]]
    assert statistics.median(wrong) <= 0.4


def test_each_check_reacts_to_its_own_attribute():
    poster = Layout("poster", "blue", "SALE", band="top", subtitle=True)
    image = render(poster)
    assert score_image(image, caption(poster)).score == 1.0
    moved = score_image(image, caption(Layout("poster", "blue", "SALE", band="bottom", subtitle=True)))
    assert moved.checks["band position"] == 0.0 and moved.checks["colour"] == 1.0
    no_sub = score_image(image, caption(Layout("poster", "blue", "SALE", band="top", subtitle=False)))
    assert no_sub.checks["subtitle"] == 0.0 and no_sub.checks["band position"] == 1.0
    comic = Layout("comic", "red", panels=3, arrangement="in a row")
    three = render(comic)
    assert score_image(three, caption(Layout("comic", "red", panels=2, arrangement="side by side"))).checks[
        "panel count"] == 0.0
    stacked = score_image(three, caption(Layout("comic", "red", panels=3, arrangement="stacked")))
    assert stacked.checks["panel count"] == 1.0 and stacked.checks["arrangement"] == 0.0
    blank = Image.new("RGB", (64, 64), (240, 240, 240))
    assert score_image(blank, caption(poster)).score <= 0.25


def test_synth_writes_a_ready_training_folder(tmp_path, capsys):
    out = tmp_path / "posters"
    code, stdout, _ = run_cli(["dataset", "synth", "poster", "--count", "12", "--out", str(out),
                               "--colours", "purple", "--seed", "4"], capsys)
    assert code == 0 and "wrote 12 images" in stdout
    report = check_dataset(out, min_side=64)
    assert len(report.items) == 12 and not report.errors
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert all(row["layout"]["theme"] == "purple" and row["layout"]["kind"] == "poster" for row in rows)
    assert all(Layout.from_dict(row["layout"]) == parse_caption(row["text"]) for row in rows)
    # writing again over the images is refused; nothing is lost
    code, _, err = run_cli(["dataset", "synth", "poster", "--count", "3", "--out", str(out)], capsys)
    assert code == 2 and "already holds images" in err
    assert len(list(out.glob("*.png"))) == 12
    with pytest.raises(UserError, match="kind 'poem'"):
        write_synthetic_dataset(tmp_path / "x", 2, "poem")
    with pytest.raises(UserError, match="colour 'mauve'"):
        write_synthetic_dataset(tmp_path / "y", 2, "poster", colours=("mauve",))


def test_eval_layout_cli_scores_a_folder(tmp_path, capsys):
    out = tmp_path / "mixed"
    write_synthetic_dataset(out, 8, None, seed=2)
    code, stdout, _ = run_cli(["eval", "layout", str(out)], capsys)
    assert code == 0
    assert "8 scored: median 1.000, mean 1.000" in stdout
    (out / "stray.png").write_bytes((out / "poster_00000.png").read_bytes() if (out / "poster_00000.png").exists()
                                    else next(out.glob("*.png")).read_bytes())
    code, stdout, _ = run_cli(["eval", "layout", str(out)], capsys)
    assert "stray.png" in stdout and "(no prompt)" in stdout
