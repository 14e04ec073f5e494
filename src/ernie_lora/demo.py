"""``ernie-lora demo``: teach micro ERNIE a layout it never saw, with the spine's LoRA recipe.

Micro ERNIE was pretrained without posters whose title band stands at the left or right edge (a
vertical band with a rotated title) and without the colour purple (``data.synthetic.HELD_OUT``). The
demo writes training posters of both concepts (train-split captions), samples micro for test-split
prompts of each concept (never a training caption: checked), trains one LoRA on the mixed data, samples
again with it, and scores structure, colour and the headline before and after. The structural concept
is the demo's point: a new arrangement, not a new colour. Its output folder holds ``dataset/``,
``before/``, ``after/``, ``run/``, ``before_after.png`` and ``report.md``; a folder holding an earlier
demo is refused unless ``overwrite``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from PIL import Image

from .config import TrainRunConfig
from .data.dataset import check_dataset
from .data.synthetic import HELD_OUT, pretraining_colours, seen_bands, split_captions, write_synthetic_dataset
from .errors import UserError
from .eval.layout import score_folder
from .eval.prompts import require_held_out
from .generate import LoraSpec, generate
from .io import atomic_write_text
from .plots import save_image_grid
from .recipes.lora import train
from .recipes.run_dir import prepare_output

# name: (what it is, the synthetic world's sampling arguments)
CONCEPTS = {
    "side bands": ("posters with the title band at the left or right edge (an arrangement micro never saw)",
                   {"kind": "poster", "colours": pretraining_colours(), "bands": HELD_OUT["bands"]}),
    "purple": ("purple posters (a colour micro never saw)",
               {"kind": "poster", "colours": ("purple",), "bands": seen_bands()}),
}
SAMPLING = dict(steps=24, guidance=3.0, width=64, height=64, dtype="fp32")
DEMO_OUTPUTS = ("dataset", "before", "after", "run", "before_after.png", "report.md")
SCORES = ("structure", "colour", "score")


def _folder(concept: str) -> str:
    return concept.replace(" ", "-")


def concept_scores(folder: Path) -> dict[str, dict]:
    """{structure | colour | score: {mean, median, values}} over the images of a folder (in name order, which
    is prompt order: the same prompt and noise before and after)."""
    scores = [s for _, _, s in score_folder(folder) if s is not None]
    if not scores:
        raise UserError(f"{folder}: no image with a prompt of the layout language")
    return {name: {"mean": statistics.mean(values), "median": statistics.median(values), "values": values}
            for name in SCORES for values in [[getattr(s, name) for s in scores]]}


def prepare_demo_dir(output: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier demo unless ``overwrite``, which removes only the demo's outputs."""
    prepare_output(output, "demo", DEMO_OUTPUTS, resume=False, overwrite=overwrite, what="an earlier demo",
                   hint="pass --overwrite (make demo DEMO_FLAGS=--overwrite) or choose another --output")


