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

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..captions import restyle
from ..config import TrainRunConfig
from ..data.batches import BucketBatches
from ..data.buckets import make_buckets
from ..data.cache import CachedDataset, build_caches, load_embedding, load_latent
from ..data.dataset import CACHE_DIR_NAME, DatasetReport, check_dataset, dataset_provenance
from ..data.sampling import sampling_weights
from ..errors import UserError
from ..flow import noisy_latents, sample_sigmas, velocity_target
from ..lora.adapters import export_adapter
from ..models import ErnieImageFamily, family_for
from . import engine


@dataclass
class TrainResult:
    output: Path
    steps_done: int
    final_loss: float | None
    cache: CachedDataset
    setup: dict


def train(cfg: TrainRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
          force: bool = False, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Run the LoRA recipe. ``stop_after`` ends the run after that step as if killed (tests use it)."""
    run = engine.open_run(output, cfg, "train", resume=resume, overwrite=overwrite, force=force, distributed=True)
    result = _train(cfg, run, resume, stop_after, progress)
    engine.close_run(run)  # on success only: a process that failed must not wait for the others
    return result


def _train(cfg: TrainRunConfig, run: engine.Run, resume: bool, stop_after: int | None, progress: bool
           ) -> TrainResult:
    family = family_for(cfg.model.name)
    report, cached = prepare_data(cfg, run, family)
    tcfg = cfg.train
    model = engine.setup_model(run, family, cfg.model, cfg.lora, tcfg, quantize=cfg.model.quantize,
                               block_swap=cfg.model.block_swap, fsdp=tcfg.fsdp)
    if tcfg.fsdp and run.world == 1:
        print("note: train.fsdp with one process: nothing to shard (launch with torchrun / accelerate)")
    optimisation = engine.make_optimisation(model.params, tcfg, run.world)
    generator = torch.Generator().manual_seed(tcfg.seed)  # noise, sigmas, caption dropout, styles
    sampling = cfg.data.sampling
    weights = sampling_weights(sampling.by, Path(cfg.data.path), [s.image for s in cached.samples],
                               sampling.aesthetic, sampling.temperature, sampling.depth)
    batches = BucketBatches(cached.samples, tcfg.batch_size * run.world, tcfg.seed, min_size=run.world,
                            weights=weights)
    checkpoints = engine.Checkpoints(run, cfg.checkpoint.every, cfg.checkpoint.keep, tcfg.steps, model,
                                     {"optimizer": optimisation.optimizer, "lr_scheduler": optimisation.scheduler,
                                      "data": batches, "generator": engine.GeneratorState(generator)})
    step = checkpoints.restore() if resume else 0
    log = engine.MetricsLog(run, ("loss", "lr", "grad_norm"), step)
    if step >= tcfg.steps and (run.output / "lora.safetensors").exists():
        print(f"{run.output}: already complete at step {step}; nothing to do (raise train.steps to go on)")
        return TrainResult(run.output, step, log.history[-1]["loss"] if log.history else None, cached, model.setup)
    engine.start_run(run, cfg)
    micro_step = FlowMatchingStep(cfg, run, family, model, batches, generator,
                                  load_embedding(cached.empty_text_file))
    sampler = make_sampler(cfg, run, family, model, cached)
    bar = engine.Progress(run, tcfg.steps, step, progress)

    def on_step(done: int) -> None:
        if sampler and cfg.sample.every and done % cfg.sample.every == 0 and done != tcfg.steps:
            grid = sampler.run(run.output / "samples" / f"step-{done:06d}.png", run.is_main)
            bar.note(f"step {done}: samples {grid}")

    step = engine.train_steps(run, tcfg, step, micro_step, model, optimisation, checkpoints, log, bar, ("loss",),
                              ("LoRA training: flow-matching loss, lr, gradient norm", ("loss", "lr", "grad_norm")),
                              on_step, stop_after)
    bar.close()
    log.close()
    last_loss = log.history[-1]["loss"] if log.history else None
    if step < tcfg.steps:  # stopped early (stop_after)
        return TrainResult(run.output, step, last_loss, cached, model.setup)
    if sampler:
        sampler.run(run.output / "samples" / f"step-{step:06d}.png", write=run.is_main)
    if run.is_main:
        metadata = engine.lora_metadata(cfg, "lora", family, model, step, **dataset_provenance(report.items))
        export_adapter(run.output / "lora.safetensors", model.transformer, model.peft_config, metadata)
    return TrainResult(run.output, step, last_loss, cached, model.setup)


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
        x0 = torch.stack([load_latent(batch[i].latent_file) for i in mine]).to(run.device, torch.float32)
        noise = torch.randn((n, *x0.shape[1:]), generator=g)  # one bucket: one latent shape
        sigmas = sample_sigmas(n, g, ts.sampling, self.shift, ts.logit_mean, ts.logit_std)
        texts = [self.empty if drop[i] else load_embedding(batch[i].text_files[style[i]]) for i in mine]
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


def make_sampler(cfg: TrainRunConfig, run: engine.Run, family: ErnieImageFamily, model: engine.TrainedModel,
                 cached: CachedDataset) -> engine.Sampler | None:
    """Samples of ``sample.prompts`` during training; under FSDP every process runs the sampler's forward
    passes (they gather the shards) and the main one writes."""
    if not cfg.sample.prompts or not (run.is_main or model.setup["fsdp"]):
        return None
    embeddings = [load_embedding(cached.prompt_files[p]) for p in cfg.sample.prompts]
    return engine.Sampler(family, cfg.model, cfg.sample, embeddings, load_embedding(cached.empty_text_file),
                          model.transformer, run.device, cfg.data.resolution)


def prepare_data(cfg: TrainRunConfig, run: engine.Run, family: ErnieImageFamily) -> tuple[DatasetReport, CachedDataset]:
    """Check the dataset, bucket it and cache its latents and embeddings (the main process encodes)."""
    multiple = family.pixel_multiple(cfg.model.name, cfg.model.revision)
    step_px = cfg.data.bucket_multiple or multiple
    if step_px % multiple:
        raise UserError(f"data.bucket_multiple: {step_px} must be a multiple of {multiple} (what the model needs)")
    buckets = make_buckets(cfg.data.resolution, step_px, cfg.data.max_aspect_ratio)
    report = check_dataset(cfg.data.path, min_side=min(min(b.width, b.height) for b in buckets))
    report.raise_if_errors()
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.data.path) / CACHE_DIR_NAME
    styles = cfg.data.caption_styles
    # the main process encodes; the others find everything cached
    with run.procs.main_process_first() if run.procs else contextlib.nullcontext():
        cached = build_caches(
            report.items, buckets, cache_dir, cfg.model.name, crop=cfg.data.crop, prompts=cfg.sample.prompts,
            vae_dtype=cfg.model.vae_dtype, text_dtype=cfg.model.dtype, device=run.device, revision=cfg.model.revision,
            wordings=lambda caption: [restyle(caption, style) for style in styles],
        )
    return report, cached
