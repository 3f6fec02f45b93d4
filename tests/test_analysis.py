"""deit analyze / deit plot: the figures are checked against direct computations."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_fashion_mnist
from deit.analysis.agreement import agreement_matrix, confusion_matrix
from deit.analysis.attention import attention_per_layer, rollout, token_maps
from deit.analysis.tokens import head_cosine, token_cosines
from deit.checkpoint import FORMAT, save_checkpoint
from deit.cli import main
from deit.data.datasets import FASHION_MNIST_CLASSES
from deit.models import create_model


def tiny_student() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("deit_pico_distilled_patch4_28", num_classes=5, in_chans=1).eval()


def test_token_cosines_match_a_direct_computation():
    model, images = tiny_student(), torch.randn(3, 1, 28, 28)
    cosines = token_cosines(model, images)
    assert len(cosines) == 1 + 1 + len(model.blocks) + 1
    with torch.no_grad():
        tokens = model.forward_features(images)  # the output entry: after the final norm
    direct = sum(F.cosine_similarity(tokens[i, 0], tokens[i, 1], dim=0) for i in range(3)) / 3
    assert abs(cosines[-1] - direct.item()) < 1e-5
    first = F.cosine_similarity(model.cls_token[0, 0], model.dist_token[0, 0], dim=0)
    assert abs(cosines[0] - first.item()) < 1e-6
    rows = [F.cosine_similarity(model.head.weight[c], model.head_dist.weight[c], dim=0) for c in range(5)]
    assert abs(head_cosine(model) - (sum(rows) / 5).item()) < 1e-6


def test_agreement_and_confusion_match_counting():
    predictions = {
        "labels": torch.tensor([0, 1, 2, 2]),
        "cls": torch.tensor([0, 1, 1, 2]),
        "dist": torch.tensor([0, 2, 1, 2]),
    }
    matrix = agreement_matrix(predictions, ["labels", "cls", "dist"])
    assert torch.equal(matrix.diagonal(), torch.ones(3))
    assert matrix[0, 1] == 0.75 and matrix[0, 2] == 0.5 and matrix[1, 2] == 0.75 and torch.equal(matrix, matrix.T)
    confusion = confusion_matrix(predictions["labels"], predictions["cls"], 3)
    assert confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_rollout_rows_are_distributions_and_maps_cover_the_grid():
    model, images = tiny_student(), torch.randn(2, 1, 28, 28)
    layers = attention_per_layer(model, images)
    assert len(layers) == len(model.blocks) and layers[0].shape == (2, 2 + 49, 2 + 49)
    rolled = rollout(layers)
    assert torch.allclose(rolled.sum(dim=-1), torch.ones(2, 51), atol=1e-5)
    one_layer = rollout(layers[:1])  # a single layer: half attention, half identity
    assert torch.allclose(one_layer, 0.5 * layers[0] + 0.5 * torch.eye(51), atol=1e-6)
    maps = token_maps(model, images)
    assert set(maps) == {"cls_last", "dist_last", "cls_rollout", "dist_rollout"}
    for heat in maps.values():
        assert heat.shape == (2, 7, 7) and torch.allclose(heat.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)


def test_plot_draws_several_runs(tmp_path, capsys):
    for name, offset in (("a", 0.0), ("b", 0.5)):
        folder = tmp_path / name
        folder.mkdir()
        records = [
            {
                "epoch": e,
                "train": {"loss": 2.0 - e / 3 + offset, "lr": 1e-3 / e},
                "val": {"acc1": 50.0 + e, "cls_acc1": 49.0 + e, "dist_acc1": 51.0 + e},
            }
            for e in (1, 2, 3)
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    output = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path), "--output", str(output)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@needs_fashion_mnist
def test_analyze_writes_json_and_figures_for_a_student_and_its_baseline(tmp_path, capsys):
    student, baseline = tmp_path / "student.pth", tmp_path / "baseline.pth"
    for path, name in ((student, "deit_pico_distilled_patch7_28"), (baseline, "deit_pico_patch7_28")):
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_chans=1)
        spec = {"name": name, "num_classes": 10, "in_chans": 1, "img_size": 28, "options": {}}
        data = {"dataset": "fashion-mnist", "class_names": list(FASHION_MNIST_CLASSES), "input_size": 28,
                "mean": [0.286], "std": [0.353]}  # fmt: skip
        save_checkpoint({"format": FORMAT, "model": model.state_dict(), "model_spec": spec, "data": data}, path)
    out = tmp_path / "analysis"
    args = ["analyze", "--checkpoint", str(student), "--baseline", str(baseline), "--output-dir", str(out)]
    assert main([*args, "--num-images", "3"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["num_images"] == 10000
    assert result["agreement"]["predictors"] == ["labels", "baseline", "cls", "dist", "fused"]
    assert sum(map(sum, result["confusion"]["counts"])) == 10000
    assert abs(result["top1"]["prediction"] - result["agreement"]["percent"][0][4]) < 1e-6  # fused vs labels
    assert set(result["token_cosine"]) >= {"tokens", "input", "block 1", "output"}
    for name in ("agreement", "confusion", "token_cosine", "attention"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "agreement (%)" in capsys.readouterr().out


CHROMIUM = shutil.which("chromium")


def write_run(folder: Path) -> Path:
    folder.mkdir()
    records = [
        {"epoch": e, "train": {"loss": 1.0 / e, "lr": 1e-3}, "val": {"acc1": 50.0 + e, "acc5": 90.0}} for e in (1, 2)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.yaml").write_text("model:\n  name: <deit_pico>\n")
    return folder


def test_report_is_self_contained_and_escapes_text(tmp_path):
    run = write_run(tmp_path / "run")
    assert main(["report", str(run), "--output", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "&lt;deit_pico&gt;" in page  # the config is shown as text, not markup
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert "http://" not in page and "https://" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
@needs_fashion_mnist
def test_report_with_analysis_renders_in_headless_chromium(tmp_path):
    run = write_run(tmp_path / "run")
    checkpoint = tmp_path / "student.pth"
    torch.manual_seed(0)
    model = create_model("deit_pico_distilled_patch7_28", num_classes=10, in_chans=1)
    spec = {"name": "deit_pico_distilled_patch7_28", "num_classes": 10, "in_chans": 1, "img_size": 28, "options": {}}
    data = {"dataset": "fashion-mnist", "class_names": list(FASHION_MNIST_CLASSES), "input_size": 28,
            "mean": [0.286], "std": [0.353]}  # fmt: skip
    save_checkpoint({"format": FORMAT, "model": model.state_dict(), "model_spec": spec, "data": data}, checkpoint)
    assert (
        main(
            [
                "analyze",
                "--checkpoint",
                str(checkpoint),
                "--output-dir",
                str(tmp_path / "analysis"),
                "--num-images",
                "2",
            ]
        )
        == 0
    )
    report = tmp_path / "report.html"
    assert main(["report", str(run), "--analysis", str(tmp_path / "analysis"), "--output", str(report)]) == 0
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom"]
    dom = subprocess.run([*command, report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert loaded is not None, dom[:500]
    assert loaded.group(1) == loaded.group(2) == "5"  # curves + agreement, cosine, attention, confusion
