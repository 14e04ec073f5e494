"""Few-step Turbo LoRAs by distribution matching, teachers by timestep range, read top to bottom.

1. prompts (a text file, or synthetic layout captions) embedded once, with the empty prompt for CFG;
2. one DiT with the student LoRA (``lora.init_from`` starts it from a user's LoRA: the slow teacher's
   own LoRA, made fast), the fake score and the teachers as further adapters (``dmd.py``);
3. optionally a regression warm start onto the teachers' ODE samples, then DMD steps: the fake score
   follows the student's samples, the student follows the difference between the teacher's and the
   fake score's predictions (``dmd.py`` says how, and where this differs from DMD2);
4. checkpoints of both LoRAs, metrics and plots through the shared engine; the student is exported as a
   plain LoRA file that runs in ``generate --lora F --steps K --guidance 1``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import DistillRunConfig, SampleConfig
from ..data.cache import build_caches, load_embedding
from ..data.synthetic import pretraining_colours, split_captions
from ..errors import UserError
from ..io import read_text_file
from ..lora.adapters import export_adapter
from ..models import family_for
from . import engine
from .dmd import FAKE, STUDENT, DistributionMatching
from .report import sample_before_after, write_run_report

METRICS = ("dmd_loss", "fake_loss", "student_step", "regression_loss")
PLOT = ("distillation: DMD loss, fake-score loss, student gradient", ("dmd_loss", "fake_loss", "grad_norm",
                                                                      "regression_loss"))


@dataclass
class DistillResult:
    output: Path
    steps_done: int
    history: list[dict]
    setup: dict
    report: Path | None = None


def run_distill(cfg: DistillRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
                force: bool = False, stop_after: int | None = None, progress: bool | str = True) -> DistillResult:
    started = time.perf_counter()
    run = engine.open_run(output, cfg, "distill", resume=resume, overwrite=overwrite, force=force)
    family, tcfg, dcfg = family_for(cfg.model.name), cfg.train, cfg.distill
    prompts = distill_prompts(cfg)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run.output.parent / ".ernie_lora_cache"
    cached = build_caches([], [], cache_dir, cfg.model.name, prompts=prompts, text_dtype=cfg.model.dtype,
                          device=run.device, revision=cfg.model.revision)
    multiple = family.pixel_multiple(cfg.model.name, cfg.model.revision)
    if cfg.data.resolution % multiple:
        raise UserError(f"data.resolution: {cfg.data.resolution} must be a multiple of {multiple}")
    model = engine.setup_model(run, family, cfg.model, cfg.lora, tcfg)
    embeddings = [load_embedding(cached.prompt_texts[p]) for p in prompts]
    empty = load_embedding(cached.empty_text)
    dmd = DistributionMatching(cfg, model, embeddings, empty, run.device, multiple)
    optimisation = engine.make_optimisation(model.params, tcfg)
    checkpoints = engine.Checkpoints(
        run, cfg.checkpoint.every, cfg.checkpoint.keep, tcfg.steps, model,
        {"optimizer": optimisation.optimizer, "lr_scheduler": optimisation.scheduler, "opt_fake": dmd.opt_fake,
         "generator": engine.GeneratorState(dmd.generator), "prompts": engine.PythonRandomState(dmd.prompt_rng)},
        adapters={"lora.safetensors": STUDENT, "fake.safetensors": FAKE})
    step = checkpoints.restore() if resume else 0
    log = engine.MetricsLog(run, (*METRICS, "lr", "grad_norm"), step)
    engine.start_run(run, cfg)
    if dcfg.regression_steps and step < dcfg.regression_steps:
        dmd.make_ode_pairs()

    def micro_step(index: int, scale: float) -> dict[str, float]:
        if index < dcfg.regression_steps:  # warm start: regress onto the teachers' ODE
            return dmd.regression_step(scale)
        return dmd.dmd_step(scale)

    bar = engine.Progress(run, tcfg.steps, step, progress, engine.Trackers(run, cfg.logging, cfg))
    step = engine.train_steps(run, tcfg, step, micro_step, model, optimisation, checkpoints, log, bar,
                              ("dmd_loss", "fake_loss"), PLOT, stop_after=stop_after)
    log.close()
    report = None
    if step >= tcfg.steps:
        metadata = engine.lora_metadata(cfg, "distill", family, model, step, student_steps=dcfg.student_steps,
                                        guidance=1.0, teachers=[t.model_dump(mode="json") for t in cfg.teachers])
        lora = export_adapter(run.output / "lora.safetensors", model.transformer, model.peft_config, metadata, STUDENT)
        bar.note(f"step {step}: LoRA {lora}", event="lora", step=step, path=lora)
        report = _report(cfg, run, family, model, dmd, prompts[:4], embeddings[:4], empty, started, step, log.history)
        bar.note(f"report {report}", event="report", path=report)
    bar.close()
    return DistillResult(run.output, step, log.history, model.setup, report)


def _report(cfg: DistillRunConfig, run: engine.Run, family, model: engine.TrainedModel, dmd: DistributionMatching,
            prompts: list[str], embeddings: list, empty, started: float, step: int, history: list[dict]) -> Path:
    """The report: before is the base, after the student, both at the student's steps without CFG."""
    steps = cfg.distill.student_steps
    sampler = engine.Sampler(family, cfg.model, SampleConfig(steps=steps, guidance=1.0), embeddings, empty,
                             model.transformer, run.device, cfg.data.resolution, labels=[p[:60] for p in prompts])
    with dmd.adapters.use(STUDENT):
        pair = sample_before_after(run.output / "report", sampler, dmd.adapters.use(None), prompts)
    return write_run_report(run.output, cfg, title=f"Turbo distillation run {run.output.name}", started=started,
                            steps=step, history=history, plotted=PLOT[1], before_after=pair,
                            notes=[f"Before: the base model at {steps} steps without CFG; after: the base with the "
                                   f"student LoRA, same prompts and seeds.", ""],
                            files={"LoRA": run.output / "lora.safetensors", "metrics": run.output / "metrics.csv"})


def distill_prompts(cfg: DistillRunConfig) -> list[str]:
    """The training prompts: a file, one per line, or distinct train-split captions of the synthetic world."""
    if cfg.data.prompts_file:
        path = Path(cfg.data.prompts_file)
        if not path.is_file():
            raise UserError(f"data.prompts_file: {path} does not exist")
        prompts = [line.strip() for line in read_text_file(path).splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"data.prompts_file: {path} holds no prompts")
        return prompts
    return sorted(split_captions(cfg.data.synthetic_prompts, "train", None, pretraining_colours(), seed=cfg.data.seed))
