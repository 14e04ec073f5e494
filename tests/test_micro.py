"""The shipped micro ERNIE: loads by name, is ERNIE-Image's classes, and has learned the layout world."""

import random
import statistics

import pytest
import torch

from ernie_lora.data.synthetic import HELD_OUT, caption, pretraining_colours, sample_layout
from ernie_lora.eval.layout import score_image
from ernie_lora.models import load_pipeline, load_transformer
from ernie_lora.models.micro_arch import MICRO_DIR


@pytest.fixture(scope="module")
def micro():
    pipe = load_pipeline("micro", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fidelity(pipe, colours, n=12, seed=777):
    rng = random.Random(seed)
    scores = []
    for i in range(n):
        prompt = caption(sample_layout(rng, colours=colours))
        image = pipe(prompt, height=64, width=64, num_inference_steps=24, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(seed + i)).images[0]
        scores.append(score_image(image, prompt).score)
    return statistics.median(scores)


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
    assert load_transformer("micro", dtype="fp32").config.hidden_size == micro.transformer.config.hidden_size


def test_micro_follows_layouts_of_seen_concepts(micro):
    assert _fidelity(micro, pretraining_colours()) >= 0.7


def test_micro_does_not_know_the_held_out_colours(micro):
    assert _fidelity(micro, HELD_OUT["colours"], n=8) < 0.35
