"""Layout analysis (captions.analysis), full auto-captions and lint --images, on images built here."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from ernie_lora.captions.analysis import analyse
from ernie_lora.captions.auto import auto_caption_image, describe
from ernie_lora.captions.lint import IMAGE_CHECKS, lint_folder
from ernie_lora.captions.ocr import read_text, space_words
from ernie_lora.captions.schema import CaptionSchema, Element, parse, render
from ernie_lora.data.designed import DesignedPoster, draw_poster
from ernie_lora.data.synthetic import COLOURS, Layout
from ernie_lora.data.synthetic import render as render_layout


def test_a_side_band_an_accent_bar_and_the_background_are_found_with_their_colours():
    image = Image.new("RGB", (400, 300), (246, 244, 238))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 79, 299), fill=COLOURS["purple"])  # a band along the left edge
    draw.rectangle((150, 250, 300, 259), fill=COLOURS["orange"])  # a thin bar near the bottom
    draw.rectangle((250, 40, 349, 139), fill=COLOURS["teal"])  # a block at the top right
    analysis = analyse(image)
    assert analysis.background == "white"
    found = {(r.kind, r.colour, r.position) for r in analysis.regions}
    assert found == {("band", "purple", "left"), ("bar", "orange", "bottom"), ("block", "teal", "top-right")}
    assert analysis.largest(2) == ["white", "purple"] and not analysis.panels
    assert [name for name, _ in analysis.palette][:2] == ["white", "purple"]
    schema = describe(analysis, [])
    assert schema.kind == "poster" and schema.theme == "purple" and schema.background == "white"
    assert parse(render(schema)).background == "white"


def test_panels_are_areas_enclosed_by_dark_lines_and_a_nested_one_is_a_speech_bubble():
    image = render_layout(Layout("comic", "red", panels=4, arrangement="in a 2x2 grid", bubble=2), size=256)
    analysis = analyse(image)
    assert len(analysis.panels) == 4 and analysis.panel_grid == (2, 2)
    assert [p.bubble for p in analysis.panels] == [False, True, False, False]
    schema = describe(analysis, [])
    assert (schema.kind, schema.panels, schema.layout) == ("comic", 4, "2x2 grid")
    assert [e.panel for e in schema.elements if e.role == "bubble"] == [2]
    assert not [e for e in schema.elements if e.role in ("block", "bar", "image")]  # drawings inside panels
    # a dark page is a background, not panel borders: its light shapes are not panels
    dark = Image.new("RGB", (200, 200), (20, 20, 24))
    ImageDraw.Draw(dark).rectangle((40, 40, 160, 160), fill=(240, 240, 240))
    assert analyse(dark).panels == [] and analyse(dark).background == "black"


def test_blocks_of_one_colour_and_size_make_a_grid_and_the_kind_follows_from_the_shapes():
    image = render_layout(Layout("infographic", "green", "DATA", grid=(2, 3)))
    schema = describe(analyse(image), [])
    assert schema.kind == "infographic"
    blocks = [e for e in schema.elements if e.role == "block"]
    assert [(b.colour, b.count, b.grid) for b in blocks] == [("green", 6, (2, 3))]
    assert "six green blocks in a 2x3 grid" in render(schema)
    ui = describe(analyse(render_layout(Layout("ui", "blue", "SHOP", lines=3, button="left"))), [])
    assert ui.kind == "ui" and ui.background == "light grey" and ui.theme == "blue"


def test_shapes_render_in_every_style_and_parse_back():
    schema = CaptionSchema("poster", [Element("title", "Jazz Night", "top"), Element("band", colour="purple",
                                                                                    position="left"),
                                      Element("bar", colour="orange", position="bottom"),
                                      Element("block", colour="teal", count=4, grid=(2, 2))],
                           theme="purple", background="white")
    natural = render(schema)
    assert natural == ('a poster with title "Jazz Night" at the top, a purple band at the left, an orange accent '
                       'bar at the bottom, four teal blocks in a 2x2 grid, white background, purple theme')
    instruction = render(schema, "instruction")  # shapes take their own article, not "the"
    assert "Place a purple band at the left." in instruction and "Place the a" not in instruction
    back = parse(natural)
    assert [(e.role, e.colour, e.position, e.count, e.grid) for e in back.elements[1:]] == [
        ("band", "purple", "left", None, None), ("bar", "orange", "bottom", None, None),
        ("block", "teal", None, 4, (2, 2))]
    assert (back.background, back.theme) == ("white", "purple")


def test_words_are_spaced_by_the_gaps_in_the_ink_and_cjk_is_left_as_is():
    letters = [(0, 8), (9, 17), (18, 26), (40, 48), (49, 57)]  # "abcde", a wide gap after "c"
    assert space_words("abcde", letters, [(28, 38)]) == "abc de"
    assert space_words("ab de", [(0, 8), (9, 17), (18, 30), (40, 48), (49, 57)], [(19, 38)]) == "ab de"
    assert space_words("春天大会", [(0, 20), (24, 44), (60, 80), (84, 104)], [(46, 58)]) == "春天大会"
    poster = draw_poster(DesignedPoster("white", "left", "purple", "orange", "Jazz Night Live",
                                        "classics every Tuesday"))
    texts = [box.text for box in read_text(poster)]
    assert texts == ["Jazz Night Live", "classics every Tuesday"]
    # 256 px: the subtitle is 11 px high, its spaces 4 px wide, its letters 1-2 px apart (the rule before
    # 2026-11-28, a quarter of the line height, read "hall everydayentry" and "onlineTuesdayevery")
    for poster in (DesignedPoster("white", "top", "orange", "red", "Jazz Summer Books", "hall every day entry", 256),
                   DesignedPoster("black", "right", "teal", "orange", "Sale Open Club", "online Tuesday every", 256)):
        assert [box.text for box in read_text(draw_poster(poster))] == [poster.title, poster.subtitle]


def test_auto_captions_name_the_band_colours_and_lint_images_flags_text_only_captions(tmp_path):
    posters = [DesignedPoster("white", "left", "purple", "orange", "Summer Market", "every Friday from nine"),
               DesignedPoster("black", "top", "teal", "pink", "Film Club", "free entry all day")]
    for number, poster in enumerate(posters):
        draw_poster(poster).save(tmp_path / f"p{number}.png")
        # what auto-captions said before: the text, joined words and all, and nothing else
        (tmp_path / f"p{number}.txt").write_text(f'a poster with title "{poster.title.replace(" ", "")}" at the top, '
                                                 f'subtitle "{poster.subtitle}"\n')
    findings, total = lint_folder(tmp_path, ocr=False, images=True)
    flagged = {(f.path.stem, f.check) for f in findings}
    assert total == 2 and {("p0", "colour not named"), ("p0", "band not named"), ("p0", "text misspelled"),
                           ("p1", "colour not named"), ("p1", "band not named"), ("p1", "text misspelled")} <= flagged
    detail = {f.detail for f in findings if f.path.stem == "p1" and f.check == "colour not named"}
    assert detail == {"the background is black", "the largest colour is teal"}
    for number, poster in enumerate(posters):
        caption, found = auto_caption_image(Image.open(tmp_path / f"p{number}.png"))
        said = parse(caption)
        assert found and [e.text for e in said.elements if e.role == "title"] == [poster.title]
        assert said.background == poster.background and said.theme == poster.band_colour
        assert [(e.colour, e.position) for e in said.elements if e.role == "band"] == [(poster.band_colour,
                                                                                       poster.band)]
        assert [e.colour for e in said.elements if e.role == "bar"] == [poster.accent_colour]
        (tmp_path / f"p{number}.txt").write_text(caption + "\n")
    findings, _ = lint_folder(tmp_path, ocr=False, images=True)
    assert findings == []


def test_lint_images_flags_a_wrong_panel_count_and_a_title_at_the_wrong_edge(tmp_path):
    render_layout(Layout("comic", "blue", panels=3, arrangement="stacked"), size=256).save(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("a comic page with two panels stacked, white background, blue theme\n")
    poster = DesignedPoster("white", "bottom", "red", "blue", "Garden Fair", "tickets online")
    draw_poster(poster).save(tmp_path / "p.png")
    (tmp_path / "p.txt").write_text('a poster with title "Garden Fair" at the bottom, subtitle "tickets online", '
                                    "a red band at the bottom, white background, red theme\n")
    findings, _ = lint_folder(tmp_path, ocr=False, images=True)
    assert {(f.path.stem, f.check, f.detail) for f in findings if f.check in IMAGE_CHECKS} == {
        ("c", "panel count wrong", "caption 2, image 3"),
        ("p", "position wrong", 'title "Garden Fair": caption bottom, image top')}


def test_the_synthetic_world_is_recovered_at_its_own_size():
    rng = random.Random(3)
    for kind in ("poster", "comic"):
        from ernie_lora.data.synthetic import sample_layout

        layout = sample_layout(rng, kind)
        said = parse(auto_caption_image(render_layout(layout, seed=1))[0])
        assert said.theme == layout.theme and (said.panels or 0) == layout.panels
        if layout.title:
            assert [e.text for e in said.elements if e.role == "title"] == [layout.title]


def test_lint_images_reads_an_images_text_once(tmp_path, monkeypatch):
    import ernie_lora.captions.auto as auto
    import ernie_lora.captions.lint as lint

    calls = []

    def counted(image, *args, **kwargs):
        calls.append(image.size)
        return read_text(image, *args, **kwargs)

    monkeypatch.setattr(lint, "read_text", counted)
    monkeypatch.setattr(auto, "read_text", counted)
    draw_poster(DesignedPoster("white", "left", "purple", "orange", "Summer Market", "every Friday")).save(
        tmp_path / "p.png")
    (tmp_path / "p.txt").write_text('a poster with title "Summer Market" at the top\n')
    findings, _ = lint_folder(tmp_path, ocr=True, images=True)
    assert calls == [(512, 512)]
    assert {f.check for f in findings} >= {"colour not named", "band not named"}
