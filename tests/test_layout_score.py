"""What the layout score means: the sanity table per genre, and structure, colour and text kept apart."""

import statistics

import pytest
from PIL import Image

from ernie_lora.data.synthetic import KINDS, Layout, caption, render
from ernie_lora.eval.layout import SANITY_CASES, sanity_table, score_image

# the headline's median per case and genre must stay within these (the table)
AT_LEAST = {"truth": 1.0, "blur 2": 0.8, "noise 40": 0.8}
AT_MOST = {"blank": 0.1, "white": 0.1, "noise": 0.1, "solid colour": 0.1, "right colour, wrong layout": 0.3,
           "right layout, wrong colour": 0.1}


@pytest.fixture(scope="module")
def table():
    return sanity_table(per_kind=16, seed=3)


@pytest.mark.parametrize("kind", KINDS)
def test_sanity_table_holds_for_every_genre(table, kind):
    assert set(AT_LEAST) | set(AT_MOST) == set(SANITY_CASES)
    for case, floor in AT_LEAST.items():
        median = statistics.median(s.score for s in table[kind][case])
        assert median >= floor, (kind, case, median)
    for case, ceiling in AT_MOST.items():
        median = statistics.median(s.score for s in table[kind][case])
        assert median <= ceiling, (kind, case, median)


@pytest.mark.parametrize("kind", KINDS)
def test_structure_and_colour_are_apart(table, kind):
    """The right layout in a wrong colour keeps its structure; a solid theme colour has colour, no structure."""
    wrong_colour = table[kind]["right layout, wrong colour"]
    assert statistics.median(s.structure for s in wrong_colour) >= 0.9
    assert max(s.colour for s in wrong_colour) == 0.0
    solid = table[kind]["solid colour"]
    assert max(s.structure for s in solid) <= 0.1 and min(s.colour for s in solid) == 1.0


def test_a_side_band_is_not_a_top_band():
    """The held-out structure: a vertical band scores 0 against a horizontal caption and vice versa."""
    side = render(Layout("poster", "red", "SALE", band="left"))
    top = render(Layout("poster", "red", "SALE", band="top"))
    left_caption = caption(Layout("poster", "red", "SALE", band="left"))
    top_caption = caption(Layout("poster", "red", "SALE", band="top"))
    assert score_image(side, left_caption).score == 1.0 and score_image(top, top_caption).score == 1.0
    assert score_image(side, top_caption).structure == 0.0 and score_image(top, left_caption).structure == 0.0


def test_text_is_read_when_asked():
    pytest.importorskip("rapidocr_onnxruntime")
    layout = Layout("ui", "blue", "MENU", lines=3, button="right")
    right = score_image(render(layout), caption(layout), text=True)
    other = render(Layout("ui", "blue", "JAZZ", lines=3, button="right"))
    wrong = score_image(other, caption(layout), text=True)
    assert right.text == 1.0 and right.score == 1.0
    assert wrong.structure == 1.0 and wrong.text == 0.0 and wrong.score == 0.0
    assert score_image(render(layout), caption(layout)).text is None  # not read unless asked


def test_non_layout_captions_and_tiny_images():
    assert score_image(Image.new("RGB", (64, 64)), "a photo of a cat") is None
    layout = Layout("comic", "teal", panels=2, arrangement="stacked", bubble=2)
    big = render(layout, size=256)  # any size is scored at 64 px
    assert score_image(big, caption(layout)).score == 1.0
