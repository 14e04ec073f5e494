import pytest
import torch

from ernie_lora.errors import UserError
from ernie_lora.models import ERNIE_IMAGE, build_tiny_pipeline


def test_tiny_uses_the_real_classes_and_is_deterministic_by_seed():
    from diffusers import AutoencoderKLFlux2, ErnieImagePipeline, ErnieImageTransformer2DModel
    from transformers import Mistral3Model

    a, b, c = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    assert isinstance(a, ErnieImagePipeline)
    assert isinstance(a.transformer, ErnieImageTransformer2DModel)
    assert isinstance(a.vae, AutoencoderKLFlux2)
    assert isinstance(a.text_encoder, Mistral3Model)
    for key, value in a.transformer.state_dict().items():
        assert torch.equal(value, b.transformer.state_dict()[key]), key
    assert not torch.equal(a.transformer.x_embedder.proj.weight, c.transformer.x_embedder.proj.weight)
    # the zero-initialised output layers are woken up, or no gradient would reach a LoRA
    assert a.transformer.final_linear.weight.abs().sum() > 0


def test_tiny_does_not_touch_the_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_tiny_pipeline(0)
    assert torch.equal(torch.rand(3), expected)


def test_local_folder_loads_through_from_pretrained_with_identical_pixels(tiny_folder):
    built = build_tiny_pipeline(0)
    loaded = ERNIE_IMAGE.load_pipeline(str(tiny_folder), dtype="fp32")
    kwargs = dict(height=32, width=32, num_inference_steps=3, output_type="np")
    a = built("a poster", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded("a poster", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (a == b).all()


def test_partial_pipeline_and_transformer_only(tiny_folder):
    vae_only = ERNIE_IMAGE.load_pipeline(str(tiny_folder), dtype="fp32", components=("vae",))
    assert vae_only.vae is not None and vae_only.transformer is None and vae_only.text_encoder is None
    transformer = ERNIE_IMAGE.load_transformer(str(tiny_folder), dtype="bf16")
    assert transformer.dtype == torch.bfloat16


def test_missing_hub_weights_say_how_to_fetch_them(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"hf download baidu/ERNIE-Image --local-dir DIR"):
        ERNIE_IMAGE.load_pipeline("baidu/ERNIE-Image")
    with pytest.raises(UserError, match=r"hf download baidu/ERNIE-Image-Turbo"):
        ERNIE_IMAGE.load_transformer("baidu/ERNIE-Image-Turbo")


def test_bad_model_names():
    with pytest.raises(UserError, match="not a local folder"):
        ERNIE_IMAGE.load_pipeline("no-such-model")
    with pytest.raises(UserError, match="not a local folder"):
        ERNIE_IMAGE.load_transformer("no-such-model")
    with pytest.raises(UserError, match="integer seed"):
        ERNIE_IMAGE.load_pipeline("tiny:abc")


def test_latents_decode_exactly_as_the_pipeline_does():
    pipe = build_tiny_pipeline(0)
    gen = dict(height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    latents = pipe("a poster", output_type="latent", **gen).images
    gen["generator"] = torch.Generator().manual_seed(0)
    expected = pipe("a poster", output_type="pt", **gen).images  # pipeline's own decode, in [0, 1]
    ours = (ERNIE_IMAGE.decode_latents(pipe.vae, latents) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    # encoding patchifies and normalises to the transformer's channel count
    encoded = ERNIE_IMAGE.encode_images(pipe.vae, torch.zeros(1, 3, 32, 32))
    assert encoded.shape == (1, pipe.transformer.config.in_channels, 8, 8)


def test_pixel_multiple_and_fingerprints(tiny_folder):
    assert ERNIE_IMAGE.pixel_multiple("tiny") == 4
    assert ERNIE_IMAGE.pixel_multiple(str(tiny_folder)) == 4
    a = ERNIE_IMAGE.fingerprint(str(tiny_folder), "vae")
    assert a == ERNIE_IMAGE.fingerprint(str(tiny_folder), "vae")
    assert a != ERNIE_IMAGE.fingerprint(str(tiny_folder), "text_encoder")
    assert ERNIE_IMAGE.fingerprint("tiny", "vae") != ERNIE_IMAGE.fingerprint("tiny:1", "vae")
