"""Aspect-ratio buckets whose sides fit ERNIE-Image's latent grid.

Why the sides are multiples of 16 for the 8B model: the FLUX.2 VAE downsamples by 8, the pipeline
then packs 2x2 latent pixels into one token (32 -> 128 channels) and the DiT's patch size is 1.
So one token covers 16x16 pixels and ``ErnieImagePipeline`` rejects sides that are not multiples
of 16. Nothing in the DiT needs more (RoPE positions are per token, attention has no windows), so
finer buckets than the usual 64 waste no pixels to cropping. The tiny model's multiple is 4.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

from ..errors import UserError


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def ratio(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def make_buckets(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[Bucket]:
    """Buckets of area close to ``resolution``², sides multiples of ``multiple``, ratio within ``max_ratio``."""
    if resolution <= 0 or resolution % multiple:
        raise UserError(f"data.resolution: {resolution} must be a positive multiple of {multiple}")
    if max_ratio < 1:
        raise UserError(f"data.max_aspect_ratio: {max_ratio} must be >= 1")
    area = resolution * resolution
    buckets: set[Bucket] = set()
    width = multiple
    while width <= resolution * max_ratio:
        height = max(multiple, round(area / width / multiple) * multiple)
        if max(width / height, height / width) <= max_ratio + 1e-9:
            buckets.add(Bucket(width, height))
        width += multiple
    return sorted(buckets, key=lambda b: (b.ratio, b.width))


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket with the closest aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.ratio) - target), -b.width * b.height))


def bucket_and_upscale(width: int, height: int, buckets: list[Bucket]) -> tuple[Bucket, float]:
    """The bucket an image lands in and how much ``resize_and_crop`` enlarges it to cover it (> 1: upscaled)."""
    bucket = nearest_bucket(width, height, buckets)
    return bucket, max(bucket.width / width, bucket.height / height)


def resize_and_crop(image: Image.Image, bucket: Bucket, crop: str = "center", rng: random.Random | None = None
                    ) -> Image.Image:
    """Scale to cover the bucket (keeping the aspect ratio), then crop to it."""
    scale = max(bucket.width / image.width, bucket.height / image.height)
    new_w = max(bucket.width, round(image.width * scale))
    new_h = max(bucket.height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    dx, dy = new_w - bucket.width, new_h - bucket.height
    if crop == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    elif crop == "center":
        left, top = dx // 2, dy // 2
    else:
        raise UserError(f"data.crop: {crop!r} must be 'center' or 'random'")
    return image.crop((left, top, left + bucket.width, top + bucket.height))
