"""Flow-matching LoRA fine-tuning of ERNIE-Image (SFT), read top to bottom.

1. check the dataset, bucket it, cache latents and text embeddings (VAE and text encoder then unloaded);
2. load the DiT, inject a peft LoRA on the chosen linear layers, everything else frozen;
3. train: x_sigma = (1 - sigma) x0 + sigma noise, predict the velocity noise - x0, MSE;
4. checkpoint atomically (LoRA, optimizer, LR schedule, RNG states, data position), sample, plot;
5. write RUN/lora.safetensors (diffusers keys, alpha / rank folded into lora_B: the same delta in
   every loader).

``--resume`` continues bit-exactly: every random draw comes from state that is checkpointed.
Under ``accelerate launch`` / ``torchrun`` with N processes, ``train.batch_size`` is per process:
every process draws the same global batch, noise and timesteps, trains on its slice, and the LoRA
gradients are averaged (what DDP does), so N processes of batch b train the LoRA of one process of
batch N*b. The main process alone writes files.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..captions import restyle
from ..captions.stats import token_counter
from ..captions.trigger import fill_placeholder, has_placeholder, with_trigger
from ..config import StageConfig, TrainRunConfig
from ..data.batches import BucketBatches
from ..data.buckets import make_buckets
from ..data.cache import CachedDataset, CachedSample, build_cache_groups, load_embedding, load_latent
from ..data.dataset import CACHE_DIR_NAME, DatasetReport, Item, check_dataset, dataset_provenance
from ..data.sampling import sampling_weights
from ..errors import UserError
from ..flow import noisy_latents, sample_sigmas, velocity_target
from ..lora.adapters import export_adapter
from ..models import ErnieImageFamily, family_for
from . import engine
from .report import BeforeAfter, write_run_report
from .validation import BestCheckpoint, Validation, split_validation


@dataclass
class TrainResult:
    output: Path
    steps_done: int
    final_loss: float | None
    cache: CachedDataset
    setup: dict
    validation: list[dict] = field(default_factory=list)  # validation.csv's rows
    report: Path | None = None


@dataclass(frozen=True)
class Stage:
    """Steps ``start + 1 .. end`` of the run, at ``resolution`` (one stage without train.stages)."""

    start: int
    end: int
    resolution: int
    lr: float
    batch_size: int
    grad_accum: int


def stage_plan(cfg: TrainRunConfig) -> list[Stage]:
    t = cfg.train
    stages, start = [], 0
    for s in t.stages or [StageConfig(resolution=cfg.data.resolution, steps=t.steps)]:
        stages.append(Stage(start, start + s.steps, s.resolution, s.lr or t.lr, s.batch_size or t.batch_size,
                            s.grad_accum or t.grad_accum))
        start += s.steps
    return stages


@dataclass
class PreparedData:
    report: DatasetReport
    training: list[Item]  # the dataset less the validation share
    cached: CachedDataset  # the shared embeddings ("" and sample prompts)
    stages: list[list[CachedSample]]  # the training images, bucketed at each stage's resolution
    validation: list[CachedSample]  # data.validation, at the largest resolution
    sample_prompts: list[str]  # as sampled: with the trigger word where the captions have it


def train(cfg: TrainRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
          force: bool = False, stop_after: int | None = None, progress: bool | str = True) -> TrainResult:
    """Run the LoRA recipe. ``stop_after`` ends the run after that step as if killed (tests use it);
    ``progress``: bar, json or off (True / False: bar / off)."""
    run = engine.open_run(output, cfg, "train", resume=resume, overwrite=overwrite, force=force, distributed=True)
    result = _train(cfg, run, resume, stop_after, progress)
    engine.close_run(run)  # on success only: a process that failed must not wait for the others
    return result


def _train(cfg: TrainRunConfig, run: engine.Run, resume: bool, stop_after: int | None, progress: bool | str
           ) -> TrainResult:
    started = time.perf_counter()
    family = family_for(cfg.model.name)
    stages = stage_plan(cfg)
    data = prepare_data(cfg, run, family, stages)
    tcfg = cfg.train
    assistant = (cfg.model.assistant_lora, cfg.model.assistant_strength) if cfg.model.assistant_lora else None
    model = engine.setup_model(run, family, cfg.model, cfg.lora, tcfg, quantize=cfg.model.quantize,
                               block_swap=cfg.model.block_swap, fsdp=tcfg.fsdp, assistant=assistant)
    if tcfg.fsdp and run.world == 1:
        print("note: train.fsdp with one process: nothing to shard (launch with torchrun / accelerate)")
    optimisation = engine.make_optimisation(model.params, tcfg, run.world)
    generator = torch.Generator().manual_seed(tcfg.seed)  # noise, sigmas, caption dropout, styles
    batches = stage_batches(cfg, run, data, stages)
    # one stage keeps the key "data" (checkpoints of runs without stages resume as before)
    positions = {"data": batches[0]} if len(batches) == 1 else {f"data-{i}": b for i, b in enumerate(batches)}
    checkpoints = engine.Checkpoints(run, cfg.checkpoint.every, cfg.checkpoint.keep, tcfg.steps, model,
                                     {"optimizer": optimisation.optimizer, "lr_scheduler": optimisation.scheduler,
                                      **positions, "generator": engine.GeneratorState(generator)})
    step = checkpoints.restore() if resume else 0
    log = engine.MetricsLog(run, ("loss", "lr", "grad_norm"), step)
    if step >= tcfg.steps and (run.output / "lora.safetensors").exists():
        print(f"{run.output}: already complete at step {step}; nothing to do (raise train.steps to go on)")
        return TrainResult(run.output, step, log.history[-1]["loss"] if log.history else None, data.cached,
                           model.setup)
    engine.start_run(run, cfg)
    bar = engine.Progress(run, tcfg.steps, step, progress, engine.Trackers(run, cfg.logging, cfg))
    watch = Watch(cfg, run, family, model, data, stages, bar, step)
    micro_step = FlowMatchingStep(cfg, run, family, model, batches[0], generator,
                                  load_embedding(data.cached.empty_text))
    for i, (stage, stage_batch) in enumerate(zip(stages, batches, strict=True)):
        if step >= stage.end or (stop_after is not None and step >= stop_after):
            continue
        micro_step.batches, watch.stage = stage_batch, stage
        optimisation.set_base_lr(stage.lr)
        if len(stages) > 1:
            bar.note(f"stage {i + 1}/{len(stages)}: {stage.resolution}px, steps {step + 1}-{stage.end}, lr "
                     f"{stage.lr:g}, batch {stage.batch_size} x {stage.grad_accum}", event="stage", stage=i + 1,
                     step=step, resolution=stage.resolution)
        stage_cfg = tcfg.model_copy(update={"steps": stage.end, "grad_accum": stage.grad_accum})
        step = engine.train_steps(run, stage_cfg, step, micro_step, model, optimisation, checkpoints, log, bar,
                                  ("loss",), ("LoRA training: flow-matching loss, lr, gradient norm",
                                              ("loss", "lr", "grad_norm")), watch.on_step, stop_after)
    log.close()
    last_loss = log.history[-1]["loss"] if log.history else None
    if step < tcfg.steps:  # stopped early (stop_after)
        bar.close()
        return TrainResult(run.output, step, last_loss, data.cached, model.setup, watch.rows)
    watch.finish(step)
    bar.close()
    report = watch.report(started, step, log.history) if run.is_main else None
    return TrainResult(run.output, step, last_loss, data.cached, model.setup, watch.rows, report)


def stage_batches(cfg: TrainRunConfig, run: engine.Run, data: PreparedData, stages: list[Stage]
                  ) -> list[BucketBatches]:
    """Each stage's batches (its own bucket order, seeded by train.seed) of the same hierarchical weights."""
    sampling = cfg.data.sampling
    weights = sampling_weights(sampling.by, Path(cfg.data.path), [s.image for s in data.stages[0]],
                               sampling.aesthetic, sampling.temperature, sampling.depth)
    return [BucketBatches(samples, stage.batch_size * run.world, cfg.train.seed,
                          weights=weights) for samples, stage in zip(data.stages, stages, strict=True)]


