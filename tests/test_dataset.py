import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from ernie_lora.data import check_dataset, load_rgb, make_buckets, nearest_bucket, resize_and_crop
from ernie_lora.errors import UserError


def _img(path: Path, size=(64, 64), mode="RGB", colour=(10, 120, 200)) -> Path:
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


def _good(folder: Path, stem: str, colour=(10, 120, 200), size=(64, 64)) -> None:
    _img(folder / f"{stem}.png", size=size, colour=colour)
    (folder / f"{stem}.txt").write_text(f'a poster with title "{stem}", blue theme', encoding="utf-8")


def _findings(report) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for f in report.findings:
        out.setdefault(f.path, []).append((f.level, f.message))
    return out


def test_every_problem_is_reported_per_file(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    _good(d, "ok")
    (d / "zero.png").write_bytes(b"")
    (d / "zero.txt").write_text("x")
    # a noisy image so the PNG has real compressed data to cut
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "trunc.png")
    data = (d / "trunc.png").read_bytes()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])
    (d / "trunc.txt").write_text("x")
    (d / "garbage.jpg").write_bytes(b"this is not an image at all")
    (d / "garbage.txt").write_text("x")
    _img(d / "nocap.png", colour=(1, 2, 3))
    _img(d / "emptycap.png", colour=(4, 5, 6))
    (d / "emptycap.txt").write_text("   \n")
    (d / "orphan.txt").write_text("caption without image")
    _img(d / "small.png", size=(16, 40), colour=(7, 8, 9))
    (d / "small.txt").write_text("small")
    _good(d, "dup")
    (d / "dup.txt").write_text("same pixels as ok")
    Image.new("CMYK", (64, 64), (0, 50, 100, 0)).save(d / "cmyk.jpg")
    (d / "cmyk.txt").write_text("cmyk")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(d / "deep.png")
    (d / "deep.txt").write_text("16 bit")
    Image.new("RGB", (64, 64), (9, 9, 90)).convert("P").save(d / "pal.png")
    (d / "pal.txt").write_text("palette")
    Image.new("RGBA", (64, 64), (9, 200, 9, 100)).save(d / "alpha.png")
    (d / "alpha.txt").write_text("alpha")
    _img(d / "latin1.png", colour=(11, 12, 13))
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

    report = check_dataset(d, min_side=32)
    f = _findings(report)
    assert f["zero.png"] == [("error", "zero-byte file")]
    assert f["trunc.png"][0][0] == "error" and "truncated" in f["trunc.png"][0][1]
    assert f["garbage.jpg"][0][0] == "error" and "unreadable" in f["garbage.jpg"][0][1]
    assert f["nocap.png"][0][0] == "error" and "missing caption" in f["nocap.png"][0][1]
    assert f["emptycap.png"] == [("warning", "empty caption (trains unconditionally)")]
    assert f["orphan.txt"] == [("warning", "caption without an image")]
    assert f["small.png"][0][0] == "warning" and "smaller than the smallest bucket" in f["small.png"][0][1]
    assert any("duplicate image" in m for _, m in f["ok.png"] + f.get("dup.png", []))
    assert "CMYK" in f["cmyk.jpg"][0][1]
    assert "16-bit" in f["deep.png"][0][1]
    assert "palette" in f["pal.png"][0][1]
    assert "alpha" in f["alpha.png"][0][1]
    assert f["latin1.txt"][0][0] == "error" and "not UTF-8" in f["latin1.txt"][0][1]
    usable = {item.image.name for item in report.items}
    assert {"ok.png", "small.png", "cmyk.jpg", "deep.png", "pal.png", "alpha.png", "emptycap.png"} <= usable
    assert not usable & {"zero.png", "trunc.png", "garbage.jpg", "nocap.png", "latin1.png"}
    with pytest.raises(UserError, match=r"problem\(s\) stop training; first: "):
        report.raise_if_errors()


