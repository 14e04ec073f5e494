"""caption auto --model: a vision-language model's description merged into the layout caption.

The model is a tiny randomly initialised SmolVLM (Idefics3ForConditionalGeneration, the class of
HuggingFaceTB/SmolVLM-256M-Instruct) with a byte tokenizer and a chat template, built in conftest: nothing is
downloaded. Its output is noise, so what it says is checked through the merge with scripted descriptions.
"""

from PIL import Image

from conftest import run_cli
from ernie_lora.captions.schema import CaptionSchema, Element, render
from ernie_lora.captions.vlm import CaptionModel, merge_description, subject_of


def _poster(folder, name="jazz"):
    from ernie_lora.data.designed import DesignedPoster, draw_poster

    poster = DesignedPoster("white", "left", "red", "blue", "Jazz Night", "every Friday")
    draw_poster(poster).save(folder / f"{name}.png")


def test_the_tiny_model_loads_and_describes_an_image_the_same_way_twice(tiny_smolvlm):
    model = CaptionModel(str(tiny_smolvlm), max_new_tokens=12)
    image = Image.new("RGB", (120, 80), "red")
    first = model.describe(image)
    assert isinstance(first, str) and first == model.describe(image)  # greedy: reruns agree
    assert subject_of(first) is None  # an untrained model's bytes are no subject


def test_caption_auto_with_a_model_keeps_the_ocr_text_and_adds_what_the_model_sees(tiny_smolvlm, tmp_path, capsys,
                                                                                   monkeypatch):
    _poster(tmp_path)
    code, out, err = run_cli(["caption", "auto", str(tmp_path), "--model", str(tiny_smolvlm)], capsys)
    assert code == 0, err
    caption = (tmp_path / "jazz.txt").read_text()
    assert '"Jazz Night"' in caption and "red band at the left" in caption  # noise from the model adds nothing
    said = ('The image shows a saxophone player under a spotlight. It is a poster with the title "JAZZ NlGHT" at '
            'the top, a red band at the left, a yellow image area at the bottom and a black background.')
    monkeypatch.setattr(CaptionModel, "describe", lambda self, image: said)
    code, out, err = run_cli(["caption", "auto", str(tmp_path), "--model", str(tiny_smolvlm), "--overwrite"], capsys)
    assert code == 0, err
    caption = (tmp_path / "jazz.txt").read_text().strip()
    assert '"Jazz Night"' in caption and "NlGHT" not in caption  # OCR wins for quoted text
    assert "image area at the bottom" in caption  # a shape the analysis did not report
    assert caption.count(" band") == 1  # the band the analysis found is not repeated
    assert "white background" in caption and "black background" not in caption  # the analysis wins
    assert caption.endswith("showing a saxophone player under a spotlight")


def test_merge_rules():
    ocr = CaptionSchema(kind="other", elements=[Element("title", text="SALE", position="top")], background="white")
    said = ('A woman holding shopping bags. A poster with the title "SALF" at the top, a green band at the bottom, '
            'two panels, blue theme and a black background.')
    merged = merge_description(ocr, said)
    assert merged.kind == "poster"  # "other" is filled from the model
    assert [e.text for e in merged.elements if e.text] == ["SALE"]
    assert any(e.role == "band" and e.colour == "green" and e.position == "bottom" for e in merged.elements)
    assert (merged.theme, merged.background, merged.panels) == ("blue", "white", 2)
    assert merged.subject == "a woman holding shopping bags"
    assert ocr.elements == [Element("title", text="SALE", position="top")]  # the input is not changed
    assert merge_description(CaptionSchema(kind="ui"), said, kind_given=True).kind == "ui"
    # where the OCR read nothing (stylised lettering), the model's quoted text is all there is
    assert [e.text for e in merge_description(CaptionSchema(kind="poster"), said).elements if e.text] == ["SALF"]
    caption = render(merged)
    assert caption.endswith(", showing a woman holding shopping bags")
    assert render(merged, "instruction").endswith("Show a woman holding shopping bags.")


def test_a_model_that_cannot_load_is_one_line_naming_it(tmp_path, capsys):
    _poster(tmp_path)
    code, _, err = run_cli(["caption", "auto", str(tmp_path), "--model", str(tmp_path / "no-such-model")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --model ") and "no-such-model" in lines[0]
    assert not (tmp_path / "jazz.txt").exists()
