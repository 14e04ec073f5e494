"""Training configs: pydantic models loaded from YAML. Unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError, short_repr

_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelConfig(_Strict):
    """The model every recipe loads."""

    name: str = "baidu/ERNIE-Image"  # hub id, local diffusers folder, "micro" or "tiny"
    revision: str | None = None
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # the frozen base weights
    vae_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"  # used only while caching latents


class ModelConfig(BaseModelConfig):
    """A base that may be quantised (LoRA and DPO recipes)."""

    # weight-only quantisation of the frozen DiT (torchao); the LoRA on top trains in fp32
    quantize: Literal["none", "int8", "float8"] = "none"


class LoraModelConfig(ModelConfig):
    """The LoRA recipe's model: quantised or partly kept in CPU memory."""

    # frozen weights of this many transformer blocks stay in CPU memory, copied in per block (see
    # models/block_swap.py): for GPUs smaller than the base; costs transfer time, not quality
    block_swap: int = Field(0, ge=0)
    # a LoRA fused into the frozen base before training, never into the output (e.g. a Turbo LoRA: the new
    # LoRA then learns on the few-step student it will be used with); any layout `generate --lora` reads
    assistant_lora: str | None = None
    assistant_strength: float = 1.0

    @model_validator(mode="after")
    def _swap_unquantized(self) -> LoraModelConfig:
        if self.block_swap and self.quantize != "none":
            raise ValueError("block_swap: works on an unquantised base only; set model.quantize: none")
        return self


class SamplingConfig(_Strict):
    """How samples are drawn each epoch (see data/sampling.py)."""

    by: Literal["uniform", "category"] = "uniform"  # category: weight = images x mean aesthetic level
    aesthetic: str | None = None  # aesthetic.jsonl from `ernie-lora rank scores` (relative to this file)
    temperature: float = Field(1.0, gt=0)  # weights ** (1 / temperature)
    depth: int | None = Field(None, gt=0)  # cut category paths to this many levels

    @model_validator(mode="after")
    def _category_keys_need_category(self) -> SamplingConfig:
        unused = [k for k in ("aesthetic", "depth") if getattr(self, k) is not None]
        unused += ["temperature"] if self.temperature != 1.0 else []
        if self.by == "uniform" and unused:
            raise ValueError(f"{', '.join(unused)} {'acts' if len(unused) == 1 else 'act'} only with by: category "
                             "(uniform sampling ignores it)")
        return self


