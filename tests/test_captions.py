import random

import pytest
import torch

from conftest import tiny_config
from ernie_lora.captions import STYLES, CaptionSchema, Element, parse, render, restyle
from ernie_lora.captions.schema import content_words
from ernie_lora.data.cache import load_embedding
from ernie_lora.data.synthetic import caption, sample_layout
from ernie_lora.models import build_tiny_pipeline
from ernie_lora.recipes.lora import train

SCHEMAS = [
    CaptionSchema("poster", [Element("title", "AI Summit 2026", "top", size="large", weight="bold"),
                             Element("subtitle", "Beijing, May 2026", "center"),
                             Element("label", "FREE ENTRY", "bottom-right")], theme="blue", layout="centered"),
    CaptionSchema("comic", [Element("caption", "Meanwhile...", panel=1), Element("caption", "Boom!", panel=3)],
                  theme="yellow", panels=3, reading_order="left to right"),
    CaptionSchema("infographic", [Element("heading", "Q3 results", "top-left"), Element("body", "+12%", "center")],
                  layout="grid", colours=["green", "white"]),
    CaptionSchema("ui", [Element("button", "Sign up", "bottom")], theme="dark"),
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=[s.kind for s in SCHEMAS])
@pytest.mark.parametrize("style", STYLES)
def test_every_style_renders_the_same_schema_and_parses_back(schema, style):
    text = render(schema, style)
    back = parse(text)
    assert back.kind == schema.kind and back.elements == schema.elements
    assert (back.theme, back.layout, back.panels, back.reading_order) == (
        schema.theme, schema.layout, schema.panels, schema.reading_order)


def test_styles_read_as_users_write():
    schema = SCHEMAS[0]
    assert render(schema, "natural").startswith('a poster with large bold title "AI Summit 2026" at the top')
    assert render(schema, "keyword").startswith('poster, large bold title: "AI Summit 2026" at the top')
    assert render(schema, "instruction").startswith('Design a poster. Place the large bold title "AI Summit 2026"')


def test_parse_free_text_keeps_what_it_recognises():
    s = parse('A minimalist flyer, headline "OPEN DAY" at the top-left, tagline "all welcome", '
              'two-column layout, teal color scheme, read top to bottom')
    assert s.kind == "poster" and s.theme == "teal" and s.layout == "two-column"
    assert s.elements[0] == Element("title", "OPEN DAY", "top-left")
    assert s.elements[1] == Element("subtitle", "all welcome")
    assert s.reading_order == "top to bottom"
    assert parse("a girl smiling") == CaptionSchema()
    assert parse('a sign that says "HELLO"').elements == [Element("label", "HELLO")]
    with pytest.raises(ValueError, match="position 'upper'"):
        Element("title", "x", "upper")


def test_restyle_keeps_every_content_word():
    rng = random.Random(0)
    captions = [caption(sample_layout(rng)) for _ in range(40)] + [
        'a poster with title "AI Summit 2026", subtitle below, centered layout, blue theme', "a girl smiling",
        render(SCHEMAS[1])]
    for text in captions:
        assert restyle(text, "natural") == text
        for style in ("keyword", "instruction"):
            out = restyle(text, style)
            assert content_words(text) <= content_words(out), (text, out)
            assert out != text
    assert restyle('a poster with title "SALE", title band at the top, blue theme', "keyword") == \
        'poster, title "SALE", title band at top, blue theme'


def test_training_with_caption_styles_uses_each_styles_cached_embedding(poster_dataset, tmp_path):
    cfg = tiny_config(poster_dataset, tmp_path / "cache", data={"caption_styles": list(STYLES), "caption_dropout": 0})
    result = train(cfg, tmp_path / "run", progress=False)
    pipe = build_tiny_pipeline(0)
    sample = result.cache.samples[0]
    assert len(sample.texts) == 3 and len(set(sample.texts)) == 3
    for style, path in zip(STYLES, sample.texts, strict=True):
        expected = pipe.encode_prompt(restyle(sample.caption, style), device="cpu")[0]
        assert torch.equal(load_embedding(path).float(), expected)
    # three styles, three embeddings per caption, each encoded once: a second run encodes nothing
    again = train(cfg, tmp_path / "run2", progress=False)
    assert again.cache.encoded_texts == 0 and again.cache.encoded_latents == 0
    # and resume stays exact with the style draws
    train(cfg, tmp_path / "r3", stop_after=3, progress=False)
    train(cfg, tmp_path / "r3", resume=True, progress=False)
    from test_train import _same_lora

    assert _same_lora(tmp_path / "run" / "lora.safetensors", tmp_path / "r3" / "lora.safetensors")


def test_trigger_word_fills_the_placeholder_or_goes_first_once():
    from ernie_lora.captions.trigger import with_trigger

    assert with_trigger('a poster, title "SALE"', "ohwx") == 'ohwx, a poster, title "SALE"'
    assert with_trigger('a [Trigger] poster, title "SALE"', "ohwx") == 'a ohwx poster, title "SALE"'
    assert with_trigger('an OHWX poster', "ohwx") == "an OHWX poster"  # said already: not twice
    assert with_trigger("ohwxy poster", "ohwx") == "ohwx, ohwxy poster"  # a longer word is not the trigger
    assert with_trigger("", "ohwx") == "" and with_trigger("a poster", None) == "a poster"
    assert with_trigger("一幅水墨画海报", "水墨") == "一幅水墨画海报"  # Chinese has no spaces to bound a word


