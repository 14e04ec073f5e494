"""Proofs on micro ERNIE: the DPO and Turbo recipes run end to end on the synthetic world and scored.

A proof folder holds ``pairs/`` (DPO: the preference pairs made by sampling micro), ``run/`` (the
recipe's own run folder), ``sft/`` (DPO: the same LoRA recipe on the chosen images, for comparison),
``eval/`` (the generated images), ``report.md`` and ``comparison.png``. The recipes know nothing of
proofs; ``ernie-lora dpo`` / ``distill`` with a ``proof:`` section run these instead of the bare recipe.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import linalg

from .config import DistillRunConfig, DpoRunConfig, TrainRunConfig
from .data.preference import read_pairs
from .data.synthetic import parse_caption, pretraining_colours, render, split_captions, write_synthetic_dataset
from .errors import UserError
from .eval.aesthetic import builtin_features
from .eval.layout import score_image
from .eval.prompts import require_held_out
from .eval.stats import paired_bootstrap
from .generate import LoraSpec, generate, load_loras
from .io import atomic_write, atomic_write_text
from .models import family_for
from .plots import save_image_grid
from .recipes.distill import distill_prompts, run_distill
from .recipes.dpo import run_dpo
from .recipes.lora import train
from .recipes.run_dir import prepare_output

PROOF_OUTPUTS = ("pairs", "run", "sft", "eval", "report.md", "comparison.png")
SCORES = ("score", "structure", "colour")


def prepare_proof_dir(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds an earlier proof unless resuming or overwriting (which removes only the
    proof's own outputs)."""
    prepare_output(output, "proof", PROOF_OUTPUTS, resume=resume, overwrite=overwrite, what="a proof",
                   hint="pass --resume or --overwrite")


def score_images(paths: list[Path], prompts: list[str]) -> dict[str, list[float]]:
    """{score | structure | colour: one value per image}, in the order given (0 for an unscorable prompt)."""
    scores: dict[str, list[float]] = {name: [] for name in SCORES}
    for path, prompt in zip(paths, prompts, strict=True):
        with Image.open(path) as im:
            result = score_image(im.convert("RGB"), prompt)
        for name in SCORES:
            scores[name].append(getattr(result, name) if result else 0.0)
    return scores


def evaluation_prompts(count: int, split: str, kind: str | None, seed: int, seeds: int, seen: list[str],
                       bands: tuple[str, ...] | None = None) -> list[str]:
    """Up to ``count`` distinct prompts of ``split``, each ``seeds`` times (each copy is sampled with its
    own noise); refused when one was a training or pair prompt. Prints the overlap (0)."""
    distinct = split_captions(count, split, kind, pretraining_colours(), bands, seed=seed)
    overlap = require_held_out(distinct, seen, f"{split} prompts")
    print(f"evaluation: {len(distinct)} {split}-split prompts x {seeds} seeds; overlap with the "
          f"{len(set(seen))} training prompts: {overlap}")
    return distinct * seeds


def _table(results: dict[str, dict[str, list[float]]]) -> list[str]:
    return ["| | score | structure | colour | share perfect |", "|---|---|---|---|---|",
            *[f"| {name} | " + " | ".join(f"{statistics.mean(r[s]):.3f}" for s in SCORES)
              + f" | {sum(v >= 0.999 for v in r['score']) / len(r['score']):.2f} |" for name, r in results.items()]]


# -- DPO ------------------------------------------------------------------------------------------------


@dataclass
class SyntheticPairsReport:
    pairs: int
    prompts: int
    chosen_mean: float
    rejected_mean: float


