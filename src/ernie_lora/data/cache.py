"""Disk caches of VAE latents and text embeddings, so training runs with the VAE and text encoder unloaded.

Keys are content hashes: a latent is keyed by (image bytes, VAE fingerprint, bucket, crop), an
embedding by (caption text, text-encoder fingerprint). A second run over the same data encodes
nothing; any change to an image, a caption, the bucket or the weights makes a new entry.

Entries live in safetensors shards (``latent-shards/``, ``text-shards/``) of up to ``SHARD_ENTRIES``
entries or ``SHARD_BYTES``: a shard's header lists its keys, so the shard files are the index (no index
file to get out of step), each shard is written whole and renamed (a crash leaves no half shard), and
training reads entries through memory maps kept open, so a step opens no file and memory does not grow
with the dataset. Images are decoded and resized by a pool of threads and encoded in batches of one
bucket; under ``torchrun`` / ``accelerate launch`` each process encodes every ``world``-th batch and the
shards together are the cache one process would have written.

With ``crop: random`` the crop is drawn once per image (seeded by the image hash) when its latent
is cached: caching and a fresh crop every epoch exclude each other.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..io import atomic_write, sha256_text
from ..models import family_for
from .buckets import Bucket, nearest_bucket, resize_and_crop
from .dataset import Item, load_rgb

SHARD_ENTRIES = 256
SHARD_BYTES = 256 * 2**20
OPEN_SHARDS = 64  # memory maps kept open at once (file descriptors)
ENCODE_BATCH = 8  # images of one bucket per VAE call


@dataclass(frozen=True)
class CacheRef:
    """Where one cached tensor lies: its shard and its key there."""

    shard: Path
    key: str


@dataclass
class CachedSample:
    latent: CacheRef
    texts: list[CacheRef]  # one embedding per wording of the caption (caption styles), in order
    bucket: Bucket
    caption: str
    image: Path | None = None  # the source image (its category drives hierarchical sampling)

    @property
    def text(self) -> CacheRef:
        return self.texts[0]


@dataclass
class CachedDataset:
    samples: list[CachedSample]
    empty_text: CacheRef  # the "" embedding: caption dropout and the CFG negative
    prompt_texts: dict[str, CacheRef] = field(default_factory=dict)
    encoded_latents: int = 0
    encoded_texts: int = 0


class ShardedStore:
    """One kind of cache entry in safetensors shards under ``folder``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read every shard's header (a shard another process just wrote included)."""
        self.index = {}
        for shard in sorted(self.folder.glob("*.safetensors")):
            for key in _open_shard(shard).keys():
                self.index[key] = shard

    def ref(self, key: str) -> CacheRef:
        return CacheRef(self.index[key], key)

    def writer(self, prefix: str) -> ShardWriter:
        return ShardWriter(self, prefix)


class ShardWriter:
    """Collects entries and writes a shard whenever it is full (and on ``close``)."""

    def __init__(self, store: ShardedStore, prefix: str):
        self.store, self.prefix = store, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.pending[key] = tensor.detach().cpu().clone()  # a row of a batch: its own storage
        self.bytes += tensor.numel() * tensor.element_size()
        if len(self.pending) >= SHARD_ENTRIES or self.bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tensors, self.pending, self.bytes = self.pending, {}, 0
        name = hashlib.sha256("|".join(sorted(tensors)).encode()).hexdigest()[:16]  # the same entries, the same name
        shard = self.store.folder / f"{self.prefix}-{name}.safetensors"
        atomic_write(shard, lambda tmp: save_file(tensors, tmp))
        for key in tensors:
            self.store.index[key] = shard

    def close(self) -> None:
        self.flush()


@lru_cache(maxsize=OPEN_SHARDS)
def _open_shard(shard: Path):
    # safe_open memory-maps the file; get_tensor copies one entry out
    return safe_open(str(shard), framework="pt", device="cpu")


def load_entry(ref: CacheRef) -> torch.Tensor:
    """One cached tensor, copied out of its shard's memory map."""
    return _open_shard(ref.shard).get_tensor(ref.key)


load_latent = load_embedding = load_entry  # the names say what a call site reads


def latent_key(item: Item, vae_fp: str, bucket: Bucket, crop: str) -> str:
    return sha256_text(f"latent|{item.sha256}|{vae_fp}|{bucket}|{crop}")[:32]


