"""Training step with caches vs. a plain loop that encodes image and caption every step.

The plain loop is what the diffusers example scripts do without caching: every step reads the
image, resizes it, runs the VAE encoder and the text encoder, then the same DiT step. Ours reads
the cached latent and embedding (``ernie_lora.data.cache``) and runs the same DiT step. Same data,
same model, same run; the two loops alternate in blocks so machine noise hits both.

Model scales (all ERNIE-Image classes, random weights):
- ``tiny``: the test model (DiT 0.2M params, text encoder 0.05M, VAE 0.2M) on 32x32 images;
- ``micro``: the shipped micro ERNIE (DiT 1.0M, text encoder 0.1M, VAE 0.24M) on 64x64 images;
- ``cpu``: a CPU-sized model (DiT ~6M, 4 layers; text encoder ~3M; VAE with the real block layout
  at a quarter of its channels) on 128x128 images.
At the 8B scale the encoders are a small share of a step's FLOPs; the script prints that estimate
too, so the measured ratio is not read as an 8B speed-up.

    python bench/train_step.py [--steps 20] [--scales tiny,micro,cpu]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from ernie_lora.data import check_dataset, make_buckets, nearest_bucket, resize_and_crop
from ernie_lora.data.cache import build_caches, image_to_tensor, load_embedding, load_latent
from ernie_lora.data.dataset import load_rgb
from ernie_lora.data.synthetic import write_synthetic_dataset
from ernie_lora.flow import noisy_latents, sample_sigmas, velocity_target
from ernie_lora.lora.adapters import add_lora, resolve_targets
from ernie_lora.models import ERNIE_IMAGE
from ernie_lora.models import tiny as tiny_module

SCALES = {
    "tiny": dict(resolution=32, build=lambda: tiny_module.build_tiny_pipeline(0)),
    "micro": dict(resolution=64, build=lambda: ERNIE_IMAGE.load_pipeline("micro", dtype="fp32")),
    "cpu": dict(
        resolution=128,
        build=lambda: tiny_module.build_pipeline_from_configs(
            dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=260, max_position_embeddings=1024),
            tiny_module.TINY_VISION_CONFIG,
            dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=32, norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
            dict(hidden_size=384, num_attention_heads=6, num_layers=4, ffn_hidden_size=1024, in_channels=128,
                 out_channels=128, text_in_dim=256, rope_axes_dim=(16, 24, 24)),
            tiny_module.TINY_SCHEDULER_CONFIG,
        ),
    ),
}


def count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def dit_step(transformer, optimizer, x0, texts, generator) -> float:
    noise = torch.randn(x0.shape, generator=generator)
    sigmas = sample_sigmas(x0.shape[0], generator)
    pred = ERNIE_IMAGE.predict_velocity(transformer, noisy_latents(x0, noise, sigmas), sigmas, texts)
    loss = torch.nn.functional.mse_loss(pred, velocity_target(x0, noise))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_scale(name: str, steps: int, batch: int, workdir: Path) -> float:
    spec = SCALES[name]
    pipe = spec["build"]()
    pipe.transformer.requires_grad_(False)
    add_lora(pipe.transformer, 16, 16, resolve_targets(pipe.transformer, "attn_mlp"))
    params = [p for p in pipe.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    res = spec["resolution"]
    dataset = write_synthetic_dataset(workdir / name, count=16, seed=0, size=res)
    items = check_dataset(dataset, min_side=res).items
    buckets = make_buckets(res, 2 ** len(pipe.vae.config.block_out_channels))

    # our caches, built with this very pipeline's encoders (a saved folder would do the same)
    cache = workdir / f"cache-{name}"
    saved = workdir / f"model-{name}"
    pipe.save_pretrained(saved)
    cached = build_caches(items, buckets, cache, str(saved), text_dtype="fp32").samples

    def cached_batch(i):
        chosen = [cached[(i * batch + k) % len(cached)] for k in range(batch)]
        return (torch.stack([load_latent(s.latent) for s in chosen]),
                [load_embedding(s.text) for s in chosen])

    def plain_batch(i):
        chosen = [items[(i * batch + k) % len(items)] for k in range(batch)]
        with torch.no_grad():
            pixels = torch.cat([
                image_to_tensor(resize_and_crop(load_rgb(it.image), nearest_bucket(it.width, it.height, buckets),
                                                "center", random.Random(0)))
                for it in chosen
            ])
            latents = ERNIE_IMAGE.encode_images(pipe.vae, pixels)
            texts = [pipe.encode_prompt(it.caption, device="cpu")[0] for it in chosen]
        return latents, texts

    timings = {"cached": 0.0, "plain": 0.0}
    generator = torch.Generator().manual_seed(0)
    for make in (cached_batch, plain_batch):  # warm-up
        dit_step(pipe.transformer, optimizer, *make(0), generator)
    block = max(1, steps // 4)
    done = 0
    while done < steps:  # alternate blocks so noise on the machine hits both loops
        for label, make in (("cached", cached_batch), ("plain", plain_batch)):
            start = time.perf_counter()
            for i in range(done, done + block):
                dit_step(pipe.transformer, optimizer, *make(i), generator)
            timings[label] += time.perf_counter() - start
        done += block
    ratio = timings["plain"] / timings["cached"]
    print(f"{name:5s} res {res:4d}  DiT {count(pipe.transformer):6.2f}M  "
          f"text encoder {count(pipe.text_encoder):6.2f}M  "
          f"VAE {count(pipe.vae):5.2f}M  | cached {timings['cached'] / done * 1000:8.1f} ms/step  "
          f"plain {timings['plain'] / done * 1000:8.1f} ms/step  | speed-up {ratio:5.2f}x")
    return ratio


def estimate_8b() -> None:
    """FLOPs per 1024² sample: DiT training step vs. what caching removes (text encoder + VAE encoder)."""
    tokens_img, tokens_txt, hidden, layers, params_dit = 4096, 256, 4096, 36, 8e9
    seq = tokens_img + tokens_txt
    dit_fwd = 2 * params_dit * seq + 4 * layers * seq * seq * hidden
    dit_train = 3 * dit_fwd  # forward + backward through activations (frozen base), no recompute
    text = 2 * 3.3e9 * tokens_txt
    # FLUX.2 VAE encoder at 1024²: ~4 TFLOPs by counting its 3x3 convolutions stage by stage
    vae = 4.0e12
    print(f"8B estimate at 1024²: DiT step {dit_train / 1e12:.0f} TFLOPs, text encoder {text / 1e12:.1f}, "
          f"VAE encoder {vae / 1e12:.1f} -> caching saves {(text + vae) / (dit_train + text + vae) * 100:.1f}% of "
          "the compute; its win there is memory (text encoder and VAE off the GPU) and no JPEG decoding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--scales", default="tiny,micro,cpu")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} steps each")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scales.split(","):
            run_scale(name, args.steps, args.batch, Path(tmp))
    estimate_8b()


if __name__ == "__main__":
    main()
