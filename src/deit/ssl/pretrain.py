"""Self-supervised pretraining on the training loop of ``deit train``: the method, its step, its kNN monitor.

``deit pretrain --method simclr`` is ``deit train`` with ``pretrain.method``
set. ``run.build_run`` then builds the method (``build_method``) around the
backbone instead of a classifier, and replaces the batch augmentation by the
views the method takes (``ssl.views``: two per image, or one). The step
gets the method's ``objective``: its losses of two views, of one view and a
mask per image (BEiT), or of one view and each image's index (DeepCluster).
Every guarantee of ``deit train`` carries over: progress lines, metrics,
atomic checkpoints (targets, queues, clusters and codebooks included: they
are buffers and parameters of the method), exact resume, SIGTERM and
torchrun. Before each epoch a method may prepare it (``Method.before_epoch``:
DeepCluster clusters). After each evaluated epoch, the method's
representation is scored by a kNN classifier (``knn_accuracy``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from deit.config import PretrainConfig
from deit.data import DataBundle
from deit.data.batch import Batch
from deit.distributed import Distributed
from deit.engine import Precision, StepParts
from deit.ssl.backbone import Backbone
from deit.ssl.beit import BEiT
from deit.ssl.byol import BYOL
from deit.ssl.cmc import CMC, SECOND_VIEW_CHANNELS
from deit.ssl.cpc import CPC
from deit.ssl.deepcluster import ClusterSettings, DeepCluster
from deit.ssl.knn import knn_predict
from deit.ssl.masking import BlockMasks
from deit.ssl.method import EpochContext, Method
from deit.ssl.moco import MoCo
from deit.ssl.simclr import SimCLR
from deit.ssl.tokenizer import PatchTokenizer, TokenizerError

DEFAULT_TEMPERATURE = {"simclr": 0.5, "moco": 0.2, "mocov3": 0.2}


@dataclass(frozen=True)
class MethodSetup:
    """What a method may need to know of its run besides its config: the schedule, the data, the processes."""

    total_steps: int  # optimizer steps of the run: the momentum schedules' length
    num_images: int = 0  # training images: DeepCluster keeps a cluster for each
    image_size: int = 0  # CPC cuts its grid of patches from it
    mean: tuple[float, ...] = (0.5,)  # the data's normalisation: CMC converts colour images to Lab
    std: tuple[float, ...] = (0.5,)
    seed: int = 0
    layout: Distributed = field(default_factory=Distributed)  # MoCo and CMC queue every process's embeddings
    build_encoder: Callable[[int], nn.Module] | None = None  # CMC: the same architecture for C input channels


def build_method(backbone: Backbone, config: PretrainConfig, setup: MethodSetup) -> Method:
    heads = {"dim": config.dim, "hidden_dim": config.hidden_dim}
    temperature = config.temperature or DEFAULT_TEMPERATURE.get(config.method or "", 0.5)
    if config.method == "simclr":
        return SimCLR(backbone, **heads, layers=config.projector_layers, temperature=temperature)
    if config.method in ("moco", "mocov3"):
        version = 3 if config.method == "mocov3" else 2
        return MoCo(backbone, version=version, total_steps=setup.total_steps, **heads, queue_size=config.queue_size,
                    temperature=temperature, momentum=config.momentum, concat=setup.layout.concat)  # fmt: skip
    if config.method == "byol":
        return BYOL(backbone, total_steps=setup.total_steps, **heads, momentum=config.momentum)
    if config.method == "beit":
        if config.mask_target == "pixels":
            return BEiT(backbone, None, mask_ratio=config.mask_ratio)
        if config.tokenizer is None:
            raise TokenizerError(
                "BEiT predicts visual tokens: give --tokenizer FILE, made by `deit tokenizer` (or predict pixels: "
                "--set pretrain.mask_target=pixels)"
            )
        return BEiT(backbone, PatchTokenizer.load(config.tokenizer), mask_ratio=config.mask_ratio)
    if config.method == "deepcluster":
        settings = ClusterSettings(clusters=config.clusters, pca_dim=config.pca_dim, seed=setup.seed)
        return DeepCluster(backbone, num_images=setup.num_images, settings=settings)
    if config.method == "cpc":
        return CPC(backbone, image_size=setup.image_size, patch=config.cpc_patch, steps=config.cpc_steps)
    if config.method == "cmc":
        if setup.build_encoder is None:
            raise ValueError("CMC needs build_encoder, to make the second view's encoder")
        second = Backbone(setup.build_encoder(SECOND_VIEW_CHANNELS))
        return CMC(backbone, second, mean=setup.mean, std=setup.std, dim=config.dim, queue_size=config.queue_size,
                   temperature=config.temperature or 0.07, concat=setup.layout.concat)  # fmt: skip
    raise ValueError(f"unknown self-supervised method {config.method!r}")


def view_losses(parts: StepParts, batch: Batch) -> dict[str, torch.Tensor]:
    """The step's objective: the model is the method, the batch's images its two views (2B, C, H, W)."""
    with parts.precision.autocast():
        return parts.model(batch.images)  # Method.forward is its losses; through DDP's wrapper too


def masked_image_losses(masking: BlockMasks, parts: StepParts, batch: Batch) -> dict[str, torch.Tensor]:
    """BEiT's objective: each image's mask is drawn from its seed on the host, then moved to the device."""
    masks = masking(batch.seeds).to(parts.device, non_blocking=True)
    with parts.precision.autocast():
        return parts.model(batch.images, masks)


def indexed_view_losses(parts: StepParts, batch: Batch) -> dict[str, torch.Tensor]:
    """DeepCluster's objective: one view, and each image's index, which names its cluster."""
    with parts.precision.autocast():
        return parts.model(batch.images, batch.indices.to(parts.device, non_blocking=True))


def objective(method: Method) -> Callable[[StepParts, Batch], dict[str, torch.Tensor]]:
    """The losses of one micro-batch for ``method``, fed what its ``step_input`` says."""
    if method.step_input == "view and mask":
        vit = method.backbone.model
        return functools.partial(masked_image_losses, BlockMasks(vit.patch_embed.grid_size, ratio=method.mask_ratio))
    if method.step_input == "view and index":
        return indexed_view_losses
    return view_losses  # two views (SimCLR, MoCo, BYOL) or one (CPC), stacked in the batch's images


@torch.no_grad()
def embed(backbone: nn.Module, images: torch.Tensor, *, precision: Precision, batch_size: int = 512) -> torch.Tensor:
    """Unit-length features of normalised images (N, C, H, W), in batches, on the images' device."""
    backbone.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        with precision.autocast():
            features = backbone(images[start : start + batch_size])
        chunks.append(F.normalize(features.float(), dim=1))
    return torch.cat(chunks)


