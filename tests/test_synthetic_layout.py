import json
import random

import numpy as np
import pytest

from conftest import run_cli
from ernie_lora.data import check_dataset
from ernie_lora.data.synthetic import (
    BANDS,
    COLOURS,
    HELD_OUT,
    KINDS,
    SPLITS,
    Layout,
    all_layouts,
    bubble_box,
    caption,
    panel_boxes,
    parse_caption,
    pretraining_colours,
    render,
    sample_layout,
    seen_bands,
    split_captions,
    split_of,
    ui_button_box,
    write_synthetic_dataset,
)
from ernie_lora.errors import UserError


def _world(n: int, seed: int, kind=None):
    rng = random.Random(seed)
    layouts = [sample_layout(rng, kind, tuple(COLOURS), bands=BANDS) for _ in range(n)]
    return layouts, [render(layout, seed=i) for i, layout in enumerate(layouts)]


def test_generators_are_deterministic_by_seed_and_captions_round_trip():
    a = [sample_layout(random.Random(3)) for _ in range(5)]
    b = [sample_layout(random.Random(3)) for _ in range(5)]
    assert a == b
    for layout in a:
        assert np.array_equal(np.asarray(render(layout, seed=1)), np.asarray(render(layout, seed=1)))
    layouts, _ = _world(300, 0)
    for layout in layouts:
        assert parse_caption(caption(layout)) == layout
    assert {layout.kind for layout in layouts} == set(KINDS)
    assert {layout.band for layout in layouts if layout.kind == "poster"} == set(BANDS)
    assert {layout.button for layout in layouts if layout.kind == "ui"} == {"left", "center", "right"}
    assert {layout.bubble > 0 for layout in layouts if layout.kind == "comic"} == {True, False}
    assert parse_caption("a girl smiling") is None


def test_held_out_concepts_never_appear_in_pretraining_layouts():
    rng = random.Random(0)
    layouts = [sample_layout(rng) for _ in range(2000)]
    assert {layout.theme for layout in layouts} == set(pretraining_colours())
    assert {layout.band for layout in layouts if layout.kind == "poster"} == set(seen_bands())
    assert not {layout.band for layout in layouts} & set(HELD_OUT["bands"])


def test_splits_are_disjoint_stable_and_sized():
    rng = random.Random(1)
    for split in SPLITS:
        drawn = [caption(sample_layout(rng, split=split)) for _ in range(200)]
        assert {split_of(text) for text in drawn} == {split}
    every = [caption(layout) for kind in KINDS for layout in all_layouts(kind, tuple(COLOURS))]
    shares = {split: sum(split_of(text) == split for text in every) / len(every) for split in SPLITS}
    assert all(0.12 < shares[split] < 0.28 for split in ("train", "validation", "test")) and shares["pretrain"] > 0.32
    assert split_of(every[0]) == split_of(every[0].strip())  # a property of the caption text alone


def test_evaluation_prompts_are_held_out_of_training_and_pairs(tmp_path):
    from ernie_lora.config import DistillRunConfig
    from ernie_lora.eval.prompts import require_held_out
    from ernie_lora.recipes.distill import distill_prompts

    test = split_captions(30, "test", "comic", seed=3)
    assert len(set(test)) == len(test) == 19  # the comic space holds 19 test captions of seen colours
    assert {split_of(t) for t in test} == {"test"}
    trained = distill_prompts(DistillRunConfig.model_validate({"data": {"synthetic_prompts": 40}}))
    assert len(trained) == 40 and {split_of(t) for t in trained} == {"train"}
    assert require_held_out(test, trained, "eval") == 0
    with pytest.raises(UserError, match=r"eval: 1 evaluation prompts were also training prompts, e.g. 'a comic"):
        require_held_out(test, trained + [test[4]], "eval")


def test_element_boxes_are_what_the_renderer_draws():
    """The scorer checks the boxes the renderer draws: every element box holds its element's colour."""
    ui = Layout("ui", "red", "MENU", lines=4, button="right")
    pixels = np.asarray(render(ui))
    x0, y0, x1, y1 = ui_button_box("right")
    assert (pixels[y0 + 2:y1 - 1, x0 + 2:x1 - 1] == pixels[y0 + 4, x0 + 4]).all()
    comic = Layout("comic", "blue", panels=3, arrangement="in a row", bubble=2)
    pixels = np.asarray(render(comic))
    panels = panel_boxes(3, "in a row")
    bx0, by0, bx1, by1 = bubble_box(panels[1])
    assert pixels[by0, (bx0 + bx1) // 2].max() < 100  # the bubble's ring
    assert not (pixels[panels[0][1] + 8, panels[0][0] + 5:panels[0][2] - 4] < 100).any()  # no bubble in panel 1


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
    assert "8 scored: median score 1.000; means: score 1.000, structure 1.000, colour 1.000" in stdout
    # a wrong prompt for an image: its row names the failed checks
    first = sorted(out.glob("*.txt"))[0]
    wrong = "a comic page with four panels in a 2x2 grid, black borders, red theme"
    if first.read_text().startswith("a comic"):
        wrong = 'a UI card with header "MENU" at the top, two text lines, a button at the bottom left, red theme'
    first.write_text(wrong + "\n")
    code, stdout, _ = run_cli(["eval", "layout", str(out)], capsys)
    row = next(line for line in stdout.splitlines() if line.startswith(first.with_suffix(".png").name))
    assert " 0.000 " in row and "; failed: main" in row
    (out / "stray.png").write_bytes((out / "poster_00000.png").read_bytes() if (out / "poster_00000.png").exists()
                                    else next(out.glob("*.png")).read_bytes())
    code, stdout, _ = run_cli(["eval", "layout", str(out)], capsys)
    assert "stray.png" in stdout and "(no prompt)" in stdout
