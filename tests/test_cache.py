import torch
from PIL import Image

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
    assert torch.equal(load_embedding(sample.text), expected_text)
    assert torch.equal(load_embedding(cached.empty_text), pipe.encode_prompt("", device="cpu")[0])
    image = resize_and_crop(load_rgb(item.image), nearest_bucket(item.width, item.height, buckets))
    encoded = ERNIE_IMAGE.encode_images(pipe.vae, image_to_tensor(image))[0]
    torch.testing.assert_close(load_latent(sample.latent), encoded)


def test_atomic_writes_leave_normal_permissions(tmp_path):
    import os

    from ernie_lora.io import atomic_write_text

    path = atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))


def _entries(folder):
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_two_processes_cache_exactly_what_one_does(tmp_path, monkeypatch):
    """Two ranks as threads (a barrier between them); each builds the tiny model under a lock, since
    building it seeds torch's global generator, which threads share and processes do not."""
    import threading

    from ernie_lora.data.synthetic import write_synthetic_dataset
    from ernie_lora.models import ErnieImageFamily

    lock, load = threading.Lock(), ErnieImageFamily.load_pipeline

    def locked_load(self, *args, **kwargs):
        with lock:
            return load(self, *args, **kwargs)

    monkeypatch.setattr(ErnieImageFamily, "load_pipeline", locked_load)

    data = write_synthetic_dataset(tmp_path / "data", count=20, kind="poster", seed=4, size=32)
    Image.new("RGB", (48, 24), (200, 30, 30)).save(data / "wide.png")  # a second bucket
    (data / "wide.txt").write_text("a wide red banner", encoding="utf-8")
    items = check_dataset(data, min_side=16).items
    buckets = make_buckets(32, 4)
    one = build_caches(items, buckets, tmp_path / "one", "tiny", text_dtype="fp32", workers=2)
    barrier, results = threading.Barrier(2), {}

    def rank(r):
        results[r] = build_caches(items, buckets, tmp_path / "two", "tiny", text_dtype="fp32", rank=r, world=2,
                                  barrier=barrier.wait, workers=1)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for kind in ("latent-shards", "text-shards"):
        a, b = _entries(tmp_path / "one" / kind), _entries(tmp_path / "two" / kind)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), kind
        writers = {p.name.split("-")[0] for p in (tmp_path / "two" / kind).glob("*.safetensors")}
        assert writers == {"r0", "r1"}, kind  # both processes encoded a share
    for r in (0, 1):  # every process reads every sample back, from whichever shard holds it
        got = [load_latent(s.latent) for s in results[r].samples]
        assert all(torch.equal(x, load_latent(s.latent)) for x, s in zip(got, one.samples, strict=True))


def test_entries_are_read_from_a_few_open_shards_not_a_file_per_sample(poster_dataset, tmp_path, monkeypatch):
    from ernie_lora.data import cache as cache_module

    monkeypatch.setattr(cache_module, "SHARD_ENTRIES", 4)
    items = check_dataset(poster_dataset, min_side=32).items  # 6 images -> shards of 4 and 2
    cached = build_caches(items, make_buckets(32, 4), tmp_path / "cache", "tiny")
    shards = sorted((tmp_path / "cache" / "latent-shards").glob("*.safetensors"))
    assert len(shards) == 2 and not list((tmp_path / "cache" / "latent-shards").glob(".*.tmp"))
    cache_module._open_shard.cache_clear()
    for _ in range(5):  # five epochs of reads
        for sample in cached.samples:
            load_latent(sample.latent)
    assert cache_module._open_shard.cache_info().misses == 2  # each shard opened once, then memory-mapped
