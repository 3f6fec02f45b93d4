"""``deit train``, ``deit eval`` and ``deit demo``: each builds its settings from the flags and calls the library."""

from __future__ import annotations

import argparse
import json
import logging

from deit.config import TrainConfig, list_presets, load_config, parse_assignment, with_overrides
from deit.losses import DISTILLATION_TYPES, KL_REDUCTIONS
from deit.models import EVAL_OUTPUTS

log = logging.getLogger("deit")


def _float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


# (flag, config key, type, help); flags follow the official DeiT code where it has one.
# A flag left out keeps the value of --config (or the default), so presets stay in charge.
TRAIN_FLAGS: list[tuple[str, str, object, str]] = [
    ("--model", "model.name", str, "deit variant (see `deit models`) or any timm model, e.g. resnet18 for a teacher"),
    ("--finetune", "model.finetune", str, "start from these weights (deit checkpoint, official .pth, timm state dict)"),
    ("--init", "model.init", str, "start from the backbone of a `deit pretrain` (or train) checkpoint, heads fresh"),
    ("--drop-path", "model.drop_path", float, "stochastic depth rate"),
    ("--drop", "model.dropout", float, "dropout rate"),
    ("--attn-impl", "model.attn_impl", str, "attention kernel: sdpa, math, auto (math on CPU under bf16, else sdpa)"),
    (
        "--eval-output",
        "model.eval_output",
        str,
        f"what a distilled model predicts at test time: {', '.join(EVAL_OUTPUTS)}",
    ),
    ("--data-set", "data.dataset", str, "fashion-mnist, cifar10, cifar100, imagefolder (also CIFAR = cifar100, IMNET)"),
    ("--data-path", "data.path", str, "folder of the data set (ImageFolder: with train/ and val/)"),
    ("--input-size", "data.input_size", int, "image side in pixels (default: the data set's own)"),
    ("--in-chans", "data.in_chans", int, "image folders: 1 to read grayscale, 3 for RGB"),
    ("--train-subset", "data.train_subset", int, "train on a seeded class-balanced subset of this many images"),
    ("--num-workers", "data.num_workers", int, "data loader worker processes"),
    (
        "--label-fraction",
        "data.label_fraction",
        float,
        "keep this seeded, per-class share of the training labels (e.g. 0.1); the rest become unlabelled images",
    ),
    (
        "--unlabeled-data-path",
        "data.unlabeled_path",
        str,
        "a folder of images (class subfolders or not) added to training without labels; needs a teacher",
    ),
    (
        "--unlabeled-ratio",
        "data.unlabeled_ratio",
        float,
        "share of each batch given to unlabelled images (default: their share of the training pool)",
    ),
    (
        "--bad-files",
        "data.bad_files",
        str,
        "unreadable images in a folder: error (stop, naming the file) or skip (leave them out, with a warning)",
    ),
    (
        "--decode-budget-gb",
        "data.decode_budget_gb",
        float,
        "decode a small-image folder once into memory when it fits this many GB (0: image by image)",
    ),
    ("--decode-cache", "data.decode_cache", str, "folder for decoded image arrays kept between runs; none: no copy"),
    ("--hflip", "augment.hflip", float, "horizontal flip probability"),
    ("--aa", "augment.rand_augment", str, "RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (the paper's); none: off"),
    ("--reprob", "augment.random_erasing", float, "Random Erasing probability (the paper: 0.25)"),
    ("--mixup", "augment.mixup", float, "Mixup alpha, 0 = off (the paper: 0.8)"),
    ("--cutmix", "augment.cutmix", float, "CutMix alpha, 0 = off (the paper: 1.0)"),
    ("--mixup-prob", "augment.mix_prob", float, "probability of mixing a batch"),
    ("--mixup-switch-prob", "augment.mix_switch_prob", float, "probability of CutMix rather than Mixup"),
    ("--repeated-aug", "augment.repeated_aug", int, "copies of each sampled image per epoch (the paper: 3; 1 = off)"),
    ("--epochs", "optim.epochs", int, "training epochs"),
    ("--batch-size", "optim.batch_size", int, "images per step and process"),
    ("--lr", "optim.lr", float, "learning rate for a global batch of 512 (scaled linearly)"),
    ("--min-lr", "optim.min_lr", float, "end of the cosine decay"),
    ("--warmup-epochs", "optim.warmup_epochs", float, "linear warm-up length in epochs"),
    ("--weight-decay", "optim.weight_decay", float, "AdamW weight decay"),
    ("--smoothing", "optim.label_smoothing", float, "label smoothing"),
    ("--clip-grad", "optim.clip_grad", _float_or_none, "clip the global gradient norm to this value; none: off"),
    (
        "--accum-steps",
        "optim.accum_steps",
        int,
        "micro-batches per optimizer step (global batch = batch x processes x this)",
    ),
    (
        "--model-ema-decay",
        "optim.ema_decay",
        _float_or_none,
        "keep an EMA of the weights with this decay per step (official code: 0.99996); none: off",
    ),
    ("--distillation-type", "distill.type", str, f"one of {', '.join(DISTILLATION_TYPES)}"),
    ("--distillation-alpha", "distill.alpha", float, "weight of the teacher term (label term: 1 - alpha)"),
    ("--distillation-tau", "distill.tau", float, "soft distillation temperature"),
    ("--kl-reduction", "distill.kl_reduction", str, f"soft distillation KL reduction: {', '.join(KL_REDUCTIONS)}"),
    (
        "--teacher-model",
        "distill.teacher_model",
        str,
        "teacher architecture (timm name) for a --teacher-path from elsewhere",
    ),
    ("--teacher-path", "distill.teacher_path", str, "teacher weights: a `deit train` checkpoint or an official .pth"),
    (
        "--teacher-cache-views",
        "distill.teacher_cache_views",
        int,
        "keep the teacher's logits for this many fixed augmented views per image and reuse them (in-memory data)",
    ),
    (
        "--pseudo-labels",
        "distill.pseudo_labels",
        str,
        "a `deit pseudo-label` file: the student distils from these stored predictions instead of a teacher",
    ),
    ("--output-dir", "run.output_dir", str, "where checkpoints and logs go"),
    ("--resume", "run.resume", str, "checkpoint to continue from, or 'auto' for the output dir's latest"),
    (
        "--checkpoint-steps",
        "run.checkpoint_steps",
        int,
        "also write checkpoint.pth every this many optimizer steps (exact resume inside an epoch)",
    ),
    ("--seed", "run.seed", int, "random seed"),
    ("--eval-interval", "run.eval_interval", int, "evaluate every N epochs (and after the last)"),
    ("--log-interval", "run.log_interval", int, "steps between progress lines when stderr is not a terminal"),
    ("--tensorboard", "run.tensorboard", str, "also log steps and epochs to TensorBoard in this folder"),
    ("--device", "run.device", str, "auto, cpu, cuda, cuda:N"),
    ("--amp", "run.amp", str, "autocast precision: none, bf16, fp16, auto (bf16 where native, else fp32)"),
]
TRAIN_SWITCHES = [
    ("--teacher-pretrained", "distill.teacher_pretrained", True, "download timm's weights for --teacher-model"),
    ("--download", "data.download", True, "download Fashion-MNIST / CIFAR if missing"),
    ("--no-progress", "run.progress", False, "no progress bar"),
    ("--compile", "run.compile", "inductor", "torch.compile the student and the teacher (inductor backend)"),
    ("--teacher-channels-last", "distill.teacher_channels_last", True, "teacher in channels-last format (default)"),
    ("--no-teacher-channels-last", "distill.teacher_channels_last", False, "keep the teacher's memory format"),
    ("--no-eval-teacher", "run.eval_teacher", False, "skip the teacher's own evaluation"),
]


