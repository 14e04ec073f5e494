"""Latent (de)normalisation exactly as ``ErnieImagePipeline`` does it.

The pipeline's transformer works on VAE latents that were 2x2 patchified (32 -> 128 channels for
the 8B model) and normalised by the VAE's batch-norm running statistics. At decode the pipeline
un-normalises with ``sqrt(running_var + 1e-5)`` (not ``config.batch_norm_eps``), so encoding uses
the same constant: a cached latent decodes back through the pipeline's own code.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, ErnieImagePipeline

PIPELINE_BN_EPS = 1e-5  # the constant hard-coded in ErnieImagePipeline.__call__


def _bn_stats(vae: AutoencoderKLFlux2, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(device=like.device, dtype=like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + PIPELINE_BN_EPS).to(device=like.device, dtype=like.dtype)
    return mean, std


@torch.no_grad()
def encode_images(vae: AutoencoderKLFlux2, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1], [B, 3, H, W] -> normalised, patchified latents [B, 4C, H/s, W/s]."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mode()  # the mean: a cached latent is deterministic
    latents = ErnieImagePipeline._patchify_latents(latents)
    mean, std = _bn_stats(vae, latents)
    return (latents - mean) / std


@torch.no_grad()
def decode_latents(vae: AutoencoderKLFlux2, latents: torch.Tensor) -> torch.Tensor:
    """The inverse, as the pipeline decodes: returns pixels in [-1, 1]."""
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    mean, std = _bn_stats(vae, latents)
    latents = ErnieImagePipeline._unpatchify_latents(latents * std + mean)
    return vae.decode(latents, return_dict=False)[0]