@torch.no_grad()
def knn_accuracy(
    backbone: nn.Module,
    bank_images: torch.Tensor,
    bank_labels: torch.Tensor,
    val_loader: DataLoader,
    *,
    device: torch.device,
    precision: Precision,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Top-1 (%) of a weighted kNN on the backbone's features: the memory bank is the training images.

    Each validation image takes its ``k`` most cosine-similar training images;
    each votes for its class with weight exp(similarity / temperature). With
    several processes, each scores its share of the validation images and
    ``reduce`` sums the counts.
    """
    bank = embed(backbone, bank_images.to(device), precision=precision)
    labels = bank_labels.to(device)
    counts = torch.zeros(2, device=device)  # correct, seen
    for images, targets in val_loader:
        features = embed(backbone, images.to(device), precision=precision)
        predicted = knn_predict(bank, labels, features, num_classes=num_classes, k=k, temperature=temperature)
        counts[0] += (predicted == targets.to(device)).sum()
        counts[1] += len(targets)
    correct, seen = (reduce(counts.cpu()) if reduce is not None else counts.cpu()).tolist()
    return {"acc1": 100.0 * correct / max(seen, 1), "num_samples": int(seen)}


def knn_monitor(
    method: Method, data: DataBundle, config: PretrainConfig, *, device: torch.device, precision: Precision, reduce
) -> dict[str, float]:
    """The kNN top-1 of the method's representation, its memory bank the in-memory training images, unaugmented."""
    train = data.train_loader.dataset  # InMemoryBatches: pretraining runs on the whole-batch path
    mean = torch.tensor(data.info.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.info.std).view(1, -1, 1, 1)
    bank = (train.images.float() / 255 - mean) / std
    return knn_accuracy(
        method.representation, bank, train.labels, data.val_loader, device=device, precision=precision,
        num_classes=data.info.num_classes, k=config.knn_k, temperature=config.knn_temperature, reduce=reduce,
    )  # fmt: skip


def epoch_context(
    data: DataBundle,
    *,
    device: torch.device,
    precision: Precision,
    optimizer: torch.optim.Optimizer,
    layout: Distributed,
) -> EpochContext:
    """What ``Method.before_epoch`` may look at: the in-memory training images, their labels, the optimizer."""
    train = data.train_loader.dataset  # InMemoryBatches: pretraining runs on the whole-batch path
    return EpochContext(train.images, train.labels.to(device), data.info.mean, data.info.std, device, precision,
                        optimizer, layout.broadcast)  # fmt: skip
