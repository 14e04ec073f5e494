import torch

from ernie_lora.data import check_dataset, make_buckets
from ernie_lora.data.buckets import nearest_bucket, resize_and_crop
from ernie_lora.data.cache import build_caches, image_to_tensor, load_embedding, load_latent
from ernie_lora.data.dataset import load_rgb
from ernie_lora.models import ERNIE_IMAGE, build_tiny_pipeline


def test_second_run_encodes_nothing_and_changes_reencode_only_what_changed(poster_dataset, tmp_path):
    cache = tmp_path / "cache"
    buckets = make_buckets(32, 4)
    items = check_dataset(poster_dataset, min_side=32).items
    first = build_caches(items, buckets, cache, "tiny", prompts=["a sample prompt"])
    n_captions = len({i.caption for i in items})
    assert first.encoded_latents == len(items)
    assert first.encoded_texts == n_captions + 2  # + "" (dropout, CFG) + the sample prompt
    second = build_caches(items, buckets, cache, "tiny", prompts=["a sample prompt"])
    assert (second.encoded_latents, second.encoded_texts) == (0, 0)

    caption_file = sorted(poster_dataset.glob("*.txt"))[0]
    caption_file.write_text("a brand new caption", encoding="utf-8")
    items = check_dataset(poster_dataset, min_side=32).items
    third = build_caches(items, buckets, cache, "tiny", prompts=["a sample prompt"])
    assert (third.encoded_latents, third.encoded_texts) == (0, 1)
    # other weights -> other keys: a cache is never reused across models
    other = build_caches(items, buckets, cache, "tiny:1")
    assert other.encoded_latents == len(items)


def test_cached_entries_equal_what_the_pipeline_computes(poster_dataset, tmp_path):
    pipe = build_tiny_pipeline(0)
    buckets = make_buckets(32, 4)
    items = check_dataset(poster_dataset, min_side=32).items
    cached = build_caches(items, buckets, tmp_path / "cache", "tiny", text_dtype="fp32")
    sample, item = cached.samples[0], items[0]
    expected_text = pipe.encode_prompt(item.caption, device="cpu")[0]
    assert torch.equal(load_embedding(sample.text_file), expected_text)
    assert torch.equal(load_embedding(cached.empty_text_file), pipe.encode_prompt("", device="cpu")[0])
    image = resize_and_crop(load_rgb(item.image), nearest_bucket(item.width, item.height, buckets))
    encoded = ERNIE_IMAGE.encode_images(pipe.vae, image_to_tensor(image))[0]
    torch.testing.assert_close(load_latent(sample.latent_file), encoded)


def test_atomic_writes_leave_normal_permissions(tmp_path):
    import os

    from ernie_lora.io import atomic_write_text

    path = atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))
