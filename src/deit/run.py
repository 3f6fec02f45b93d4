"""Everything a training run is made of, built once from its config: data, model, teacher, loss, optimizer.

``build_run(config)`` checks what can be checked before the first step (the
teacher's classes, the batch against Mixup and accumulation) so that a
misconfigured run fails in seconds, not after an epoch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deit.checkpoint import Checkpoint, DataSpec, ModelSpec
from deit.config import ModelConfig, TrainConfig, config_to_dict
from deit.data import DataBundle, DatasetInfo, Unlabeled, build_data
from deit.data.augment import build_mixup
from deit.distributed import Distributed, resolve_device
from deit.ema import ModelEma
from deit.engine import EpochMeter, Precision, StepParts
from deit.errors import DeitError
from deit.losses import DistillationLoss
from deit.models import VisionTransformer, is_deit_model, load_weights
from deit.optim import WarmupCosine, build_optimizer
from deit.pseudo_labels import PseudoLabels, PseudoLabelTeacher
from deit.rng import seed_everything
from deit.ssl.backbone import Backbone, pooling_for
from deit.ssl.method import Method
from deit.ssl.pretrain import MethodSetup, build_method, objective
from deit.ssl.transfer import init_from_pretrained
from deit.ssl.views import OneView, TwoViews
from deit.teacher_cache import TeacherCache
from deit.teachers import InputSpec, Teacher, build_teacher

log = logging.getLogger("deit")


class RunError(DeitError, RuntimeError):
    """A run that cannot start or continue as configured; the message says why."""


def attention_kernel(requested: str, precision: Precision | None) -> str:
    """``auto`` is explicit attention on CPU under bf16, where it ran faster than fused SDPA (docs/speed.md),
    and fused SDPA everywhere else."""
    if requested != "auto":
        return requested
    cpu_bf16 = precision is not None and precision.device_type == "cpu" and precision.dtype == torch.bfloat16
    return "math" if cpu_bf16 else "sdpa"


def model_options(config: ModelConfig, precision: Precision | None = None) -> dict[str, Any]:
    """Keyword arguments for ``create_model`` from the model section, for a run in ``precision``.

    Without a precision (a model built outside a run), ``auto`` attention is fused SDPA.
    """
    options: dict[str, Any] = {"drop_path_rate": config.drop_path, "drop_rate": config.dropout}
    if is_deit_model(config.name):
        options.update(attn_impl=attention_kernel(config.attn_impl, precision), eval_output=config.eval_output)
    return options


def model_spec(config: ModelConfig, info: DatasetInfo, input_size: int, precision: Precision) -> ModelSpec:
    """Everything needed to rebuild the model from a checkpoint (the attention kernel resolved)."""
    return ModelSpec(config.name, info.num_classes, info.in_chans, input_size, model_options(config, precision))


def _build_teacher(config: TrainConfig, data: DataBundle) -> Teacher | PseudoLabelTeacher | None:
    distill = config.distill
    if distill.pseudo_labels:  # _unlabeled has checked that no teacher is given too
        labels = PseudoLabels.load(distill.pseudo_labels)
        labels.check(data.info.class_names)
        return PseudoLabelTeacher(labels)
    if distill.type == "none" and not (distill.teacher_path or distill.teacher_pretrained):
        return None
    return build_teacher(
        distill.teacher_model,
        distill.teacher_path,
        student_input=InputSpec(data.info.in_chans, data.info.mean, data.info.std),
        num_classes=data.info.num_classes,
        class_names=data.info.class_names,
        input_size=data.input_size,
        pretrained=distill.teacher_pretrained,
    )


def _explain_heads(model: nn.Module, distillation_type: str) -> None:
    distilled = isinstance(model, VisionTransformer) and model.distilled
    if distilled and distillation_type == "none":
        log.warning(
            "distilled model without a teacher: both the class and the distillation head learn from the labels, "
            "so the fused prediction never includes an untrained head"
        )
    elif not distilled and distillation_type != "none":
        log.warning(
            "the student has no distillation token: the label and teacher terms both train its single head (the "
            "paper's 'usual distillation'); for distillation through attention use a deit_*_distilled_* model"
        )


@dataclass
class Progress:
    """Where a run is: what a checkpoint must hold besides the weights to continue it exactly."""

    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # optimizer steps completed in the epoch in progress
    best_acc1: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per completed epoch
    meter: EpochMeter = field(default_factory=EpochMeter)  # this process's sums for the epoch in progress


@dataclass
class Run:
    """Everything a training run is made of, built once from its config."""

    config: TrainConfig
    layout: Distributed
    device: torch.device
    precision: Precision
    data: DataBundle
    spec: ModelSpec
    model: nn.Module  # the model itself: checkpoints, EMA and evaluation use it
    train_model: nn.Module  # what the step calls: the model, or its DistributedDataParallel wrapper
    teacher: Teacher | TeacherCache | PseudoLabelTeacher | None
    criterion: DistillationLoss
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    scaler: torch.amp.GradScaler | None
    mixup: Callable | None
    ema: ModelEma | None

    def step_parts(self) -> StepParts:
        """What ``engine.train_steps`` needs of this run."""
        optim = self.config.optim
        return StepParts(
            model=self.train_model,
            criterion=self.criterion,
            optimizer=self.optimizer,
            lr_at=self.schedule,
            device=self.device,
            precision=self.precision,
            teacher=self.teacher,
            mixup=self.mixup,
            augment=self.data.batch_transform,
            accum_steps=optim.accum_steps,
            clip_grad=optim.clip_grad,
            scaler=self.scaler,
            ema=self.ema,
            seed=self.config.run.seed,
            rank=self.layout.rank,
            losses=objective(self.model) if isinstance(self.model, Method) else None,
            after_step=self.model.after_step if isinstance(self.model, Method) else None,
        )

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the same on every process)."""
        return len(self.data.train_loader) // self.config.optim.accum_steps

    def checkpoint(self, progress: Progress, meters: list[dict[str, Any]]) -> Checkpoint:
        """Everything to rebuild and continue this run; ``meters`` holds every process's epoch sums, in rank order.

        No generator state is needed: every random draw is seeded from (seed, epoch, step), see ``deit.rng``.
        """
        info = self.data.info
        return Checkpoint(
            model=self.model.state_dict(),
            model_spec=self.spec,
            data=DataSpec(info.name, tuple(info.class_names), tuple(info.mean), tuple(info.std), self.data.input_size),
            model_ema=self.ema.state_dict() if self.ema is not None else None,
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            epoch=progress.epoch,
            epoch_step=progress.epoch_step,
            best_acc1=progress.best_acc1,
            history=progress.history,
            meters=meters,
            world_size=self.layout.world_size,
            config=config_to_dict(self.config),
            teacher_cache=self.teacher_cache_state(),
        )

    def teacher_cache_state(self) -> dict[str, torch.Tensor] | None:
        if not isinstance(self.teacher, TeacherCache):
            return None
        return {"logits": self.teacher.logits.cpu(), "filled": self.teacher.filled.cpu()}


