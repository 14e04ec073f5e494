"""Datasets at scale on this CPU: check cold / warm, cache build (1 vs 2 processes), data loading per step.

    OMP_NUM_THREADS=1 python bench/dataset_scale.py [--images 5000] [--size 512]

1. A synthetic dataset of ``--images`` posters at ``--size`` px (PNG + caption), written once.
2. ``check_dataset``: cold (every image decoded, hashed and given its perceptual signature) and warm (the
   remembered checks; no image opened), twice each, alternating; the near-duplicate search's share of a
   warm check (with / without it, alternating), the banded search against a brute-force scan of every
   pair (same pairs, time ratio), and the search over 100k random signatures.
3. Cache build for micro ERNIE at 64 px (decode + resize by the thread pool, VAE in batches of one bucket,
   text embeddings), into an empty cache: one process (``rank 0 of 1``), then two processes (ranks 0 and 1
   of 2, a file barrier between them), alternating, twice each. Images/s of the whole build.
4. Data loading in a step: 8 latents and 8 embeddings read from the shards (what a batch-8 step reads),
   against a micro LoRA training step at batch 8 measured in the same run.
5. The extrapolation to 100k images at 1024 px on a GPU, with the formula.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ernie_lora.data import check_dataset, make_buckets  # noqa: E402

WORKER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {src!r})
from ernie_lora.data import check_dataset, make_buckets
from ernie_lora.data.cache import build_caches
rank, world = int(sys.argv[1]), int(sys.argv[2])
cache, data, flag = Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
items = check_dataset(data, min_side=16).items

def barrier():
    (flag / f"done-{{rank}}").touch()
    while len(list(flag.glob("done-*"))) < world:
        time.sleep(0.05)

start = time.perf_counter()
build_caches(items, make_buckets(64, 16), cache, "micro", text_dtype="fp32", rank=rank, world=world, barrier=barrier)
print(time.perf_counter() - start)
"""