def test_metadata_jsonl_captions_and_bad_lines(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    _img(d / "a.png", colour=(1, 1, 1))
    _img(d / "b.png", colour=(2, 2, 2))
    rows = [json.dumps({"file_name": "a.png", "text": "caption a"}), "{not json", json.dumps({"text": "no name"}),
            json.dumps({"file_name": "gone.png", "text": "x"})]
    (d / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = check_dataset(d, min_side=32)
    captions = {i.image.name: i.caption for i in report.items}
    assert captions == {"a.png": "caption a"}
    f = _findings(report)
    assert ("error", "invalid JSON (Expecting property name enclosed in double quotes)") in f["metadata.jsonl:2"]
    assert ("error", "missing key 'file_name'") in f["metadata.jsonl:3"]
    assert any("gone.png" in m for _, m in f["metadata.jsonl"])
    assert f["b.png"][0][0] == "error"


def test_empty_and_missing_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        check_dataset(tmp_path / "empty").raise_if_errors()
    with pytest.raises(UserError, match="not a folder"):
        check_dataset(tmp_path / "nowhere")


def test_dataset_check_cli_exit_codes(tmp_path, capsys):
    d = tmp_path / "ds"
    d.mkdir()
    _good(d, "fine")
    code, out, _ = run_cli(["dataset", "check", str(d), "--resolution", "32"], capsys)
    assert code == 0 and "1 images, 1 usable, 0 errors" in out
    (d / "broken.png").write_bytes(b"")
    code, out, _ = run_cli(["dataset", "check", str(d), "--resolution", "32"], capsys)
    assert code == 1 and "error: broken.png: zero-byte file" in out
    assert "error: broken.png: missing caption" in out and "2 errors" in out


def test_buckets_fit_the_latent_grid():
    buckets = make_buckets(1024, 16, max_aspect_ratio := 2.0)
    assert all(b.width % 16 == 0 and b.height % 16 == 0 for b in buckets)
    assert all(max(b.ratio, 1 / b.ratio) <= max_aspect_ratio + 1e-9 for b in buckets)
    assert all(abs(b.width * b.height / 1024**2 - 1) < 0.05 for b in buckets)
    names = {str(b) for b in buckets}
    assert {"1024x1024", "1376x768", "768x1360"} <= names
    assert str(nearest_bucket(1920, 1080, buckets)) == "1360x768"
    assert str(nearest_bucket(1080, 1920, buckets)) == "768x1360"
    assert str(nearest_bucket(500, 500, buckets)) == "1024x1024"
    with pytest.raises(UserError, match="data.resolution"):
        make_buckets(1000, 16)


def test_resize_and_crop_and_rgb_conversion(tmp_path):
    image = Image.new("RGB", (400, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 100, 100))  # blue quarter on the left
    bucket = nearest_bucket(400, 100, make_buckets(64, 4, 2.0))  # 2:1, so a 4:1 image is cropped a lot
    center = resize_and_crop(image, bucket, "center")
    assert center.size == (bucket.width, bucket.height)
    assert center.getpixel((0, 0)) == (255, 0, 0)  # the centre crop misses the blue quarter
    left = [resize_and_crop(image, bucket, "random", __import__("random").Random(s)).getpixel((0, 0)) for s in
            range(20)]
    assert len(set(left)) > 1  # random crops differ
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # alpha over white
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert load_rgb(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)


def test_every_batch_is_full_and_of_one_bucket_even_with_remainders():
    from collections import Counter
    from types import SimpleNamespace

    from ernie_lora.data.batches import BucketBatches
    from ernie_lora.data.buckets import Bucket

    sizes = {Bucket(32, 32): 5, Bucket(48, 16): 8, Bucket(16, 48): 2}  # remainders 1, 0 and a bucket < batch
    samples = [SimpleNamespace(bucket=b, id=f"{b}-{i}") for b, n in sizes.items() for i in range(n)]
    batches = BucketBatches(samples, 4, seed=5)
    first_epoch = [batches.next() for _ in range(2 + 2 + 1)]  # ceil(5/4) + ceil(8/4) + ceil(2/4)
    assert batches.epoch == 0 and batches.index == 5
    for batch in first_epoch:
        assert len(batch) == 4 and len({s.bucket for s in batch}) == 1
    seen = Counter(s.id for batch in first_epoch for s in batch)
    assert set(seen) == {s.id for s in samples}  # every image at least once an epoch
    # the fill repeats the fewest images it can: 3 of the 5-bucket once more, the 2-bucket twice over
    assert sorted(seen.values()) == sorted([2, 2, 2, 1, 1] + [1] * 8 + [2, 2])
    state = batches.state_dict()
    after = [[s.id for s in batches.next()] for _ in range(7)]  # into the next epoch
    resumed = BucketBatches(samples, 4, seed=5)
    resumed.load_state_dict(state)
    assert [[s.id for s in resumed.next()] for _ in range(7)] == after
    with pytest.raises(UserError, match="train.batch_size: 0 must be at least 1"):
        BucketBatches(samples, 0, seed=5)


def test_the_lora_recipe_trains_on_full_batches(poster_dataset, tmp_path, monkeypatch):
    from conftest import tiny_config
    from ernie_lora.data.batches import BucketBatches
    from ernie_lora.recipes.lora import train

    sizes = []
    original = BucketBatches.next
    monkeypatch.setattr(BucketBatches, "next", lambda self: sizes.append(len(batch := original(self))) or batch)
    cfg = tiny_config(poster_dataset, tmp_path / "cache", train={"batch_size": 4, "steps": 5})  # 6 images
    train(cfg, tmp_path / "run", progress=False)
    assert sizes == [4] * 5


def test_a_warm_check_opens_no_image_and_a_changed_one_is_checked_again(tmp_path, monkeypatch):
    import os

    from ernie_lora.data import dataset as dataset_module

    for i, colour in enumerate([(10, 20, 30), (200, 10, 10), (10, 20, 30)]):
        _good(tmp_path, f"img{i}", colour=colour, size=(64, 48))
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "alpha.png")
    (tmp_path / "alpha.txt").write_text("a poster", encoding="utf-8")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (tmp_path / "broken.txt").write_text("x", encoding="utf-8")
    cold = check_dataset(tmp_path, min_side=48)
    opened = []
    real_open = dataset_module.Image.open
    monkeypatch.setattr(dataset_module.Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    warm = check_dataset(tmp_path, min_side=48)
    assert opened == [tmp_path / "broken.png"]  # only the file that failed is read again
    assert [str(f) for f in warm.findings] == [str(f) for f in cold.findings]
    assert [(i.image, i.width, i.height, i.sha256) for i in warm.items] == [
        (i.image, i.width, i.height, i.sha256) for i in cold.items]
    assert any("duplicate image" in str(f) for f in warm.findings)  # from the cached hashes
    shown = [str(f) for f in warm.findings]
    assert any("mode RGBA" in f for f in shown) and any("40x40 is smaller" in f for f in shown)
    # a replaced image (same name, new content and time) is decoded again; the others are not
    opened.clear()
    Image.new("RGB", (80, 80), (1, 2, 3)).save(tmp_path / "img1.png")
    os.utime(tmp_path / "img1.png", ns=(1, 1))
    again = check_dataset(tmp_path, min_side=48)
    assert sorted(p.name for p in opened) == ["broken.png", "img1.png"]
    assert {i.image.name: (i.width, i.height) for i in again.items}["img1.png"] == (80, 80)
    # a damaged record is not trusted: everything is checked again
    (tmp_path / ".ernie_lora_cache" / "checked.json").write_text("{not json")
    opened.clear()
    check_dataset(tmp_path, min_side=48)
    assert len(opened) == 5


def _poster(folder: Path, stem: str, band_colour: str = "red", title: str = "Jazz Night", size: int = 256,
            caption: str | None = None) -> Image.Image:
    from ernie_lora.data.designed import DesignedPoster, draw_poster

    image = draw_poster(DesignedPoster("white", "left", band_colour, "blue", title, "every Friday", size=size))
    image.save(folder / f"{stem}.png")
    (folder / f"{stem}.txt").write_text(caption or f'a poster with title "{title}", {band_colour} band at the left',
                                        encoding="utf-8")
    return image


def test_near_duplicates_are_found_and_colour_variants_and_new_words_are_not(tmp_path, monkeypatch):
    import io

    from ernie_lora.data import dataset as dataset_module

    original = _poster(tmp_path, "original")
    small = original.resize((192, 192), Image.Resampling.LANCZOS)  # a resized, re-encoded copy
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=80)
    (tmp_path / "copy.jpg").write_bytes(buffer.getvalue())
    (tmp_path / "copy.txt").write_text("the same poster, smaller", encoding="utf-8")
    (tmp_path / "z_exact.png").write_bytes((tmp_path / "original.png").read_bytes())
    (tmp_path / "z_exact.txt").write_text("the same file", encoding="utf-8")
    _poster(tmp_path, "recoloured", band_colour="green")  # the same design in another colour: a lesson of its own
    _poster(tmp_path, "retitled", title="Book Fair")  # the same template with other words
    _poster(tmp_path, "other", band_colour="purple", title="Summer Market Sale")

    report = check_dataset(tmp_path, min_side=0)
    near = [str(f) for f in report.findings if "near duplicate" in f.message]
    assert len(near) == 1 and near[0].startswith("warning: original.png: near duplicate of copy.jpg"), near
    assert [str(f) for f in report.findings if "duplicate image" in f.message] == [
        "warning: z_exact.png: duplicate image (same content as original.png)"]  # reported once, as exact
    # the signatures are remembered: a warm check finds the same pairs without opening an image
    monkeypatch.setattr(dataset_module.Image, "open", lambda *a, **k: pytest.fail(f"opened {a[0]}"))
    assert [str(f) for f in check_dataset(tmp_path, min_side=0).findings] == [str(f) for f in report.findings]
    assert not any("near duplicate" in f.message for f in check_dataset(tmp_path, min_side=0, near=None).findings)


def test_near_duplicate_search_finds_every_pair_within_the_distance_among_thousands():
    from ernie_lora.data.duplicates import HASH_BITS, near_duplicates

    rng = np.random.default_rng(0)
    colour = bytes(range(12)).hex()
    shapes = {f"{i:05d}": rng.integers(0, 2, HASH_BITS).astype(bool) for i in range(3000)}
    planted = {}
    for i, flips in enumerate([0, 1, 8, 16, 17, 40]):  # at 16 bits still found; 17 and more not
        bits = shapes[f"{i:05d}"].copy()
        bits[rng.choice(HASH_BITS, flips, replace=False)] ^= True
        shapes[f"copy{i}"] = bits
        planted[(f"{i:05d}", f"copy{i}")] = flips
    signatures = {name: f"{np.packbits(bits).tobytes().hex()}:{colour}" for name, bits in shapes.items()}
    found = near_duplicates(signatures, max_distance=16)
    assert found == sorted((a, b, d) for (a, b), d in planted.items() if d <= 16)
    far_colour = dict(signatures, copy1=signatures["copy1"].split(":")[0] + ":" + bytes([200] * 12).hex())
    assert ("00001", "copy1", 1) not in near_duplicates(far_colour, max_distance=16)


def test_dataset_check_flags_images_smaller_than_their_bucket_and_captions_over_the_token_limit(tmp_path, capsys):
    _good(tmp_path, "square", size=(200, 200))  # below its 256x256 bucket though above the smallest bucket side
    _good(tmp_path, "wide", size=(512, 256), colour=(200, 10, 10))
    (tmp_path / "wide.txt").write_text("a poster with title " + '"JAZZ" ' * 130, encoding="utf-8")
    code, out, _ = run_cli(["dataset", "check", str(tmp_path), "--resolution", "256", "--model", "micro"], capsys)
    assert code == 0, out
    assert "warning: square.png: 200x200 is smaller than its bucket 256x256; it will be upscaled 1.28x" in out
    assert "wide.png: 512x256" not in out
    assert "warning: wide.png: caption is 395 tokens; the text encoder reads the first 128, the rest is cut off" in out
    code, out, _ = run_cli(["dataset", "check", str(tmp_path), "--resolution", "256"], capsys)
    assert "captions: lengths not checked against the text encoder's limit; pass --model or --config" in out


def test_language_of_a_caption():
    from ernie_lora.captions.stats import language_of

    assert language_of("a poster with the title at the top, blue theme") == "en"
    assert language_of("ein Plakat mit dem Titel oben und einer blauen Leiste") == "de"
    assert language_of("une affiche avec le titre en haut et une bande bleue") == "fr"
    assert language_of("海报，标题在顶部，蓝色主题") == "zh"
    assert language_of("ポスター、タイトルは上、青いテーマ") == "ja"
    assert language_of("포스터, 위에 제목") == "ko"
    assert language_of("SALE") == "latin"
    assert language_of("2026 !") is None


def test_dataset_stats_buckets_contact_sheet_tokens_words_and_languages(tmp_path, capsys):
    data, out_dir = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out_dir.mkdir()
    colours = {"tall": (200, 20, 20), "tall2": (20, 200, 20), "wide": (20, 20, 200), "square": (240, 200, 0)}
    sizes = {"tall": (64, 128), "tall2": (32, 64), "wide": (128, 64), "square": (64, 64)}
    for stem, colour in colours.items():
        _img(data / f"{stem}.png", size=sizes[stem], colour=colour)
    captions = {"tall": 'a poster with title "夏季促销", red band at the top',
                "tall2": "a poster with a green band, zebra",
                "wide": 'an infographic with title "DATA", blue theme', "square": "ein Plakat mit dem Titel oben"}
    for stem, text in captions.items():
        (data / f"{stem}.txt").write_text(text, encoding="utf-8")
    sheet = out_dir / "sheet.png"
    code, out, err = run_cli(["dataset", "stats", str(data), "--resolution", "64", "--model", "micro", "--sheet",
                              str(sheet), "--chart", str(out_dir / "chart.png")], capsys)
    assert code == 0, err
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "48x88 2, 64x64 1, 88x48 1" in lines["buckets at 64"]  # micro's 4-pixel grid, ratios up to 2
    assert "1 image(s) smaller than their bucket (e.g. tall2.png 32x64)" in lines["upscaled"]
    assert "tokens (micro); limit 128, 0 over it" in lines["caption length"]
    assert "zebra (1)" in lines["unknown words"] and "ein (1)" in lines["unknown words"]
    assert "band 2" in lines["top words"] and "poster 2" in lines["top words"]
    assert "en 3 (75%), de 1 (25%)" in lines["languages"]
    assert "2 of 4 captions; zh 1 (50%), latin 1 (50%)" in lines["quoted text"]
    # the contact sheet: one row per bucket (ratio order), each image as training crops it
    image = np.asarray(Image.open(sheet).convert("RGB")).astype(int)
    row_h = 96 + 14 + 4
    assert image.shape[0] == 3 * row_h + 4
    for row, colour in enumerate([colours["tall"], colours["square"], colours["wide"]]):
        pixel = image[4 + row * row_h + 48, 150 + 20]
        assert np.abs(pixel - colour).max() <= 2, (row, pixel)
    pixel = image[4 + 48, 150 + 52 + 4 + 20]  # the second tall image (52 px wide thumbnails), beside the first
    assert np.abs(pixel - colours["tall2"]).max() <= 2
    assert (out_dir / "chart.png").is_file() and not list(data.glob("*sheet*"))
