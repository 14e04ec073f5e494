"""LoRA files that go everywhere: the four layouts, conversion, merge, fuse, provenance, verify."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, tiny_config
from ernie_lora.errors import UserError
from ernie_lora.generate import LoraSpec, generate
from ernie_lora.lora.formats import FORMATS, LoraModule, read_modules, write_modules
from ernie_lora.lora.tools import fuse_into, merge_modules, verify_lora
from ernie_lora.models import build_tiny_pipeline
from test_generate import make_lora

SMALL = dict(width=32, height=32, steps=3, guidance=2.0, dtype="fp32", seed=4)


def _deltas(modules):
    return {name: m.delta() for name, m in modules.items()}


@pytest.fixture
def known(tmp_path):
    """A diffusers-format LoRA with alpha != rank on attention and MLP layers."""
    return make_lora(tmp_path / "known.safetensors", seed=3, rank=4, alpha=6.0,
                     targets=("to_q", "to_v", "to_out.0", "gate_proj", "linear_fc2"), std=3.0)


def test_each_layout_loads_and_gives_the_same_image(known, tmp_path):
    modules, fmt, meta = read_modules(known)
    assert fmt == "diffusers" and {m.alpha for m in modules.values()} == {6.0}
    images = {}
    for target in FORMATS:
        path = write_modules(tmp_path / f"{target}.safetensors", modules, target, meta)
        assert read_modules(path)[1] == target
        [png] = generate(["a poster"], model="tiny", loras=[LoraSpec(path, 0.9)], out_dir=tmp_path / target, **SMALL)
        images[target] = np.asarray(Image.open(png), dtype=int)
    for target in FORMATS:
        assert np.abs(images[target] - images["diffusers"]).max() <= 1, target  # float rounding of the folded scale
    [plain] = generate(["a poster"], model="tiny", out_dir=tmp_path / "plain", **SMALL)
    assert np.abs(np.asarray(Image.open(plain), dtype=int) - images["diffusers"]).max() > 5


def test_diffusers_own_loader_reads_our_comfy_and_peft_files(known, tmp_path):
    modules, _, meta = read_modules(known)
    outputs = []
    for target in ("diffusers", "comfy", "peft"):
        path = write_modules(tmp_path / f"{target}.safetensors", modules, target, meta)
        pipe = build_tiny_pipeline(0)
        pipe.load_lora_weights(str(path))
        outputs.append(pipe.transformer.layers[0].self_attention.to_q(torch.ones(1, 64)))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("via", FORMATS)
def test_conversion_round_trips_delta_w(known, tmp_path, capsys, via):
    original = _deltas(read_modules(known)[0])
    mid, back = tmp_path / f"{via}.safetensors", tmp_path / "back.safetensors"
    assert run_cli(["lora", "convert", str(known), str(mid), "--format", via], capsys)[0] == 0
    assert run_cli(["lora", "convert", str(mid), str(back), "--format", "diffusers"], capsys)[0] == 0
    modules, fmt, _ = read_modules(back)
    assert fmt == "diffusers"
    for name, delta in _deltas(modules).items():
        if via in ("diffusers", "kohya"):  # alpha stored: bit-identical factors
            assert torch.equal(delta, original[name]), name
        else:  # alpha folded into up: equal to float32 rounding of the largest entries
            torch.testing.assert_close(delta, original[name], rtol=1e-6, atol=1e-6 * float(original[name].abs().max()))
    code, _, err = run_cli(["lora", "convert", str(known), str(mid), "--format", via], capsys)
    assert code == 2 and "exists; pass --overwrite" in err


def test_kohya_names_and_alpha(tmp_path):
    down, up = torch.randn(2, 64), torch.randn(64, 2)
    modules = {"layers.1.self_attention.to_out.0": LoraModule(down, up, 1.0),
               "adaLN_modulation.1": LoraModule(torch.randn(2, 64), torch.randn(384, 2), 2.0),
               "final_norm.linear": LoraModule(torch.randn(2, 64), torch.randn(128, 2), 2.0)}
    path = write_modules(tmp_path / "k.safetensors", modules, "kohya")
    from safetensors.torch import load_file

    keys = set(load_file(path))
    assert "lora_unet_layers_1_self_attention_to_out_0.lora_down.weight" in keys
    assert "lora_unet_adaLN_modulation_1.alpha" in keys
    back, fmt, _ = read_modules(path)
    assert fmt == "kohya" and set(back) == set(modules)
    assert back["layers.1.self_attention.to_out.0"].scale == 0.5


def test_peft_alpha_from_adapter_config(tmp_path):
    from safetensors.torch import save_file

    save_file({"base_model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(4, 64),
               "base_model.model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(128, 4)},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    modules, fmt, _ = read_modules(tmp_path / "adapter_model.safetensors")
    assert fmt == "peft" and modules["layers.0.mlp.up_proj"].scale == 4.0


def test_bad_files_each_get_one_clear_error(known, tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"unet.down.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "unknown.safetensors"))
    save_file({"transformer.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
               "lora_unet_layers_0_mlp_up_proj.lora_up.weight": torch.zeros(128, 4)},
              str(tmp_path / "mixed.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes(known.read_bytes()[: known.stat().st_size // 2])
    expected = {"unknown": "unknown LoRA key 'unet.down.lora_A.weight'", "mixed": "mixed LoRA formats",
                "truncated": "truncated.safetensors"}
    for name, message in expected.items():
        code, _, err = run_cli(["lora", "info", str(tmp_path / f"{name}.safetensors")], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_merge_is_the_truncated_svd_of_the_weighted_sum(tmp_path):
    a = read_modules(make_lora(tmp_path / "a.safetensors", seed=1, rank=4, alpha=4.0))[0]
    b = read_modules(make_lora(tmp_path / "b.safetensors", seed=2, rank=4, alpha=8.0))[0]
    full, energy = merge_modules([a, b], [0.6, 0.4], rank=8)
    assert energy == pytest.approx(1.0)
    for name in a:
        torch.testing.assert_close(full[name].delta(), 0.6 * a[name].delta() + 0.4 * b[name].delta(),
                                   rtol=1e-5, atol=1e-6)
    low, kept = merge_modules([a, b], [0.6, 0.4], rank=3)
    sigma2_kept = sigma2_all = 0.0
    for name in a:
        s = torch.linalg.svdvals(0.6 * a[name].delta() + 0.4 * b[name].delta())
        sigma2_kept += float((s[:3] ** 2).sum())
        sigma2_all += float((s**2).sum())
        u, sv, vh = torch.linalg.svd(0.6 * a[name].delta() + 0.4 * b[name].delta())
        best = (u[:, :3] * sv[:3]) @ vh[:3]
        torch.testing.assert_close(low[name].delta(), best, rtol=1e-4, atol=1e-6)
    assert kept == pytest.approx(sigma2_kept / sigma2_all, rel=1e-6) and kept < 1


def test_merge_and_fuse_commands(known, tmp_path, capsys, tiny_folder):
    other = make_lora(tmp_path / "other.safetensors", seed=9)
    code, out, _ = run_cli(["lora", "merge", str(known), str(other), str(tmp_path / "m.safetensors"),
                            "--weights", "0.5,0.5", "--rank", "2"], capsys)
    assert code == 0 and "energy kept" in out
    assert read_modules(tmp_path / "m.safetensors")[0]["layers.0.self_attention.to_q"].rank == 2
    code, out, _ = run_cli(["lora", "fuse", str(known), "--model", str(tiny_folder), "--strength", "0.7",
                            "--out", str(tmp_path / "fused"), "--dtype", "fp32"], capsys)
    assert code == 0
    from diffusers import ErnieImageTransformer2DModel

    fused = ErnieImageTransformer2DModel.from_pretrained(tmp_path / "fused" / "transformer")
    adapted = build_tiny_pipeline(0)
    adapted.load_lora_weights(str(known), adapter_name="k")
    adapted.set_adapters(["k"], [0.7])
    x = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    kwargs = dict(timestep=torch.tensor([500.0]), text_bth=torch.randn(1, 5, 32), text_lens=torch.tensor([5]),
                  return_dict=False)
    torch.testing.assert_close(fused(x, **kwargs)[0], adapted.transformer(x, **kwargs)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="no such linear layer"):
        fuse_into(fused, {"layers.9.mlp.up_proj": LoraModule(torch.zeros(1, 64), torch.zeros(128, 1), 1.0)})


def test_training_writes_provenance_that_info_shows_and_verify_checks(poster_dataset, tmp_path, capsys):
    from ernie_lora.recipes.lora import train

    cfg = tiny_config(poster_dataset, tmp_path / "cache",
                      provenance={"creator": "Studio K", "licence": "CC-BY-4.0", "consent": "own work"})
    train(cfg, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "lora.safetensors"
    assert verify_lora(path)[0]
    code, out, _ = run_cli(["lora", "info", str(path), "--model", "tiny"], capsys)
    assert code == 0
    for text in ("format:    diffusers", "rank:      4", "alpha:     8", "base:      tiny", "creator: Studio K",
                 "licence: CC-BY-4.0", "consent: own work", "dataset_hash:", "captions_hash:", "base_model_hash:",
                 "fits tiny: yes"):
        assert text in out, text
    code, out, _ = run_cli(["lora", "info", str(path), "--model", "micro"], capsys)
    assert "fits micro: LoRA" in out and "does not match the model" in out
    # one flipped byte in a tensor: the stored hash no longer matches
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    code, out, _ = run_cli(["lora", "verify", str(path)], capsys)
    assert code == 1 and "FAILED: tensor hash mismatch" in out


def test_dataset_hash_depends_on_content_not_on_the_model(poster_dataset, tmp_path):
    from ernie_lora.recipes.lora import train

    a = train(tiny_config(poster_dataset, tmp_path / "c1"), tmp_path / "a", progress=False)
    b = train(tiny_config(poster_dataset, tmp_path / "c2", model={"name": "tiny:1", "dtype": "fp32"}),
              tmp_path / "b", progress=False)
    meta_a = read_modules(a.output / "lora.safetensors")[2]
    meta_b = read_modules(b.output / "lora.safetensors")[2]
    assert meta_a["ernie_lora.dataset_hash"] == meta_b["ernie_lora.dataset_hash"]
    assert meta_a["ernie_lora.base_model_hash"] != meta_b["ernie_lora.base_model_hash"]
    (poster_dataset / "poster_00000.txt").write_text("another caption")
    c = train(tiny_config(poster_dataset, tmp_path / "c1"), tmp_path / "c", progress=False)
    meta_c = read_modules(c.output / "lora.safetensors")[2]
    assert meta_c["ernie_lora.dataset_hash"] != meta_a["ernie_lora.dataset_hash"]
