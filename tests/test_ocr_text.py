"""OCR-based parts of the layout language: text-rendering score, auto-captions, lint; and the expander."""

import random
import shutil
import statistics

import pytest
from PIL import Image

from conftest import run_cli
from ernie_lora.captions.expand import expand_prompt
from ernie_lora.captions.schema import parse
from ernie_lora.data.synthetic import POSTER_TEXTS, font_path, text_poster
from ernie_lora.eval.text import quoted_text, score_image_text, text_recall

ENGLISH, SUBTITLES = (list(t) for t in POSTER_TEXTS["latin"])
CHINESE, CHINESE_SUB = (list(t) for t in POSTER_TEXTS["cjk"])
needs_latin = pytest.mark.skipif(font_path("latin") is None, reason="fonts-dejavu-core missing (make setup)")
needs_cjk = pytest.mark.skipif(font_path("cjk") is None, reason="fonts-wqy-zenhei missing (make setup)")


def test_recall_rule():
    assert quoted_text('title "SUMMER SALE", subtitle “50% off”') == ["SUMMER SALE", "50% off"]
    assert text_recall(["SUMMER SALE"], "summer sale") == 1.0
    assert text_recall(["SALE SALE SALE"], "sale") == pytest.approx(1 / 3)  # a multiset, not a set
    assert text_recall(["SUMMER SALE"], "SUMMERSALE") == 1.0  # OCR dropped the space
    assert text_recall(["SUMMER SALE"], "WINTER SALE") == 0.5
    assert text_recall(["夏季促销"], "夏季") == 0.5  # Chinese counts characters
    assert text_recall([], "anything") is None


@needs_latin
@needs_cjk
def test_text_score_separates_right_from_wrong_text():
    rng = random.Random(0)
    right, wrong = [], []
    for i in range(12):
        cjk = i % 3 == 2
        titles, subs = (CHINESE, CHINESE_SUB) if cjk else (ENGLISH, SUBTITLES)
        title, sub = rng.choice(titles), rng.choice(subs)
        image = text_poster(title, sub, rng.choice(["top", "middle", "bottom"]), script="cjk" if cjk else "latin")
        other_title = rng.choice([t for t in titles if t != title])
        other_sub = rng.choice([s for s in subs if s != sub])
        right.append(score_image_text(image, f'a poster with title "{title}", subtitle "{sub}"'))
        wrong.append(score_image_text(image, f'a poster with title "{other_title}", subtitle "{other_sub}"'))
    assert statistics.median(right) >= 0.95, right
    assert statistics.median(wrong) <= 0.2, wrong


@needs_latin
def test_auto_caption_recovers_title_text_and_position(tmp_path, capsys):
    rng = random.Random(1)
    truth = {}
    for i in range(12):
        title, band = rng.choice(ENGLISH), rng.choice(["top", "middle", "bottom"])
        text_poster(title, rng.choice(SUBTITLES + [None]), band).save(tmp_path / f"p{i:02d}.png")
        truth[f"p{i:02d}"] = (title, {"top": "top", "middle": "center", "bottom": "bottom"}[band])
    (tmp_path / "p00.txt").write_text("my own caption\n")
    Image.new("RGB", (256, 256), (120, 160, 200)).save(tmp_path / "blank.png")
    code, out, _ = run_cli(["caption", "auto", str(tmp_path), "--kind", "poster"], capsys)
    assert code == 0 and "13 images, 11 captions written" in out
    assert "blank.png: no text or layout found; no caption written" in out and not (tmp_path / "blank.txt").exists()
    assert (tmp_path / "p00.txt").read_text() == "my own caption\n"  # never replaced without --overwrite
    own = tmp_path / "own"  # the user's caption, on its own: OCR runs once per image a call looks at
    own.mkdir()
    shutil.copy(tmp_path / "p00.png", own / "p00.png")
    shutil.copy(tmp_path / "p00.txt", own / "p00.txt")
    code, out, _ = run_cli(["caption", "auto", str(own), "--kind", "poster", "--dry-run", "--overwrite"], capsys)
    assert "-my own caption" in out and "+a poster with title" in out and "(dry run)" in out
    assert (own / "p00.txt").read_text() == "my own caption\n"
    run_cli(["caption", "auto", str(own), "--kind", "poster", "--overwrite"], capsys)
    recovered = 0
    for stem, (title, position) in truth.items():
        schema = parse(((own if stem == "p00" else tmp_path) / f"{stem}.txt").read_text())
        found = [e for e in schema.elements if e.role == "title"]
        recovered += bool(found and found[0].text.replace(" ", "") == title.replace(" ", "")
                          and found[0].position == position)
    assert recovered / len(truth) >= 0.75, recovered  # measured 10/12 and 11/12 on these seeds