def _fast_teacher(teacher: Teacher, config: TrainConfig, data: DataBundle) -> Teacher | TeacherCache:
    """The teacher network with the run's speed levers: channels-last, compiled, cached."""
    if config.distill.teacher_channels_last:
        teacher.channels_last()
    if config.run.compile:
        # the teacher is frozen, so inductor may fold its weights in as constants and prepack them for
        # oneDNN ("freezing"); a small gain on CPU here (benchmarks/results/teacher_forward.md)
        options = {"freezing": True} if config.run.compile == "inductor" else None
        teacher.model = torch.compile(teacher.model, backend=config.run.compile, options=options)
    if config.distill.teacher_cache_views:
        return _cached(teacher, config, data)
    return teacher


def _cached(teacher: Teacher, config: TrainConfig, data: DataBundle) -> TeacherCache:
    """The teacher behind a cache of its logits per (image, view); see deit.teacher_cache for when it applies."""
    problems = []
    if data.batch_transform is None:
        problems.append("in-memory data at its native size (whole-batch augmentation, drawn from each view's seed)")
    if config.augment.mixup > 0 or config.augment.cutmix > 0:
        problems.append("no Mixup / CutMix (the teacher must see the mixed image)")
    if config.augment.repeated_aug > 1:
        problems.append("no repeated augmentation (its copies would be the same view)")
    if problems:
        raise RunError(f"--teacher-cache-views needs {'; '.join(problems)}; or use the online teacher")
    num_images = len(data.train_loader.dataset)
    return TeacherCache(teacher, num_images, config.distill.teacher_cache_views, data.info.num_classes)


