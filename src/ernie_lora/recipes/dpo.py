"""Diffusion-DPO for flow matching: align a LoRA with preference pairs, read top to bottom.

1. pairs: a JSONL file of prompt / chosen / rejected (``rank scores`` exports one; Pick-a-Pic's
   columns are read too); latents of both images and the prompt's embedding cached as in the LoRA recipe;
2. model: the DiT with a LoRA (fresh, or ``lora.init_from`` to align an existing style LoRA). The
   reference is the same DiT with the LoRA at its starting weights: the base itself for a fresh LoRA
   (B = 0), the starting LoRA otherwise. Its weights are swapped in for a no-grad forward each step;
3. each step: chosen and rejected latents share noise and sigma; e = per-sample mean squared velocity
   error, for the policy and the reference;
       loss = -log sigmoid(-beta/2 * ((e_w - e_w,ref) - (e_l - e_l,ref))) + lambda * e_w
   (Wallace et al. 2023 with the flow-matching target; lambda is the SFT anchor). With
   ``dpo.rejected_scale: sdpo`` the rejected gradient is scaled down so that, to first order, the step
   cannot raise the chosen error (the failure where both errors rise; Diffusion-SDPO's safeguard);
4. metrics per step (loss, implicit accuracy, reward margin, chosen and rejected error vs the
   reference, the rejected-gradient scale) in ``metrics.csv`` / ``metrics.png``; checkpoints and
   ``--resume`` as in the LoRA recipe (the shared engine).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..captions.trigger import fill_placeholder, has_placeholder
from ..config import DpoRunConfig, SampleConfig
from ..data.batches import BucketBatches
from ..data.buckets import make_buckets
from ..data.cache import build_caches, load_embedding, load_latent
from ..data.dataset import CACHE_DIR_NAME
from ..data.preference import PairSample, pair_items, pair_samples, read_pairs
from ..errors import UserError
from ..flow import noisy_latents, sample_sigmas, velocity_target
from ..lora.adapters import export_adapter
from ..models import ErnieImageFamily, family_for
from . import engine
from .report import sample_before_after, write_run_report

METRICS = ("loss", "dpo_loss", "accuracy", "margin", "chosen_vs_ref", "rejected_vs_ref", "rejected_scale")
PLOT_TITLE = "DPO: loss, implicit accuracy, reward margin, errors vs the reference"


@dataclass
class DpoResult:
    output: Path
    steps_done: int
    history: list[dict]
    setup: dict
    report: Path | None = None


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Diffusion-DPO loss and its logit ("inside"): positive when the policy prefers the
    chosen image more than the reference does."""
    inside = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    return -F.logsigmoid(inside), inside


def sdpo_scale(g_w: list[torch.Tensor], g_l: list[torch.Tensor]) -> float:
    """Largest scale s <= 1 of the rejected gradient for which stepping along -(g_w - s g_l) does not
    raise the chosen error to first order: <g_w, g_w - s g_l> >= 0."""
    dot = sum(float((a * b).sum()) for a, b in zip(g_w, g_l, strict=True))
    if dot <= 0:
        return 1.0
    return min(1.0, sum(float((a * a).sum()) for a in g_w) / dot)


