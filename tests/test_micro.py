"""The shipped micro ERNIE: loads by name, is ERNIE-Image's classes, and has learned the layout world."""

import statistics

import pytest
import torch

from ernie_lora.data.synthetic import HELD_OUT, pretraining_colours, split_captions
from ernie_lora.eval.layout import score_image
from ernie_lora.models import ERNIE_IMAGE
from ernie_lora.models.micro_arch import MICRO_DIR


@pytest.fixture(scope="module")
def micro():
    pipe = ERNIE_IMAGE.load_pipeline("micro", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _median(pipe, colours, bands=None, kind=None, n=12, seed=777, score="score"):
    """The median ``score`` of micro's samples for ``n`` test-split prompts (never seen in pretraining)."""
    values = []
    for i, prompt in enumerate(split_captions(n, "test", kind, colours, bands, seed=seed)):
        image = pipe(prompt, height=64, width=64, num_inference_steps=24, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(seed + i)).images[0]
        values.append(getattr(score_image(image, prompt), score))
    return statistics.median(values)


def test_shipped_weights_are_small_safetensors_of_the_real_classes(micro):
    from diffusers import AutoencoderKLFlux2, ErnieImageTransformer2DModel
    from transformers import Mistral3Model

    assert isinstance(micro.transformer, ErnieImageTransformer2DModel)
    assert isinstance(micro.vae, AutoencoderKLFlux2)
    assert isinstance(micro.text_encoder, Mistral3Model)
    total = sum(p.numel() for m in (micro.transformer, micro.vae, micro.text_encoder) for p in m.parameters())
    assert 1e6 < total < 10e6
    files = [p for p in MICRO_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    loaded = ERNIE_IMAGE.load_transformer("micro", dtype="fp32")
    assert loaded.config.hidden_size == micro.transformer.config.hidden_size


def test_micro_follows_layouts_of_seen_concepts(micro):
    assert _median(micro, pretraining_colours()) >= 0.7


def test_micro_does_not_know_the_held_out_concepts(micro):
    assert _median(micro, HELD_OUT["colours"], n=8, score="colour") < 0.35
    assert _median(micro, pretraining_colours(), HELD_OUT["bands"], "poster", n=8, score="structure") < 0.35


def test_pretraining_is_reproducible_from_its_seed(tmp_path):
    from safetensors.torch import load_file

    from ernie_lora.config import MicroPretrainConfig
    from ernie_lora.recipes.pretrain_micro import pretrain_micro

    cfg = MicroPretrainConfig(images=48, vae_steps=3, vae_batch=4, dit_steps=3, dit_batch=4, warmup_steps=1,
                              eval_count=2, eval_steps=2)
    pretrain_micro(cfg, tmp_path / "a")
    pretrain_micro(cfg, tmp_path / "b")
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    other = pretrain_micro(cfg.model_copy(update={"seed": 1}), tmp_path / "c")
    assert other["parameters"]["transformer"] > 0
    c = load_file(tmp_path / "c" / "transformer/diffusion_pytorch_model.safetensors")
    a = load_file(tmp_path / "a" / "transformer/diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(Exception, match="already holds a model"):
        pretrain_micro(cfg, tmp_path / "a")