class Watch:
    """What the user sees of a run besides the bar: sample grids at each stage's resolution, validations (loss,
    scored samples, the best checkpoint), their lines and tracker entries, and the end-of-run report."""

    def __init__(self, cfg: TrainRunConfig, run: engine.Run, family: ErnieImageFamily, model: engine.TrainedModel,
                 data: PreparedData, stages: list[Stage], bar: engine.Progress, step: int):
        self.cfg, self.run, self.model, self.bar, self.stage = cfg, run, model, bar, stages[0]
        provenance = dataset_provenance(data.training)  # the images it trained on (validation held out)
        # what the LoRA file records, at the step it is written (the best, the last)
        self.metadata = lambda step: engine.lora_metadata(cfg, "lora", family, model, step, **provenance)
        self.after: Path | None = None
        self.samples_dir = run.output / "samples"
        active = run.is_main or model.setup["fsdp"]  # under FSDP every process runs the forward passes
        empty = load_embedding(data.cached.empty_text)
        self.sampler = None
        if cfg.sample.prompts and active:
            self.sampler = engine.Sampler(family, cfg.model, cfg.sample,
                                          [load_embedding(data.cached.prompt_texts[p]) for p in data.sample_prompts],
                                          empty, model.transformer, run.device, cfg.data.resolution)
        self.validation = None
        if data.validation and active:
            shown = data.validation[:cfg.validation.samples]
            sampler = engine.Sampler(family, cfg.model, cfg.sample, [load_embedding(s.text) for s in shown],
                                     empty, model.transformer, run.device, cfg.data.resolution,
                                     labels=[s.caption[:60] for s in shown]) if shown else None
            self.validation = Validation(cfg, run, family, model, data.validation, sampler)
        self.rows = self.validation.history(step) if self.validation else []
        self.best = BestCheckpoint(run.output / "best", cfg.checkpoint.best)
        self.best.restore(step)
        if step == 0:
            self.observe(0)  # the before: what the base makes of the prompts

    def grid(self, kind: str, step: int) -> Path:
        return self.run.output / kind / f"step-{step:06d}.png"

    def on_step(self, step: int) -> None:
        every, v_every = self.cfg.sample.every, self.cfg.validation.every
        if step == self.cfg.train.steps:
            return  # finish() samples and validates the end
        if self.sampler and every and step % every == 0:
            self.sample(step)
        if self.validation and v_every and step % v_every == 0:
            self.validate(step)

    def sample(self, step: int) -> None:
        path = self.grid("samples", step)
        grid = self.sampler.run(path, self.run.is_main, side=self.stage.resolution)
        self.bar.note(f"step {step}: samples {grid} ({self.stage.resolution}px)", event="samples", image=grid,
                      step=step, path=grid)

    def validate(self, step: int) -> None:
        row = {"step": step, "val_loss": self.validation.loss()}
        row.update(self.validation.scores(self.grid("validation", step)))
        self.rows = [r for r in self.rows if r["step"] < step] + [row]
        if not self.run.is_main:
            return
        self.validation.write(self.rows)
        self.bar.log({f"validation/{k}": v for k, v in row.items() if k != "step"}, step)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
        grid = self.grid("validation", step)
        self.bar.note(f"step {step}: validation {shown}" + (f"; samples {grid}" if grid.exists() else ""),
                      event="validation", image=grid if grid.exists() else None, **row)
        if self.best.consider(step, row):
            path = self.best.save(lambda file: export_adapter(file, self.model.transformer, self.model.peft_config,
                                                              self.metadata(step)))
            self.bar.note(f"step {step}: best {self.best.metric} so far; LoRA {path}", event="best", step=step,
                          path=path, metric=self.best.metric, value=self.best.value)

    def observe(self, step: int) -> Path | None:
        """Samples and validation at ``step`` (the first and the last); the grid that shows the step for the
        report's before/after: the validation samples' when there are some, else the sample prompts'."""
        if self.sampler:
            self.sample(step)
        if self.validation:
            self.validate(step)
            if self.validation.sampler:
                return self.grid("validation", step)
        return self.grid("samples", step) if self.sampler else None

    def finish(self, step: int) -> None:
        """The end: last samples and validation (which may save the best), then the LoRA."""
        self.after = self.observe(step)
        if self.run.is_main:
            path = self.run.output / "lora.safetensors"
            export_adapter(path, self.model.transformer, self.model.peft_config, self.metadata(step))
            self.bar.note(f"step {step}: LoRA {path}", event="lora", step=step, path=path)

    def report(self, started: float, step: int, history: list[dict]) -> Path:
        before = self.grid("validation" if self.validation and self.validation.sampler else "samples", 0)
        scores = {}
        if self.rows:
            first, last = self.rows[0], self.rows[-1]
            scores = {k: (first.get(k), last.get(k)) for k in ("val_loss", "layout", "text") if k in last}
        pair = BeforeAfter(len(self.validation.captions) if self.validation else len(self.cfg.sample.prompts),
                           before, self.after, scores) if self.after else None
        best = {"metric": self.best.metric, "value": self.best.value, "step": self.best.step,
                "path": self.best.folder / "lora.safetensors"} if self.best.step is not None else None
        path = write_run_report(self.run.output, self.cfg, title=f"LoRA run {self.run.output.name}", started=started,
                                steps=step, history=history, plotted=("loss", "lr", "grad_norm"),
                                validation=self.rows, best=best, before_after=pair,
                                files={"LoRA": self.run.output / "lora.safetensors", "metrics": self.run.output /
                                       "metrics.csv", "validation": self.validation.path if self.validation else None})
        self.bar.note(f"report {path}", event="report", path=path)
        return path