def run_demo(output: Path, steps: int = 500, count: int = 64, eval_count: int = 16, seed: int = 0,
             data_seed: int | None = None, overwrite: bool = False) -> dict:
    """The demo; returns {concept: {before | after: scores}, steps, final_loss, overlap, seconds}. ``seed``
    seeds the training and the samples' noise, ``data_seed`` (default: ``seed``) the training images and
    the evaluation prompts."""
    started = time.perf_counter()
    phases: dict[str, float] = {}
    output = Path(output)
    prepare_demo_dir(output, overwrite)
    data_seed = seed if data_seed is None else data_seed

    t = time.perf_counter()
    prompts: dict[str, list[str]] = {}
    for i, (concept, (what, world)) in enumerate(CONCEPTS.items()):
        write_synthetic_dataset(output / "dataset" / _folder(concept), count // len(CONCEPTS), seed=data_seed * 10 + i,
                                split="train", **world)
        prompts[concept] = split_captions(eval_count, "test", seed=data_seed * 10 + i + 5, **world)
        print(f"dataset: {count // len(CONCEPTS)} {what}")
    trained = [item.caption for item in check_dataset(output / "dataset", min_side=1).items]
    every_prompt = [p for ps in prompts.values() for p in ps]
    overlap = require_held_out(every_prompt, trained, "demo")
    print(f"evaluation: {len(every_prompt)} test-split prompts; overlap with the training captions: {overlap}")
    phases["synthesise"] = time.perf_counter() - t

    t = time.perf_counter()
    before = {c: generate(ps, model="micro", out_dir=output / "before" / _folder(c), seed=1000 + seed, **SAMPLING)
              for c, ps in prompts.items()}
    results = {c: {"before": concept_scores(output / "before" / _folder(c))} for c in CONCEPTS}
    phases["sample before"] = time.perf_counter() - t
    for c in CONCEPTS:
        print(f"before: {c}: structure {results[c]['before']['structure']['mean']:.3f}, colour "
              f"{results[c]['before']['colour']['mean']:.3f} (means of {len(prompts[c])})")

    t = time.perf_counter()
    cfg = TrainRunConfig.model_validate({
        "model": {"name": "micro", "dtype": "fp32"},
        "data": {"path": str(output / "dataset"), "resolution": 64, "caption_dropout": 0.1},
        "lora": {"rank": 8, "alpha": 8, "targets": "attn_mlp"},
        "train": {"steps": steps, "batch_size": 8, "lr": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 20,
                  "mixed_precision": "no", "gradient_checkpointing": False, "seed": seed},
        "checkpoint": {"every": max(1, steps // 2), "keep": 1},
        "sample": {"every": max(1, steps // 3), "prompts": [ps[0] for ps in prompts.values()],
                   "steps": SAMPLING["steps"], "guidance": SAMPLING["guidance"], "seed": 1000 + seed},
    })
    run = output / "run"
    result = train(cfg, run)
    phases["train LoRA"] = time.perf_counter() - t

    t = time.perf_counter()
    after = {c: generate(ps, model="micro", loras=[LoraSpec(run / "lora.safetensors", 1.0)],
                         out_dir=output / "after" / _folder(c), seed=1000 + seed, **SAMPLING)
             for c, ps in prompts.items()}
    for c in CONCEPTS:
        results[c]["after"] = concept_scores(output / "after" / _folder(c))
    phases["sample after"] = time.perf_counter() - t

    shown = min(8, eval_count)
    rows = [(f"{c} {when}", paths[c][:shown]) for c in CONCEPTS for when, paths in (("before", before),
                                                                                    ("after", after))]
    grid = save_image_grid([Image.open(p) for _, ps in rows for p in ps], output / "before_after.png",
                           labels=[label for label, ps in rows for _ in ps], columns=shown)
    phases["total"] = time.perf_counter() - started
    summary = {**results, "steps": result.steps_done, "final_loss": result.final_loss, "overlap": overlap,
               "seconds": {k: round(v, 1) for k, v in phases.items()}}
    atomic_write_text(output / "report.md", _report(summary, prompts, count, phases))
    for c in CONCEPTS:
        b, a = results[c]["before"], results[c]["after"]
        print(f"{c}: structure {b['structure']['mean']:.3f} -> {a['structure']['mean']:.3f}, colour "
              f"{b['colour']['mean']:.3f} -> {a['colour']['mean']:.3f}, score {b['score']['mean']:.3f} -> "
              f"{a['score']['mean']:.3f}")
    print(f"grid {grid}; training curves {run / 'metrics.png'}; report {output / 'report.md'}; "
          f"{phases['total']:.0f} s")
    return summary


def _report(summary: dict, prompts: dict[str, list[str]], count: int, phases: dict[str, float]) -> str:
    lines = [
        "# ernie-lora demo: held-out concepts taught by one LoRA",
        "",
        f"A rank-8 LoRA trained {summary['steps']} steps on {count} synthetic posters (train-split captions, "
        "`dataset/`), half of each concept below; micro ERNIE saw neither in pretraining.",
        "",
        f"Scores on test-split prompts ({SAMPLING['steps']} steps, guidance {SAMPLING['guidance']}), none a "
        f"training caption (overlap {summary['overlap']}). Structure: are the elements where the prompt puts them "
        "(band position and size, subtitle); colour: is the coloured ink the theme colour; score: their product.",
        "",
    ]
    for concept, (what, _) in CONCEPTS.items():
        lines += [f"**{concept}**: {what}; e.g. `{prompts[concept][0]}` ({len(prompts[concept])} prompts)", "",
                  "| mean (median) | structure | colour | score |", "|---|---|---|---|"]
        for when in ("before", "after"):
            s = summary[concept][when]
            lines.append(f"| {when} | " + " | ".join(f"{s[n]['mean']:.3f} ({s[n]['median']:.3f})" for n in SCORES)
                         + " |")
        lines.append("")
    lines += [
        "Files: `before_after.png` (per concept: a row before, a row after), `run/metrics.png`, `run/samples/`, "
        "`run/lora.safetensors`, `before/` and `after/` (PNGs with their prompts in the metadata).",
        "",
        "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
        "",
    ]
    return "\n".join(lines)
