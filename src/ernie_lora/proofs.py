"""Proofs on micro ERNIE: the DPO and Turbo recipes run end to end on the synthetic world and scored.

A proof folder holds ``pairs/`` (DPO: the preference pairs made by sampling micro), ``run/`` (the
recipe's own run folder), ``sft/`` (DPO: the same LoRA recipe on the chosen images, for comparison),
``eval/`` (the generated images), ``report.md`` and ``comparison.png``. The recipes know nothing of
proofs; ``ernie-lora dpo`` / ``distill`` with a ``proof:`` section run these instead of the bare recipe.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import linalg

from .config import DistillRunConfig, DpoRunConfig, TrainRunConfig
from .data.preference import read_pairs
from .data.synthetic import caption, parse_caption, pretraining_colours, render, sample_layout
from .errors import UserError
from .eval.aesthetic import builtin_features
from .eval.layout import score_folder, score_image
from .generate import LoraSpec, generate
from .io import atomic_write_text
from .models import family_for
from .plots import save_image_grid
from .recipes.distill import run_distill
from .recipes.dpo import run_dpo
from .recipes.lora import train

PROOF_OUTPUTS = ("pairs", "run", "sft", "eval", "report.md", "comparison.png")


def prepare_proof_dir(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds an earlier proof unless resuming or overwriting (which removes only the
    proof's own outputs)."""
    held = [name for name in PROOF_OUTPUTS if (output / name).exists()]
    if held and not (resume or overwrite):
        raise UserError(f"output {output}: already holds a proof ({', '.join(held)}); pass --resume or --overwrite")
    if overwrite:
        for name in held:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output.mkdir(parents=True, exist_ok=True)


def _scores(folder: Path) -> dict:
    scores = [s.score for _, _, s in score_folder(folder) if s is not None]
    return {"mean": statistics.mean(scores), "median": statistics.median(scores),
            "perfect": sum(s >= 0.999 for s in scores) / len(scores)}


# -- DPO ------------------------------------------------------------------------------------------------


@dataclass
class SyntheticPairsReport:
    pairs: int
    prompts: int
    chosen_mean: float
    rejected_mean: float


