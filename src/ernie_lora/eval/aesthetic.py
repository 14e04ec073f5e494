"""Aesthetic scorer: a small MLP head on frozen image features, trained on annotation results.

Encoders (``encoder``):
- ``builtin``: 60 hand-made statistics that need no download: colour moments, saturation and value,
  contrast and luminance percentiles, histogram entropy, sharpness (Laplacian), edge density, a
  high-frequency noise estimate, colourfulness, mirror symmetry, and a 4x4 grid of luminance and
  gradient energy (the composition). For tests, the demo, and small studios' datasets.
- ``hf:NAME_OR_FOLDER``: any transformers model with ``get_image_features`` (CLIP, SigLIP) when the
  user has its weights; the embeddings are L2-normalised, as LAION's predictor does.

Training targets: ``levels`` (regression on the 1-10 levels, MSE) or ``pairs`` (the votes themselves:
Bradley-Terry likelihood of each vote, ties as half, which is what the ERNIE-Image report trains on).
Evaluation follows image-quality benchmarks: SRCC, KRCC, and PLCC after fitting the 4-parameter
logistic (VQEG) from predictions to the truth.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.optimize import curve_fit
from scipy.stats import kendalltau, pearsonr, spearmanr
from tqdm.auto import tqdm

from .. import hub
from ..data.categories import list_images, metadata_rows
from ..data.dataset import METADATA_FILE
from ..data.sampling import read_aesthetic_labels
from ..errors import UserError
from ..io import atomic_write, open_image
from ..plots import plt
from ..rank.store import OUTCOMES, AnnotationStore

FEATURE_SIDE = 96
GRID = 4


# -- encoders ----------------------------------------------------------------------------------------
def builtin_features(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB").resize((FEATURE_SIDE, FEATURE_SIDE), Image.BILINEAR),
                     dtype=np.float32) / 255.0
    hsv = np.asarray(image.convert("RGB").resize((FEATURE_SIDE, FEATURE_SIDE)).convert("HSV"),
                     dtype=np.float32) / 255.0
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lap = (-4 * lum[1:-1, 1:-1] + lum[:-2, 1:-1] + lum[2:, 1:-1] + lum[1:-1, :-2] + lum[1:-1, 2:])
    gy, gx = np.gradient(lum)
    grad = np.hypot(gx, gy)
    blurred = (lum[:-2, 1:-1] + lum[2:, 1:-1] + lum[1:-1, :-2] + lum[1:-1, 2:] + lum[1:-1, 1:-1]) / 5
    residual = lum[1:-1, 1:-1] - blurred
    hist = np.histogram(lum, bins=32, range=(0, 1))[0].astype(np.float32) + 1e-6
    hist /= hist.sum()
    rg, yb = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourfulness = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    cells = FEATURE_SIDE // GRID
    grid_lum = lum.reshape(GRID, cells, GRID, cells).mean(axis=(1, 3)).ravel()
    grid_grad = grad.reshape(GRID, cells, GRID, cells).mean(axis=(1, 3)).ravel()
    stats = [
        *rgb.mean(axis=(0, 1)), *rgb.std(axis=(0, 1)),
        hsv[..., 1].mean(), hsv[..., 1].std(), hsv[..., 2].mean(), hsv[..., 2].std(),
        lum.std(), *np.percentile(lum, [5, 50, 95]), float(-(hist * np.log(hist)).sum()),
        math.log(lap.var() + 1e-8), grad.mean(), float((grad > 0.1).mean()),
        math.log(np.abs(residual).mean() + 1e-8), colourfulness,
        float(np.abs(lum - lum[:, ::-1]).mean()), float(np.abs(lum - lum[::-1, :]).mean()),
    ]
    return np.concatenate([np.array(stats, dtype=np.float32), grid_lum, grid_grad]).astype(np.float32)


class Encoder:
    """Images to feature vectors, in batches."""

    def __init__(self, name: str, device: str = "cpu"):
        self.name = name
        self.model = self.processor = None
        if name == "builtin":
            return
        if not name.startswith("hf:"):
            raise UserError(f"encoder {name!r}: use builtin or hf:NAME_OR_FOLDER (a CLIP or SigLIP model)")
        from transformers import AutoImageProcessor, AutoModel  # optional: only hf: encoders need it

        source = name[3:]
        try:
            source = hub.local_source(source)
            self.model = AutoModel.from_pretrained(source).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(source)
        except OSError as exc:  # hub.NotCached included
            raise UserError(f"encoder {name}: cannot load ({str(exc).splitlines()[0]})") from None
        if not hasattr(self.model, "get_image_features"):
            raise UserError(f"encoder {name}: {type(self.model).__name__} has no get_image_features")
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        if self.model is None:
            return np.stack([builtin_features(im) for im in images])
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        out = self.model.get_image_features(**inputs)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()


def encode_files(encoder: Encoder, root: Path, names: list[str], batch: int = 32,
                 progress: bool = True) -> np.ndarray:
    feats = []
    for start in tqdm(range(0, len(names), batch), desc="features", disable=not progress):
        images = []
        for name in names[start:start + batch]:
            path = root / name
            images.append(open_image(path).convert("RGB"))
        feats.append(encoder(images))
    return np.concatenate(feats)


# -- the head ----------------------------------------------------------------------------------------
class AestheticHead(torch.nn.Module):
    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)


@dataclass
class Scorer:
    head: AestheticHead
    encoder_name: str
    holdout: list[str]

    def save(self, path: Path) -> None:
        meta = {"encoder": self.encoder_name, "dim": str(self.head.mean.numel()),
                "hidden": str(self.head.net[0].out_features), "holdout": json.dumps(self.holdout)}
        tensors = {k: v.contiguous() for k, v in self.head.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> Scorer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such scorer (train one with `ernie-lora aes train`)")
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: a scorer is a .safetensors file (pickled files are never loaded)")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise UserError(f"{path}: not a readable safetensors file ({str(exc)[:160]})") from None
        if "encoder" not in meta:
            raise UserError(f"{path}: not an ernie-lora aesthetic scorer (no 'encoder' in its metadata)")
        try:
            head = AestheticHead(int(meta["dim"]), int(meta["hidden"]))
            head.load_state_dict(load_file(str(path)))
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UserError(f"{path}: a damaged aesthetic scorer ({type(exc).__name__}: {str(exc)[:160]})") from None
        return cls(head.eval(), meta["encoder"], json.loads(meta.get("holdout", "[]")))

    @torch.no_grad()
    def score_features(self, features: np.ndarray) -> np.ndarray:
        self.head.eval()
        return self.head(torch.from_numpy(features).float()).numpy()


def _fit(head: AestheticHead, loss_fn, epochs: int, lr: float) -> None:
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    head.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    head.eval()


def train_scorer(features: np.ndarray, names: list[str], *, targets: dict[str, float] | None = None,
                 votes: list[tuple[str, str, float]] | None = None, encoder_name: str = "builtin",
                 holdout: float = 0.2, epochs: int = 400, lr: float = 3e-3, seed: int = 0) -> Scorer:
    """Fit the head on ``targets`` (regression) or ``votes`` (a, b, outcome for a). A ``holdout`` share
    of the images is kept out of training (and out of every vote that involves one) for evaluation."""
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    held = set(order[: int(round(holdout * len(order)))])
    index = {n: i for i, n in enumerate(names)}
    train_idx = [index[n] for n in names if n not in held]
    if len(train_idx) < 4:
        raise UserError(f"{len(train_idx)} training images after the holdout; label more images")
    x = torch.from_numpy(features).float()
    with torch.random.fork_rng():  # the seed owns the head's initial weights and dropout; the caller's RNG is left
        torch.manual_seed(seed)
        head = AestheticHead(x.shape[1])
        head.mean.copy_(x[train_idx].mean(0))
        head.std.copy_(x[train_idx].std(0).clamp_min(1e-4))
        _fit(head, _loss_function(head, x, names, index, held, train_idx, targets, votes), epochs, lr)
    return Scorer(head, encoder_name, sorted(held))


def _loss_function(head: AestheticHead, x: torch.Tensor, names: list[str], index: dict[str, int], held: set[str],
                   train_idx: list[int], targets: dict[str, float] | None,
                   votes: list[tuple[str, str, float]] | None):
    """Bradley-Terry on the votes between training images, or MSE on the standardised targets."""
    if votes is not None:
        kept = [(index[a], index[b], o) for a, b, o in votes if a not in held and b not in held]
        if not kept:
            raise UserError("no votes between training images")
        ia, ib = torch.tensor([k[0] for k in kept]), torch.tensor([k[1] for k in kept])
        outcome = torch.tensor([k[2] for k in kept], dtype=torch.float32)

        def loss_fn() -> torch.Tensor:
            s = head(x)
            return torch.nn.functional.binary_cross_entropy_with_logits(s[ia] - s[ib], outcome)
        return loss_fn
    y = torch.tensor([targets[n] for n in names], dtype=torch.float32)
    ti = torch.tensor(train_idx)
    y_mean, y_std = y[ti].mean(), y[ti].std().clamp_min(1e-6)

    def loss_fn() -> torch.Tensor:
        return torch.nn.functional.mse_loss(head(x[ti]), (y[ti] - y_mean) / y_std)
    return loss_fn


# -- evaluation --------------------------------------------------------------------------------------
def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2


@dataclass
class Agreement:
    srcc: float
    plcc: float
    krcc: float
    n: int
    fitted: tuple[float, float, float, float] | None  # the logistic's parameters (None: fit failed)


def agreement(predicted: np.ndarray, truth: np.ndarray) -> Agreement:
    if len(predicted) < 3:
        raise UserError(f"{len(predicted)} images to evaluate; need at least 3")
    srcc = float(spearmanr(predicted, truth).statistic)
    krcc = float(kendalltau(predicted, truth).statistic)
    p0 = [float(truth.max()), float(truth.min()), float(np.median(predicted)), float(predicted.std() or 1.0)]
    try:
        params, _ = curve_fit(logistic4, predicted, truth, p0=p0, maxfev=20000)
        fitted = tuple(float(v) for v in params)
        plcc = float(pearsonr(logistic4(predicted, *params), truth).statistic)
    except (RuntimeError, ValueError):
        fitted, plcc = None, float(pearsonr(predicted, truth).statistic)  # linear PLCC, said so by fitted=None
    return Agreement(srcc, plcc, krcc, len(predicted), fitted)


def save_scatter(predicted: np.ndarray, truth: np.ndarray, result: Agreement, path: Path, truth_label: str) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ax.scatter(predicted, truth, s=12, alpha=0.6, color="#36c")
    if result.fitted:
        xs = np.linspace(predicted.min(), predicted.max(), 200)
        ax.plot(xs, logistic4(xs, *result.fitted), color="#c33", label="4-parameter logistic fit")
        ax.legend(loc="upper left")
    ax.set_xlabel("predicted aesthetic score")
    ax.set_ylabel(truth_label)
    ax.set_title(f"SRCC {result.srcc:.3f}  PLCC {result.plcc:.3f}  KRCC {result.krcc:.3f}  (n={result.n})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


# -- what the commands do ----------------------------------------------------------------------------
def _truth(root: Path, labels: str | Path | None, key: str) -> dict[str, float]:
    """Per-image truth: ``key`` of an ``aesthetic.jsonl`` (score, level), else of the dataset's
    ``metadata.jsonl`` (e.g. the hidden ``quality`` of a simulated dataset)."""
    if labels is not None:
        source, rows = Path(labels), read_aesthetic_labels(labels)
    else:
        source, rows = root / METADATA_FILE, metadata_rows(root)
    truth = {name: float(row[key]) for name, row in rows.items() if key in row}
    if not truth:
        raise UserError(f"{source}: no image has {key!r}")
    return truth


def train_command(root: Path, out: Path, *, labels: Path | None, db: Path | None, encoder: str, holdout: float,
                  epochs: int, seed: int, overwrite: bool) -> tuple[Scorer, Agreement | None]:
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite or another --out")
    if (labels is None) == (db is None):
        raise UserError("give --labels aesthetic.jsonl (regression on levels) or --db annotations.sqlite (pairs)")
    votes = None
    if labels is not None:
        targets = _truth(root, labels, "level")
        names = sorted(targets)
    else:
        store = AnnotationStore(db)
        names = [e.path for e in store.images()]
        votes = [(v.left, v.right, OUTCOMES[v.outcome]) for v in store.votes() if v.outcome != "skip"]
        targets = None
    enc = Encoder(encoder)
    features = encode_files(enc, root, names)
    scorer = train_scorer(features, names, targets=targets, votes=votes, encoder_name=encoder, holdout=holdout,
                          epochs=epochs, seed=seed)
    scorer.save(out)
    check = None
    if scorer.holdout and labels is not None:
        idx = [names.index(n) for n in scorer.holdout]
        truth = np.array([targets[n] for n in scorer.holdout])
        if len(idx) >= 3:
            check = agreement(scorer.score_features(features[idx]), truth)
    return scorer, check


def score_folder(model: Path, folder: Path) -> list[tuple[str, float]]:
    scorer = Scorer.load(model)
    names = [e.path for e in list_images(folder)]
    if not names:
        raise UserError(f"{folder}: no images")
    scores = scorer.score_features(encode_files(Encoder(scorer.encoder_name), folder, names))
    return sorted(zip(names, (float(s) for s in scores), strict=True), key=lambda r: -r[1])


def eval_command(model: Path, root: Path, *, labels: Path | None, key: str, all_images: bool,
                 plot: Path) -> tuple[Agreement, str]:
    scorer = Scorer.load(model)
    truth = _truth(root, labels, key)
    names = sorted(truth)
    subset = "all labelled images"
    if scorer.holdout and not all_images:
        names = [n for n in scorer.holdout if n in truth]
        subset = "the images held out of training"
    features = encode_files(Encoder(scorer.encoder_name), root, names, progress=False)
    predicted, target = scorer.score_features(features), np.array([truth[n] for n in names])
    result = agreement(predicted, target)
    save_scatter(predicted, target, result, plot, key)
    return result, subset
