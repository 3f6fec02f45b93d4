"""``deit export``, ``deit predict``, ``deit verify-data`` and ``deit models``: working with trained models and data."""

from __future__ import annotations

import argparse
import json
import sys

from deit.models import EVAL_OUTPUTS, list_models


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    from deit.export import EXPORT_FORMATS, EXPORT_HEADS

    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint's model as safetensors, TorchScript or ONNX",
        description="Export a trained model for inference: it takes a normalised (B, C, H, W) batch of any size "
        "and returns (B, classes) logits; class names, mean, std and input size travel inside the file.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by deit train")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument(
        "--head",
        choices=EXPORT_HEADS,
        default="fused",
        help="prediction of a distilled model: fused (as trained), avg_logits, softmax_sum, cls or dist",
    )
    parser.add_argument("--ema", action="store_true", help="export the EMA of the weights")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from deit.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.output, format=args.format, head=args.head, use_ema=args.ema)
    print(f"wrote {path}")
    return 0


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="top-k classes of image files",
        description="Predict image files (PNG, JPEG, ...; grayscale or colour) with a trained checkpoint. "
        "Exit code 1 if some file could not be read; the others are still predicted.",
    )
    parser.add_argument("--checkpoint", required=True, help="a deit train checkpoint or an exported .safetensors")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--eval-output", choices=EVAL_OUTPUTS, help="prediction of a distilled model")
    parser.add_argument("--ema", action="store_true", help="predict with the EMA of the weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="one JSON list of {path, predictions, error}")
    parser.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from deit.predict import Predictor

    predictor = Predictor(args.checkpoint, use_ema=args.ema, eval_output=args.eval_output, device=args.device)
    predictions = predictor.predict(args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps([prediction.to_dict() for prediction in predictions], indent=2))
    for prediction in predictions:
        if prediction.error:
            print(f"deit: error: {prediction.path}: {prediction.error}", file=sys.stderr)
        elif not args.json:
            print(prediction.path)
            for name, probability in prediction.top:
                print(f"  {probability:7.2%}  {name}")
    return 1 if any(prediction.error for prediction in predictions) else 0


def add_verify_data_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify-data",
        help="find unreadable images in a folder",
        description="Decode every image file under --data-path (an ImageFolder tree or any folder) and list those "
        "that cannot be read: truncated, empty, or not an image. Exit code 1 if there are any.",
    )
    parser.add_argument("--data-path", required=True)
    parser.set_defaults(handler=run_verify_data)


def run_verify_data(args: argparse.Namespace) -> int:
    from deit.data.datasets import find_unreadable

    checked, problems = find_unreadable(args.data_path)
    for path, reason in problems:
        print(f"{path}: {reason}")
    print(f"{checked} image files checked, {len(problems)} unreadable", file=sys.stderr)
    return 1 if problems else 0


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the deit model variants")
    parser.add_argument("pattern", nargs="?", default="")
    parser.set_defaults(handler=lambda args: print("\n".join(list_models(args.pattern))) or 0)