def _dest(key: str) -> str:
    return key.replace(".", "__")


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a DeiT student (or a CNN teacher)",
        description="Train a model. Start from --config (a YAML file or a bundled preset), then flags override it.",
    )
    add_config_arguments(parser)
    parser.set_defaults(handler=run_train)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, every training flag and --set: what ``train_config_from_args`` reads."""
    parser.add_argument("--config", help=f"YAML config file or preset name ({', '.join(list_presets())})")
    for flag, key, kind, text in TRAIN_FLAGS:
        parser.add_argument(
            flag,
            dest=_dest(key),
            type=kind,
            default=argparse.SUPPRESS,
            metavar=key.split(".")[1].upper(),
            help=f"{text} [{key}]",
        )
    for flag, key, value, text in TRAIN_SWITCHES:
        parser.add_argument(
            flag, dest=_dest(key), action="store_const", const=value, default=argparse.SUPPRESS, help=f"{text} [{key}]"
        )
    parser.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="any config keys, e.g. optim.betas=[0.9,0.95] optim.lr=1e-3 (repeatable)",
    )


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = load_config(args.config) if args.config else TrainConfig()
    # flags the user gave, and only those: an absent flag leaves the preset's value, `--aa none` clears it
    given = vars(args)
    keys = [key for _, key, _, _ in TRAIN_FLAGS] + [key for _, key, _, _ in TRAIN_SWITCHES]
    overrides = {key: given[_dest(key)] for key in keys if _dest(key) in given}
    overrides.update(parse_assignment(text) for text in args.set)
    return with_overrides(config, overrides)


def run_train(args: argparse.Namespace) -> int:
    from deit.training import fit

    result = fit(train_config_from_args(args))
    summary = {
        "final": result.final,
        "best_acc1": result.best_acc1,
        "teacher": result.teacher,
        "seconds": result.seconds,
    }
    if result.output_dir is not None:
        (result.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("wrote %s", result.output_dir)
    print(json.dumps({"acc1": result.final.get("acc1"), "best_acc1": result.best_acc1}))
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate every head of a checkpoint", description="Evaluate a `deit train` checkpoint."
    )
    parser.add_argument(
        "--checkpoint", "--resume", dest="checkpoint", required=True, help="a checkpoint written by deit train"
    )
    parser.add_argument("--data-set", help="default: the checkpoint's data set")
    parser.add_argument("--data-path", help="default: the checkpoint's data path")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--amp", help="none, bf16, fp16 or auto (default: the precision the checkpoint's run trained with)"
    )
    parser.add_argument(
        "--eval-output", choices=EVAL_OUTPUTS, help="prediction of a distilled model (default: as trained)"
    )
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA of the weights (--model-ema-decay runs)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from deit.evaluation import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint,
        dataset=args.data_set,
        data_path=args.data_path,
        batch_size=args.batch_size,
        device=args.device,
        amp=args.amp,
        eval_output=args.eval_output,
        use_ema=args.ema,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"{'prediction':<14} {'top-1':>7} {'top-5':>7}")
    for head in ("", "cls_", "dist_", "avg_logits_", "softmax_sum_"):
        if f"{head}acc1" in metrics:
            print(f"{head.rstrip('_') or 'prediction':<14} {metrics[f'{head}acc1']:7.2f} {metrics[f'{head}acc5']:7.2f}")
    print(f"{metrics['num_samples']} images, loss {metrics['loss']:.4f}")
    return 0


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    from deit.demo import DemoSettings

    defaults = DemoSettings()
    parser = subparsers.add_parser(
        "demo",
        help="teacher + three students on Fashion-MNIST, as the paper's distillation table",
        description="Train a CNN teacher, then the DeiT student without distillation, with soft and with hard "
        "distillation on 2,000 images with the paper's augmentation (the fashion_mnist_data_limited preset), and "
        "print a table in the form of the paper's.",
    )
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--data-path", default=None, help="Fashion-MNIST IDX folder (default: Debian's)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="student epochs (default: the preset's)")
    parser.add_argument("--teacher-epochs", type=int, default=defaults.teacher_epochs, help="default: the preset's")
    parser.add_argument(
        "--train-subset", type=int, default=defaults.train_subset, help="student images (default: the preset's)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from deit.demo import DemoSettings, run_demo

    settings = DemoSettings(
        output_dir=args.output_dir,
        data_path=args.data_path,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        train_subset=args.train_subset or None,
        seed=args.seed,
        progress=not args.no_progress,
    )
    report = run_demo(settings)
    print(report.markdown)
    print(f"\nwrote {report.markdown_path} and {report.json_path}")
    return 0
