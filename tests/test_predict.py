"""deit predict: top-k classes of image files, with per-file errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import needs_fashion_mnist, write_image
from deit.checkpoint import load_checkpoint, model_from_checkpoint
from deit.cli import main
from deit.config import TrainConfig, with_overrides
from deit.data import build_eval_data
from deit.predict import Predictor
from deit.training import fit
from test_export import CLASS_NAMES, write_checkpoint


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("rgb") / "checkpoint.pth", in_chans=3)


def write_broken_files(folder):
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    write_image(folder / "whole.png", "RGB", "PNG", (30, 30), seed=1)
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:60])
    return [folder / name for name in ("empty.png", "notes.png", "truncated.png", folder / "missing.jpg")]


def test_every_image_mode_is_predicted_and_probabilities_sum_to_one(rgb_checkpoint, tmp_path):
    paths = []
    for index, (mode, fmt, suffix) in enumerate(
        [
            ("RGB", "PNG", ".png"),
            ("L", "PNG", ".png"),
            ("P", "PNG", ".png"),
            ("CMYK", "JPEG", ".jpg"),
            ("RGBA", "PNG", ".png"),
        ]
    ):
        paths.append(tmp_path / f"image{index}{suffix}")
        write_image(paths[-1], mode, fmt, (40 + index, 33), seed=index)
    predictions = Predictor(rgb_checkpoint).predict(paths, top_k=len(CLASS_NAMES))
    for prediction, path in zip(predictions, paths, strict=True):
        assert prediction.error is None and prediction.path == str(path)
        assert sorted(name for name, _ in prediction.top) == sorted(CLASS_NAMES)
        probabilities = [p for _, p in prediction.top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_broken_files_get_their_own_error_and_the_rest_is_predicted(rgb_checkpoint, tmp_path, capsys):
    broken = write_broken_files(tmp_path)
    good = tmp_path / "whole.png"
    args = ["predict", "--checkpoint", str(rgb_checkpoint), "--json", "--top-k", "2", str(good), *map(str, broken)]
    assert main(args) == 1  # some files failed
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [r["path"] for r in results] == [str(good), *map(str, broken)]
    assert results[0]["error"] is None and len(results[0]["predictions"]) == 2
    assert all(r["error"] and not r["predictions"] for r in results[1:])
    assert "no such file" in results[-1]["error"]
    for path in broken:
        assert str(path) in captured.err


@needs_fashion_mnist
def test_predictions_on_png_files_match_evaluation_of_a_trained_student(tmp_path, capsys):
    """Train briefly, write test images as PNG files, and predict them as a user would."""
    config = with_overrides(
        TrainConfig(),
        {
            "model.name": "deit_pico_distilled_patch7_28",
            "data.dataset": "fashion-mnist",
            "data.train_subset": 512,
            "optim.epochs": 1,
            "optim.batch_size": 64,
            "run.progress": False,
            "run.output_dir": str(tmp_path / "run"),
        },
    )
    fit(config)
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    state = load_checkpoint(checkpoint)
    loader, info = build_eval_data("fashion-mnist", None, batch_size=8, in_chans=1)
    images, _ = next(iter(loader))
    model = model_from_checkpoint(state).eval()
    with torch.no_grad():
        expected = model(images).softmax(-1)
    paths = []
    for index in range(8):
        paths.append(tmp_path / f"test{index}.png")
        Image.fromarray(loader.dataset.images[index, 0].numpy(), mode="L").save(paths[-1])  # (28, 28) uint8
    assert main(["predict", "--checkpoint", str(checkpoint), "--top-k", "1", *map(str, paths)]) == 0
    printed = capsys.readouterr().out
    for index, path in enumerate(paths):
        best = int(expected[index].argmax())
        assert f"{path}\n" in printed
        assert info.class_names[best] in printed.split(f"{path}\n")[1].splitlines()[0]
    predictions = Predictor(checkpoint).predict(paths, top_k=1)
    for index, prediction in enumerate(predictions):
        name, probability = prediction.top[0]
        assert name == info.class_names[int(expected[index].argmax())]
        assert probability == pytest.approx(float(expected[index].max()), abs=1e-5)