def test_training_with_a_trigger_word_says_it_in_every_style_sample_and_file(poster_dataset, tmp_path, capsys):
    from conftest import run_cli
    from ernie_lora.captions.trigger import with_trigger
    from ernie_lora.lora.files import read_lora_shapes

    cfg = tiny_config(poster_dataset, tmp_path / "cache", data={"caption_styles": list(STYLES), "caption_dropout": 0,
                                                                "trigger_word": "ohwx poster"},
                      sample={"every": 0, "prompts": ['title "SALE"', "a [trigger] with a red band"]})
    result = train(cfg, tmp_path / "run", progress=False)
    pipe = build_tiny_pipeline(0)

    def encoded(text: str) -> torch.Tensor:
        return pipe.encode_prompt(text, device="cpu")[0]

    for sample in result.cache.samples:  # no caption says [trigger]: every one gets the word first
        for style, path in zip(STYLES, sample.texts, strict=True):
            worded = with_trigger(restyle(sample.caption, style), "ohwx poster")
            assert worded.startswith("ohwx poster, ")
            assert torch.equal(load_embedding(path).float(), encoded(worded))
    assert set(result.cache.prompt_texts) == {'ohwx poster, title "SALE"', "a ohwx poster with a red band"}
    assert "Trigger word: `ohwx poster`." in (tmp_path / "run" / "report.md").read_text()
    header = read_lora_shapes(tmp_path / "run" / "lora.safetensors")[1]
    assert header["ernie_lora.trigger_word"] == header["modelspec.trigger_phrase"] == "ohwx poster"
    code, out, err = run_cli(["lora", "info", str(tmp_path / "run" / "lora.safetensors")], capsys)
    assert code == 0 and "trigger:   ohwx poster" in out
    code, out, err = run_cli(["lora", "convert", str(tmp_path / "run" / "lora.safetensors"),
                              str(tmp_path / "comfy.safetensors"), "-f", "comfy"], capsys)
    assert code == 0, err  # a converted file keeps the trigger where ComfyUI users' tools look for it
    assert read_lora_shapes(tmp_path / "comfy.safetensors")[1]["modelspec.trigger_phrase"] == "ohwx poster"
    # a LoRA started from it answers to the same word, and says so. Once a caption says [trigger], the
    # placeholders alone place the word: the other captions (regularisation images) go without it
    first = sorted(poster_dataset.glob("*.txt"))[0]
    first.write_text("a [trigger] " + first.read_text())
    again = tiny_config(poster_dataset, tmp_path / "cache", train={"steps": 1}, data={"caption_dropout": 0},
                        lora={"init_from": str(tmp_path / "run" / "lora.safetensors")})
    continued = train(again, tmp_path / "continued", progress=False)
    assert read_lora_shapes(tmp_path / "continued" / "lora.safetensors")[1]["modelspec.trigger_phrase"] == "ohwx poster"
    for sample in continued.cache.samples:
        said = sample.caption.replace("[trigger]", "ohwx poster")
        assert torch.equal(load_embedding(sample.texts[0]).float(), encoded(said))
    assert sum("[trigger]" in s.caption for s in continued.cache.samples) == 1
    # generate fills [trigger] from the LoRA and says when a prompt leaves the trigger out
    lora = f"{tmp_path / 'run' / 'lora.safetensors'}:1.0"
    code, out, err = run_cli(["generate", "a [trigger], blue theme", "a plain poster", "-m", "tiny", "--lora", lora,
                              "--width", "32", "--height", "32", "--steps", "1", "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "trained with the trigger word 'ohwx poster'; 1 of 2 prompts do not say it" in err
    from PIL import Image

    first = sorted((tmp_path / "out").glob("000-*.png"))[0]
    assert Image.open(first).text["prompt"] == "a ohwx poster, blue theme"


def test_a_trigger_word_the_tokenizer_does_not_know_is_warned_about(poster_dataset, tmp_path, capsys):
    cfg = tiny_config(poster_dataset, tmp_path / "cache", model={"name": "micro", "dtype": "fp32"},
                      data={"trigger_word": "ohwx poster"}, train={"steps": 1})
    train(cfg, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "warning: trigger word 'ohwx poster': micro's tokenizer does not know ohwx," in err


def test_a_trigger_only_modelspec_records_is_read_shown_and_kept(tmp_path, capsys):
    from safetensors.torch import save_file

    from conftest import run_cli
    from ernie_lora.lora.files import read_lora_shapes

    # the way other tools write it: kohya-style keys, the trigger only under ModelSpec's key
    down, up = torch.randn(4, 32), torch.zeros(32, 4)
    save_file({"lora_unet_layers_0_self_attention_to_q.lora_down.weight": down,
               "lora_unet_layers_0_self_attention_to_q.lora_up.weight": up,
               "lora_unet_layers_0_self_attention_to_q.alpha": torch.tensor(4.0)},
              tmp_path / "theirs.safetensors", metadata={"modelspec.trigger_phrase": "inkwash"})
    code, out, err = run_cli(["lora", "info", str(tmp_path / "theirs.safetensors")], capsys)
    assert code == 0 and "trigger:   inkwash" in out
    code, out, err = run_cli(["lora", "convert", str(tmp_path / "theirs.safetensors"),
                              str(tmp_path / "ours.safetensors")], capsys)
    assert code == 0, err
    header = read_lora_shapes(tmp_path / "ours.safetensors")[1]
    assert header["ernie_lora.trigger_word"] == header["modelspec.trigger_phrase"] == "inkwash"
