import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from ernie_lora.generate import LoraSpec, generate, interference_warnings, parse_lora_spec
from ernie_lora.lora.adapters import add_lora, lora_state_dict, peft_config_metadata
from ernie_lora.lora.files import save_lora
from ernie_lora.models import ERNIE_IMAGE, build_tiny_pipeline

SMALL = dict(width=32, height=32, steps=3, guidance=2.0, dtype="fp32")


def make_lora(path, seed=0, rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0"), std=0.2):
    transformer = build_tiny_pipeline(0).transformer
    torch.manual_seed(seed)
    config = add_lora(transformer, rank, alpha, list(targets))
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=std)
    return save_lora(path, lora_state_dict(transformer), peft_config_metadata(config), {"base_model": "tiny"})


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_pixels_equal_diffusers_own_pipeline_call(tiny_folder, tmp_path, fuse):
    lora = make_lora(tmp_path / "style.safetensors", std=2.0)  # strong enough to move the pixels
    [path] = generate(["a poster with title \"SALE\""], model=str(tiny_folder), loras=[LoraSpec(lora, 0.8)],
                      seed=11, out_dir=tmp_path / "out", fuse=fuse, **SMALL)
    ours = np.asarray(Image.open(path).convert("RGB"), dtype=int)

    from diffusers import ErnieImagePipeline

    pipe = ErnieImagePipeline.from_pretrained(str(tiny_folder))
    pipe.load_lora_weights(str(lora), adapter_name="style")  # diffusers' own (peft's) layers
    pipe.set_adapters(["style"], [0.8])
    theirs = pipe('a poster with title "SALE"', height=32, width=32, num_inference_steps=3, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(11)).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=int)).max() <= 1  # float rounding only
    # and the LoRA changed the image
    base = pipe.__class__.from_pretrained(str(tiny_folder))
    plain = base('a poster with title "SALE"', height=32, width=32, num_inference_steps=3, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(11)).images[0]
    assert np.abs(ours - np.asarray(plain, dtype=int)).max() > 8


def test_unfused_loras_equal_fused_ones_at_every_strength_and_leave_no_trace(tmp_path):
    """Two stacked live LoRAs give the velocity of the same LoRAs fused at those strengths, also after the
    strengths change; removing them gives the base's output bit for bit."""
    from ernie_lora.lora.formats import read_lora_file
    from ernie_lora.lora.live import LiveLoras
    from ernie_lora.lora.tools import fuse_into

    files = [read_lora_file(make_lora(tmp_path / f"{i}.safetensors", seed=i, rank=2 + i, std=1.0)) for i in range(2)]
    model = build_tiny_pipeline(0).transformer.eval()
    x = torch.randn(1, model.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    texts = [torch.randn(5, model.config.text_in_dim, generator=torch.Generator().manual_seed(1))]
    sigmas = torch.tensor([0.6])

    def velocity(transformer):
        with torch.no_grad():
            return ERNIE_IMAGE.predict_velocity(transformer, x, sigmas, texts)

    before = velocity(model)
    live = LiveLoras(model, [(files[0].modules, 0.8), (files[1].modules, -0.5)])
    for strengths in ([0.8, -0.5], [1.2, 0.0]):
        live.set_strengths(strengths)
        fused = build_tiny_pipeline(0).transformer.eval()
        for lora, strength in zip(files, strengths, strict=True):
            fuse_into(fused, lora.modules, strength)
        ours, theirs = velocity(model), velocity(fused)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
        assert (ours - before).abs().max() > 1e-2  # they act
    live.remove()
    assert torch.equal(velocity(model), before)


def test_png_metadata_and_no_overwrite(tmp_path):
    lora = make_lora(tmp_path / "l.safetensors")
    out = tmp_path / "out"
    [first] = generate(["hello"], model="tiny", loras=[LoraSpec(lora, 1.1)], seed=5, out_dir=out, **SMALL)
    text = Image.open(first).text
    assert text["prompt"] == "hello" and text["seed"] == "5" and text["model"] == "tiny"
    assert json.loads(text["loras"]) == [{"path": str(lora), "strength": 1.1}]
    assert text["steps"] == "3" and text["guidance"] == "2.0"
    before = first.read_bytes()
    [second] = generate(["hello"], model="tiny", seed=6, out_dir=out, **SMALL)
    assert second != first and first.read_bytes() == before


def test_fused_matches_unfused_and_turbo_defaults(tmp_path):
    lora = make_lora(tmp_path / "l.safetensors")
    kw = dict(model="tiny", loras=[LoraSpec(lora, 0.9)], seed=1, **SMALL)
    [a] = generate(["x"], out_dir=tmp_path / "a", fuse=False, **kw)
    [b] = generate(["x"], out_dir=tmp_path / "b", **kw)  # fused: the default
    diff = np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int))
    assert diff.max() <= 2  # fusing changes only float rounding
    [t] = generate(["x"], model="tiny", turbo=True, width=32, height=32, dtype="fp32", out_dir=tmp_path / "t")
    meta = Image.open(t).text
    assert (meta["steps"], meta["guidance"]) == ("8", "1.0")