class ReferenceWeights:
    """Swap the LoRA's starting weights in for the reference forward, and the trained ones back."""

    def __init__(self, transformer):
        self.params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        self.start = {n: p.detach().clone() for n, p in self.params.items()}

    @contextlib.contextmanager
    def active(self):
        trained = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.start[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(trained[n])


def run_dpo(cfg: DpoRunConfig, output: str | Path, *, resume: bool = False, overwrite: bool = False,
            force: bool = False, stop_after: int | None = None, progress: bool | str = True) -> DpoResult:
    if cfg.data.pairs is None:
        raise UserError("data.pairs: no pairs file (a proof section makes one: ernie-lora dpo with proof:)")
    started = time.perf_counter()
    run = engine.open_run(output, cfg, "dpo", resume=resume, overwrite=overwrite, force=force)
    family = family_for(cfg.model.name)
    samples, empty = prepare_pairs(cfg, run, family)
    tcfg = cfg.train
    model = engine.setup_model(run, family, cfg.model, cfg.lora, tcfg, quantize=cfg.model.quantize)
    reference = ReferenceWeights(model.transformer)  # the starting weights: the base when B = 0
    optimisation = engine.make_optimisation(model.params, tcfg)
    generator = torch.Generator().manual_seed(tcfg.seed)
    batches = BucketBatches(samples, tcfg.batch_size, tcfg.seed)
    checkpoints = engine.Checkpoints(run, cfg.checkpoint.every, cfg.checkpoint.keep, tcfg.steps, model,
                                     {"optimizer": optimisation.optimizer, "lr_scheduler": optimisation.scheduler,
                                      "data": batches, "generator": engine.GeneratorState(generator)})
    step = checkpoints.restore() if resume else 0
    log = engine.MetricsLog(run, (*METRICS, "lr", "grad_norm"), step)
    engine.start_run(run, cfg)
    micro_step = PreferenceStep(cfg, run, family, model, reference, batches, generator)
    bar = engine.Progress(run, tcfg.steps, step, progress, engine.Trackers(run, cfg.logging, cfg))
    step = engine.train_steps(run, tcfg, step, micro_step, model, optimisation, checkpoints, log, bar,
                              ("loss", "accuracy"), (PLOT_TITLE, METRICS), stop_after=stop_after)
    log.close()
    report = None
    if step >= tcfg.steps:
        metadata = engine.lora_metadata(cfg, "dpo", family, model, step, pairs=len(samples), beta=cfg.dpo.beta,
                                        sft_weight=cfg.dpo.sft_weight, rejected_scale=cfg.dpo.rejected_scale)
        lora = export_adapter(run.output / "lora.safetensors", model.transformer, model.peft_config, metadata)
        bar.note(f"step {step}: LoRA {lora}", event="lora", step=step, path=lora)
        # before / after: the LoRA's starting weights (the reference) and the trained ones, on pair prompts
        prompts = list(dict.fromkeys(s.chosen.caption for s in samples))[:4]
        texts = {s.chosen.caption: load_embedding(s.chosen.text) for s in samples}
        sampler = engine.Sampler(family, cfg.model, SampleConfig(), [texts[p] for p in prompts], empty,
                                 model.transformer, run.device, cfg.data.resolution,
                                 labels=[p[:60] for p in prompts])
        pair = sample_before_after(run.output / "report", sampler, reference.active(), prompts)
        report = write_run_report(run.output, cfg, title=f"DPO run {run.output.name}", started=started, steps=step,
                                  history=log.history, plotted=METRICS, before_after=pair,
                                  notes=[f"{len(samples)} pairs; beta {cfg.dpo.beta:g}, SFT anchor "
                                         f"{cfg.dpo.sft_weight:g}. Before: the LoRA's starting weights (the "
                                         "reference), after: the aligned LoRA, same prompts and seeds.", ""],
                                  files={"LoRA": lora, "metrics": run.output / "metrics.csv"})
        bar.note(f"report {report}", event="report", path=report)
    bar.close()
    return DpoResult(run.output, step, log.history, model.setup, report)


class PreferenceStep:
    """One micro-batch of pairs: chosen and rejected under shared noise and sigma, policy and reference
    errors, the DPO loss (plus the SFT anchor), backward."""

    def __init__(self, cfg: DpoRunConfig, run: engine.Run, family: ErnieImageFamily, model: engine.TrainedModel,
                 reference: ReferenceWeights, batches: BucketBatches, generator: torch.Generator):
        self.cfg, self.run, self.family, self.model, self.reference = cfg, run, family, model, reference
        self.batches, self.generator = batches, generator
        self.num_train_timesteps = family.num_train_timesteps(cfg.model.name, cfg.model.revision)
        self.shift = family.scheduler_shift(cfg.model.name, cfg.train.timesteps.shift, cfg.model.revision)

    def errors(self, x_t, target, sigmas, texts) -> torch.Tensor:
        with self.model.autocast_context():
            pred = self.family.predict_velocity(self.model.transformer, x_t, sigmas, texts, self.num_train_timesteps)
        return F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(dim=1)

    def __call__(self, _: int, scale: float) -> dict[str, float]:
        ts, device, beta = self.cfg.train.timesteps, self.run.device, self.cfg.dpo.beta
        batch = self.batches.next()
        x_w = torch.stack([load_latent(s.chosen.latent) for s in batch])
        x_l = torch.stack([load_latent(s.rejected.latent) for s in batch])
        noise = torch.randn(x_w.shape, generator=self.generator)  # shared by chosen and rejected
        sigmas = sample_sigmas(len(batch), self.generator, ts.sampling, self.shift, ts.logit_mean, ts.logit_std)
        texts = [load_embedding(s.chosen.text) for s in batch] * 2
        x0 = torch.cat([x_w, x_l]).to(device, torch.float32)
        noise2, sigmas2 = torch.cat([noise, noise]).to(device), torch.cat([sigmas, sigmas]).to(device)
        x_t, target = noisy_latents(x0, noise2, sigmas2), velocity_target(x0, noise2).float()
        with torch.no_grad(), self.reference.active():
            ref_w, ref_l = self.errors(x_t, target, sigmas2, texts).chunk(2)
        err_w, err_l = self.errors(x_t, target, sigmas2, texts).chunk(2)
        per_pair, inside = dpo_loss(err_w, err_l, ref_w, ref_l, beta)
        loss = per_pair.mean() + self.cfg.dpo.sft_weight * err_w.mean()
        if not torch.isfinite(loss):
            raise UserError(f"loss is {loss.item()}; lower train.lr or dpo.beta")
        if self.cfg.dpo.rejected_scale == "sdpo":
            rejected_scale = self.sdpo_backward(err_w, err_l, inside, scale)
        else:
            (loss * scale).backward()
            rejected_scale = 1.0
        return {"loss": loss.item(), "dpo_loss": per_pair.mean().item(),
                "accuracy": (inside > 0).float().mean().item(), "margin": inside.mean().item(),
                "chosen_vs_ref": (err_w - ref_w).mean().item(), "rejected_vs_ref": (err_l - ref_l).mean().item(),
                "rejected_scale": rejected_scale}

    def sdpo_backward(self, err_w, err_l, inside, scale: float) -> float:
        """SDPO: the chosen and rejected halves of the gradient apart, the rejected one scaled down."""
        params, beta, sft_weight = self.model.params, self.cfg.dpo.beta, self.cfg.dpo.sft_weight
        # d loss / d e_w = beta/2 sigmoid(-inside) = -(d loss / d e_l)
        c = (0.5 * beta * torch.sigmoid(-inside)).detach()
        g_w = torch.autograd.grad((c * err_w).mean(), params, retain_graph=True)
        g_l = torch.autograd.grad((c * err_l).mean(), params, retain_graph=sft_weight > 0)
        g_sft = torch.autograd.grad(err_w.mean(), params) if sft_weight > 0 else [0.0] * len(params)
        s = sdpo_scale(g_w, g_l)
        for p, a, b, anchor in zip(params, g_w, g_l, g_sft, strict=True):
            g = (a - s * b + sft_weight * anchor) * scale
            p.grad = g if p.grad is None else p.grad + g
        return s


def prepare_pairs(cfg: DpoRunConfig, run: engine.Run, family: ErnieImageFamily
                  ) -> tuple[list[PairSample], torch.Tensor]:
    """Read the pairs, cache both images' latents and the prompts' embeddings; each pair in one bucket. Returns
    the pairs and the empty prompt's embedding (the samples' CFG negative)."""
    step_px = family.bucket_step(cfg.model.name, cfg.data.bucket_multiple, cfg.model.revision)
    buckets = make_buckets(cfg.data.resolution, step_px, cfg.data.max_aspect_ratio)
    pairs_file = Path(cfg.data.pairs)
    pairs = read_pairs(pairs_file)
    trigger = engine.trigger_word(cfg)  # the lora.init_from LoRA's: [trigger] in a prompt is filled with it
    if trigger:
        pairs = [replace(pair, prompt=fill_placeholder(pair.prompt, trigger)) for pair in pairs]
    elif any(has_placeholder(pair.prompt) for pair in pairs):
        raise UserError(f"{pairs_file}: a prompt says [trigger] but no lora.init_from LoRA records a trigger word")
    chosen_items, rejected_items = pair_items(pairs)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else pairs_file.parent / CACHE_DIR_NAME
    cached = build_caches(chosen_items + rejected_items, buckets, cache_dir, cfg.model.name, crop=cfg.data.crop,
                          vae_dtype=cfg.model.vae_dtype, text_dtype=cfg.model.dtype, device=run.device,
                          revision=cfg.model.revision)
    return pair_samples(pairs_file, pairs, cached.samples), load_embedding(cached.empty_text)