def build(workdir: Path, data: Path, world: int) -> float:
    cache, flag = workdir / f"cache-{world}", workdir / f"flag-{world}"
    for folder in (cache, flag):
        shutil.rmtree(folder, ignore_errors=True)
    flag.mkdir()
    script = workdir / "worker.py"
    script.write_text(WORKER.format(src=str(ROOT / "src")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(cache), str(data), str(flag)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for r in range(world)]
    for p in procs:
        p.communicate()
        if p.returncode:
            raise SystemExit(f"cache worker failed ({p.returncode})")
    return time.perf_counter() - start


def loading_vs_step(workdir: Path, data: Path) -> tuple[float, float]:
    import torch

    from ernie_lora.data.cache import build_caches, load_embedding, load_latent
    from ernie_lora.lora.adapters import add_lora, resolve_targets
    from ernie_lora.models import ERNIE_IMAGE

    items = check_dataset(data, min_side=16).items
    cached = build_caches(items, make_buckets(64, 16), workdir / "cache-1", "micro", text_dtype="fp32")
    samples = cached.samples
    rng = random.Random(0)
    transformer = ERNIE_IMAGE.load_transformer("micro", dtype="fp32")
    add_lora(transformer, 8, 8, resolve_targets(transformer, "attn_mlp"))
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loads, steps = [], []
    for i in range(40):
        batch = rng.sample(samples, 8)
        start = time.perf_counter()
        x0 = torch.stack([load_latent(s.latent) for s in batch])
        texts = [load_embedding(s.text) for s in batch]
        loaded = time.perf_counter()
        sigmas = torch.rand(8)
        noise = torch.randn_like(x0)
        x_t = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
        pred = ERNIE_IMAGE.predict_velocity(transformer, x_t, sigmas, texts)
        loss = ((pred - (noise - x0)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        done = time.perf_counter()
        if i >= 5:
            loads.append(loaded - start)
            steps.append(done - loaded)
    return statistics.median(loads), statistics.median(steps)


def near_duplicate_search(data: Path, n: int) -> None:
    import json

    import numpy as np

    from ernie_lora.data.duplicates import COLOUR_TOLERANCE, NEAR_DISTANCE, near_duplicates

    with_near, without = [], []
    for _ in range(3):
        start = time.perf_counter()
        check_dataset(data, min_side=16)
        with_near.append(time.perf_counter() - start)
        start = time.perf_counter()
        check_dataset(data, min_side=16, near=None)
        without.append(time.perf_counter() - start)
    entries = json.loads((data / ".ernie_lora_cache" / "checked.json").read_text())["images"]
    signatures = {name: entry[6] for name, entry in entries.items()}
    start = time.perf_counter()
    pairs = near_duplicates(signatures)
    banded = time.perf_counter() - start
    names = sorted(signatures)
    packed = np.stack([np.frombuffer(bytes.fromhex(signatures[k].split(":")[0]), np.uint8) for k in names])
    colours = np.stack([np.frombuffer(bytes.fromhex(signatures[k].split(":")[1]), np.uint8) for k in names])
    colours = colours.astype(np.int16)
    start = time.perf_counter()
    brute = []
    for i in range(0, len(names), 256):  # every pair, 256 rows at a time
        d = np.bitwise_count(packed[i:i + 256, None] ^ packed[None]).sum(axis=2)
        gap = np.abs(colours[i:i + 256, None] - colours[None]).max(axis=2)
        for a, b in zip(*np.nonzero((d <= NEAR_DISTANCE) & (gap <= COLOUR_TOLERANCE)), strict=True):
            if i + a < b:
                brute.append((names[i + a], names[b], int(d[a, b])))
    scan = time.perf_counter() - start
    rng = np.random.default_rng(0)
    many = {f"{i:06d}": rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() + ":" + "80" * 12
            for i in range(100_000)}
    start = time.perf_counter()
    near_duplicates(many)
    hundred_k = time.perf_counter() - start
    print(f"near duplicates, {n} images: {len(pairs)} pairs (the synthetic world repeats layouts); warm check "
          f"with the search {statistics.median(with_near):.2f} s, without {statistics.median(without):.2f} s; banded "
          f"search {banded:.2f} s vs every pair {scan:.2f} s: {scan / banded:.0f}x faster, same pairs: "
          f"{sorted(brute) == pairs}; 100k random signatures: {hundred_k:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the dataset in this folder")
    args = parser.parse_args()
    from ernie_lora.data.synthetic import write_synthetic_dataset

    tmp = Path(tempfile.mkdtemp(prefix="dataset-scale-"))
    try:
        data = args.keep or tmp / "data"
        if not (data / "metadata.jsonl").exists():
            start = time.perf_counter()
            write_synthetic_dataset(data, count=args.images, seed=0, size=args.size)
            print(f"wrote {args.images} images of {args.size} px in {time.perf_counter() - start:.0f} s "
                  f"({sum(p.stat().st_size for p in data.glob('*.png')) / 2**20:.0f} MiB of PNG)")
        checked = data / ".ernie_lora_cache" / "checked.json"
        cold, warm = [], []
        for _ in range(2):
            checked.unlink(missing_ok=True)
            start = time.perf_counter()
            check_dataset(data, min_side=16)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            report = check_dataset(data, min_side=16)
            warm.append(time.perf_counter() - start)
        n = len(report.items)
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"check_dataset, {n} images: cold {c:.1f} s ({n / c:.0f} images/s), warm {w:.2f} s "
              f"({n / w:.0f} images/s): warm / cold = {w / c:.3f}")
        near_duplicate_search(data, n)

        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(2):
            for world in (1, 2):
                times[world].append(build(tmp, data, world))
        one, two = statistics.median(times[1]), statistics.median(times[2])
        print(f"cache build (micro, 64 px; decode + resize + VAE + text encoder; whole command incl. start-up): "
              f"1 process {one:.1f} s ({n / one:.0f} images/s), 2 processes {two:.1f} s ({n / two:.0f} images/s):"
              f" {one / two:.2f}x")
        load, step = loading_vs_step(tmp, data)
        print(f"batch 8 from the shards: {load * 1000:.2f} ms; micro LoRA step (batch 8, forward + backward + "
              f"AdamW): {step * 1000:.1f} ms; data loading = {load / (load + step):.1%} of a step")
        per_image_check = c / n
        print("extrapolation to 100k images at 1024 px (formula; figures measured here except the GPU's):")
        print(f"  check cold  = N * t_check(1024) ~ 100000 * {per_image_check * 1000:.1f} ms * (1024/{args.size})^2 "
              f"= {100000 * per_image_check * (1024 / args.size) ** 2 / 60:.0f} min on one core; warm: "
              f"{100000 * w / n:.1f} s (stat + JSON, no pixels)")
        print("  cache build = N * max(t_decode(1024) / workers, t_vae(1024) on the GPU) + N_captions * t_text; "
              "decoding is the CPU's part and divides by the pool's threads and the processes")
        print(f"  a step reads 8 entries from open memory maps: {load * 1000:.2f} ms here, independent of N "
              "(the shards' headers are read once at start: N / 256 files)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