def _build_student(spec: ModelSpec, config: ModelConfig) -> nn.Module:
    if config.finetune and config.init:
        raise RunError("give --finetune (weights with their heads) or --init (a backbone, heads fresh), not both")
    model = spec.build()
    if config.finetune:
        load_weights(model, config.finetune)  # logs what it had to adapt (resolution, channels, heads)
    if config.init:
        init_from_pretrained(model, config.init)  # logs what it loaded and what starts fresh
    return model


def _self_supervised(
    model: nn.Module, spec: ModelSpec, config: TrainConfig, data: DataBundle, layout: Distributed
) -> tuple[Method, DataBundle]:
    """The method around ``model`` (now its backbone), and the views of every image it trains on (``deit.ssl``)."""
    if config.distill.type != "none" or config.augment.mixup > 0 or config.augment.cutmix > 0:
        raise RunError("self-supervised pretraining uses no teacher and no Mixup / CutMix: drop those settings")
    if data.batch_transform is None:
        raise RunError(
            "self-supervised pretraining makes its two views on whole in-memory batches: use Fashion-MNIST, CIFAR, or "
            "an image folder of small images that fits --decode-budget-gb"
        )
    total_steps = config.optim.epochs * (len(data.train_loader) // config.optim.accum_steps)
    setup = MethodSetup(
        total_steps, num_images=len(data.train_loader.dataset), image_size=data.input_size, mean=data.info.mean,
        std=data.info.std, seed=config.run.seed, layout=layout,
        build_encoder=lambda in_chans: dataclasses.replace(spec, in_chans=in_chans).build(),
    )  # fmt: skip
    backbone = Backbone(model, pool=pooling_for(config.pretrain.method))
    method = build_method(backbone, config.pretrain, setup).to(next(model.parameters()).device)
    if method.step_input != "two views":  # BEiT, DeepCluster, CPC, colour CMC: one view, a crop and a flip
        views = OneView(data.info.mean, data.info.std, scale=(0.4, 1.0), hflip=config.augment.hflip)
    else:
        views = TwoViews(data.info.mean, data.info.std, hflip=config.augment.hflip)
    return method, dataclasses.replace(data, batch_transform=views)


def _build_mixup(config: TrainConfig, num_classes: int) -> Callable | None:
    augment = config.augment
    mixup = build_mixup(
        mixup=augment.mixup,
        cutmix=augment.cutmix,
        prob=augment.mix_prob,
        switch_prob=augment.mix_switch_prob,
        label_smoothing=config.optim.label_smoothing,
        num_classes=num_classes,
    )
    if mixup is not None and config.optim.batch_size % 2:
        raise RunError(
            f"Mixup / CutMix pair the images of a batch: use an even --batch-size, not {config.optim.batch_size}"
        )
    return mixup


def _unlabeled(config: TrainConfig) -> Unlabeled | None:
    """Where the run's unlabelled images come from; without a teacher, it trains on the labelled ones only."""
    data, distill = config.data, config.distill
    if data.label_fraction is None and data.unlabeled_path is None and distill.pseudo_labels is None:
        return None
    if distill.pseudo_labels and distill.type == "none":
        raise RunError("--pseudo-labels replace the teacher: give --distillation-type soft or hard")
    if distill.pseudo_labels and (distill.teacher_path or distill.teacher_pretrained):
        raise RunError("give a teacher or stored pseudo-labels, not both")
    ratio = data.unlabeled_ratio
    if distill.type == "none":
        log.info("no teacher: training on the labelled images only (an epoch still spans the whole pool)")
        ratio = 0.0
    elif config.augment.mixup > 0 or config.augment.cutmix > 0:
        raise RunError("Mixup / CutMix would mix labels with unlabelled images: set --mixup 0 --cutmix 0")
    selection = fingerprint = None
    if distill.pseudo_labels:
        labels = PseudoLabels.load(distill.pseudo_labels)
        selection, fingerprint = labels.selection, labels.pool
    return Unlabeled(data.label_fraction, data.unlabeled_path, ratio, selection, fingerprint)


def _build_data(config: TrainConfig, layout: Distributed, device: torch.device) -> DataBundle:
    return build_data(
        config.data.dataset,
        config.data.path,
        batch_size=config.optim.batch_size,
        seed=config.run.seed,
        input_size=config.data.input_size,
        download=config.data.download,
        in_chans=config.data.in_chans,
        train_subset=config.data.train_subset,
        num_workers=config.data.num_workers,
        hflip=config.augment.hflip,
        rand_augment=config.augment.rand_augment,
        random_erasing=config.augment.random_erasing,
        repeated_aug=config.augment.repeated_aug,
        pin_memory=device.type == "cuda",
        num_replicas=layout.world_size,
        rank=layout.rank,
        bad_files=config.data.bad_files,
        batched=config.augment.batched,
        decode_budget_gb=config.data.decode_budget_gb,
        decode_cache=config.data.decode_cache,
        views=config.distill.teacher_cache_views,
        unlabeled=_unlabeled(config),
    )


def build_run(config: TrainConfig, layout: Distributed | None = None) -> Run:
    """Data, model, teacher, loss and optimizer for ``config``; the teacher is checked here, before any step."""
    layout = layout or Distributed()
    device = resolve_device(config.run.device, layout)
    precision = Precision.resolve(config.run.amp, device)
    seed_everything(config.run.seed)  # the same initial weights on every process
    data = _build_data(config, layout, device)
    if data.info.name == "unlabeled" and not config.pretrain.method:
        raise RunError(f"{config.data.path} holds images without labels: pretrain on them with `deit pretrain`, "
                       "or lay them out as train/<class>/ and val/<class>/ to train a classifier")  # fmt: skip
    spec = model_spec(config.model, data.info, data.input_size, precision)
    model = _build_student(spec, config.model).to(device)
    if config.pretrain.method:
        model, data = _self_supervised(model, spec, config, data, layout)
    teacher = _build_teacher(config, data)
    if isinstance(teacher, Teacher):  # a network (stored pseudo-labels need none of this)
        teacher = _fast_teacher(teacher, config, data)
    criterion = DistillationLoss(
        config.distill.type,
        alpha=config.distill.alpha,
        tau=config.distill.tau,
        kl_reduction=config.distill.kl_reduction,
        label_smoothing=config.optim.label_smoothing,
    )
    _explain_heads(model, config.distill.type)
    global_batch = config.optim.batch_size * config.optim.accum_steps * layout.world_size
    optimizer_steps_per_epoch = len(data.train_loader) // config.optim.accum_steps
    if optimizer_steps_per_epoch == 0:
        raise RunError(
            f"{len(data.train_loader)} batches per epoch are fewer than --accum-steps {config.optim.accum_steps}"
        )
    train_model = model
    if layout.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if config.run.compile:
        train_model = torch.compile(train_model, backend=config.run.compile)
    return Run(
        config=config,
        layout=layout,
        device=device,
        precision=precision,
        data=data,
        spec=spec,
        model=model,
        train_model=train_model,
        teacher=teacher.to(device) if teacher is not None else None,
        criterion=criterion,
        optimizer=build_optimizer(model, config.optim, global_batch),
        schedule=WarmupCosine.from_config(config.optim, global_batch, optimizer_steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type) if precision.dtype == torch.float16 else None,
        mixup=_build_mixup(config, data.info.num_classes),
        ema=ModelEma(model, config.optim.ema_decay) if config.optim.ema_decay else None,
    )
