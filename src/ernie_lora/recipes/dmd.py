"""Distribution matching distillation (DMD2-style) of a few-step student LoRA: the loss and its parts.

One DiT holds every adapter: the ``student`` (trained, exported), the ``fake`` score (trained online on
the student's samples) and the teachers (the base with adapters off, or base + a LoRA file), each
owning a range of sigma. A DMD step: ``fake_updates`` rounds of the fake score learning to denoise the
student's samples; then the student generates with its first k steps without grad and step k (random)
with grad (backward simulation), x0 is noised to a random sigma, the owning teacher (with CFG) and the
fake score predict x0, and the normalised difference is the student's gradient, entering as
loss = 0.5 * MSE(x0, stopgrad(x0 - grad)). The warm start regresses the student's K-step samples onto
the teachers' own ODE samples from the same noise.

Where this differs from DMD2 (Yin et al. 2024):

- no GAN term: DMD2 adds a discriminator head on the fake score's features, trained against real images
  of the target distribution; this recipe distils from the teachers and prompts alone (users distilling a
  style LoRA rarely hold a large real set), so it cannot push the student beyond the teacher;
- the student samples with deterministic Euler steps (the pipeline's sampler, so the file runs unchanged
  in ``generate --steps K``) instead of re-noising its x0 between steps; backward simulation still trains
  each of the K steps;
- the fake-score updates per student step are a setting (``distill.fake_updates``; DMD2's two time-scale
  rule used 5, and 10 in places); ``bench/turbo_proof.py`` measures 1-10 on micro.
"""

from __future__ import annotations

import contextlib
import random
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig

from ..config import DistillRunConfig
from ..errors import UserError
from ..lora.adapters import ADAPTER_NAME, add_lora_from_file, load_lora_into_adapter
from ..models import family_for
from .engine import TrainedModel, make_optimizer

STUDENT, FAKE = ADAPTER_NAME, "fake"
NAN = float("nan")


@dataclass
class Teacher:
    adapter: str | None  # None: the base with adapters off
    low: float
    high: float
    guidance: float


def teacher_for(teachers: list[Teacher], sigma: float) -> Teacher:
    """The teacher whose [low, high] holds sigma (the first, where ranges touch)."""
    for t in teachers:
        if t.low <= sigma <= t.high:
            return t
    raise UserError(f"no teacher owns sigma {sigma:.3f}; teachers' t_range must cover [0, 1]")


class Adapters:
    """Which LoRA the forward pass runs: one adapter, or none (the base)."""

    def __init__(self, transformer):
        self.transformer = transformer

    @contextlib.contextmanager
    def use(self, name: str | None):
        if name is None:
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
        else:
            self.transformer.set_adapter(name)
            try:
                yield
            finally:
                self.transformer.set_adapter(STUDENT)
        # peft makes the active adapter trainable: only the student and the fake score ever train
        for n, p in self.transformer.named_parameters():
            if "lora_" in n:
                p.requires_grad_(f".{STUDENT}." in n or f".{FAKE}." in n)


def adapter_params(transformer, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if "lora_" in n and f".{name}." in n]


