"""Loading ERNIE-Image (hub id, local folder, tiny), and latent (de)normalisation."""

from .latents import decode_latents, encode_images
from .loading import (
    BASE_MODEL,
    TURBO_MODEL,
    component_fingerprint,
    load_pipeline,
    load_transformer,
    parse_dtype,
)
from .tiny import build_tiny_pipeline

__all__ = [
    "BASE_MODEL",
    "TURBO_MODEL",
    "build_tiny_pipeline",
    "decode_latents",
    "encode_images",
    "load_pipeline",
    "load_transformer",
    "component_fingerprint",
    "parse_dtype",
]
