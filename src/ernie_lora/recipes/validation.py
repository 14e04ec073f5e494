"""Validation while a LoRA trains: a held-out set, a loss that is comparable across steps and runs, scored
samples, and the best checkpoint.

- ``split_validation``: ``data.validation`` is a folder (checked like the dataset) or a share of the
  dataset drawn with ``data.validation_seed`` (those images leave training);
- ``Validation.loss``: the flow-matching loss of the validation images at ``validation.sigmas`` with
  noise fixed once by the seed, so identical weights give an identical number (SimpleTuner's idea);
- ``Validation.scores``: samples of the first ``validation.samples`` validation captions, scored with the
  layout score where a caption is in the layout language and OCR recall where it quotes text;
- ``BestCheckpoint``: keeps ``RUN/best/`` (the LoRA file and ``best.json``) for the chosen metric;
- ``validation.csv``: one row per validation, repaired on resume like ``metrics.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import TrainRunConfig
from ..data.cache import CachedSample, load_embedding, load_latent
from ..data.dataset import DatasetReport, Item, check_dataset
from ..errors import UserError
from ..flow import noisy_latents, velocity_target
from ..io import atomic_write_json, atomic_write_text
from ..models import ErnieImageFamily
from .engine import Run, Sampler, TrainedModel
from .report import score_samples

FIELDS = ("val_loss", "layout", "text")
LOWER_IS_BETTER = {"val_loss": True, "layout": False, "text": False}


def split_validation(cfg: TrainRunConfig, report: DatasetReport, min_side: int) -> tuple[list[Item], list[Item]]:
    """(training items, validation items) for ``data.validation``: a folder, or a share of the dataset."""
    held = cfg.data.validation
    if held is None:
        return report.items, []
    if isinstance(held, float):
        order = sorted(report.items, key=lambda item: item.sha256)  # independent of listing order
        random.Random(cfg.data.validation_seed).shuffle(order)
        count = max(1, round(held * len(order)))
        if count >= len(order):
            raise UserError(f"data.validation: {held} of {len(order)} images leaves none to train on")
        chosen = {item.image for item in order[:count]}
        return [i for i in report.items if i.image not in chosen], [i for i in report.items if i.image in chosen]
    folder = Path(held)
    if not folder.is_dir():
        raise UserError(f"data.validation: {folder} is not a folder (give a folder or a share such as 0.1)")
    val = check_dataset(folder, min_side=min_side, near=None)
    val.raise_if_errors()
    if not val.items:
        raise UserError(f"data.validation: {folder} holds no captioned images")
    overlap = {i.sha256 for i in val.items} & {i.sha256 for i in report.items}
    if overlap:
        raise UserError(f"data.validation: {len(overlap)} validation images are also in the training set "
                        f"{report.root}; a validation set must be held out")
    return report.items, val.items


class Validation:
    """The validation loss and scored samples of one run (the main process runs it)."""

    def __init__(self, cfg: TrainRunConfig, run: Run, family: ErnieImageFamily, model: TrainedModel,
                 samples: list[CachedSample], sampler: Sampler | None):
        self.cfg, self.run, self.family, self.model = cfg, run, family, model
        self.samples = samples
        self.num_train_timesteps = family.num_train_timesteps(cfg.model.name, cfg.model.revision)
        generator = torch.Generator().manual_seed(cfg.data.validation_seed)
        self.noise = [torch.randn((len(cfg.validation.sigmas), *load_latent(s.latent).shape), generator=generator)
                      for s in samples]  # fixed once: the same noise at every validation of every run
        self.captions = [s.caption for s in samples[:cfg.validation.samples]]
        self.sampler = sampler  # of the first validation.samples captions (None: no scored samples)
        self.path = run.output / "validation.csv"

    @torch.no_grad()
    def loss(self) -> float:
        """Mean flow-matching loss over the validation images x ``validation.sigmas`` (LoRA dropout off)."""
        transformer = self.model.transformer
        was_training = transformer.training
        transformer.eval()
        sigmas = torch.tensor(self.cfg.validation.sigmas, dtype=torch.float32, device=self.run.device)
        losses = []
        for sample, noise in zip(self.samples, self.noise, strict=True):
            x0 = load_latent(sample.latent).to(self.run.device, torch.float32).expand(len(sigmas), -1, -1, -1)
            noise = noise.to(self.run.device)
            texts = [load_embedding(sample.text)] * len(sigmas)
            with self.model.autocast_context():
                pred = self.family.predict_velocity(transformer, noisy_latents(x0, noise, sigmas), sigmas, texts,
                                                    self.num_train_timesteps)
            losses.append(F.mse_loss(pred.float(), velocity_target(x0, noise).float()).item())
        transformer.train(was_training)
        return statistics.mean(losses)

    def scores(self, grid: Path) -> dict[str, float]:
        """Samples of the validation captions as a grid at ``grid`` (the run's full resolution, so steps of
        every stage compare); their mean scores."""
        if self.sampler is None:
            return {}
        images = self.sampler.images()
        self.sampler.save_grid(images, grid)
        return score_samples(images, self.captions, self.cfg.validation.scores)

    def history(self, up_to: int) -> list[dict]:
        """The rows of an earlier run up to ``up_to`` (a resumed run repeats what came after)."""
        if not self.path.exists():
            return []
        rows = []
        for row in csv.DictReader(io.StringIO(self.path.read_text(encoding="utf-8"))):
            try:
                step = int(row["step"])
            except (KeyError, TypeError, ValueError):
                break
            if step <= up_to:
                rows.append({"step": step, **{k: float(row[k]) for k in FIELDS if row.get(k) not in (None, "")}})
        return rows

    def write(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=("step", *FIELDS), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
        atomic_write_text(self.path, buf.getvalue())


class BestCheckpoint:
    """``checkpoint.best``: after each validation, whether its metric beat every earlier one; the best LoRA is
    kept in ``RUN/best/`` with ``best.json`` (metric, value, step), apart from the rotating checkpoints."""

    def __init__(self, folder: Path, metric: str | None):
        self.folder, self.metric = folder, metric
        self.value: float | None = None
        self.step: int | None = None

    def restore(self, up_to: int) -> None:
        """On resume: the best of an earlier run, if it came at or before the checkpoint resumed from."""
        record = self.folder / "best.json"
        if self.metric and record.exists():
            data = json.loads(record.read_text(encoding="utf-8"))
            if data.get("metric") == self.metric and int(data["step"]) <= up_to:
                self.value, self.step = float(data["value"]), int(data["step"])

    def consider(self, step: int, metrics: dict[str, float]) -> bool:
        """True when ``metrics`` holds the chosen metric and it is the best so far (then it is recorded)."""
        value = metrics.get(self.metric) if self.metric else None
        if value is None or not math.isfinite(value):
            return False
        better = self.value is None or (value < self.value if LOWER_IS_BETTER[self.metric] else value > self.value)
        if better:
            self.value, self.step = value, step
        return better

    def save(self, export: Callable[[Path], None]) -> Path:
        """Write the best LoRA (``export(path)``) and its record."""
        self.folder.mkdir(parents=True, exist_ok=True)
        export(self.folder / "lora.safetensors")
        atomic_write_json(self.folder / "best.json", {"metric": self.metric, "value": self.value, "step": self.step})
        return self.folder / "lora.safetensors"
