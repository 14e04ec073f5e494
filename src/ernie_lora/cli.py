"""The ``ernie-lora`` command: parses arguments, loads configs, calls a recipe or a command function.

Each command imports what it needs when it runs (the imports inside the functions below are deliberate):
``--help``, a config error or a light command never waits for torch, diffusers or matplotlib to load.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from .errors import RunStopped, UserError, one_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, check and use LoRA adapters for ERNIE-Image.")
dataset_app = typer.Typer(no_args_is_help=True, help="Dataset folders: check them before training.")
app.add_typer(dataset_app, name="dataset")
eval_app = typer.Typer(no_args_is_help=True, help="Score generated images.")
app.add_typer(eval_app, name="eval")
lora_app = typer.Typer(no_args_is_help=True, help="LoRA files: info, verify, convert, merge, fuse.")
app.add_typer(lora_app, name="lora")
caption_app = typer.Typer(no_args_is_help=True, help="Captions in the layout language: lint and auto-caption.")
app.add_typer(caption_app, name="caption")
rank_app = typer.Typer(no_args_is_help=True, help="Swiss-tournament annotation: serve, scores, simulate.")
app.add_typer(rank_app, name="rank")
aes_app = typer.Typer(no_args_is_help=True, help="Aesthetic scorer: train, score, eval.")
app.add_typer(aes_app, name="aes")


def _quiet_libraries() -> None:
    # diffusers/transformers log dtype notes and deprecations on every load; users need errors only
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()


FORCE_HELP = "with --resume: continue even though the config differs from the run's (or its config.yaml is gone)"
PROGRESS_HELP = ("bar: a progress bar and a line per file written; json: one JSON object per line on stdout for "
                 "every step and event (checkpoint, samples, validation, lora, report, done); off: neither")


_PROGRESS_JSON = False  # set by --progress json: errors then also go to stdout as an event


def _check_progress(progress: str) -> str:
    global _PROGRESS_JSON
    if progress not in ("bar", "json", "off"):
        raise typer.BadParameter(f"{progress!r}: choose bar, json or off", param_hint="--progress")
    _PROGRESS_JSON = progress == "json"
    return progress


def _done(progress: str, text: list[str], **fields) -> None:
    """The closing lines; in json mode one ``done`` event instead, so stdout stays JSON."""
    if progress == "json":
        import json

        print(json.dumps({"event": "done", **fields}, default=str), flush=True)
    else:
        for line in text:
            typer.echo(line)


@app.command()
def train(
    config: Path = typer.Argument(..., help="training YAML (see configs/)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="run folder (default: runs/<config name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --output from its last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the run already in --output"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    set_: list[str] = typer.Option([], "--set", help="override a config key: --set train.lr=5e-5"),
    progress: str = typer.Option("bar", "--progress", help=PROGRESS_HELP, callback=_check_progress),
) -> None:
    """Train a LoRA from a YAML config."""
    from .config import load_train_config

    cfg = load_train_config(config, set_)  # a config mistake answers before torch and diffusers load
    from .recipes.lora import train as run_train

    output = output or Path("runs") / config.stem
    _quiet_libraries()
    result = run_train(cfg, output, resume=resume, overwrite=overwrite, force=force, progress=progress)
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    lora = result.output / "lora.safetensors"
    _done(progress, [f"done: {result.steps_done} steps, final loss {loss}",
                     f"LoRA: {lora}  report: {result.output / 'report.md'}"],
          steps=result.steps_done, loss=result.final_loss, lora=lora, report=result.report)


@app.command()
def dpo(
    config: Path = typer.Argument(..., help="DPO YAML (see configs/micro-dpo.yaml)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="run folder (default: runs/<config name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --output from its last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the run already in --output"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    set_: list[str] = typer.Option([], "--set", help="override a config key: --set dpo.beta=1000"),
    progress: str = typer.Option("bar", "--progress", help=PROGRESS_HELP, callback=_check_progress),
) -> None:
    """Align a LoRA with preference pairs (Diffusion-DPO on the flow-matching target).

    With a proof: section the pairs are made from the model's own samples and the result is scored
    (the folder then holds pairs/, run/, sft/, eval/, report.md)."""
    from .config import load_dpo_config

    cfg = load_dpo_config(config, set_)
    output = output or Path("runs") / config.stem
    _quiet_libraries()
    if cfg.proof is not None:
        from .proofs import dpo_proof

        dpo_proof(cfg, output, resume=resume, overwrite=overwrite, force=force, progress=progress)
        _done(progress, [f"LoRA: {output / 'run' / 'lora.safetensors'}  report: {output / 'report.md'}"],
              lora=output / "run" / "lora.safetensors", report=output / "report.md")
        return
    from .recipes.dpo import run_dpo

    result = run_dpo(cfg, output, resume=resume, overwrite=overwrite, force=force, progress=progress)
    last = result.history[-1] if result.history else {}
    lora = result.output / "lora.safetensors"
    _done(progress, [f"done: {result.steps_done} steps, loss {last.get('loss', float('nan')):.4f}, implicit "
                     f"accuracy {last.get('accuracy', float('nan')):.2f}", f"LoRA: {lora}  report: {result.report}"],
          steps=result.steps_done, loss=last.get("loss"), accuracy=last.get("accuracy"), lora=lora,
          report=result.report)


@app.command()
def distill(
    config: Path = typer.Argument(..., help="distillation YAML (see configs/micro-turbo.yaml)"),
    output: Path | None = typer.Option(None, "--output", "-o", help="run folder (default: runs/<config name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --output from its last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the run already in --output"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    set_: list[str] = typer.Option([], "--set", help="override a config key: --set distill.student_steps=4"),
    progress: str = typer.Option("bar", "--progress", help=PROGRESS_HELP, callback=_check_progress),
) -> None:
    """Distil a few-step Turbo LoRA (DMD2-style, teachers by timestep range).

    With a proof: section the student, the teacher and the base are then scored (report.md)."""
    from .config import load_distill_config

    cfg = load_distill_config(config, set_)
    output = output or Path("runs") / config.stem
    _quiet_libraries()
    hint = f"sample with --steps {cfg.distill.student_steps} --guidance 1"
    if cfg.proof is not None:
        from .proofs import distill_proof

        distill_proof(cfg, output, resume=resume, overwrite=overwrite, force=force, progress=progress)
        _done(progress, [f"student LoRA {output / 'run' / 'lora.safetensors'} ({hint}); report {output / 'report.md'}"],
              lora=output / "run" / "lora.safetensors", report=output / "report.md")
        return
    from .recipes.distill import run_distill

    result = run_distill(cfg, output, resume=resume, overwrite=overwrite, force=force, progress=progress)
    lora = result.output / "lora.safetensors"
    _done(progress, [f"done: {result.steps_done} steps; student LoRA {lora} ({hint}); report {result.report}"],
          steps=result.steps_done, lora=lora, report=result.report)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="training YAML (see configs/)"),
    vram: float | None = typer.Option(None, "--vram", help="GPU memory budget in GiB: recommend settings that fit"),
    text_tokens: int = typer.Option(256, "--text-tokens", help="text tokens per caption to plan for"),
    gpus: int = typer.Option(1, "--gpus", min=1, help="processes the run will use (with train.fsdp: the shards)"),
    set_: list[str] = typer.Option([], "--set", help="override a config key: --set train.batch_size=2"),
) -> None:
    """Estimate a training config's peak GPU memory before running it (no weights needed)."""
    from .config import load_train_config

    cfg = load_train_config(config, set_)
    from .plan import format_plan, plan_config

    _quiet_libraries()
    result, fit = plan_config(cfg, vram, text_tokens, gpus=gpus)
    typer.echo(format_plan(result, vram, fit), nl=False)