class FlowMatchingStep:
    """One micro-batch: the flow-matching loss on this process's slice of a global batch, backward."""

    def __init__(self, cfg: TrainRunConfig, run: engine.Run, family: ErnieImageFamily, model: engine.TrainedModel,
                 batches: BucketBatches, generator: torch.Generator, empty: torch.Tensor):
        self.cfg, self.run, self.family, self.model = cfg, run, family, model
        self.batches, self.generator, self.empty = batches, generator, empty
        self.num_train_timesteps = family.num_train_timesteps(cfg.model.name, cfg.model.revision)
        self.shift = family.scheduler_shift(cfg.model.name, cfg.train.timesteps.shift, cfg.model.revision)

    def __call__(self, _: int, scale: float) -> dict[str, float]:
        run, g, ts = self.run, self.generator, self.cfg.train.timesteps
        batch = self.batches.next()  # the global batch; every process draws the same random numbers for it
        n = len(batch)
        # caption dropout swaps in the cached "" embedding (what the pipeline's CFG negative uses)
        drop = (torch.rand(n, generator=g) < self.cfg.data.caption_dropout).tolist()
        n_styles = len(self.cfg.data.caption_styles)  # one style per sample, drawn only when there is a choice
        style = torch.randint(n_styles, (n,), generator=g).tolist() if n_styles > 1 else [0] * n
        mine = list(range(run.rank, n, run.world))  # this process's slice of the global batch (never empty)
        x0 = torch.stack([load_latent(batch[i].latent) for i in mine]).to(run.device, torch.float32)
        noise = torch.randn((n, *x0.shape[1:]), generator=g)  # one bucket: one latent shape
        sigmas = sample_sigmas(n, g, ts.sampling, self.shift, ts.logit_mean, ts.logit_std)
        texts = [self.empty if drop[i] else load_embedding(batch[i].texts[style[i]]) for i in mine]
        noise_mine, sigmas_mine = noise[mine].to(run.device), sigmas[mine].to(run.device)
        with self.model.autocast_context():
            pred = self.family.predict_velocity(self.model.transformer, noisy_latents(x0, noise_mine, sigmas_mine),
                                                sigmas_mine, texts, self.num_train_timesteps)
        per_sample = F.mse_loss(pred.float(), velocity_target(x0, noise_mine).float(), reduction="none")
        per_sample = per_sample.flatten(1).mean(dim=1)
        # sum / global n is this slice's share of the global mean; x world undoes the gradient average
        loss = per_sample.sum() / n * run.world * scale
        if not torch.isfinite(loss):
            raise UserError(f"loss is {loss.item()}; lower train.lr or use mixed_precision bf16")
        loss.backward()
        logged = per_sample.detach().sum()
        if run.world > 1:
            torch.distributed.all_reduce(logged)
        return {"loss": logged.item() / n}