def test_stacking_several_loras_and_interference_warnings(tmp_path, capsys):
    paths = [make_lora(tmp_path / f"l{i}.safetensors", seed=i) for i in range(3)]
    specs = [LoraSpec(p, 0.6) for p in paths]
    pipe = build_tiny_pipeline(0)
    generate(["x"], loras=specs, out_dir=tmp_path / "o", pipe=pipe, fuse=False, **SMALL)
    err = capsys.readouterr().err
    assert "summed LoRA strength 1.80 > 1.5" in err and "3 LoRAs all modify the same" in err
    assert interference_warnings(specs[:2], [{"a"}, {"a"}]) == []


def test_parse_lora_spec():
    assert parse_lora_spec("a/b.safetensors:0.8").strength == 0.8
    assert parse_lora_spec("a/b.safetensors").strength == 1.0
    assert str(parse_lora_spec("weird:name.safetensors").path) == "weird:name.safetensors"


def test_cli_generate_and_size_validation(tmp_path, capsys):
    code, out, _ = run_cli(["generate", "a poster", "-m", "tiny", "--width", "32", "--height", "32", "--steps", "2",
                            "--dtype", "fp32", "-o", str(tmp_path / "o")], capsys)
    assert code == 0 and out.strip().endswith(".png")
    code, _, err = run_cli(["generate", "x", "-m", "tiny", "--width", "30", "--height", "32"], capsys)
    assert code == 2 and err.strip() == "error: --width: 30 must be a positive multiple of 4 and at most 4096"


@pytest.mark.parametrize("pe", [True, False])
def test_prompt_enhancer_flag_without_pe_weights(tmp_path, capsys, pe):
    [p] = generate(["x"], model="tiny", use_pe=pe, out_dir=tmp_path, **SMALL)
    assert Image.open(p).text["prompt_enhancer"] == ("rules" if pe else "off")
    assert ("has no Prompt Enhancer weights" in capsys.readouterr().err) == pe


def test_load_pipeline_partial_for_generation(tiny_folder):
    pipe = ERNIE_IMAGE.load_pipeline(str(tiny_folder), dtype="fp32")
    assert pipe.pe is None  # the 3B Prompt Enhancer is loaded only when asked for


def test_cli_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    code, out, _ = run_cli(["generate", "--prompts-file", str(prompts), "-m", "tiny", "--width", "32", "--height",
                            "32", "--steps", "2", "--dtype", "fp32", "-o", str(tmp_path / "o")], capsys)
    assert code == 0
    written = out.split()
    assert len(written) == 2
    assert [Image.open(p).text["prompt"] for p in written] == ["first prompt", "second prompt"]
    assert [Image.open(p).text["seed"] for p in written] == ["0", "1"]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_a_callers_pipeline_comes_back_bit_exact_after_generating_with_loras(tmp_path, fuse):
    specs = [LoraSpec(make_lora(tmp_path / f"l{i}.safetensors", seed=i), s) for i, s in enumerate((1.0, 0.5))]
    pipe = build_tiny_pipeline(0)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    [with_loras] = generate(["x"], loras=specs, out_dir=tmp_path / "a", pipe=pipe, fuse=fuse, **SMALL)
    after = pipe.transformer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not pipe.get_list_adapters()  # no peft layers left behind
    assert not any(m._forward_hooks for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear))
    [plain] = generate(["x"], out_dir=tmp_path / "b", pipe=pipe, **SMALL)
    assert not np.array_equal(np.asarray(Image.open(with_loras)), np.asarray(Image.open(plain)))  # they did act
    [again] = generate(["x"], out_dir=tmp_path / "c", model="tiny", **SMALL)  # a fresh base draws the same
    assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(again)))