def _training_view(config: Path | None, resolution: int | None, model: str | None):
    """(resolution, buckets, model or None) a dataset is looked at with: --config's data and model keys, or the
    options (resolution 1024 and ERNIE-Image's 16-pixel grid by default)."""
    from .data.buckets import make_buckets
    from .models.names import PIXELS_PER_TOKEN

    requested, max_ratio, revision = None, 2.0, None
    if config is not None:
        from .config import load_train_config

        cfg = load_train_config(config, [])
        resolution = resolution or cfg.data.resolution
        model = model or cfg.model.name
        requested, max_ratio, revision = cfg.data.bucket_multiple, cfg.data.max_aspect_ratio, cfg.model.revision
    resolution = resolution or 1024
    if model is not None:
        from .models import family_for  # deferred: the model's configs need torch and diffusers

        multiple = family_for(model).bucket_step(model, requested, revision)  # the grid training uses
    else:
        multiple = requested or PIXELS_PER_TOKEN
    if resolution % multiple:
        raise UserError(f"--resolution {resolution}: must be a multiple of {multiple} (the model's pixels per token)")
    return resolution, make_buckets(resolution, multiple, max_ratio), model


def _token_counter(model: str | None, without: str):
    """The model's tokenizer as a counter, or None with a line saying so (``without``: what is not done)."""
    if model is None:
        typer.echo(f"captions: {without}; pass --model or --config to count the text encoder's tokens")
        return None
    from .captions.stats import token_counter

    _quiet_libraries()
    try:
        return token_counter(model)
    except UserError as exc:
        typer.echo(f"captions: {without}: {model}'s tokenizer is not here ({one_line(str(exc))})")
        return None


def _outside(folder: Path, path: Path, option: str) -> None:
    if path.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"{option} {path}: inside the dataset folder, where it would become a training image")


_CONFIG_HELP = "a training YAML: its data.resolution, max_aspect_ratio, bucket_multiple and model"
_RESOLUTION_HELP = "training resolution (default: --config's, else 1024)"
_MODEL_HELP = "count caption tokens with this model's tokenizer (default: --config's model)"


