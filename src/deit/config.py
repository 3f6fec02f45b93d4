"""Run configuration: frozen dataclasses, YAML presets, dotted overrides.

A config is built once (preset, then overrides) and never mutated; the
resolved config is written next to every run as ``config.yaml``. Every
hyperparameter is documented once, here, with its unit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deit.errors import DeitError


@dataclass(frozen=True)
class ModelConfig:
    name: str = "deit_nano_distilled_patch4_28"  # a deit variant (`deit models`) or any timm model
    drop_path: float = 0.1  # stochastic depth probability at the last block (linear from 0)
    dropout: float = 0.0  # dropout on projections; the paper uses none
    attn_impl: str = "auto"  # "sdpa" (fused), "math" (explicit), auto: math on CPU under bf16, where it is faster
    eval_output: str = "avg_logits"  # distilled models: avg_logits | softmax_sum | cls | dist
    finetune: str | None = None  # start from these weights (ours, official .pth, timm); resized to the input size
    init: str | None = None  # start from the backbone of a deit pretrain / train checkpoint; heads fresh


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | cifar100 | imagefolder (or CIFAR, IMNET) | unlabeled
    path: str | None = None  # folder of the data; Fashion-MNIST defaults to Debian's copy
    input_size: int | None = None  # side in pixels; default: the data set's own
    in_chans: int | None = None  # image folders only: 1 reads grayscale, 3 (default) RGB
    download: bool = False  # fetch Fashion-MNIST / CIFAR when missing (needs the internet)
    train_subset: int | None = None  # train on a seeded, class-balanced subset of this many images
    num_workers: int = 0  # loader worker processes; 0 decodes in the training process
    bad_files: str = "error"  # image folders: error (name the unreadable file) | skip (leave it out, warn)
    # image folders of small images (<= 64 px) decoded once into memory when their uint8 array fits this budget;
    # 0: always decode image by image
    decode_budget_gb: float = 4.0
    decode_cache: str | None = None  # a folder to keep decoded arrays in for later runs (memory-mapped); null: none
    label_fraction: float | None = None  # keep a seeded, stratified share of the training labels; the rest unlabelled
    unlabeled_path: str | None = None  # a folder of images added to training without labels (subfolders ignored)
    unlabeled_ratio: float | None = None  # unlabelled share of each batch; None: their share of the pool


@dataclass(frozen=True)
class AugmentConfig:
    """Data augmentation and batch mixing; the paper's values (Table 9) are in the comments."""

    hflip: float = 0.5  # horizontal flip probability
    rand_augment: str | None = None  # timm RandAugment policy; paper: "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.0  # probability of erasing one random box per image; paper: 0.25
    mixup: float = 0.0  # Beta(a, a) concentration of Mixup, 0 = off; paper: 0.8
    cutmix: float = 0.0  # Beta(a, a) concentration of CutMix, 0 = off; paper: 1.0
    mix_prob: float = 1.0  # probability of mixing a batch at all
    mix_switch_prob: float = 0.5  # with both on: probability of CutMix rather than Mixup
    repeated_aug: int = 1  # copies of each sampled image per epoch, each augmented anew; paper: 3
    batched: bool = True  # in-memory data (Fashion-MNIST, CIFAR): crop, flip, RandAugment and erase whole
    #                       batches on the device instead of image by image (same distribution, other draws)


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 300
    batch_size: int = 64  # images per process and step
    lr: float = 5e-4  # AdamW learning rate for a global batch of 512 (scaled by batch / 512)
    scale_lr: bool = True  # false: use lr as given, whatever the batch
    min_lr: float = 1e-5  # floor of the cosine decay
    warmup_lr: float = 1e-6  # learning rate at the first step
    warmup_epochs: float = 5  # linear warm-up, per iteration
    weight_decay: float = 0.05  # not applied to biases, norms, position embedding, tokens
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    label_smoothing: float = 0.1
    clip_grad: float | None = None  # max global gradient norm; None: no clipping
    accum_steps: int = 1  # micro-batches per optimizer step: global batch = batch_size x processes x accum_steps
    ema_decay: float | None = None  # exponential moving average of the weights per step; paper: 0.99996


@dataclass(frozen=True)
class DistillConfig:
    type: str = "none"  # none | soft | hard
    alpha: float = 0.5  # weight of the teacher term; the label term gets 1 - alpha
    tau: float = 1.0  # soft distillation temperature
    kl_reduction: str = "batchmean"  # batchmean | official (sum / (batch x classes)), see losses.py
    teacher_model: str | None = None  # timm name, or the architecture of a teacher_path from elsewhere
    teacher_path: str | None = None  # a `deit train` checkpoint, an official {'model': ...} file, a state dict
    teacher_pretrained: bool = False  # download timm's weights for teacher_model (needs the internet)
    teacher_cache_views: int | None = None  # reuse the teacher's logits on this many fixed views per image
    #                                           (without a teacher: cycle through that many fixed views all the same)
    teacher_channels_last: bool = True  # the teacher's weights and inputs channels-last: faster convolutions
    pseudo_labels: str | None = None  # a `deit pseudo-label` file: stored predictions replace the online teacher


