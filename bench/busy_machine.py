"""A micro training run on a busy machine: alone, beside a busy loop, beside a second torch process.

    python bench/busy_machine.py [--steps 60] [--rounds 2]

The workload is what a user runs: ``ernie-lora train`` (configs/micro-lora.yaml on 64 synthetic posters,
``--steps`` steps, its own cache) as a fresh process, timed from start to exit. Two thread policies:

- ``2 threads``: torch's default on this 2-core machine (``ERNIE_LORA_THREADS=2``), what ran before;
- ``policy``: ernie-lora's choice (one thread below ``cpu_threads.SMALL_DIT_PARAMETERS``).

Neighbours, started before the run and killed after it: none; ``while True: pass`` in Python; a second
torch process multiplying 128x128 matrices in a loop with torch's default threads (what a second job or a
``generate`` beside training looks like). Runs take turns (neighbour x policy) round by round; medians.
OMP_NUM_THREADS must not be set: the bench is about the thread count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

NEIGHBOURS = {
    "alone": None,
    "busy loop": "while True: pass",
    "torch process": "import torch\na = torch.randn(128, 128)\nwhile True: a @ a",
}
POLICIES = {"2 threads": {"ERNIE_LORA_THREADS": "2"}, "policy": {}}


def train_once(dataset: Path, work: Path, steps: int, env_extra: dict, tag: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ERNIE_LORA_THREADS")}
    env.update(env_extra)
    out = work / f"run-{tag}"
    cmd = [sys.executable, "-m", "ernie_lora.cli", "train", str(ROOT / "configs" / "micro-lora.yaml"), "-o",
           str(out), "--overwrite", "--progress", "off", "--set", f"data.path={dataset}", "--set",
           f"data.cache_dir={work / 'cache'}", "--set", f"train.steps={steps}", "--set", "sample.every=0",
           "--set", "validation.samples=0"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if "OMP_NUM_THREADS" in os.environ:
        sys.exit("unset OMP_NUM_THREADS: this bench compares thread counts")
    from ernie_lora.data.synthetic import write_synthetic_dataset

    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = write_synthetic_dataset(work / "data", count=64, kind="poster", seed=0, size=64)
        train_once(dataset, work, 2, {}, "warm")  # fills the cache and the OS file cache
        for _ in range(args.rounds):
            for neighbour, code in NEIGHBOURS.items():
                for policy, env in POLICIES.items():
                    proc = subprocess.Popen([sys.executable, "-c", code]) if code else None
                    try:
                        time.sleep(1.0 if code else 0)  # the neighbour is running (torch imported) first
                        t = train_once(dataset, work, args.steps, env, policy.replace(" ", "-"))
                    finally:
                        if proc is not None:
                            proc.kill()
                            proc.wait()
                    times.setdefault((neighbour, policy), []).append(t)
                    print(f"  {neighbour:14s} {policy:10s} {t:7.1f} s", flush=True)
    print(f"ernie-lora train micro, {args.steps} steps, whole command; {os.cpu_count()} cores; medians of "
          f"{args.rounds} rounds")
    print(f"{'neighbour':14s} " + "".join(f"{p:>12s} {'x alone':>8s}" for p in POLICIES))
    for neighbour in NEIGHBOURS:
        row = f"{neighbour:14s} "
        for policy in POLICIES:
            t = statistics.median(times[neighbour, policy])
            alone = statistics.median(times["alone", policy])
            row += f"{t:10.1f} s {t / alone:7.2f}x"
        print(row)


if __name__ == "__main__":
    main()