@dataset_app.command("check")
def dataset_check(
    folder: Path = typer.Argument(..., help="images with .txt captions and/or metadata.jsonl"),
    config: Path | None = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    resolution: int | None = typer.Option(None, "--resolution", min=1, help=_RESOLUTION_HELP),
    model: str | None = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    near: int = typer.Option(16, "--near", min=0, max=63, help="near duplicates: perceptual-hash bits (of 256) "
                                                             "apart at most"),
) -> None:
    """Report every problem per file (unreadable, uncaptioned, exact and near duplicates, images smaller than
    their bucket, captions over the text encoder's limit); exit 1 when training would fail."""
    from .data.dataset import check_dataset

    resolution, buckets, model = _training_view(config, resolution, model)
    tokens = _token_counter(model, "lengths not checked against the text encoder's limit")
    report = check_dataset(folder, min_side=0, near=near, buckets=buckets, count_tokens=tokens and tokens.count,
                           max_tokens=tokens and tokens.limit)
    for finding in report.findings:
        typer.echo(str(finding))
    typer.echo(
        f"{report.images_seen} images, {len(report.items)} usable, "
        f"{len(report.errors)} errors, {len(report.warnings)} warnings (at resolution {resolution})"
    )
    if report.errors or not report.items:
        if not report.items and not report.errors:
            typer.echo(f"error: {folder}: no images found", err=True)
        raise typer.Exit(1)