class DataConfig(_Strict):
    path: str = "dataset"  # relative paths are relative to the config file
    resolution: int = Field(1024, gt=0)  # bucket area is resolution²
    max_aspect_ratio: float = Field(2.0, ge=1.0)
    bucket_multiple: int | None = Field(None, gt=0)  # default: what the model needs (16 for ERNIE-Image)
    crop: Literal["center", "random"] = "center"
    caption_dropout: float = Field(0.05, ge=0.0, le=1.0)
    # one drawn per sample and step: the same caption worded as users write prompts (ERNIE-Image SFT)
    caption_styles: list[Literal["natural", "keyword", "instruction"]] = ["natural"]
    # a word the LoRA learns to answer to: fills [trigger] in captions and sample prompts, else put first
    trigger_word: str | None = None
    cache_dir: str | None = None  # default: <dataset>/.ernie_lora_cache
    sampling: SamplingConfig = SamplingConfig()
    # held out of training for validation: a folder of images and captions (relative to this file), or a
    # share of the dataset (0 < f < 0.5) drawn with validation_seed; None: no validation
    validation: str | float | None = None
    validation_seed: int = 0

    @field_validator("validation")
    @classmethod
    def _validation_share(cls, v: str | float | None) -> str | float | None:
        if isinstance(v, float) and not 0.0 < v < 0.5:
            raise ValueError(f"a share of the dataset must be between 0 and 0.5 (got {v}); or give a folder")
        return v

    @field_validator("trigger_word")
    @classmethod
    def _trigger_is_words(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = " ".join(v.split())
        if not v or "[" in v or "]" in v or "," in v:
            raise ValueError(f"{v!r}: a word or phrase, without brackets or commas (e.g. ohwx poster)")
        return v

    @field_validator("caption_styles")
    @classmethod
    def _styles_unique(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("must list each style once, at least one")
        return v


class LoraConfig(_Strict):
    rank: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)  # scale = alpha / rank, honoured as written
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: Literal["attn", "attn_mlp"] | list[str] = "attn_mlp"
    init_from: str | None = None  # start from an existing LoRA file (diffusers format)

    @field_validator("targets")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module")
        return v


class TimestepConfig(_Strict):
    sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    shift: Literal["official", "none"] | float = "official"  # "official": the model scheduler's shift


class TrainConfig(_Strict):
    """What every recipe's optimisation honours (recipes/engine.py runs it)."""

    steps: int = Field(3000, gt=0)
    batch_size: int = Field(1, gt=0)  # per process; the global batch is batch_size x processes
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # bf16 autocast over fp32 LoRA weights; fp16 would need loss scaling, which we do not ship
    mixed_precision: Literal["no", "bf16"] = "bf16"
    gradient_checkpointing: bool = True
    # torch.compile of the repeated transformer block only (regional): compiles once, reused 36 times
    compile: bool = False
    seed: int = 42
    device: str | None = None  # default: cuda if available, else cpu


class FlowTrainConfig(TrainConfig):
    """Recipes trained on the flow-matching loss (LoRA, DPO) also choose where noise levels are drawn."""

    timesteps: TimestepConfig = TimestepConfig()


class StageConfig(_Strict):
    """One stage of a resolution curriculum; lr, batch size and accumulation default to train's."""

    resolution: int = Field(gt=0)
    steps: int = Field(gt=0)
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    grad_accum: int | None = Field(None, gt=0)


class LoraTrainConfig(FlowTrainConfig):
    # with several processes: shard the frozen base over them (FSDP2), each GPU holds 1/N of its
    # weights; the LoRA stays whole on every GPU and its gradients are averaged as without FSDP
    fsdp: bool = False
    # a resolution curriculum (the ERNIE-Image report's 256 -> 512 -> 1024): stages trained in order, one
    # LR schedule over all of them; train.steps is their sum and data.resolution their largest
    stages: list[StageConfig] | None = None

    @field_validator("stages")
    @classmethod
    def _some_stages(cls, v: list[StageConfig] | None) -> list[StageConfig] | None:
        if v is not None and not v:
            raise ValueError("give at least one stage, or leave train.stages out")
        return v


class DpoTrainConfig(FlowTrainConfig):
    steps: int = Field(500, gt=0)
    lr: float = Field(1e-5, gt=0)


class DistillTrainConfig(TrainConfig):
    """DMD2's optimiser: no first moment, no weight decay (the student's gradient is a distribution match)."""

    steps: int = Field(1000, gt=0)
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = Field(0.0, ge=0)


class CheckpointConfig(_Strict):
    every: int = Field(250, gt=0)
    keep: int = Field(3, gt=0)
    # also keep RUN/best/: the LoRA of the validation with the lowest val_loss, or the highest layout or
    # text score of its samples (needs data.validation; the score needs validation.samples)
    best: Literal["val_loss", "layout", "text"] | None = None


class ValidationConfig(_Strict):
    """What a validation measures (on data.validation), every ``every`` steps and at the end."""

    every: int = Field(250, ge=0)  # 0: at the end only
    # the loss at these sigmas with noise fixed by data.validation_seed: comparable across steps and runs
    sigmas: list[float] = [0.1, 0.3, 0.5, 0.7, 0.9]
    samples: int = Field(4, ge=0)  # validation captions sampled and scored (the sample section's settings)
    # layout: the layout score where a caption is in the layout language; text: OCR recall of quoted text
    scores: list[Literal["layout", "text"]] = ["layout"]

    @field_validator("sigmas")
    @classmethod
    def _sigmas_in_range(cls, v: list[float]) -> list[float]:
        if not v or not all(0.0 < s < 1.0 for s in v):
            raise ValueError("give at least one sigma, each strictly between 0 and 1")
        return v


class LoggingConfig(_Strict):
    """Trackers besides metrics.csv: TensorBoard (RUN/logs/, `pip install 'ernie-lora[tensorboard]'`) and
    Weights & Biases (`wandb`), through accelerate's trackers."""

    trackers: list[Literal["tensorboard", "wandb"]] = []
    project: str = "ernie-lora"  # the W&B project


class SampleConfig(_Strict):
    every: int = Field(250, ge=0)  # 0: only at the end
    prompts: list[str] = []
    steps: int = Field(28, gt=0)
    guidance: float = Field(4.0, ge=1.0)
    width: int | None = None  # default: data.resolution
    height: int | None = None
    seed: int = 0


class ProvenanceConfig(_Strict):
    """Written into every LoRA this run saves (``lora info`` shows it)."""

    creator: str = ""
    licence: str = ""  # e.g. "CC-BY-4.0", "proprietary"
    consent: str = ""  # e.g. "all images owned by the creator", "artists' written consent on file"


class TrainRunConfig(_Strict):
    PATHS: ClassVar[tuple[str, ...]] = ("data.path", "data.cache_dir", "data.sampling.aesthetic", "data.validation",
                                        "lora.init_from", "model.assistant_lora")
    model: LoraModelConfig = LoraModelConfig()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    train: LoraTrainConfig = LoraTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    sample: SampleConfig = SampleConfig()
    validation: ValidationConfig = ValidationConfig()
    logging: LoggingConfig = LoggingConfig()
    provenance: ProvenanceConfig = ProvenanceConfig()

    @model_validator(mode="after")
    def _fsdp_shards_a_plain_base(self) -> TrainRunConfig:
        if self.train.fsdp and (self.model.block_swap or self.model.quantize != "none"):
            raise ValueError("train.fsdp: shards an unquantised base held on the GPUs; "
                             "set model.quantize: none and model.block_swap: 0 (or train.fsdp: false)")
        return self

    @model_validator(mode="after")
    def _stages_set_steps_and_resolution(self) -> TrainRunConfig:
        stages = self.train.stages
        if not stages:
            return self
        total, largest = sum(s.steps for s in stages), max(s.resolution for s in stages)
        if "steps" in self.train.model_fields_set and self.train.steps != total:
            raise ValueError(f"train.steps: {self.train.steps}, but train.stages add up to {total} steps; "
                             "leave train.steps out with stages")
        if "resolution" in self.data.model_fields_set and self.data.resolution != largest:
            raise ValueError(f"data.resolution: {self.data.resolution}, but the largest stage is {largest}; "
                             "leave data.resolution out with stages")
        # set without validation on assignment: these are derived, not the user's keys
        object.__setattr__(self.train, "steps", total)
        object.__setattr__(self.data, "resolution", largest)
        return self

    @model_validator(mode="after")
    def _best_needs_validation(self) -> TrainRunConfig:
        best = self.checkpoint.best
        if best and self.data.validation is None:
            raise ValueError(f"checkpoint.best: {best} is chosen on validation; set data.validation")
        if best in ("layout", "text") and (not self.validation.samples or best not in self.validation.scores):
            raise ValueError(f"checkpoint.best: {best} needs validation.samples > 0 and {best} in validation.scores")
        return self


class PreferenceDataConfig(_Strict):
    """Preference pairs (see data/preference.py); images of a pair must fall in one bucket."""

    pairs: str | None = None  # JSONL of prompt/chosen/rejected (relative to this file); made by `proof` if None
    resolution: int = Field(1024, gt=0)
    max_aspect_ratio: float = Field(2.0, ge=1.0)
    bucket_multiple: int | None = Field(None, gt=0)
    crop: Literal["center", "random"] = "center"
    cache_dir: str | None = None  # default: <pairs folder>/.ernie_lora_cache


class DpoConfig(_Strict):
    # errors are per-element means of the squared velocity error; at that scale error gaps of ~1e-3
    # times beta/2 = 1000 land in sigmoid's working range. Diffusion-DPO used 2000-5000 on SD latents
    # with the same normalisation; on micro 2000 beat 100, 500 and 5000 (bench/RESULTS.md)
    beta: float = Field(2000.0, gt=0)
    sft_weight: float = Field(0.0, ge=0)  # lambda: + lambda * chosen error, an anchor against reward hacking
    # sdpo: scale the rejected gradient down so that the chosen error cannot rise (to first order)
    rejected_scale: Literal["none", "sdpo"] = "none"


class ProofConfig(_Strict):
    """The micro-world proof: pairs made by sampling the model (with the LoRA DPO starts from, if any) and
    ranking by the layout score; after training, scores on held-out prompts for the start, SFT on the chosen
    images, and DPO."""

    kind: Literal["poster", "infographic", "comic", "ui"] = "comic"
    bands: list[Literal["top", "middle", "bottom", "left", "right"]] | None = None  # posters; default: seen ones
    # a concept LoRA to align: first the LoRA recipe on this many synthetic images of the proof's prompts
    # (train split) for concept_steps; DPO and the SFT baseline start from it and it is their reference
    concept_images: int = Field(0, ge=0)
    concept_steps: int = Field(300, gt=0)
    pair_prompts: int = Field(48, gt=0)
    candidates: int = Field(6, ge=2)
    min_margin: float = Field(0.3, ge=0, le=1)
    eval_prompts: int = Field(32, gt=0)  # distinct prompts of `split` (fewer when the split holds fewer)
    eval_seeds: int = Field(2, gt=0)  # samples per evaluation prompt, each with its own noise
    split: Literal["validation", "test"] = "test"  # tune settings on validation, report on test
    compare_sft: bool = True
    sft_lr: float | None = Field(None, gt=0)  # the SFT baseline's lr (default: train.lr), tuned like DPO's
    sft_steps: int | None = Field(None, gt=0)  # the SFT baseline's steps (default: train.steps)
    steps: int = Field(24, gt=0)
    guidance: float = Field(3.0, ge=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _bands_are_for_posters(self) -> ProofConfig:
        if self.bands is not None and self.kind != "poster":
            raise ValueError(f"proof.bands: only posters have bands (proof.kind is {self.kind})")
        return self


class DpoRunConfig(_Strict):
    PATHS: ClassVar[tuple[str, ...]] = ("data.pairs", "data.cache_dir", "lora.init_from")
    model: ModelConfig = ModelConfig()
    data: PreferenceDataConfig = PreferenceDataConfig()
    lora: LoraConfig = LoraConfig()
    train: DpoTrainConfig = DpoTrainConfig()
    dpo: DpoConfig = DpoConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    proof: ProofConfig | None = None
    logging: LoggingConfig = LoggingConfig()
    provenance: ProvenanceConfig = ProvenanceConfig()

    @model_validator(mode="after")
    def _one_source_of_pairs(self) -> DpoRunConfig:
        if self.data.pairs is None and self.proof is None:
            raise ValueError("data.pairs: give a pairs file, or a proof section that makes pairs")
        return self


class TeacherConfig(_Strict):
    lora: str | None = None  # None: the base model; else base + this LoRA file (relative to the config)
    t_range: tuple[float, float] = (0.0, 1.0)  # the sigmas this teacher owns (1 = pure noise)
    guidance: float = Field(4.0, ge=1.0)  # the teacher's CFG; the student bakes it in and runs at 1

    @field_validator("t_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError(f"t_range {list(v)}: need 0 <= low < high <= 1")
        return v


class DistillConfig(_Strict):
    student_steps: int = Field(8, gt=0)  # K: the student samples with K Euler steps at guidance 1
    fake_updates: int = Field(5, gt=0)  # fake-score updates per student update (DMD2: 5)
    fake_lr: float | None = Field(None, gt=0)  # default: train.lr
    min_sigma: float = Field(0.02, ge=0.0, lt=1.0)  # where the distribution-matching loss is sampled
    max_sigma: float = Field(0.98, gt=0.0, le=1.0)
    # optional warm start: the first regression_steps of train.steps regress the student's K-step
    # samples onto the teachers' own samples (their ODE, teacher_steps Euler steps) from the same noise
    regression_steps: int = Field(0, ge=0)
    regression_pairs: int = Field(64, gt=0)
    teacher_steps: int = Field(24, gt=0)


class DistillDataConfig(_Strict):
    prompts_file: str | None = None  # one prompt per line (relative to the config); else train-split captions
    synthetic_prompts: int = Field(64, gt=0)
    seed: int = 0
    resolution: int = Field(1024, gt=0)  # square samples of this side
    cache_dir: str | None = None  # the prompts' embeddings; default: beside the run folder


class DistillProofConfig(_Strict):
    eval_prompts: int = Field(96, gt=1)  # distinct prompts of `split`; the Frechet distance wants many
    split: Literal["validation", "test"] = "test"  # tune settings on validation, report on test
    teacher_steps: int = Field(24, gt=0)
    steps: list[int] = [8, 4, 2, 1]  # the student and the base are each sampled at these step counts
    seed: int = 0


class DistillRunConfig(_Strict):
    PATHS: ClassVar[tuple[str, ...]] = ("data.prompts_file", "data.cache_dir", "lora.init_from")
    model: BaseModelConfig = BaseModelConfig()
    data: DistillDataConfig = DistillDataConfig()
    lora: LoraConfig = LoraConfig()
    teachers: list[TeacherConfig] = [TeacherConfig()]
    distill: DistillConfig = DistillConfig()
    train: DistillTrainConfig = DistillTrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    proof: DistillProofConfig | None = None
    logging: LoggingConfig = LoggingConfig()
    provenance: ProvenanceConfig = ProvenanceConfig()

    @model_validator(mode="after")
    def _teachers_cover(self) -> DistillRunConfig:
        lo, hi = self.distill.min_sigma, self.distill.max_sigma
        if not self.teachers:
            raise ValueError("teachers: at least one (an empty list has no teacher)")
        for k in range(101):
            sigma = lo + (hi - lo) * k / 100
            if not any(t.t_range[0] <= sigma <= t.t_range[1] for t in self.teachers):
                raise ValueError(f"teachers: no t_range holds sigma {sigma:.2f}; together they must cover "
                                 f"distill.min_sigma..max_sigma ({lo:g}..{hi:g})")
        return self


class MicroPretrainConfig(_Strict):
    """``ernie-lora pretrain-micro``: micro ERNIE's VAE, then its DiT, on the synthetic world."""

    seed: int = 0
    images: int = Field(12000, gt=0)
    vae_steps: int = Field(1200, gt=0)
    vae_batch: int = Field(32, gt=0)
    vae_lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-3, ge=0)
    dit_steps: int = Field(3000, gt=0)
    dit_batch: int = Field(64, gt=0)
    dit_lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    eval_count: int = Field(48, gt=0)
    eval_steps: int = Field(24, gt=0)
    eval_guidance: float = Field(3.0, ge=1)


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    # a check across sections names its keys in the message itself
    key = ".".join(str(p) for p in err["loc"]) or ""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    got = err.get("input")
    extra = "" if err["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {short_repr(got)})"
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{source}: {key + ': ' if key else ''}{msg}{extra}{more}"


MAX_YAML_VALUES = 100_000  # a config has hundreds; aliases that expand past this are a "billion laughs" file


def safe_load_yaml(text: str, source: str) -> object:
    """``yaml.safe_load``, refusing documents whose aliases expand to more than ``MAX_YAML_VALUES`` values
    (the expansion is counted on the node graph, never built)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}

        def size(n: yaml.Node) -> int:
            if id(n) in sizes:
                return sizes[id(n)]
            sizes[id(n)] = 1  # a recursive alias counts once here; construction handles the cycle
            if isinstance(n, yaml.SequenceNode):
                total = 1 + sum(size(c) for c in n.value)
            elif isinstance(n, yaml.MappingNode):
                total = 1 + sum(size(k) + size(v) for k, v in n.value)
            else:
                total = 1
            sizes[id(n)] = min(total, MAX_YAML_VALUES + 1)
            return sizes[id(n)]

        if size(node) > MAX_YAML_VALUES:
            raise UserError(f"{source}: YAML aliases expand to more than {MAX_YAML_VALUES:,} values; refused")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = safe_load_yaml(raw, f"--set {key}") if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key}: the value {short_repr(raw)} is not YAML ({getattr(exc, 'problem', exc)})") \
                from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = value
    return data


def load_yaml_model(path: str | Path, model: type[_M], overrides: list[str] | None = None) -> _M:
    """Load a YAML file into a pydantic model; every problem is one line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path}: no such file")
    try:
        data = safe_load_yaml(path.read_text(encoding="utf-8"), f"config {path}") or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"config {path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise UserError(f"config {path}: not UTF-8 text") from None
    except RecursionError:
        raise UserError(f"config {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_error(f"config {path}", exc)) from None


def _resolve(cfg: BaseModel, dotted: str, base: Path) -> None:
    """A relative path at ``dotted`` (``data.path``) made relative to the config file's folder."""
    *parents, attr = dotted.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    value = getattr(node, attr)
    if isinstance(value, str) and value and not Path(value).is_absolute():
        setattr(node, attr, str((base / value).resolve()))


def _resolve_model_name(model: BaseModelConfig, base: Path) -> None:
    """A model folder next to the config is named relative to it; hub ids and built-in names stay."""
    local_model = base / model.name
    if model.name.startswith((".", "/")) or (local_model.exists() and not Path(model.name).is_absolute()):
        model.name = str(local_model.resolve())


def load_run_config(path: str | Path, model: type[_M], overrides: list[str] | None = None) -> _M:
    """A recipe's YAML: validated, and its relative paths (``PATHS``, teachers' LoRAs, a local model
    folder) resolved against the file's folder; a path given with ``--set`` against the current folder,
    where the user typed it."""
    path = Path(path)
    cfg = load_yaml_model(path, model, overrides)
    typed = {item.split("=", 1)[0].strip() for item in overrides or [] if "=" in item}
    for dotted in model.PATHS:
        _resolve(cfg, dotted, Path.cwd() if dotted in typed else path.parent)
    for teacher in getattr(cfg, "teachers", []):
        _resolve(teacher, "lora", path.parent)
    _resolve_model_name(cfg.model, Path.cwd() if "model.name" in typed else path.parent)
    return cfg


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainRunConfig:
    return load_run_config(path, TrainRunConfig, overrides)


def load_dpo_config(path: str | Path, overrides: list[str] | None = None) -> DpoRunConfig:
    return load_run_config(path, DpoRunConfig, overrides)


def load_distill_config(path: str | Path, overrides: list[str] | None = None) -> DistillRunConfig:
    return load_run_config(path, DistillRunConfig, overrides)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
