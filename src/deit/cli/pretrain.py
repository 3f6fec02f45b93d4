"""``deit pretrain``, ``deit tokenizer`` and ``deit linear-probe``: self-supervised pretraining and its score."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from deit.cli.train import add_config_arguments, train_config_from_args
from deit.config import PRETRAIN_METHODS as METHODS
from deit.config import with_overrides
from deit.data import canonical_dataset_name

log = logging.getLogger("deit")


def add_pretrain_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining of a backbone: " + ", ".join(METHODS),
        description="Pretrain a backbone without labels (they only score it: a kNN classifier on its features after "
        "every epoch). Takes deit train's flags: --model, --data-set, --data-path, --epochs, --batch-size, "
        "--output-dir, --resume, --config ... Then score it with `deit linear-probe` and start a classifier from "
        "it with `deit train --init`.",
    )
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--tokenizer", help="BEiT: the visual tokenizer `deit tokenizer` wrote [pretrain.tokenizer]")
    add_config_arguments(parser)
    parser.set_defaults(handler=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from deit.training import fit

    overrides = {"pretrain.method": args.method}
    if args.tokenizer:
        overrides["pretrain.tokenizer"] = args.tokenizer
    config = with_overrides(train_config_from_args(args), overrides)
    if _is_plain_folder(config.data.dataset, config.data.path):
        log.info("%s has no train/ and val/ class folders: pretraining on every image in it, without labels "
                 "(no kNN monitor)", config.data.path)  # fmt: skip
        config = with_overrides(config, {"data.dataset": "unlabeled"})
    result = fit(config)
    knn = result.final.get("acc1")  # None where no kNN monitor ran (no labelled validation images)
    best = result.best_acc1 if knn is not None else None
    print(json.dumps({"knn_acc1": knn, "best_knn_acc1": best}, indent=2))
    return 0


def _is_plain_folder(dataset: str, path: str | None) -> bool:
    """An image-folder data set whose folder is not laid out by class: labels are not needed to pretrain."""
    if path is None or canonical_dataset_name(dataset) != "imagefolder" or not Path(path).is_dir():
        return False
    return not ((Path(path) / "train").is_dir() and (Path(path) / "val").is_dir())


def add_linear_probe_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "linear-probe",
        help="score a backbone's frozen features: a linear classifier and kNN, beside random init and raw pixels",
        description="Fit a logistic regression (L-BFGS, C = 1) on the frozen features of the backbone in "
        "--checkpoint (a deit pretrain or deit train checkpoint) and report its top-1, and the kNN monitor's, "
        "next to the same architecture at random init and to the raw pixels.",
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-set", help="default: the checkpoint's data set")
    parser.add_argument("--data-path", help="default: the checkpoint's data path, for its own data set")
    parser.add_argument("--label-fraction", type=float, help="fit on this class-balanced share of the labels")
    parser.add_argument("--seed", type=int, default=0, help="draws the labelled share and the random-init baseline")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="none", help="none, bf16, fp16 (feature extraction only)")
    parser.add_argument("--no-baselines", action="store_true", help="probe the checkpoint only")
    parser.add_argument("--output", help="also write the scores to this JSON file")
    parser.set_defaults(handler=run_linear_probe)


def run_linear_probe(args: argparse.Namespace) -> int:
    from deit.ssl.probe import format_scores, probe_checkpoint

    scores = probe_checkpoint(
        args.checkpoint, dataset=args.data_set, data_path=args.data_path, label_fraction=args.label_fraction,
        seed=args.seed, batch_size=args.batch_size, device=args.device, amp=args.amp,
        baselines=not args.no_baselines,
    )  # fmt: skip
    print(format_scores(scores))
    if args.output:
        Path(args.output).write_text(json.dumps([asdict(score) for score in scores], indent=2))
    return 0


def add_tokenizer_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenizer",
        help="fit BEiT's visual tokenizer: a k-means codebook of image patches",
        description="Fit a codebook of --codebook-size tokens to patches of the training images (normalised, the "
        "ViT's patch size), by k-means, and write it for `deit pretrain --method beit --tokenizer FILE`.",
    )
    parser.add_argument("--data-set", default="fashion-mnist")
    parser.add_argument("--data-path")
    parser.add_argument("--input-size", type=int, help="default: the data set's own")
    parser.add_argument("--in-chans", type=int, help="image folders: 1 to read grayscale, 3 for RGB")
    parser.add_argument("--patch-size", type=int, required=True, help="the ViT's patch size, e.g. 7 or 4 at 28 px")
    parser.add_argument("--kind", choices=("kmeans", "dvae"), default="kmeans",
                        help="a k-means codebook, or a small discrete VAE (see docs/pretraining.md)")  # fmt: skip
    parser.add_argument("--codebook-size", type=int, default=256, help="tokens (BEiT's dVAE has 8192)")
    parser.add_argument("--samples", type=int, default=100_000, help="random patches the codebook is fitted to")
    parser.add_argument("--bad-files", default="error", choices=("error", "skip"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="a .safetensors file")
    parser.set_defaults(handler=run_tokenizer)


def run_tokenizer(args: argparse.Namespace) -> int:
    import torch

    from deit.data import build_probe_data
    from deit.ssl.tokenizer import train_tokenizer

    dataset = "unlabeled" if _is_plain_folder(args.data_set, args.data_path) else args.data_set
    train_loader, val_loader, info = build_probe_data(
        dataset, args.data_path, batch_size=512, input_size=args.input_size, in_chans=args.in_chans,
        bad_files=args.bad_files,
    )  # fmt: skip
    images = torch.cat([batch for batch, _ in train_loader])  # normalised, unaugmented: what the ViT sees
    held_out = [batch for batch, _ in val_loader]  # a plain folder has no validation images
    tokenizer = train_tokenizer(images, patch_size=args.patch_size, codebook_size=args.codebook_size,
                                dataset=info.name, kind=args.kind, samples=args.samples,
                                held_out=torch.cat(held_out) if held_out else None, seed=args.seed)  # fmt: skip
    tokenizer.save(args.output)
    print(json.dumps({"output": args.output, **asdict(tokenizer.info), "codebook_size": tokenizer.size,
                      "fingerprint": tokenizer.fingerprint()}, indent=2))  # fmt: skip
    return 0