def prepare_data(cfg: TrainRunConfig, run: engine.Run, family: ErnieImageFamily, stages: list[Stage]) -> PreparedData:
    """Check the dataset, hold out the validation set, bucket the images at every stage's resolution and cache
    their latents and embeddings in one pass (split over the processes)."""
    step_px = family.bucket_step(cfg.model.name, cfg.data.bucket_multiple, cfg.model.revision)
    for stage in stages:
        if stage.resolution % step_px:
            raise UserError(f"train.stages: resolution {stage.resolution} is not a multiple of {step_px}")
    buckets = {res: make_buckets(res, step_px, cfg.data.max_aspect_ratio) for res in {s.resolution for s in stages}}
    largest = cfg.data.resolution
    min_side = min(min(b.width, b.height) for b in buckets[largest])
    report = check_dataset(cfg.data.path, min_side=min_side, near=None)  # warnings are for `dataset check`
    report.raise_if_errors()
    items, held_out = split_validation(cfg, report, min_side)
    trigger = engine.trigger_word(cfg)
    placed = next((item for item in items + held_out if has_placeholder(item.caption)), None)
    put_first = placed is None  # captions that say [trigger] place it; the others then go without it
    if not trigger and placed is not None:
        raise UserError(f"{placed.image}: its caption says [trigger] but data.trigger_word is not set")
    if not trigger and any(has_placeholder(prompt) for prompt in cfg.sample.prompts):
        raise UserError("sample.prompts: a prompt says [trigger] but data.trigger_word is not set")
    if trigger and run.is_main:
        unknown = token_counter(cfg.model.name, cfg.model.revision).unknown(trigger)
        if unknown:  # a word-level tokenizer (micro's) reads every word it lacks as one and the same token
            print(f"warning: trigger word {trigger!r}: {cfg.model.name}'s tokenizer does not know "
                  f"{', '.join(unknown)}, which it reads like any other unknown word; pick words it knows",
                  file=sys.stderr)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.data.path) / CACHE_DIR_NAME
    styles = cfg.data.caption_styles
    groups = [(items, buckets[s.resolution]) for s in stages] + [(held_out, buckets[largest])]

    def wordings(caption: str) -> list[str]:
        """The caption in each style, with the trigger where [trigger] stood, or put first after restyling (unless
        some captions place it themselves)."""
        text = fill_placeholder(caption, trigger) if trigger else caption
        return [with_trigger(restyle(text, style), trigger, put_first) for style in styles]

    prompts = [with_trigger(prompt, trigger, put_first) for prompt in cfg.sample.prompts]

    # each process encodes its share of what is missing; all then read the same shards
    cached, samples = build_cache_groups(
        groups, cache_dir, cfg.model.name, crop=cfg.data.crop, prompts=prompts,
        vae_dtype=cfg.model.vae_dtype, text_dtype=cfg.model.dtype, device=run.device, revision=cfg.model.revision,
        wordings=wordings, rank=run.rank, world=run.world, barrier=run.wait,
    )
    cached.samples = samples[-2]  # the last stage's: what TrainResult.cache has always held
    return PreparedData(report, items, cached, samples[:-1], samples[-1], prompts)