@needs_latin
def test_lint_finds_each_planted_defect(tmp_path, capsys):
    text_poster("JAZZ NIGHT", "all welcome").save(tmp_path / "texty.png")
    (tmp_path / "texty.txt").write_text("a poster with a band at the top and a subtitle, blue title")
    Image.new("RGB", (64, 64), (200, 200, 200)).save(tmp_path / "plain.png")
    (tmp_path / "plain.txt").write_text('a poster with title "X" at the top, centered layout')  # clean
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "trigger.png")
    (tmp_path / "trigger.txt").write_text("ohwx style")
    Image.new("RGB", (64, 64), (10, 10, 200)).save(tmp_path / "nolayout.png")
    (tmp_path / "nolayout.txt").write_text('a poster with title "X" in blue')
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "nohier.png")
    (tmp_path / "nohier.txt").write_text('a poster with "X" at the top')
    Image.new("RGB", (64, 64), (20, 20, 20)).save(tmp_path / "long.png")
    (tmp_path / "long.txt").write_text('a poster with title "X" at the top, ' + "blue theme, " * 12)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 title at the top".encode("latin-1"))
    code, out, _ = run_cli(["caption", "lint", str(tmp_path), "--model", "micro", "--max-tokens", "30",
                            "--strict"], capsys)
    assert code == 1
    flagged: dict[str, str] = {}
    for line in out.splitlines():
        if ".txt:" in line:
            name = line.split(":")[0]
            flagged[name] = flagged.get(name, "") + line
    assert "no quoted text" in flagged["texty.txt"]
    assert "trigger word only" in flagged["trigger.txt"]
    assert "no layout words" in flagged["nolayout.txt"]
    assert "no hierarchy" in flagged["nohier.txt"]
    assert "too many tokens" in flagged["long.txt"]
    assert "not UTF-8" in flagged["latin1.txt"]
    assert "plain.txt" not in flagged
    assert "6 of 7 captions flagged" in out
    code, _, _ = run_cli(["caption", "lint", str(tmp_path / "nowhere")], capsys)
    assert code == 2


def test_rule_based_expander():
    assert expand_prompt('poster "SUMMER SALE" "50% off" blue') == (
        'a poster with large bold title "SUMMER SALE" at the top, subtitle "50% off" in the center, '
        "centered layout, blue theme")
    jazz = expand_prompt('poster "JAZZ" bottom purple')
    assert jazz.startswith('a poster with large bold title "JAZZ" at the bottom') and jazz.endswith("purple theme")
    structured = 'a poster with title "X" at the top, blue theme'
    assert expand_prompt(structured) == structured
    assert "about cat" in expand_prompt("a comic with 3 panels about a cat, yellow")  # nothing dropped


@needs_latin
def test_eval_text_cli(tmp_path, capsys):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", 'a poster with title "BOOK FAIR"')
    text_poster("BOOK FAIR").save(tmp_path / "a.png", pnginfo=info)
    info = PngInfo()
    info.add_text("prompt", 'a poster with title "NIGHT RUN"')
    text_poster("BOOK FAIR").save(tmp_path / "b.png", pnginfo=info)
    code, out, _ = run_cli(["eval", "text", str(tmp_path)], capsys)
    assert code == 0 and "a.png" in out and "1.000" in out and "0.000" in out
    assert "2 scored: median 0.500" in out