def text_key(text: str, te_fp: str) -> str:
    return sha256_text(f"text|{te_fp}|{text}")[:32]


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [-1, 1], as diffusers' VaeImageProcessor normalises."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr * 2.0 - 1.0).unsqueeze(0)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_caches(items: list[Item], buckets: list[Bucket], cache_dir: Path, model: str, **kwargs) -> CachedDataset:
    """Encode whatever is not cached yet; return where every sample's latent and embedding lies (the
    keyword arguments are ``build_cache_groups``')."""
    cached, groups = build_cache_groups([(items, buckets)], cache_dir, model, **kwargs)
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
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    workers: int | None = None,
) -> tuple[CachedDataset, list[list[CachedSample]]]:
    """Encode what is not cached yet for several (items, buckets) groups at once (the stages of a resolution
    curriculum, a validation set): one pass, one progress bar per encoder. Returns the shared part (the
    empty and prompt embeddings, counts) and each group's samples.

    ``wordings(caption)`` lists the texts to embed for a caption (e.g. the caption in each training style);
    by default the caption itself. With ``world`` processes, process ``rank`` encodes every ``world``-th
    batch and ``barrier()`` waits for the others before the shards are read back. ``workers``: threads that
    decode and resize images (default: the cores, at most 8)."""
    cache_dir = Path(cache_dir)
    family = family_for(model)
    vae_fp = family.fingerprint(model, "vae", revision)
    te_fp = family.fingerprint(model, "text_encoder", revision)
    latent_store, text_store = ShardedStore(cache_dir / "latent-shards"), ShardedStore(cache_dir / "text-shards")

    planned: list[list[tuple[Item, Bucket, str]]] = []
    for items, buckets in groups:
        planned.append([])
        for item in items:
            bucket = nearest_bucket(item.width, item.height, buckets)
            planned[-1].append((item, bucket, latent_key(item, vae_fp, bucket, crop)))
    every = [entry for group in planned for entry in group]

    wordings = wordings or (lambda caption: [caption])
    worded = {item.caption: wordings(item.caption) for item, _, _ in every}
    texts = sorted({t for variants in worded.values() for t in variants} | {""} | set(prompts or []))
    text_keys = {t: text_key(t, te_fp) for t in texts}

    todo = sorted({key: (item, bucket, key) for item, bucket, key in every if key not in latent_store.index}.values(),
                  key=lambda entry: (entry[1].width, entry[1].height, entry[2]))
    batches = [chunk for _, group in _by_bucket(todo) for chunk in _chunks(group, ENCODE_BATCH)]
    mine = batches[rank::world]
    if mine:
        pipe = family.load_pipeline(model, dtype=vae_dtype, device=device, components=("vae",), revision=revision)
        writer = latent_store.writer(f"r{rank}")
        bar = tqdm(total=sum(len(b) for b in mine), desc="caching latents", unit="img")
        for batch, pixels in _decoded(mine, crop, workers):
            latents = family.encode_images(pipe.vae, pixels)
            for (_, _, key), latent in zip(batch, latents, strict=True):
                writer.add(key, latent)
            bar.update(len(batch))
        writer.close()
        bar.close()
        del pipe  # the VAE leaves memory before the text encoder arrives
        _release_memory()

    missing_texts = [t for t in texts if text_keys[t] not in text_store.index]
    my_texts = missing_texts[rank::world]
    if my_texts:
        pipe = family.load_pipeline(
            model, dtype=text_dtype, device=device, components=("text_encoder", "tokenizer"), revision=revision
        )
        writer = text_store.writer(f"r{rank}")
        for text in tqdm(my_texts, desc="caching text embeddings", unit="caption"):
            # exactly the pipeline's own encoding (second-to-last hidden state, BOS, truncation), one text
            # at a time: padding a batch would change what the encoder attends to
            writer.add(text_keys[text], pipe.encode_prompt(text, device=pipe.text_encoder.device)[0])
        writer.close()
        del pipe  # training runs with the text encoder unloaded
        _release_memory()
    if world > 1:
        barrier()
        latent_store.refresh()
        text_store.refresh()

    samples = [[CachedSample(latent_store.ref(key), [text_store.ref(text_keys[t]) for t in worded[item.caption]],
                             bucket, item.caption, item.image) for item, bucket, key in group] for group in planned]
    shared = CachedDataset(samples=[], empty_text=text_store.ref(text_keys[""]),
                           prompt_texts={p: text_store.ref(text_keys[p]) for p in (prompts or [])},
                           encoded_latents=len(todo), encoded_texts=len(missing_texts))
    return shared, samples


def _by_bucket(entries: list) -> Iterator[tuple[Bucket, list]]:
    groups: dict[Bucket, list] = {}
    for entry in entries:
        groups.setdefault(entry[1], []).append(entry)
    return iter(groups.items())


def _chunks(entries: list, size: int) -> list[list]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


def _decoded(batches: list[list], crop: str, workers: int | None) -> Iterator[tuple[list, torch.Tensor]]:
    """Each batch with its images decoded, resized and cropped by a thread pool (PIL releases the GIL while
    decoding and resampling), a few batches ahead of the encoder and no more: memory stays bounded."""
    workers = workers or min(8, os.cpu_count() or 1)

    def prepare(entry) -> torch.Tensor:
        item, bucket, _ = entry
        return image_to_tensor(resize_and_crop(load_rgb(item.image), bucket, crop, random.Random(item.sha256)))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead = [pool.map(prepare, batch) for batch in batches[:2]]
        for i, batch in enumerate(batches):
            if i + 2 < len(batches):
                ahead.append(pool.map(prepare, batches[i + 2]))
            yield batch, torch.cat(list(ahead[i]))
            ahead[i] = None