@dataset_app.command("synth")
def dataset_synth(
    kind: str = typer.Argument(..., help="poster, infographic, comic, ui, or all"),
    count: int = typer.Option(50, "--count", "-n", min=1),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write (must not hold images yet)"),
    seed: int = typer.Option(0),
    colours: str | None = typer.Option(None, help="comma-separated theme colours (default: the pretraining ones)"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Write a synthetic layout dataset: PNGs, .txt captions, metadata.jsonl with layout records."""
    from .data.synthetic import write_synthetic_dataset

    chosen = tuple(c.strip() for c in colours.split(",")) if colours else None
    folder = write_synthetic_dataset(out, count, None if kind == "all" else kind, seed, chosen, overwrite=overwrite)
    typer.echo(f"wrote {count} images to {folder}")


@dataset_app.command("stats")
def dataset_stats(
    folder: Path = typer.Argument(..., help="dataset folder (categories from metadata.jsonl or sub-folders)"),
    config: Path | None = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    resolution: int | None = typer.Option(None, "--resolution", min=1, help=_RESOLUTION_HELP),
    model: str | None = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    sheet: Path = typer.Option(Path("bucket_sheet.png"), "--sheet", help="contact sheet PNG: each bucket's "
                               "images as training crops them (kept out of FOLDER)"),
    aesthetic: Path | None = typer.Option(None, "--aesthetic", help="aesthetic.jsonl from `rank scores`"),
    temperature: float = typer.Option(1.0, "--temperature", help="weights ** (1 / T); > 1 flattens"),
    depth: int | None = typer.Option(None, "--depth", min=1, help="cut category paths to this many levels"),
    chart: Path = typer.Option(Path("category_stats.png"), "--chart", help="bar chart PNG (kept out of FOLDER)"),
) -> None:
    """Sizes, aspect ratios, buckets (with a contact sheet), caption lengths in tokens, top words, languages;
    then images, mean aesthetic and hierarchical-sampling share per category (with a bar chart)."""
    from .captions.stats import caption_stats, format_caption_stats
    from .data.categories import list_images
    from .data.dataset import check_dataset
    from .data.sampling import aesthetic_levels, category_stats, format_stats
    from .data.stats import format_image_stats, image_stats, save_contact_sheet
    from .plots import save_stats_chart

    _outside(folder, sheet, "--sheet")
    _outside(folder, chart, "--chart")
    resolution, buckets, model = _training_view(config, resolution, model)
    tokens = _token_counter(model, "lengths in words")
    report = check_dataset(folder, min_side=0, near=None)
    if not report.items:
        report.raise_if_errors()  # the first problem, named
    if report.errors:
        typer.echo(f"{len(report.errors)} problem(s) left out of these figures (`ernie-lora dataset check` lists them)")
    images = image_stats(report.items, resolution, buckets)
    captions = caption_stats([item.caption for item in report.items], tokens)
    levels = aesthetic_levels(aesthetic) if aesthetic else None
    categories = category_stats(list_images(folder), levels, temperature, depth)  # every input read before writing
    typer.echo(format_image_stats(images) + format_caption_stats(captions), nl=False)
    typer.echo(f"contact sheet: {save_contact_sheet(images, sheet)}")
    typer.echo(format_stats(categories), nl=False)
    typer.echo(f"chart: {save_stats_chart(categories, chart)}")


def _scored_folder(folder: Path, score_folder) -> list:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    results = score_folder(folder)
    if not results:
        raise UserError(f"{folder}: no PNG images")
    return results


def _print_score_table(detail_header: str, rows: list[tuple[str, float | None, str]]) -> None:
    """One row per image (name, score or None, detail), then the median and mean of the scores."""
    import statistics

    typer.echo(f"{'image':40s} {'score':>6s}  {detail_header}")
    for name, score, detail in rows:
        shown = "-" if score is None else f"{score:.3f}"
        typer.echo(f"{name[:40]:40s} {shown:>6s}  {detail}")
    scores = [score for _, score, _ in rows if score is not None]
    if scores:
        typer.echo(f"{len(scores)} scored: median {statistics.median(scores):.3f}, mean {statistics.mean(scores):.3f}")


@eval_app.command("layout")
def eval_layout(
    folder: Path = typer.Argument(..., help="PNGs with prompts in their metadata, .txt files or metadata.jsonl"),
    text: bool = typer.Option(False, "--text", help="also read the quoted text (OCR) into the headline"),
) -> None:
    """Layout scores (0-1) of every image against its prompt: structure, colour (and text), and their product."""
    import statistics

    from .eval.layout import score_folder

    rows = list(_scored_folder(folder, lambda f: score_folder(f, text=text)))
    typer.echo(f"{'image':36s} {'score':>6s} {'struct':>6s} {'colour':>6s}" + (f" {'text':>6s}" if text else "")
               + "  kind; failed checks")
    scored = []
    for path, prompt, score in rows:
        if score is None:
            why = "(no prompt)" if not prompt else "(prompt is not in the layout language)"
            typer.echo(f"{path.name[:36]:36s} {'-':>6s}  {why}")
            continue
        scored.append(score)
        failed = ", ".join(k for k, v in score.checks.items() if v < 0.5)
        shown_text = "" if not text else f" {'-' if score.text is None else f'{score.text:.3f}':>6s}"
        typer.echo(f"{path.name[:36]:36s} {score.score:6.3f} {score.structure:6.3f} {score.colour:6.3f}{shown_text}"
                   f"  {score.kind}" + (f"; failed: {failed}" if failed else ""))
    if scored:
        means = ", ".join(f"{name} {statistics.mean(getattr(s, name) for s in scored):.3f}"
                          for name in ("score", "structure", "colour"))
        typer.echo(f"{len(scored)} scored: median score {statistics.median(s.score for s in scored):.3f}; "
                   f"means: {means}")


@eval_app.command("text")
def eval_text(
    folder: Path = typer.Argument(..., help="PNGs with prompts in their metadata, .txt files or metadata.jsonl"),
) -> None:
    """Text-rendering score (LongText-Bench rule): recall of the prompt's quoted text in the image's OCR."""
    from .eval.text import quoted_text, score_folder_text

    rows = [(path.name, score, " | ".join(quoted_text(prompt)) or "(no quoted text)")
            for path, prompt, score in _scored_folder(folder, score_folder_text)]
    _print_score_table("quoted text", rows)


@caption_app.command("lint")
def caption_lint(
    folder: Path = typer.Argument(..., help="a dataset folder with .txt captions"),
    model: str | None = typer.Option(None, "--model", "-m", help="count tokens with this model's tokenizer"),
    max_tokens: int | None = typer.Option(None, help="token limit (default: the tokenizer's model_max_length)"),
    ocr: bool = typer.Option(True, "--ocr/--no-ocr", help="read the images' text to flag unquoted text"),
    images: bool = typer.Option(False, "--images", help="compare each caption with its image's text, colours, "
                                                        "bands, panels and positions"),
    strict: bool = typer.Option(False, "--strict", help="exit 1 when anything is flagged"),
) -> None:
    """Flag weak captions: unquoted text, no layout or hierarchy words, too long, trigger words only; with
    --images, what the caption omits or contradicts of its image."""
    from .captions.lint import lint_folder, summary_table

    findings, total = lint_folder(folder, model=model, ocr=ocr, max_tokens=max_tokens, images=images)
    for finding in findings:
        typer.echo(str(finding))
    typer.echo(summary_table(findings, total, images))
    if strict and findings:
        raise typer.Exit(1)


@caption_app.command("auto")
def caption_auto(
    folder: Path = typer.Argument(..., help="a folder of images"),
    kind: str = typer.Option("auto", help="poster, infographic, comic, ui, other, or auto (guessed per image)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing .txt captions"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show the diff, write nothing"),
    model: str | None = typer.Option(None, "--model", "-m", help="a vision-language model (hub id or folder, e.g. "
                                     "HuggingFaceTB/SmolVLM-256M-Instruct) whose description is merged in"),
) -> None:
    """Write structured captions from the images' text (offline OCR) and layout (bands, bars, blocks, panels,
    colours): roles, positions, reading order, background and theme; with --model, also what a captioning
    model sees (the OCR's quoted text wins)."""
    from .captions.auto import auto_caption_folder, caption_diff
    from .captions.schema import KINDS

    if kind not in (*KINDS, "auto"):
        raise UserError(f"--kind {kind!r}: choose from {', '.join(KINDS)} or auto")
    results = auto_caption_folder(folder, kind=kind, overwrite=overwrite, dry_run=dry_run, model=model)
    for result in results:
        if not result.found_text:
            typer.echo(f"{result.image.name}: no text or layout found; no caption written")
        elif dry_run:
            typer.echo(caption_diff(result))
        elif result.written:
            typer.echo(f"{result.image.with_suffix('.txt').name}: {result.caption}")
        else:
            typer.echo(f"{result.image.with_suffix('.txt').name}: kept the existing caption (--overwrite replaces it)")
    written = sum(r.written for r in results)
    typer.echo(f"{len(results)} images, {written} captions written" + (" (dry run)" if dry_run else ""))


@lora_app.command("info")
def lora_info_cmd(
    file: Path = typer.Argument(..., help="a LoRA .safetensors in any supported layout"),
    model: str | None = typer.Option(None, "--model", "-m", help="also check that it fits this model"),
    modules: bool = typer.Option(False, "--modules", help="list every module with its kind, rank and alpha"),
) -> None:
    """Layout, modules, ranks, alpha, what each loader applies, provenance, and whether it fits a model.

    Layouts read: diffusers (transformer.), ai-toolkit/ComfyUI (diffusion_model., lora_A/B or
    lora_up/down, .alpha, .dora_scale, .diff, .diff_b), peft (base_model.model., adapter_config.json),
    kohya/musubi (lora_unet_), OneTrainer legacy (lora_transformer_), SimpleTuner LyCORIS (lycoris_),
    DiffSynth/OneTrainer bare keys (.lora_A.default.weight); LoRA, DoRA, LoHa, LoKr and full deltas.
    """
    from .lora.info import lora_info
    from .lora.layouts import LAYOUTS

    info = lora_info(file, model)
    layout = next(row for row in LAYOUTS if row.name == info.format)
    typer.echo(f"file:      {info.path} ({info.size_bytes / 2**20:.2f} MiB)")
    module = "<module_with_underscores>" if layout.flat else "<module>"
    typer.echo(f"layout:    {info.format}: {layout.prefix}{module}{layout.down} / {layout.up} (written by "
               f"{layout.writers})")
    typer.echo(f"modules:   {len(info.modules)} (" + ", ".join(f"{k}: {n}" for k, n in sorted(info.kinds.items()))
               + ")")
    if info.ranks:
        typer.echo("rank:      " + ", ".join(f"{r} ({n} modules)" for r, n in sorted(info.ranks.items())))
        typer.echo("alpha:     " + ", ".join(f"{a:g} ({n} modules)" for a, n in sorted(info.alphas.items()))
                   + f"  [from {info.alpha_source}]")
    p = info.provenance
    if "rank" in p and "alpha" in p:
        folded = f", scale {p['scale_folded']} folded into lora_B" if "scale_folded" in p else ""
        typer.echo(f"trained:   rank {p['rank']}, alpha {p['alpha']}{folded}")
    typer.echo(f"loaders:   {'':10s} {'loads':6s} {'as meant':9s}")
    for view, same, detail in info.loaders:
        meant = "-" if same is None else ("yes" if same else "NO")
        typer.echo(f"  {view.loader:10s} {'yes' if view.loads else 'no':6s} {meant:9s} {detail}")
    typer.echo(f"base:      {p.get('base_model', 'unknown')}")
    if info.trigger:
        typer.echo(f"trigger:   {info.trigger}  (generate fills [trigger] in prompts with it)")
    for key, value in sorted(p.items()):
        if key not in ("base_model", "training_config", "rank", "alpha", "scale_folded", "trigger_word"):
            typer.echo(f"  {key}: {value[:100]}")
    if info.fits is not None:
        typer.echo(f"fits {model}: {info.fits}")
    if modules:
        for name, plan in info.modules.items():
            extra = f", rank {plan.rank}, alpha {plan.alpha:g}" if plan.kind == "LoRA" else ""
            typer.echo(f"  {name}: {plan.label}{extra}")


@lora_app.command("verify")
def lora_verify(file: Path = typer.Argument(...)) -> None:
    """Check the header, the keys and the stored tensor hash; exit 1 only on a hash mismatch.

    A file from another tool has no hash: it is checked for readability and layout and passes."""
    from .lora.info import verify_lora

    code, message = verify_lora(file)
    typer.echo(f"{file}: {'OK' if code == 0 else 'FAILED'}: {message}")
    if code:
        raise typer.Exit(code)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists; pass --overwrite to replace it")


def _lora_target(target: Path, format: str, overwrite: bool) -> None:
    """Refuse to replace an existing file (or a peft folder's files) unless --overwrite."""
    if format == "peft" and target.suffix != ".safetensors":
        if target.exists() and not target.is_dir():
            raise UserError(f"{target}: exists and is not a folder (a peft adapter is a folder)")
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            _refuse_existing(target / name, overwrite)
    else:
        _refuse_existing(target, overwrite)


@lora_app.command("convert")
def lora_convert(
    source: Path = typer.Argument(...),
    target: Path = typer.Argument(..., help="the file to write (peft: a folder for adapter_model.safetensors "
                                            "and adapter_config.json)"),
    format: str = typer.Option("diffusers", "--format", "-f", help="diffusers, comfy, peft or kohya"),
    rank: int | None = typer.Option(None, "--rank", min=1,
                                    help="rank for modules that are not plain LoRAs (DoRA, LoHa, LoKr, full "
                                         "deltas): a truncated SVD, its error printed per module"),
    model: str | None = typer.Option(None, "--model", "-m", help="the base model (DoRA's change depends on it)"),
    drop_bias: bool = typer.Option(False, "--drop-bias", help="leave out bias and norm changes (not LoRA-able)"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Rewrite a LoRA in one of our formats; every module's delta W stays the same (alpha / rank folded in)."""
    from .lora.formats import FORMATS, read_lora_file, write_modules
    from .lora.header import provenance
    from .lora.tools import convert_modules

    if format not in FORMATS:
        raise UserError(f"--format {format!r}: choose from {', '.join(FORMATS)}")
    _lora_target(target, format, overwrite)
    lora = read_lora_file(source)
    plain, errors = convert_modules(lora.modules, rank, model, drop_bias)
    for name, error in errors.items():
        typer.echo(f"  {name}: {lora.modules[name].__class__.__name__} -> rank {plain[name].rank} LoRA, "
                   f"relative error {error:.2e}")
    written = write_modules(target, plain, format, provenance(lora.header))
    worst = f"; worst relative error {max(errors.values()):.2e}" if errors else ""
    typer.echo(f"{source} ({lora.layout}) -> {written} ({format}), {len(plain)} modules{worst}")


@lora_app.command("merge")
def lora_merge(
    files: list[Path] = typer.Argument(..., help="LoRAs to merge, then the output file last"),
    weights: str | None = typer.Option(None, help="comma-separated weights (default: equal, summing to 1)"),
    rank: int = typer.Option(16, help="rank of the merged LoRA"),
    format: str = typer.Option("diffusers", "--format", "-f"),
    model: str | None = typer.Option(None, "--model", "-m", help="the base model (needed for DoRA inputs)"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """One LoRA from several: truncated SVD of the weighted sum of their delta W, per module."""
    from .lora.formats import read_modules, write_modules
    from .lora.tools import base_weights, check_fits, merge_modules, shape_model

    if len(files) < 3:
        raise UserError("lora merge: give at least two LoRAs and the output file")
    *inputs, target = files
    _lora_target(target, format, overwrite)
    try:
        w = [float(x) for x in weights.split(",")] if weights else [1.0 / len(inputs)] * len(inputs)
    except ValueError:
        raise UserError(f"--weights {weights!r}: expected numbers separated by commas") from None
    if len(w) != len(inputs):
        raise UserError(f"--weights: {len(w)} weights for {len(inputs)} LoRAs")
    read = [read_modules(f) for f in inputs]
    loras = [modules for modules, _, _ in read]
    # the model they are for: --model, else the base model our files record; every module must exist there
    target_model = model or next((h["ernie_lora.base_model"] for _, _, h in read if h.get("ernie_lora.base_model")),
                                 None)
    if target_model is not None:
        shapes = shape_model(target_model)
        for file, modules in zip(inputs, loras, strict=True):
            check_fits(file, modules, shapes)
    bases = base_weights(model, sorted({n for lora in loras for n, m in lora.items() if m.dora is not None}))
    merged, energy = merge_modules(loras, w, rank, bases)
    metadata = {"merged_from": [str(f) for f in inputs], "merge_weights": w, "energy_kept": f"{energy:.6f}"}
    written = write_modules(target, merged, format, metadata)
    typer.echo(f"merged {len(inputs)} LoRAs into {written}: {len(merged)} modules, rank {rank}, "
               f"energy kept {energy:.2%}" + ("" if target_model else "; not checked against a model (no --model, "
                                              "no base model recorded in the files)"))


@lora_app.command("fuse")
def lora_fuse(
    file: Path = typer.Argument(...),
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="the base model (default: the one recorded in the LoRA's provenance)"),
    strength: float = typer.Option(1.0, "--strength", "-s"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the fused transformer (diffusers format)"),
    dtype: str = typer.Option("bf16"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Save the base transformer with the LoRA (any layout and kind) merged into its weights."""
    from .lora.formats import read_modules
    from .lora.tools import fuse_into
    from .models import family_for

    target = out / "transformer"
    _refuse_existing(target, overwrite)
    modules, _, metadata = read_modules(file)
    model = model or metadata.get("ernie_lora.base_model")
    if not model:
        raise UserError(f"{file}: no base model recorded in it; pass --model")
    transformer = family_for(model).load_transformer(model, dtype=dtype)
    fuse_into(transformer, modules, strength)
    from .io import write_folder_atomically

    write_folder_atomically(target, lambda tmp: transformer.save_pretrained(tmp, safe_serialization=True))
    typer.echo(f"fused {file} at strength {strength:g} into {target}")


@app.command("pretrain-micro")
def pretrain_micro_cmd(
    config: Path = typer.Argument(..., help="configs/micro-pretrain.yaml"),
    output: Path = typer.Option(..., "--output", "-o"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Pretrain micro ERNIE (VAE, then DiT) on the synthetic layout world."""
    from .config import MicroPretrainConfig, load_yaml_model

    cfg = load_yaml_model(config, MicroPretrainConfig)
    from .recipes.pretrain_micro import pretrain_micro

    _quiet_libraries()
    pretrain_micro(cfg, output, overwrite=overwrite)


@app.command()
def generate(
    prompts: list[str] = typer.Argument(None, help="prompts, one image each; [trigger] is filled with the LoRAs' "
                                                   "trigger words"),
    prompts_file: Path | None = typer.Option(None, "--prompts-file", help="a text file, one prompt per line"),
    model: str | None = typer.Option(None, "--model", "-m", help="hub id, local folder or 'tiny'"),
    lora: list[str] = typer.Option([], "--lora", help="PATH[:STRENGTH], repeatable"),
    fuse: bool = typer.Option(True, "--fuse/--no-fuse",
                              help="write the LoRAs into the weights for the run (the base's speed); --no-fuse "
                                   "adds them to their layers' outputs at each step"),
    steps: int | None = typer.Option(None, min=1, help="denoising steps (default 50; 8 with --turbo)"),
    guidance: float | None = typer.Option(None, help="CFG scale (default 4.0; 1.0 with --turbo)"),
    seed: int = typer.Option(0, help="seed of the first image; the next prompts use seed+1, ..."),
    width: int | None = typer.Option(None, help="default: the model's native size (1024; 64 for micro)"),
    height: int | None = typer.Option(None),
    turbo: bool = typer.Option(False, "--turbo", help="ERNIE-Image-Turbo: 8 steps, guidance 1.0"),
    pe: bool = typer.Option(False, "--pe/--no-pe",
                            help="rewrite prompts with the Prompt Enhancer (its model if loaded, else rules)"),
    negative_prompt: str = typer.Option("", "--negative-prompt"),
    out: Path = typer.Option(Path("outputs"), "--out", "-o", help="folder for the PNGs"),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32"),
    device: str | None = typer.Option(None, help="cuda, cpu, ... (default: cuda if available)"),
) -> None:
    """Generate images, optionally with LoRAs."""
    from .generate import generate as run_generate
    from .generate import parse_lora_spec

    all_prompts = list(prompts or [])
    if prompts_file is not None:
        from .io import read_text_file

        all_prompts += [ln.strip() for ln in read_text_file(prompts_file).splitlines() if ln.strip()]
    _quiet_libraries()
    paths = run_generate(
        all_prompts, model=model, loras=[parse_lora_spec(s) for s in lora], fuse=fuse, steps=steps,
        guidance=guidance, seed=seed, width=width, height=height, turbo=turbo, use_pe=pe,
        negative_prompt=negative_prompt, out_dir=out, dtype=dtype, device=device,
    )
    for path in paths:
        typer.echo(str(path))


@app.command()
def studio(
    root: Path = typer.Option(Path("studio"), "--root", help="its folder: datasets/, jobs/, runs/, playground/"),
    host: str = typer.Option("127.0.0.1", "--host", help="any other address needs --token"),
    port: int = typer.Option(7860, "--port", min=1, max=65535),
    token: str | None = typer.Option(None, "--token", help="required on every request (and to bind beyond loopback)"),
) -> None:
    """The whole workflow in a browser: datasets and captions, jobs with live loss, LoRAs, annotation."""
    from .studio.app import serve

    serve(root, host, port, token)


@rank_app.command("serve")
def rank_serve(
    folder: Path = typer.Argument(..., help="the images to compare (sub-folders included)"),
    db: Path | None = typer.Option(None, "--db", help="SQLite file (default: FOLDER/annotations.sqlite)"),
    host: str = typer.Option("127.0.0.1", "--host", help="any other address needs --token"),
    port: int = typer.Option(8765, "--port", min=1, max=65535),
    token: str | None = typer.Option(None, "--token", envvar="ERNIE_LORA_TOKEN",
                                     help="every request must carry it (?token=, X-Token or the page's cookie)"),
) -> None:
    """Serve the pairwise annotation page: ← / → / ↓ (tie) / s (skip) / u (undo)."""
    from .rank.app import serve

    serve(folder, db, host, port, token)


@rank_app.command("invite")
def rank_invite(
    annotators: list[str] = typer.Argument(..., help="one name per annotator"),
    token: str = typer.Option(..., "--token", envvar="ERNIE_LORA_TOKEN", help="the token the server runs with"),
    url: str = typer.Option("http://127.0.0.1:8765/", "--url", help="where annotators reach the server"),
) -> None:
    """A link per annotator for a server started with --token: each votes (and undoes) only as themselves."""
    from urllib.parse import quote

    from .rank.app import invite_token

    for name in annotators:
        if not 0 < len(name) <= 64:
            raise UserError(f"annotator {name[:70]!r}: 1 to 64 characters")
        typer.echo(f"{name}: {url.rstrip('/')}/?annotator={quote(name)}&token={invite_token(token, name)}")


@rank_app.command("scores")
def rank_scores(
    db: Path = typer.Argument(..., help="annotations.sqlite"),
    out: Path | None = typer.Option(None, "--out", "-o", help="folder (default: beside DB, scores/)"),
    bootstrap: int = typer.Option(200, "--bootstrap", min=10, help="resamples for the confidence intervals"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Bradley-Terry scores with intervals, Elo, levels 1-10 -> scores.csv, pairs.jsonl, aesthetic.jsonl."""
    from .rank.export import export_scores

    summary = export_scores(db, out or db.parent / "scores", bootstrap=bootstrap, overwrite=overwrite)
    typer.echo(f"{summary.images} images, {summary.votes} votes -> {summary.out}/scores.csv, aesthetic.jsonl; "
               f"pairs.jsonl: {summary.pairs_from_votes} same-prompt votes + {summary.pairs_from_scores} by score")


@rank_app.command("synth")
def rank_synth(
    out: Path = typer.Argument(..., help="new folder"),
    prompts: int = typer.Option(50, "--prompts", min=1),
    per_prompt: int = typer.Option(4, "--per-prompt", min=1),
    seed: int = typer.Option(0),
) -> None:
    """Simulated data: synthetic layouts degraded by a hidden quality (kept in metadata.jsonl)."""
    from .rank.simulate import write_quality_dataset

    folder = write_quality_dataset(out, prompts, per_prompt, seed)
    typer.echo(f"wrote {prompts * per_prompt} images to {folder}")


@rank_app.command("simulate")
def rank_simulate(
    folder: Path = typer.Argument(..., help="a `rank synth` folder (hidden quality in metadata.jsonl)"),
    votes: int = typer.Option(800, "--votes", min=1),
    annotators: int = typer.Option(3, "--annotators", min=1),
    noise: float = typer.Option(0.1, "--noise", min=0.001, help="annotator noise on the 0-1 quality scale"),
    db: Path | None = typer.Option(None, "--db"),
    seed: int = typer.Option(0),
) -> None:
    """Simulated annotators vote through the same database the web app uses."""
    from .data.categories import list_images
    from .rank.simulate import hidden_quality, simulate_annotators
    from .rank.store import AnnotationStore

    store = AnnotationStore.create_or_open(db or folder / "annotations.sqlite", folder, list_images(folder))
    cast = simulate_annotators(store, hidden_quality(folder), votes, annotators, noise, seed=seed)
    typer.echo(f"{cast} votes in {store.path}")


@aes_app.command("train")
def aes_train(
    folder: Path = typer.Argument(..., help="the images (the dataset folder the labels name)"),
    labels: Path | None = typer.Option(None, "--labels", help="aesthetic.jsonl: regression on levels"),
    db: Path | None = typer.Option(None, "--db", help="annotations.sqlite: train on the votes (ranking loss)"),
    out: Path = typer.Option(Path("aesthetic.safetensors"), "--out", "-o"),
    encoder: str = typer.Option("builtin", "--encoder", help="builtin, or hf:NAME_OR_FOLDER (CLIP/SigLIP)"),
    holdout: float = typer.Option(0.2, "--holdout", min=0.0, max=0.9, help="share kept out for eval"),
    epochs: int = typer.Option(400, "--epochs", min=1),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Train the aesthetic head on frozen features."""
    from .eval.aesthetic import train_command

    _quiet_libraries()
    scorer, check = train_command(folder, out, labels=labels, db=db, encoder=encoder, holdout=holdout,
                                  epochs=epochs, seed=seed, overwrite=overwrite)
    typer.echo(f"scorer: {out} ({scorer.encoder_name}; {len(scorer.holdout)} images held out)")
    if check:
        typer.echo(f"held-out levels: SRCC {check.srcc:.3f}  PLCC {check.plcc:.3f}  KRCC {check.krcc:.3f}")


@aes_app.command("score")
def aes_score(
    folder: Path = typer.Argument(...),
    model: Path = typer.Option(Path("aesthetic.safetensors"), "--model", "-m"),
) -> None:
    """Score every image of a folder, best first."""
    from .eval.aesthetic import score_folder

    _quiet_libraries()
    for name, score in score_folder(model, folder):
        typer.echo(f"{score:8.3f}  {name}")


@aes_app.command("eval")
def aes_eval(
    folder: Path = typer.Argument(..., help="the images"),
    model: Path = typer.Option(Path("aesthetic.safetensors"), "--model", "-m"),
    labels: Path | None = typer.Option(None, "--labels", help="aesthetic.jsonl (default: FOLDER/metadata.jsonl)"),
    key: str = typer.Option("score", "--key", help="the truth: score, level, or a metadata key such as quality"),
    all_images: bool = typer.Option(False, "--all", help="every labelled image, not only those held out"),
    plot: Path = typer.Option(Path("aesthetic_scatter.png"), "--plot"),
) -> None:
    """SRCC, PLCC (after the 4-parameter logistic fit) and KRCC against the truth; a scatter plot."""
    from .eval.aesthetic import eval_command

    _quiet_libraries()
    result, subset = eval_command(model, folder, labels=labels, key=key, all_images=all_images, plot=plot)
    fit = "after the 4-parameter logistic" if result.fitted else "linear: the logistic fit failed"
    typer.echo(f"{result.n} images ({subset}) against {key}: SRCC {result.srcc:.4f}  PLCC {result.plcc:.4f} "
               f"({fit})  KRCC {result.krcc:.4f}")
    typer.echo(f"scatter: {plot}")


@app.command()
def demo(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o"),
    steps: int = typer.Option(500, help="LoRA training steps"),
    seed: int = typer.Option(0, help="seeds the training data, the LoRA's training and the samples"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier demo in --output"),
) -> None:
    """Teach micro ERNIE a layout and a colour it never saw, with one LoRA; before/after scores (CPU)."""
    from .demo import run_demo

    _quiet_libraries()
    run_demo(output, steps=steps, seed=seed, overwrite=overwrite)


def main() -> None:
    """Every mistake ends as one line on stderr: a bad argument or option (typer's usage errors, which would
    print a box; exit status 2), or bad input found while running (UserError, exit status 2)."""
    from typer.exceptions import TyperException  # the base of typer's usage and parameter errors

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = app(standalone_mode=False)
    except TyperException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # a bare group: its help, as before
            print(ctx.get_help())
            sys.exit(2)
        command = ctx.command_path if ctx is not None else "ernie-lora"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {command}: {one_line(message)} (see {command} --help)", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except RunStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(3)
    except UserError as exc:
        if _PROGRESS_JSON:  # a driver reading stdout gets the error as an event too
            print(json.dumps({"event": "error", "message": one_line(str(exc))}), flush=True)
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