def write_synthetic_pairs(folder: str | Path, *, model: str, kind: str, prompts: int, candidates: int,
                          min_margin: float, seed: int, sampling: dict) -> SyntheticPairsReport:
    """Sample ``candidates`` images per prompt; pair the best (by layout fidelity) with every sample at
    least ``min_margin`` worse. Writes the images and ``pairs.jsonl`` into ``folder``."""
    folder = Path(folder)
    if (folder / "pairs.jsonl").exists():
        raise UserError(f"{folder}: already holds pairs.jsonl; choose another folder")
    rng = random.Random(seed)
    texts = [caption(sample_layout(rng, kind, pretraining_colours())) for _ in range(prompts)]
    pipe = family_for(model).load_pipeline(model, dtype=sampling.get("dtype", "fp32"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    rows, chosen_scores, rejected_scores = [], [], []
    for i, text in enumerate(texts):
        paths = generate([text] * candidates, model=model, pipe=pipe, out_dir=folder / f"{i:04d}",
                         seed=seed * 100_000 + i * candidates, **sampling)
        scored = []
        for path in paths:
            with Image.open(path) as im:
                result = score_image(im.convert("RGB"), text)
            scored.append((result.score if result else 0.0, path))
        scored.sort(key=lambda s: s[0])
        high, best = scored[-1]
        for low, worse in scored[:-1]:  # the best against every sample clearly worse than it
            if high - low >= min_margin:
                rows.append({"prompt": text, "chosen": str(best.relative_to(folder)),
                             "rejected": str(worse.relative_to(folder)), "chosen_score": round(high, 4),
                             "rejected_score": round(low, 4)})
                chosen_scores.append(high)
                rejected_scores.append(low)
    if not rows:
        raise UserError(f"no prompt gave samples {min_margin} apart in layout fidelity; lower min_margin")
    atomic_write_text(folder / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return SyntheticPairsReport(len(rows), prompts, statistics.mean(chosen_scores), statistics.mean(rejected_scores))


def dpo_proof(cfg: DpoRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
              force: bool = False, progress: bool = True) -> dict:
    """Pairs from micro's samples ranked by layout fidelity, DPO on them, then base vs SFT-on-chosen vs
    DPO on fresh prompts, the same seeds for each."""
    output = Path(output)
    prepare_proof_dir(output, resume, overwrite)
    p = cfg.proof
    side = cfg.data.resolution
    sampling = {"steps": p.steps, "guidance": p.guidance, "width": side, "height": side, "dtype": "fp32"}
    pairs_file = Path(cfg.data.pairs) if cfg.data.pairs else output / "pairs" / "pairs.jsonl"
    pair_report = None
    if not pairs_file.exists():
        print(f"making preference pairs: {p.pair_prompts} {p.kind} prompts x {p.candidates} samples of "
              f"{cfg.model.name}")
        pair_report = write_synthetic_pairs(pairs_file.parent, model=cfg.model.name, kind=p.kind,
                                            prompts=p.pair_prompts, candidates=p.candidates,
                                            min_margin=p.min_margin, seed=p.seed, sampling=sampling)
    cfg = cfg.model_copy(deep=True)
    cfg.data.pairs = str(pairs_file)
    result = run_dpo(cfg, output / "run", resume=resume and (output / "run").exists(), force=force,
                     progress=progress)
    pairs = read_pairs(pairs_file)
    rng = random.Random(p.seed + 10_007)  # fresh prompts: not the ones the pairs were made from
    prompts = [caption(sample_layout(rng, p.kind, pretraining_colours())) for _ in range(p.eval_prompts)]
    contenders = {"base": None}
    if p.compare_sft:
        contenders["SFT on chosen"] = _sft_on_chosen(cfg, pairs, output / "sft")
    contenders["DPO"] = result.output / "lora.safetensors"
    results, images = {}, {}
    for name, lora in contenders.items():
        folder = output / "eval" / name.lower().replace(" ", "-")
        images[name] = generate(prompts, model=cfg.model.name, loras=[LoraSpec(lora, 1.0)] if lora else None,
                                out_dir=folder, seed=50_000 + p.seed, **sampling)
        results[name] = _scores(folder)
    shown = min(8, len(prompts))
    grid = save_image_grid([Image.open(path) for name in contenders for path in images[name][:shown]],
                           output / "comparison.png", labels=[n for n in contenders for _ in range(shown)],
                           columns=shown)
    last = result.history[-max(1, len(result.history) // 10):]
    lines = [
        f"# DPO on {cfg.model.name}: {p.kind} layouts",
        "",
        f"Pairs: {len(pairs)}, the best of {p.candidates} samples of a prompt against each one at least "
        f"{p.min_margin} worse in layout fidelity" + (f" (chosen mean {pair_report.chosen_mean:.3f}, rejected mean "
                                                  f"{pair_report.rejected_mean:.3f})" if pair_report else "") + ".",
        f"DPO: beta {cfg.dpo.beta:g}, SFT anchor {cfg.dpo.sft_weight:g}, rejected scale {cfg.dpo.rejected_scale}, "
        f"rank {cfg.lora.rank}, {cfg.train.steps} steps of {cfg.train.batch_size} pairs, lr {cfg.train.lr:g}.",
        f"Last 10 % of steps: implicit accuracy {statistics.mean(r['accuracy'] for r in last):.2f}, chosen error vs "
        f"reference {statistics.mean(r['chosen_vs_ref'] for r in last):+.5f}, rejected "
        f"{statistics.mean(r['rejected_vs_ref'] for r in last):+.5f}.",
        "",
        f"Layout fidelity on {len(prompts)} fresh prompts, the same seeds for each ({p.steps} steps, guidance "
        f"{p.guidance:g}):",
        "",
        "| | mean | median | share perfect |",
        "|---|---|---|---|",
        *[f"| {name} | {r['mean']:.3f} | {r['median']:.3f} | {r['perfect']:.2f} |" for name, r in results.items()],
        "",
        f"`comparison.png`: one row per model ({', '.join(contenders)}), the first {shown} prompts. "
        "`run/metrics.png`: the training curves.",
        "",
    ]
    atomic_write_text(output / "report.md", "\n".join(lines))
    print("\n".join(line for line in lines if line.startswith("|")))
    print(f"report {output / 'report.md'}; grid {grid}")
    return results


def _sft_on_chosen(cfg: DpoRunConfig, pairs, folder: Path) -> Path:
    """The LoRA recipe with DPO's LoRA, steps and lr on the chosen images with their prompts."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i, pair in enumerate(pairs):
        target = data / f"{i:05d}{pair.chosen.suffix}"
        if not target.exists():
            target.write_bytes(pair.chosen.read_bytes())
        (data / f"{i:05d}.txt").write_text(pair.prompt + "\n", encoding="utf-8")
    sft_cfg = TrainRunConfig.model_validate({
        "model": cfg.model.model_dump(), "lora": cfg.lora.model_dump(),
        "data": {"path": str(data), "resolution": cfg.data.resolution, "caption_dropout": 0.0},
        "train": cfg.train.model_dump(),
        "checkpoint": {"every": cfg.train.steps, "keep": 1}, "sample": {"every": 0, "prompts": []}})
    print(f"SFT baseline: the same LoRA recipe on the {len(pairs)} chosen images, {cfg.train.steps} steps")
    return train(sft_cfg, folder / "run", overwrite=True, progress=False).output / "lora.safetensors"


# -- Turbo ----------------------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula on any features: |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(sa @ sb, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * np.real(root)))


def distill_proof(cfg: DistillRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
                  force: bool = False, progress: bool = True) -> dict:
    """Distil, then the teacher at its full step count, the student and the base at each of ``proof.steps``:
    layout fidelity and the Frechet distance of image statistics to renders of the prompts."""
    output = Path(output)
    prepare_proof_dir(output, resume, overwrite)
    result = run_distill(cfg, output / "run", resume=resume and (output / "run").exists(), force=force,
                         progress=progress)
    p, dcfg = cfg.proof, cfg.distill
    rng = random.Random(p.seed + 20_011)
    prompts = [caption(sample_layout(rng, None, pretraining_colours())) for _ in range(p.eval_prompts)]
    reference = np.stack([builtin_features(render(parse_caption(t), seed=i)) for i, t in enumerate(prompts)])
    side = cfg.data.resolution
    teacher = cfg.teachers[0]
    teacher_lora = [LoraSpec(Path(teacher.lora), 1.0)] if teacher.lora else []
    student = [LoraSpec(result.output / "lora.safetensors", 1.0)]
    few = sorted(set(p.steps), reverse=True)
    runs = [("teacher", p.teacher_steps, teacher.guidance, teacher_lora)]
    runs += [(f"student {k} steps", k, 1.0, student) for k in few]
    slow = "teacher" if teacher.lora else "base"
    runs += [(f"{slow} {k} steps", k, teacher.guidance, teacher_lora) for k in few]
    runs += [(f"{slow} {k} steps, CFG 1", k, 1.0, teacher_lora) for k in few]  # CFG can hurt at few steps
    results, images = {}, {}
    for name, steps, guidance, loras in runs:
        folder = output / "eval" / name.replace(", ", "-").replace(" ", "-")
        paths = generate(prompts, model=cfg.model.name, loras=loras, out_dir=folder, steps=steps, guidance=guidance,
                         width=side, height=side, dtype="fp32", seed=70_000 + p.seed)
        feats = np.stack([builtin_features(Image.open(path)) for path in paths])
        scores = _scores(folder)
        results[name] = {"steps": steps, "guidance": guidance, "fidelity": scores["mean"],
                         "median": scores["median"], "fd": frechet_distance(feats, reference)}
        images[name] = paths
    shown = min(8, len(prompts))
    grid = save_image_grid([Image.open(path) for name, *_ in runs for path in images[name][:shown]],
                           output / "comparison.png", labels=[name for name, *_ in runs for _ in range(shown)],
                           columns=shown)
    t = results["teacher"]["fidelity"]
    lines = [
        f"# Turbo LoRA on {cfg.model.name}: {dcfg.student_steps}-step student by distribution matching",
        "",
        f"Student: rank {cfg.lora.rank} LoRA, {cfg.train.steps} steps of {cfg.train.batch_size} prompts, "
        f"{dcfg.fake_updates} fake-score updates per step; teachers: "
        + "; ".join(f"{t.lora or 'base'} on sigma {t.t_range[0]:g}-{t.t_range[1]:g} (CFG {t.guidance:g})"
                    for t in cfg.teachers) + ".",
        "",
        f"{len(prompts)} fresh prompts of the synthetic world, the same seeds for every row. Layout fidelity "
        "(mean, median) and the Frechet distance of 60 image statistics to renders of the prompts (lower "
        "is closer):",
        "",
        "| | steps | CFG | fidelity | median | vs teacher | Frechet distance |",
        "|---|---|---|---|---|---|---|",
        *[f"| {name} | {r['steps']} | {r['guidance']:g} | {r['fidelity']:.3f} | {r['median']:.3f} | "
          f"{(r['fidelity'] - t) / t:+.1%} | {r['fd']:.3f} |" for name, r in results.items()],
        "",
        f"`comparison.png`: rows {', '.join(name for name, *_ in runs)}; `run/metrics.png`: the training curves. "
        f"The student runs in `ernie-lora generate --model {cfg.model.name} --lora run/lora.safetensors "
        f"--steps {dcfg.student_steps} --guidance 1`.",
        "",
    ]
    atomic_write_text(output / "report.md", "\n".join(lines))
    print("\n".join(line for line in lines if line.startswith("|")))
    print(f"report {output / 'report.md'}; grid {grid}")
    return results
