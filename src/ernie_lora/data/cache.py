"""Disk caches of VAE latents and text embeddings, so training runs with the VAE and text encoder unloaded.

Keys are content hashes: a latent is keyed by (image bytes, VAE fingerprint, bucket, crop), an
embedding by (caption text, text-encoder fingerprint). A second run over the same data encodes
nothing; any change to an image, a caption, the bucket or the weights makes a new entry.

With ``crop: random`` the crop is drawn once per image (seeded by the image hash) when its latent
is cached: caching and a fresh crop every epoch exclude each other.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..io import atomic_write, sha256_text
from ..models import family_for
from .buckets import Bucket, nearest_bucket, resize_and_crop
from .dataset import Item, load_rgb


@dataclass
class CachedSample:
    latent_file: Path
    text_files: list[Path]  # one embedding per wording of the caption (caption styles), in order
    bucket: Bucket
    caption: str
    image: Path | None = None  # the source image (its category drives hierarchical sampling)

    @property
    def text_file(self) -> Path:
        return self.text_files[0]


@dataclass
class CachedDataset:
    samples: list[CachedSample]
    empty_text_file: Path  # the "" embedding: caption dropout and the CFG negative
    prompt_files: dict[str, Path] = field(default_factory=dict)
    encoded_latents: int = 0
    encoded_texts: int = 0


def latent_key(item: Item, vae_fp: str, bucket: Bucket, crop: str) -> str:
    return sha256_text(f"latent|{item.sha256}|{vae_fp}|{bucket}|{crop}")[:32]


def text_key(text: str, te_fp: str) -> str:
    return sha256_text(f"text|{te_fp}|{text}")[:32]


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [-1, 1], as diffusers' VaeImageProcessor normalises."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr * 2.0 - 1.0).unsqueeze(0)


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp))


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_caches(
    items: list[Item],
    buckets: list[Bucket],
    cache_dir: Path,
    model: str,
    *,
    crop: str = "center",
    prompts: list[str] | None = None,
    vae_dtype: str = "fp32",
    text_dtype: str = "bf16",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    wordings: Callable[[str], list[str]] | None = None,
) -> CachedDataset:
    """Encode whatever is not cached yet; return where every sample's latent and embedding lies.

    ``wordings(caption)`` lists the texts to embed for a caption (e.g. the caption in each training
    style); by default the caption itself.
    """
    cached, groups = build_cache_groups([(items, buckets)], cache_dir, model, crop=crop, prompts=prompts,
                                        vae_dtype=vae_dtype, text_dtype=text_dtype, device=device, revision=revision,
                                        wordings=wordings)
    cached.samples = groups[0]
    return cached


def build_cache_groups(
    groups: list[tuple[list[Item], list[Bucket]]],
    cache_dir: Path,
    model: str,
    *,
    crop: str = "center",
    prompts: list[str] | None = None,
    vae_dtype: str = "fp32",
    text_dtype: str = "bf16",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    wordings: Callable[[str], list[str]] | None = None,
) -> tuple[CachedDataset, list[list[CachedSample]]]:
    """``build_caches`` for several (items, buckets) groups at once (the stages of a resolution curriculum,
    a validation set): one pass, one progress bar per encoder. Returns the shared part (the empty and
    prompt embeddings, counts) and each group's samples."""
    cache_dir = Path(cache_dir)
    family = family_for(model)
    vae_fp = family.fingerprint(model, "vae", revision)
    te_fp = family.fingerprint(model, "text_encoder", revision)

    planned: list[list[tuple[Item, Bucket, Path]]] = []
    for items, buckets in groups:
        planned.append([])
        for item in items:
            bucket = nearest_bucket(item.width, item.height, buckets)
            lat = cache_dir / "latents" / f"{latent_key(item, vae_fp, bucket, crop)}.safetensors"
            planned[-1].append((item, bucket, lat))
    every = [entry for group in planned for entry in group]

    wordings = wordings or (lambda caption: [caption])
    worded = {item.caption: wordings(item.caption) for item, _, _ in every}
    texts = sorted({t for variants in worded.values() for t in variants} | {""} | set(prompts or []))
    text_files = {t: cache_dir / "text" / f"{text_key(t, te_fp)}.safetensors" for t in texts}

    todo = list({lat: (item, bucket, lat) for item, bucket, lat in every if not lat.exists()}.values())
    if todo:
        pipe = family.load_pipeline(model, dtype=vae_dtype, device=device, components=("vae",), revision=revision)
        for item, bucket, lat in tqdm(todo, desc="caching latents", unit="img"):
            image = resize_and_crop(load_rgb(item.image), bucket, crop, random.Random(item.sha256))
            latent = family.encode_images(pipe.vae, image_to_tensor(image))[0]
            _save(lat, {"latent": latent})
        del pipe  # the VAE leaves memory before the text encoder arrives
        _release_memory()

    missing_texts = [t for t in texts if not text_files[t].exists()]
    if missing_texts:
        pipe = family.load_pipeline(
            model, dtype=text_dtype, device=device, components=("text_encoder", "tokenizer"), revision=revision
        )
        for text in tqdm(missing_texts, desc="caching text embeddings", unit="caption"):
            # exactly the pipeline's own encoding (second-to-last hidden state, BOS, truncation)
            hidden = pipe.encode_prompt(text, device=pipe.text_encoder.device)[0]
            _save(text_files[text], {"embedding": hidden})
        del pipe  # training runs with the text encoder unloaded
        _release_memory()

    samples = [[CachedSample(lat, [text_files[t] for t in worded[item.caption]], bucket, item.caption, item.image)
                for item, bucket, lat in group] for group in planned]
    shared = CachedDataset(samples=[], empty_text_file=text_files[""],
                           prompt_files={p: text_files[p] for p in (prompts or [])}, encoded_latents=len(todo),
                           encoded_texts=len(missing_texts))
    return shared, samples


def load_latent(path: Path) -> torch.Tensor:
    return load_file(str(path))["latent"]


def load_embedding(path: Path) -> torch.Tensor:
    return load_file(str(path))["embedding"]