class DistributionMatching:
    """The student, the fake score and the teachers on one DiT, and the two kinds of step."""

    def __init__(self, cfg: DistillRunConfig, model: TrainedModel, embeddings: list[torch.Tensor],
                 empty: torch.Tensor, device: torch.device, multiple: int):
        self.cfg, self.dcfg, self.model, self.device = cfg, cfg.distill, model, device
        self.family = family_for(cfg.model.name)
        transformer = model.transformer
        self.teachers = []
        for i, t in enumerate(cfg.teachers):
            name = f"teacher{i}" if t.lora else None
            if t.lora:
                add_lora_from_file(transformer, t.lora, name)
            self.teachers.append(Teacher(name, t.t_range[0], t.t_range[1], t.guidance))
        # the fake score starts where the (first) teacher is: the base, or its LoRA when it has one
        fake_config = PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=model.targets,
                                     init_lora_weights=True)
        transformer.add_adapter(fake_config, adapter_name=FAKE)
        if cfg.teachers[0].lora:
            try:  # the teacher's delta, when its modules and ranks are the fake score's; else a fresh start
                load_lora_into_adapter(transformer, cfg.teachers[0].lora, fake_config, "teachers[0].lora", FAKE)
            except UserError:
                pass
        transformer.set_adapter(STUDENT)
        self.adapters = Adapters(transformer)
        with self.adapters.use(STUDENT):
            pass  # settles requires_grad: student and fake trainable, teachers frozen
        self.fake_params = adapter_params(transformer, FAKE)
        for p in self.fake_params:
            p.data = p.data.float()
        self.opt_fake = make_optimizer(self.fake_params, cfg.train, self.dcfg.fake_lr)
        self.sigmas = self.family.euler_sigmas(cfg.model.name, self.dcfg.student_steps, cfg.model.revision).to(device)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.prompt_rng = random.Random(cfg.train.seed)
        self.embeddings, self.empty = embeddings, empty
        self.latent_side = cfg.data.resolution * transformer.config.patch_size // multiple
        self.channels = transformer.config.in_channels
        self.num_train_timesteps = self.family.num_train_timesteps(cfg.model.name, cfg.model.revision)
        self.ode_pairs = None

    def velocity(self, x_t: torch.Tensor, sigma: torch.Tensor, texts: list[torch.Tensor]) -> torch.Tensor:
        with self.model.autocast_context():
            v = self.family.predict_velocity(self.model.transformer, x_t, sigma, texts, self.num_train_timesteps)
        return v.float()

    def guided(self, x_t, sigma, texts, guidance: float) -> torch.Tensor:
        if guidance <= 1.0:
            return self.velocity(x_t, sigma, texts)
        both = self.velocity(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), [self.empty] * len(texts) + texts)
        uncond, cond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (n, self.channels, self.latent_side, self.latent_side)
        return torch.randn(shape, generator=generator or self.generator).to(self.device)

    def student_sample(self, texts, grad_step: int | None, x: torch.Tensor | None = None) -> torch.Tensor:
        """Euler steps from noise; x0 predicted at ``grad_step`` (with grad), or the final sample (none)."""
        x = self.noise(len(texts)) if x is None else x
        last = self.dcfg.student_steps if grad_step is None else grad_step
        s = self.sigmas
        with self.adapters.use(STUDENT):
            with torch.no_grad():
                for i in range(last):
                    x = x + (s[i + 1] - s[i]) * self.velocity(x, s[i].expand(len(texts)), texts)
            if grad_step is None:
                return x
            return x - s[grad_step] * self.velocity(x, s[grad_step].expand(len(texts)), texts)  # x0 = x_t - sigma v

    def noise_to(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = self.dcfg.min_sigma, self.dcfg.max_sigma
        sigma = (lo + (hi - lo) * torch.rand(x0.shape[0], generator=self.generator)).to(self.device)
        eps = torch.randn(x0.shape, generator=self.generator).to(self.device)
        return (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, eps

    def texts(self) -> list[torch.Tensor]:
        return [self.embeddings[self.prompt_rng.randrange(len(self.embeddings))]
                for _ in range(self.cfg.train.batch_size)]

    @torch.no_grad()
    def make_ode_pairs(self) -> None:
        """The warm start's targets: the teachers' own ODE from fixed noise (the same pairs on resume)."""
        steps, n, batch = self.dcfg.teacher_steps, self.dcfg.regression_pairs, self.cfg.train.batch_size
        sig = self.family.euler_sigmas(self.cfg.model.name, steps, self.cfg.model.revision).to(self.device)
        texts = [self.embeddings[i % len(self.embeddings)] for i in range(n)]
        z = self.noise(n, torch.Generator().manual_seed(self.cfg.train.seed + 1))
        targets = []
        for b in range(0, n, batch):
            x, chunk = z[b:b + batch], texts[b:b + batch]
            for i in range(steps):
                teacher = teacher_for(self.teachers, float(sig[i]))
                with self.adapters.use(teacher.adapter):
                    x = x + (sig[i + 1] - sig[i]) * self.guided(x, sig[i].expand(len(chunk)), chunk, teacher.guidance)
            targets.append(x)
        self.ode_pairs = (z, texts, torch.cat(targets))

    def regression_step(self, scale: float) -> dict[str, float]:
        z, texts, targets = self.ode_pairs
        idx = [self.prompt_rng.randrange(len(texts)) for _ in range(self.cfg.train.batch_size)]
        x, chosen, s = z[idx], [texts[i] for i in idx], self.sigmas
        with self.adapters.use(STUDENT):
            for i in range(self.dcfg.student_steps):
                x = x + (s[i + 1] - s[i]) * self.velocity(x, s[i].expand(len(idx)), chosen)
        loss = F.mse_loss(x, targets[idx])
        (loss * scale).backward()
        return {"dmd_loss": NAN, "fake_loss": NAN, "student_step": NAN, "regression_loss": loss.item()}

    def dmd_step(self, scale: float) -> dict[str, float]:
        texts = self.texts()
        k = int(torch.randint(self.dcfg.student_steps, (1,), generator=self.generator))  # backward simulation
        loss, fake_losses = distribution_matching_step(
            fake_samples=lambda: self.student_sample(texts, grad_step=self.dcfg.student_steps - 1),
            fake_update=lambda x0: self.fake_update(x0, texts),
            student_x0=lambda: self.student_sample(texts, grad_step=k),
            noise_to=self.noise_to, real_x0=lambda x_t, sigma: self.real_x0(x_t, sigma, texts),
            fake_x0=lambda x_t, sigma: self.fake_x0(x_t, sigma, texts), fake_updates=self.dcfg.fake_updates,
            scale=scale)
        return {"dmd_loss": loss, "fake_loss": statistics.mean(fake_losses) if fake_losses else NAN,
                "student_step": float(k), "regression_loss": NAN}

    def fake_update(self, x0: torch.Tensor, texts: list[torch.Tensor]) -> float:
        """One step of the fake score learning to denoise the student's samples (the flow-matching loss)."""
        x_t, sigma, eps = self.noise_to(x0)
        with self.adapters.use(FAKE):
            loss = F.mse_loss(self.velocity(x_t, sigma, texts), eps - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.fake_params, 1.0)
        self.opt_fake.step()
        self.opt_fake.zero_grad(set_to_none=True)
        return loss.item()

    def real_x0(self, x_t: torch.Tensor, sigma: torch.Tensor, texts: list[torch.Tensor]) -> torch.Tensor:
        """The teachers' x0 (with their CFG), each sample's from the teacher owning its sigma."""
        real = torch.empty_like(x_t)
        for i in range(len(texts)):
            teacher = teacher_for(self.teachers, float(sigma[i]))
            with self.adapters.use(teacher.adapter):
                v = self.guided(x_t[i:i + 1], sigma[i:i + 1], texts[i:i + 1], teacher.guidance)
            real[i:i + 1] = x_t[i:i + 1] - sigma[i] * v
        return real

    def fake_x0(self, x_t: torch.Tensor, sigma: torch.Tensor, texts: list[torch.Tensor]) -> torch.Tensor:
        with self.adapters.use(FAKE):
            return x_t - sigma.view(-1, 1, 1, 1) * self.velocity(x_t, sigma, texts)


def dmd_gradient(x0: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """DMD's gradient of the student's samples: the fake score's x0 minus the teacher's, normalised by the
    mean distance of the sample to the teacher's x0 (DMD eq. 8). Descending it moves samples toward the
    teacher's distribution and away from the student's own."""
    weight = (x0 - real).abs().mean(dim=tuple(range(1, x0.dim())), keepdim=True).clamp_min(1e-6)
    return torch.nan_to_num((fake - real) / weight)


def distribution_matching_step(fake_samples, fake_update, student_x0, noise_to, real_x0, fake_x0,
                               fake_updates: int, scale: float = 1.0) -> tuple[float, list[float]]:
    """One DMD step over its parts (the DiT recipe and the tests' Gaussian toy run the same one):
    ``fake_updates`` rounds of the fake score learning the student's current samples, then the student's x0
    (with grad) noised, both scores' x0, and loss = 0.5 MSE(x0, stopgrad(x0 - grad)), whose gradient in x0
    is ``dmd_gradient``; backward with the loss times ``scale``. Returns the loss and the fake losses."""
    fake_losses = []
    for _ in range(fake_updates):  # the fake score follows the student's current outputs
        with torch.no_grad():
            samples = fake_samples().detach()
        fake_losses.append(fake_update(samples))
    x0 = student_x0()
    with torch.no_grad():
        x_t, sigma, _ = noise_to(x0.detach())
        grad = dmd_gradient(x0.detach(), real_x0(x_t, sigma), fake_x0(x_t, sigma))
    loss = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
    (loss * scale).backward()
    return loss.item(), fake_losses
