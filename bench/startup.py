"""How long the commands users wait on take to answer: each as a fresh process, against a bare Python.

    OMP_NUM_THREADS=1 python bench/startup.py [--rounds 5]

Commands (interleaved round by round; medians): ``python -c pass``; ``ernie-lora --help``; a config with
an unknown key (``train``); ``lora info`` and ``lora verify`` on a LoRA trained on the tiny model;
``python -c "import torch"`` for scale (what any command that runs a model pays first).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "ernie-lora"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bad = tmp / "bad.yaml"
        bad.write_text("model:\n  name: micro\ntrain:\n  stepz: 3\n")
        subprocess.run([str(BIN), "train", str(ROOT / "configs" / "tiny-lora.yaml"), "-o", str(tmp / "run"),
                        "--progress", "off", "--set", "train.steps=2", "--set", f"data.cache_dir={tmp / 'cache'}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lora = tmp / "run" / "lora.safetensors"
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "ernie-lora --help": [str(BIN), "--help"],
            "config error (train)": [str(BIN), "train", str(bad)],
            "lora info": [str(BIN), "lora", "info", str(lora)],
            "lora verify": [str(BIN), "lora", "verify", str(lora)],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds + 1):
            for name, cmd in commands.items():
                start = time.perf_counter()
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
    bare = statistics.median(times["python -c pass"][1:])
    print(f"fresh processes, medians of {args.rounds} rounds (the first round not counted)")
    for name, ts in times.items():
        t = statistics.median(ts[1:])
        print(f"  {name:28s} {t:7.3f} s  {t / bare:6.1f}x bare python")


if __name__ == "__main__":
    main()
