"""Do the tests catch the bugs that would make our claims false? Apply each mutation to a copy of the
working tree, run the tests that should catch it, and report whether they failed (they must).

    python scripts/mutation_check.py            # every mutation
    python scripts/mutation_check.py --list     # what each one does
    python scripts/mutation_check.py dmd-sign   # one of them

A copy per mutation (never the working tree itself), run with its ``src/`` first on the path; the
unmutated copy is run first: its tests must pass, else a "caught" mutation would prove nothing.
Exit status 0 only when the clean run passes and every mutation turns its tests red.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("dpo-swap", "DPO loss: chosen and rejected swapped", "src/ernie_lora/recipes/dpo.py",
             "inside = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))",
             "inside = -0.5 * beta * ((err_l - ref_l) - (err_w - ref_w))",
             ("tests/test_dpo.py",)),
    Mutation("dpo-swap-data", "DPO step: the chosen latents fed as the rejected and vice versa",
             "src/ernie_lora/recipes/dpo.py",
             "x0 = torch.cat([x_w, x_l]).to(device, torch.float32)",
             "x0 = torch.cat([x_l, x_w]).to(device, torch.float32)",
             ("tests/test_dpo.py",)),
    Mutation("dmd-sign", "DMD: the student's gradient sign flipped", "src/ernie_lora/recipes/dmd.py",
             "return torch.nan_to_num((fake - real) / weight)", "return torch.nan_to_num((real - fake) / weight)",
             ("tests/test_distill.py",)),
    Mutation("dmd-no-fake", "DMD: the fake-score update removed", "src/ernie_lora/recipes/dmd.py",
             "fake_losses.append(fake_update(samples))", "fake_losses.append(0.0)",
             ("tests/test_distill.py",)),
    Mutation("aes-seed", "aesthetic head: initial weights from the caller's RNG, not the seed",
             "src/ernie_lora/eval/aesthetic.py",
             "        torch.manual_seed(seed)\n        head = AestheticHead(x.shape[1])",
             "        head = AestheticHead(x.shape[1])",
             ("tests/test_rank_store.py",)),
    Mutation("demo-no-lora", "demo: the 'after' samples drawn without the LoRA", "src/ernie_lora/demo.py",
             'loras=[LoraSpec(run / "lora.safetensors", 1.0)]', "loras=None",
             ("tests/test_demo.py",)),
    Mutation("demo-train-prompts", "demo: evaluated on train-split prompts", "src/ernie_lora/demo.py",
             'split_captions(eval_count, "test"', 'split_captions(eval_count, "train"',
             ("tests/test_demo.py",)),
    Mutation("layout-colour-only", "layout score: the headline is the colour score alone",
             "src/ernie_lora/eval/layout.py", "headline = structure * colour", "headline = colour",
             ("tests/test_layout_score.py",)),
)


def copy_tree(target: Path) -> None:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / rel)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[bool, str, float]:
    """Whether the tests pass, and what the run says: the failing tests' names, else pytest's summary."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests], cwd=tree,
                          env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    failed = [line.split()[1].split("::")[-1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    said = f"failed: {', '.join(failed)}" if failed else "all passed" if proc.returncode == 0 else proc.stdout[-300:]
    return proc.returncode == 0, said, time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:20s} {m.what}  ({m.file}; caught by {', '.join(m.tests)})")
        return 0
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"error: unknown mutation {sorted(unknown)[0]!r}; see --list", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    ok = True
    with tempfile.TemporaryDirectory(prefix="ernie-lora-mutation-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        passed, last, seconds = run_tests(clean, tuple(sorted({t for m in chosen for t in m.tests})))
        print(f"{'unmutated':20s} {'passes' if passed else 'FAILS'} ({seconds:.0f} s): {last}", flush=True)
        if not passed:
            return 1
        for m in chosen:
            tree = Path(tmp) / m.name
            shutil.copytree(clean, tree)
            path = tree / m.file
            text = path.read_text(encoding="utf-8")
            if text.count(m.old) != 1:
                print(f"{m.name:20s} NOT APPLIED: the text to mutate is not (once) in {m.file}")
                ok = False
                continue
            path.write_text(text.replace(m.old, m.new), encoding="utf-8")
            passed, last, seconds = run_tests(tree, m.tests)
            print(f"{m.name:20s} {'MISSED (tests pass)' if passed else 'caught'} ({seconds:.0f} s): {m.what}\n"
                  f"{'':20s} {last}", flush=True)
            ok &= not passed
            shutil.rmtree(tree)
    print("every mutation turns the tests red" if ok else "some mutation survives: the tests cannot see it")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