def write_synthetic_pairs(folder: str | Path, *, model: str, kind: str, prompts: int, candidates: int,
                          min_margin: float, seed: int, sampling: dict, bands: tuple[str, ...] | None = None,
                          lora: Path | None = None) -> SyntheticPairsReport:
    """Sample ``candidates`` images (of the model, with ``lora`` if given) for each of ``prompts``
    train-split prompts; pair the best (by the layout score) with every sample at least ``min_margin``
    worse. Writes the images and ``pairs.jsonl``."""
    folder = Path(folder)
    if (folder / "pairs.jsonl").exists():
        raise UserError(f"{folder}: already holds pairs.jsonl; choose another folder")
    texts = split_captions(prompts, "train", kind, pretraining_colours(), bands, seed=seed)
    pipe = family_for(model).load_pipeline(model, dtype=sampling.get("dtype", "fp32"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    if lora:
        load_loras(pipe, [LoraSpec(lora, 1.0)], fuse=True)  # once, for every prompt's samples
    rows, chosen_scores, rejected_scores = [], [], []
    for i, text in enumerate(texts):
        paths = generate([text] * candidates, model=model, pipe=pipe, out_dir=folder / f"{i:04d}",
                         seed=seed * 100_000 + i * candidates, **sampling)
        scored = sorted(zip(score_images(paths, [text] * candidates)["score"], paths, strict=True))
        high, best = scored[-1]
        for low, worse in scored[:-1]:  # the best against every sample clearly worse than it
            if high - low >= min_margin:
                rows.append({"prompt": text, "chosen": str(best.relative_to(folder)),
                             "rejected": str(worse.relative_to(folder)), "chosen_score": round(high, 4),
                             "rejected_score": round(low, 4)})
                chosen_scores.append(high)
                rejected_scores.append(low)
    if not rows:
        raise UserError(f"no prompt gave samples {min_margin} apart in layout score; lower min_margin")
    atomic_write_text(folder / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return SyntheticPairsReport(len(rows), len(texts), statistics.mean(chosen_scores),
                                statistics.mean(rejected_scores))


def dpo_proof(cfg: DpoRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
              force: bool = False, progress: bool | str = True) -> dict:
    """Pairs from samples of the model DPO starts from (the base, or base + ``lora.init_from``, or a concept
    LoRA the proof trains first) on train-split prompts, ranked by the layout score; DPO on them; then the
    start vs SFT-on-chosen vs DPO on prompts of ``proof.split``, the same noise for each, with paired-bootstrap
    intervals. Returns {contender: {score | structure | colour: per-image values}}."""
    output = Path(output)
    prepare_proof_dir(output, resume, overwrite)
    p = cfg.proof
    bands = tuple(p.bands) if p.bands else None
    side = cfg.data.resolution
    sampling = {"steps": p.steps, "guidance": p.guidance, "width": side, "height": side, "dtype": "fp32"}
    cfg = cfg.model_copy(deep=True)
    if p.concept_images:
        cfg.lora.init_from = str(train_concept_lora(cfg, output / "concept"))
    start = Path(cfg.lora.init_from) if cfg.lora.init_from else None
    pairs_file = Path(cfg.data.pairs) if cfg.data.pairs else output / "pairs" / "pairs.jsonl"
    pair_report = None
    if not pairs_file.exists():
        print(f"making preference pairs: {p.pair_prompts} train-split {p.kind} prompts x {p.candidates} samples "
              f"of {cfg.model.name}" + (f" + {start.name}" if start else ""))
        pair_report = write_synthetic_pairs(pairs_file.parent, model=cfg.model.name, kind=p.kind,
                                            prompts=p.pair_prompts, candidates=p.candidates,
                                            min_margin=p.min_margin, seed=p.seed, sampling=sampling, bands=bands,
                                            lora=start)
    cfg.data.pairs = str(pairs_file)
    pairs = read_pairs(pairs_file)
    prompts = evaluation_prompts(p.eval_prompts, p.split, p.kind, p.seed + 10_007, p.eval_seeds,
                                 [pair.prompt for pair in pairs], bands)
    result = run_dpo(cfg, output / "run", resume=resume and (output / "run").exists(), force=force,
                     progress=progress)
    first = "start LoRA" if start else "base"
    contenders = {first: start}
    if p.compare_sft:
        contenders["SFT on chosen"] = sft_on_chosen(cfg, pairs, output / "sft")
    contenders["DPO"] = result.output / "lora.safetensors"
    results, images = {}, {}
    for name, lora in contenders.items():
        images[name] = generate(prompts, model=cfg.model.name, loras=[LoraSpec(lora, 1.0)] if lora else None,
                                out_dir=output / "eval" / name.lower().replace(" ", "-"), seed=50_000 + p.seed,
                                **sampling)
        results[name] = score_images(images[name], prompts)
    shown = min(8, len(prompts))
    grid = save_image_grid([Image.open(path) for name in contenders for path in images[name][:shown]],
                           output / "comparison.png", labels=[n for n in contenders for _ in range(shown)],
                           columns=shown)
    lines = _dpo_report(cfg, pairs, pair_report, result.history, prompts, results, first, start)
    lines += [f"`comparison.png`: one row per model ({', '.join(contenders)}), the first {shown} prompts. "
              "`run/metrics.png`: the training curves.", ""]
    atomic_write_text(output / "report.md", "\n".join(lines))
    print("\n".join(line for line in lines if line.startswith(("|", "- "))))
    print(f"report {output / 'report.md'}; grid {grid}")
    return results


def _dpo_report(cfg: DpoRunConfig, pairs, pair_report: SyntheticPairsReport | None, history: list[dict],
                prompts: list[str], results: dict, first: str, start: Path | None) -> list[str]:
    p = cfg.proof
    last = history[-max(1, len(history) // 10):]
    saturated = next((r["step"] for r in history if r["dpo_loss"] < 0.01), None)
    comparisons = [(a, b) for a, b in (("DPO", first), ("SFT on chosen", first), ("DPO", "SFT on chosen"))
                   if a in results and b in results]
    if start is None:
        concept = "DPO starts from the base, which is the reference."
    elif p.concept_images:
        concept = (f"DPO aligns a concept LoRA (`concept/`): the LoRA recipe on {p.concept_images} synthetic "
                   f"{p.kind}s of the pretrain split for {p.concept_steps} steps; it is the start and the reference.")
    else:
        concept = f"DPO aligns `{start}` (lora.init_from): it is the start and the reference."
    return [
        f"# DPO on {cfg.model.name}: {p.kind} layouts" + (f" ({', '.join(p.bands)} bands)" if p.bands else ""),
        "",
        concept,
        f"Pairs: {len(pairs)} from {len({pair.prompt for pair in pairs})} train-split prompts, the best of "
        f"{p.candidates} samples against each one at least {p.min_margin} worse in layout score"
        + (f" (chosen mean {pair_report.chosen_mean:.3f}, rejected mean {pair_report.rejected_mean:.3f})"
           if pair_report else "") + ".",
        f"DPO: beta {cfg.dpo.beta:g}, SFT anchor {cfg.dpo.sft_weight:g}, rejected scale {cfg.dpo.rejected_scale}, "
        f"rank {cfg.lora.rank}, {cfg.train.steps} steps of {cfg.train.batch_size} pairs, lr {cfg.train.lr:g}.",
        f"Last 10 % of steps: implicit accuracy {statistics.mean(r['accuracy'] for r in last):.2f}, DPO loss "
        f"{statistics.mean(r['dpo_loss'] for r in last):.4f} (first below 0.01 at step {saturated}), chosen error "
        f"vs reference {statistics.mean(r['chosen_vs_ref'] for r in last):+.5f}, rejected "
        f"{statistics.mean(r['rejected_vs_ref'] for r in last):+.5f}.",
        "",
        f"Means over {len(prompts)} samples of {len(set(prompts))} {p.split}-split prompts (none a pair prompt), "
        f"the same noise for each model ({p.steps} steps, guidance {p.guidance:g}):",
        "",
        *_table(results),
        "",
        "Paired differences in the layout score, mean [95 % bootstrap interval]:",
        "",
        *[f"- {a} - {b}: {paired_bootstrap(results[a]['score'], results[b]['score'], seed=p.seed)}"
          for a, b in comparisons],
        "",
    ]


def train_concept_lora(cfg: DpoRunConfig, folder: Path) -> Path:
    """The proof's concept LoRA: the LoRA recipe (DPO's LoRA shape, the demo's lr schedule) on
    ``proof.concept_images`` synthetic images of the proof's kind and bands for ``proof.concept_steps`` steps.
    Its captions come from the pretrain split, which for a held-out concept micro never saw: disjoint from the
    pair prompts (train split), so the pairs show the LoRA's mistakes on prompts new to it."""
    p = cfg.proof
    data = write_synthetic_dataset(folder / "data", p.concept_images, p.kind, seed=p.seed + 30_011, split="pretrain",
                                   bands=tuple(p.bands) if p.bands else None, size=cfg.data.resolution,
                                   overwrite=True)
    concept_cfg = TrainRunConfig.model_validate({
        "model": cfg.model.model_dump(), "lora": {**cfg.lora.model_dump(), "init_from": None},
        "data": {"path": str(data), "resolution": cfg.data.resolution, "caption_dropout": 0.1},
        "train": {**cfg.train.model_dump(), "steps": p.concept_steps, "lr": 2e-3, "lr_scheduler": "cosine",
                  "warmup_steps": 20},
        "checkpoint": {"every": p.concept_steps, "keep": 1}, "sample": {"every": 0, "prompts": []}})
    print(f"concept LoRA: the LoRA recipe on {p.concept_images} pretrain-split {p.kind}s, {p.concept_steps} steps")
    return train(concept_cfg, folder / "run", overwrite=True, progress=False).output / "lora.safetensors"


def sft_on_chosen(cfg: DpoRunConfig, pairs, folder: Path) -> Path:
    """The LoRA recipe with DPO's LoRA and training settings (``proof.sft_lr`` / ``sft_steps`` where set) on
    the chosen images with their prompts."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i, pair in enumerate(pairs):
        target = data / f"{i:05d}{pair.chosen.suffix}"
        if not target.exists():
            atomic_write(target, lambda tmp, src=pair.chosen: Path(tmp).write_bytes(src.read_bytes()))
        atomic_write_text(data / f"{i:05d}.txt", pair.prompt + "\n")
    steps = cfg.proof.sft_steps or cfg.train.steps
    train_cfg = {**cfg.train.model_dump(), "lr": cfg.proof.sft_lr or cfg.train.lr, "steps": steps}
    sft_cfg = TrainRunConfig.model_validate({
        "model": cfg.model.model_dump(), "lora": cfg.lora.model_dump(),
        "data": {"path": str(data), "resolution": cfg.data.resolution, "caption_dropout": 0.0},
        "train": train_cfg, "checkpoint": {"every": steps, "keep": 1}, "sample": {"every": 0, "prompts": []}})
    print(f"SFT baseline: the LoRA recipe on the {len(pairs)} chosen images, {steps} steps, lr {train_cfg['lr']:g}")
    return train(sft_cfg, folder / "run", overwrite=True, progress=False).output / "lora.safetensors"


# -- Turbo ----------------------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula on any features: |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(sa @ sb, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * np.real(root)))


def distill_proof(cfg: DistillRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
                  force: bool = False, progress: bool | str = True) -> dict:
    """Distil, then the teacher at its full step count, the student and the base at each of ``proof.steps``
    on prompts of ``proof.split`` (none a training prompt): the layout scores, paired-bootstrap intervals of
    the student against the better base at its step count, and the Frechet distance of image statistics
    to renders of the prompts. Returns {row: {steps, guidance, fd, score | structure | colour: per image}}."""
    output = Path(output)
    prepare_proof_dir(output, resume, overwrite)
    p, dcfg = cfg.proof, cfg.distill
    prompts = evaluation_prompts(p.eval_prompts, p.split, None, p.seed + 20_011, 1, distill_prompts(cfg))
    result = run_distill(cfg, output / "run", resume=resume and (output / "run").exists(), force=force,
                         progress=progress)
    reference = np.stack([builtin_features(render(parse_caption(t), seed=i)) for i, t in enumerate(prompts)])
    side = cfg.data.resolution
    teacher = cfg.teachers[0]
    teacher_lora = [LoraSpec(Path(teacher.lora), 1.0)] if teacher.lora else []
    student = [LoraSpec(result.output / "lora.safetensors", 1.0)]
    few = sorted(set(p.steps), reverse=True)
    slow = "teacher" if teacher.lora else "base"
    runs = [("teacher", p.teacher_steps, teacher.guidance, teacher_lora)]
    runs += [(f"student {k} steps", k, 1.0, student) for k in few]
    runs += [(f"{slow} {k} steps", k, teacher.guidance, teacher_lora) for k in few]
    runs += [(f"{slow} {k} steps, CFG 1", k, 1.0, teacher_lora) for k in few]  # CFG can hurt at few steps
    results, images = {}, {}
    for name, steps, guidance, loras in runs:
        folder = output / "eval" / name.replace(", ", "-").replace(" ", "-")
        paths = generate(prompts, model=cfg.model.name, loras=loras, out_dir=folder, steps=steps, guidance=guidance,
                         width=side, height=side, dtype="fp32", seed=70_000 + p.seed)
        feats = np.stack([builtin_features(Image.open(path)) for path in paths])
        results[name] = {"steps": steps, "guidance": guidance, "fd": frechet_distance(feats, reference),
                         **score_images(paths, prompts)}
        images[name] = paths
    shown = min(8, len(prompts))
    grid = save_image_grid([Image.open(path) for name, *_ in runs for path in images[name][:shown]],
                           output / "comparison.png", labels=[name for name, *_ in runs for _ in range(shown)],
                           columns=shown)
    t = statistics.mean(results["teacher"]["score"])
    intervals = []
    for k in few:
        base = max((f"{slow} {k} steps", f"{slow} {k} steps, CFG 1"),
                   key=lambda name: statistics.mean(results[name]["score"]))
        interval = paired_bootstrap(results[f"student {k} steps"]["score"], results[base]["score"], seed=p.seed)
        intervals.append(f"- student {k} steps - {base}: {interval}")
    lines = [
        f"# Turbo LoRA on {cfg.model.name}: {dcfg.student_steps}-step student by distribution matching",
        "",
        f"Student: rank {cfg.lora.rank} LoRA, {cfg.train.steps} steps of {cfg.train.batch_size} train-split prompts, "
        f"{dcfg.fake_updates} fake-score updates per step; teachers: "
        + "; ".join(f"{t.lora or 'base'} on sigma {t.t_range[0]:g}-{t.t_range[1]:g} (CFG {t.guidance:g})"
                    for t in cfg.teachers) + ". Where this differs from DMD2: recipes/dmd.py.",
        "",
        f"{len(prompts)} {p.split}-split prompts of the synthetic world (none a training prompt), the same noise "
        "for every row. Mean layout score, structure and colour, and the Frechet distance of 60 image statistics "
        "to renders of the prompts (lower is closer):",
        "",
        "| | steps | CFG | score | structure | colour | vs teacher | Frechet distance |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {name} | {r['steps']} | {r['guidance']:g} | "
          + " | ".join(f"{statistics.mean(r[s]):.3f}" for s in SCORES)
          + f" | {(statistics.mean(r['score']) - t) / max(t, 1e-9):+.1%} | {r['fd']:.3f} |"
          for name, r in results.items()],
        "",
        "Paired differences in the layout score against the better base at the same step count, mean [95 % "
        "bootstrap interval]:",
        "",
        *intervals,
        "",
        f"`comparison.png`: rows {', '.join(name for name, *_ in runs)}; `run/metrics.png`: the training curves. "
        f"The student runs in `ernie-lora generate --model {cfg.model.name} --lora run/lora.safetensors "
        f"--steps {dcfg.student_steps} --guidance 1`.",
        "",
    ]
    atomic_write_text(output / "report.md", "\n".join(lines))
    print("\n".join(line for line in lines if line.startswith(("|", "- "))))
    print(f"report {output / 'report.md'}; grid {grid}")
    return results