PRETRAIN_METHODS = ("simclr", "moco", "mocov3", "byol", "beit", "deepcluster", "cpc", "cmc")


@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised pretraining (``deit pretrain``): labels are only used to monitor, by kNN."""

    method: str | None = None  # one of PRETRAIN_METHODS; None: train on the labels
    dim: int = 128  # size of the projected embeddings the objective compares
    hidden_dim: int = 512  # width of the projector's and predictor's hidden layers
    projector_layers: int = 2  # SimCLR's projector depth: 2 as in SimCLR, 3 as in SimCLRv2
    temperature: float | None = None  # of the contrastive losses; None: the method's (SimCLR 0.5, MoCo 0.2, CMC 0.07)
    momentum: float = 0.99  # MoCo's and BYOL's target momentum at the start; it rises to 1 on a cosine
    queue_size: int = 4096  # MoCo v2's negatives, and CMC's (one queue per view)
    tokenizer: str | None = None  # BEiT: the visual tokenizer file `deit tokenizer` wrote
    mask_ratio: float = 0.4  # BEiT: share of each image's patches masked, in blocks
    mask_target: str = "tokens"  # BEiT: the tokenizer's tokens, or the masked patches' pixels (SimMIM's baseline)
    clusters: int = 100  # DeepCluster: k of its k-means, more than the classes
    pca_dim: int = 64  # DeepCluster: features are whitened down to this many dimensions before k-means
    cpc_patch: int | None = None  # CPC: side of its overlapping patches (stride half of it); None: half the image
    cpc_steps: int = 2  # CPC: how many rows below the context predicts
    knn_k: int = 20  # the kNN monitor's neighbours (cosine similarity, temperature-weighted votes)
    knn_temperature: float = 0.07


@dataclass(frozen=True)
class RunConfig:
    output_dir: str | None = None  # checkpoints, metrics.jsonl, config.yaml; None: write nothing
    seed: int = 0
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1 ...
    # none | bf16 | fp16 autocast | auto: bf16 where the hardware computes it natively (measured no less accurate
    # than fp32 at equal epochs, 2.1x faster here: benchmarks/results/precision_check.md), else fp32
    amp: str = "auto"
    resume: str | None = None  # a checkpoint to continue from, or "auto" for output_dir's latest
    eval_teacher: bool = True  # also report the teacher's accuracy on the validation set
    eval_interval: int = 1  # evaluate every this many epochs, and always after the last one
    progress: bool = True  # a progress bar on a terminal; in a log file, a line every log_interval steps
    log_interval: int = 50  # optimizer steps between progress lines when stderr is not a terminal
    checkpoint_steps: int | None = None  # also write checkpoint.pth every this many optimizer steps
    tensorboard: str | None = None  # also log every step and epoch to TensorBoard event files in this folder
    compile: str | None = None  # torch.compile the student and the teacher with this backend (inductor)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(DeitError, ValueError):
    """An unknown key or a value of the wrong type in a config file or override."""


@dataclass(frozen=True)
class Allowed:
    """The values a setting may take: a numeric interval, a set of names, or both kinds of check off."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    choices: tuple[str | int, ...] = ()

    def accepts(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        if self.choices:
            return f"one of {', '.join(map(str, self.choices))}"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


PROBABILITY = Allowed(0, 1)
POSITIVE = Allowed(0, low_open=True)
AT_LEAST_ONE = Allowed(1)
NON_NEGATIVE = Allowed(0)
# Every setting with a limited range; a config outside them is refused when it is built (None is always
# allowed where the field is optional: it means "off" or "default").
ALLOWED: dict[str, Allowed] = {
    "model.drop_path": Allowed(0, 1, high_open=True),
    "model.dropout": Allowed(0, 1, high_open=True),
    "model.attn_impl": Allowed(choices=("auto", "sdpa", "math")),
    "model.eval_output": Allowed(choices=("avg_logits", "softmax_sum", "cls", "dist")),
    "data.input_size": Allowed(8),
    "data.in_chans": Allowed(choices=(1, 3)),
    "data.train_subset": AT_LEAST_ONE,
    "data.num_workers": NON_NEGATIVE,
    "data.bad_files": Allowed(choices=("error", "skip")),
    "data.decode_budget_gb": NON_NEGATIVE,
    "pretrain.method": Allowed(choices=PRETRAIN_METHODS),
    "pretrain.cpc_patch": Allowed(2),
    "pretrain.cpc_steps": AT_LEAST_ONE,
    "pretrain.clusters": Allowed(2),
    "pretrain.pca_dim": AT_LEAST_ONE,
    "pretrain.mask_ratio": Allowed(0, 1, low_open=True, high_open=True),
    "pretrain.mask_target": Allowed(choices=("tokens", "pixels")),
    "pretrain.dim": AT_LEAST_ONE,
    "pretrain.hidden_dim": AT_LEAST_ONE,
    "pretrain.projector_layers": Allowed(choices=(2, 3)),
    "pretrain.temperature": POSITIVE,
    "pretrain.momentum": Allowed(0, 1, high_open=True),
    "pretrain.queue_size": AT_LEAST_ONE,
    "pretrain.knn_k": AT_LEAST_ONE,
    "pretrain.knn_temperature": POSITIVE,
    "data.label_fraction": Allowed(0, 1, low_open=True),
    "data.unlabeled_ratio": Allowed(0, 1, high_open=True),
    "augment.hflip": PROBABILITY,
    "augment.random_erasing": PROBABILITY,
    "augment.mixup": NON_NEGATIVE,
    "augment.cutmix": NON_NEGATIVE,
    "augment.mix_prob": PROBABILITY,
    "augment.mix_switch_prob": PROBABILITY,
    "augment.repeated_aug": AT_LEAST_ONE,
    "optim.epochs": AT_LEAST_ONE,
    "optim.batch_size": AT_LEAST_ONE,
    "optim.lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.warmup_lr": NON_NEGATIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas": Allowed(0, 1, high_open=True),  # each of the two
    "optim.eps": POSITIVE,
    "optim.label_smoothing": Allowed(0, 1, high_open=True),
    "optim.clip_grad": POSITIVE,
    "optim.accum_steps": AT_LEAST_ONE,
    "optim.ema_decay": Allowed(0, 1, low_open=True, high_open=True),
    "distill.type": Allowed(choices=("none", "soft", "hard")),
    "distill.alpha": PROBABILITY,
    "distill.tau": POSITIVE,
    "distill.kl_reduction": Allowed(choices=("batchmean", "official")),
    "distill.teacher_cache_views": AT_LEAST_ONE,
    "run.seed": NON_NEGATIVE,
    "run.amp": Allowed(choices=("none", "bf16", "fp16", "auto")),
    "run.checkpoint_steps": AT_LEAST_ONE,
    "run.eval_interval": AT_LEAST_ONE,
    "run.log_interval": AT_LEAST_ONE,
}


def validate(config: TrainConfig) -> TrainConfig:
    """``config`` itself if every setting is in its range; else a ConfigError naming the key, value and range."""
    for key, allowed in ALLOWED.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(config, section), name)
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and not allowed.accepts(v) for v in values):
            raise ConfigError(f"{key} = {value!r} is out of range: it must be {allowed.describe()}")
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain dicts, lists and scalars: safe for YAML, JSON and weights-only checkpoints."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    return {
        section.name: {key: plain(value) for key, value in dataclasses.asdict(getattr(config, section.name)).items()}
        for section in dataclasses.fields(config)
    }


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Build a config from nested dicts; missing keys keep ``base``'s values."""
    config = base or TrainConfig()
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - sections)
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; sections are {sorted(sections)}")
    for section, entries in values.items():
        if not isinstance(entries, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {entries!r}")
        config = with_overrides(config, {f"{section}.{key}": value for key, value in entries.items()})
    return config


def with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A new config with dotted keys replaced, e.g. ``{"optim.lr": 1e-3, "distill.type": "hard"}``."""
    replacements: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        current = getattr(config, section, None)
        if not dataclasses.is_dataclass(current) or section not in {f.name for f in dataclasses.fields(config)}:
            raise ConfigError(
                f"unknown config key {dotted!r}: sections are {[f.name for f in dataclasses.fields(config)]}"
            )
        fields = {f.name: f for f in dataclasses.fields(current)}
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}; {section} has {sorted(fields)}")
        replacements.setdefault(section, {})[key] = _coerce(dotted, value, getattr(current, key), fields[key].type)
    return validate(
        dataclasses.replace(
            config,
            **{section: dataclasses.replace(getattr(config, section), **kv) for section, kv in replacements.items()},
        )
    )


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    """Check a value against its field's type and convert the lossless cases (int -> float, list -> tuple)."""
    if isinstance(value, str) and value.lower() == "none" and "None" in str(annotation):
        value = None  # `--aa none` switches an optional setting off
    if value is None:
        if "None" not in str(annotation):
            raise ConfigError(f"{key} cannot be empty")
        return None
    if "tuple" in str(annotation):
        if not isinstance(value, list | tuple) or len(value) != len(default):
            raise ConfigError(f"{key} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(
            _coerce(f"{key}[{i}]", item, float(d), "float")
            for i, (item, d) in enumerate(zip(value, default, strict=True))
        )
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if str(annotation).startswith(name):
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if kind is float and isinstance(value, str) and _looks_numeric(value):
                return float(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"{key} must be {name}, got {value!r}")
            return value
    return value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``; values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


PRESETS_DIR = Path(__file__).parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML config file, or a bundled preset by name (``fashion_mnist``, see ``list_presets``)."""
    path = Path(path)
    if not path.is_file() and (PRESETS_DIR / f"{path.name}.yaml").is_file() and path.suffix == "":
        path = PRESETS_DIR / f"{path.name}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; bundled presets are {list_presets()}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, data, augment, optim, distill, run)")
    if "base" in values:  # a preset that changes a few keys of another one
        base_name = values.pop("base")
        base_path = path.parent / f"{base_name}.yaml" if (path.parent / f"{base_name}.yaml").is_file() else base_name
        base = load_config(base_path, base)
    try:
        return config_from_dict(values, base)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
