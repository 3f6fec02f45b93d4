"""Using a pretrained backbone: `deit train --init`, the linear probe and its kNN."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import needs_fashion_mnist
from deit.checkpoint import Checkpoint, DataSpec, ModelSpec
from deit.config import PretrainConfig
from deit.errors import ModelError
from deit.models import create_model
from deit.ssl.backbone import Backbone
from deit.ssl.knn import knn_predict
from deit.ssl.pretrain import MethodSetup, build_method
from deit.ssl.probe import Features, fit_logistic, score
from deit.ssl.transfer import head_keys, init_from_pretrained, load_backbone

DATA = DataSpec("fashion-mnist", tuple(f"c{i}" for i in range(10)), (0.5,), (0.25,), 28)


def save_pretrained(path, name: str = "deit_pico_patch7_28", method: str = "simclr") -> nn.Module:
    """A pretraining checkpoint of ``method`` around ``name``, with non-default weights; returns the method."""
    torch.manual_seed(1)
    spec = ModelSpec(name, 10, 1, 28)
    config = PretrainConfig(method=method, dim=16, hidden_dim=32)
    module = build_method(Backbone(spec.build()), config, MethodSetup(total_steps=10))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter))  # so that "loaded" and "fresh" cannot agree by chance
    Checkpoint(model=module.state_dict(), model_spec=spec, data=DATA, config={"pretrain": {"method": method}}).save(
        path
    )
    return module


def test_init_loads_the_backbone_into_a_distilled_student_and_keeps_its_heads_and_token_fresh(tmp_path):
    pretrained = save_pretrained(tmp_path / "simclr.pth").backbone.model
    torch.manual_seed(2)
    student = create_model("deit_pico_distilled_patch7_28", num_classes=10, in_chans=1, img_size=28)
    fresh = {key: value.clone() for key, value in student.state_dict().items()}
    notes = init_from_pretrained(student, tmp_path / "simclr.pth")
    state = student.state_dict()
    for key, value in pretrained.state_dict().items():
        if key.startswith("blocks.") or key in ("cls_token", "patch_embed.proj.weight", "norm.weight"):
            assert torch.equal(state[key], value), key
    for key in ("head.weight", "head_dist.weight", "dist_token"):
        assert torch.equal(state[key], fresh[key]), key
    # position rows: the class token's and the patches' come from the backbone, the distillation token's is fresh
    assert torch.equal(state["pos_embed"][:, 0], pretrained.pos_embed[:, 0])
    assert torch.equal(state["pos_embed"][:, 2:], pretrained.pos_embed[:, 1:])
    assert torch.equal(state["pos_embed"][:, 1], fresh["pos_embed"][:, 1])
    assert "simclr" in notes[0] and "head.weight" in notes[0] and any("distillation token" in n for n in notes)


def test_init_resamples_the_position_embedding_for_a_new_input_size(tmp_path):
    save_pretrained(tmp_path / "simclr.pth")
    student = create_model("deit_pico_patch7_28", num_classes=10, in_chans=1, img_size=42)
    notes = init_from_pretrained(student, tmp_path / "simclr.pth")
    assert student.pos_embed.shape[1] == 1 + 36 and any("resampled" in note for note in notes)


def test_init_of_a_small_resnet_teacher_leaves_only_its_classifier_fresh(tmp_path):
    pretrained = save_pretrained(tmp_path / "byol.pth", "resnet8_small", "byol").backbone.model
    teacher = create_model("resnet8_small", num_classes=10, in_chans=1, img_size=28)
    fresh_fc = teacher.fc.weight.clone()
    init_from_pretrained(teacher, tmp_path / "byol.pth")
    assert head_keys(teacher) == {"fc.weight", "fc.bias"}
    assert torch.equal(teacher.fc.weight, fresh_fc)
    for key, value in pretrained.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(teacher.state_dict()[key], value), key


def test_init_from_another_architecture_names_what_does_not_fit(tmp_path):
    save_pretrained(tmp_path / "simclr.pth")
    wider = create_model("deit_nano_patch7_28", num_classes=10, in_chans=1, img_size=28)
    with pytest.raises((ModelError, RuntimeError), match="size mismatch|does not fit"):
        init_from_pretrained(wider, tmp_path / "simclr.pth")
    resnet = create_model("resnet8_small", num_classes=10, in_chans=1, img_size=28)
    with pytest.raises(ModelError, match="does not fit this model: missing"):
        init_from_pretrained(resnet, tmp_path / "simclr.pth")


def test_init_and_finetune_together_are_refused(tmp_path):
    from deit.config import ModelConfig
    from deit.run import RunError, _build_student

    spec = ModelSpec("deit_pico_patch7_28", 10, 1, 28)
    with pytest.raises(RunError, match="not both"):
        _build_student(spec, ModelConfig(finetune="a.pth", init="b.pth"))


def test_the_loaded_backbone_computes_the_pretrained_features(tmp_path):
    method = save_pretrained(tmp_path / "moco.pth", method="moco").eval()
    backbone, checkpoint = load_backbone(tmp_path / "moco.pth")
    images = torch.randn(4, 1, 28, 28)
    assert torch.allclose(backbone.eval()(images), method.backbone(images), atol=1e-6)
    with pytest.raises(Exception, match="linear-probe"):
        checkpoint.build_model()  # a pretraining checkpoint is no classifier: the error says what to use


def test_knn_votes_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[0.96, 0.28]])  # similarities 0.96, 0.936, 0.28
    # k = 2: class 0 gets exp(0.96 / T), class 1 exp(0.936 / T): class 0 wins; k = 3 adds exp(0.28 / T) to class 1
    assert knn_predict(bank, labels, query, num_classes=2, k=2, temperature=1.0).item() == 0
    assert knn_predict(bank, labels, query, num_classes=2, k=3, temperature=1.0).item() == 1
    assert knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.01).item() == 0


def test_the_probe_finds_the_informative_features_and_not_the_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=generator)
    noise = torch.randn(600, 8, generator=generator)
    informative = noise.clone()
    informative[:, :3] += 4 * nn.functional.one_hot(labels, 3)  # each class lifts its own coordinate
    split = 400

    def features(x):
        return Features(x[:split], labels[:split], x[split:], labels[split:])

    good, bad = score("informative", features(informative), 3), score("noise", features(noise), 3)
    assert good.linear_acc1 > 95 and good.knn_acc1 > 90
    assert bad.linear_acc1 < 50 and bad.knn_acc1 < 50
    classifier = fit_logistic(informative[:split], labels[:split], 3)
    assert classifier(informative[:split]).shape == (split, 3)


@needs_fashion_mnist
def test_linear_probe_command_scores_the_checkpoint_beside_both_baselines(tmp_path, capsys):
    from deit.cli.main import main

    save_pretrained(tmp_path / "simclr.pth")
    out = tmp_path / "probe.json"
    code = main(["linear-probe", "--checkpoint", str(tmp_path / "simclr.pth"), "--label-fraction", "0.01",
                 "--device", "cpu", "--output", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "random init" in printed and "raw pixels" in printed
    scores = json.loads(out.read_text())
    assert [s["dim"] for s in scores] == [64, 64, 784]
    raw = scores[2]
    assert 60 < raw["linear_acc1"] < 90 and 50 < raw["knn_acc1"] < 90  # 600 labelled images of Fashion-MNIST


def plain_folder(root, count: int = 40):
    """``count`` images of mixed modes and sizes under ``root``, some in a subfolder, none in class folders."""
    from conftest import IMAGE_KINDS, write_image

    (root / "more").mkdir(parents=True)
    for i in range(count):
        mode, suffix, fmt = IMAGE_KINDS[i % len(IMAGE_KINDS)]
        write_image((root / "more" if i % 3 else root) / f"photo{i}{suffix}", mode, fmt, (30 + i % 7, 26), seed=i)
    (root / "broken.png").write_bytes(b"not a png at all")
    return root


PRETRAIN_FLAGS = ["--model", "deit_pico_patch4_28", "--input-size", "28", "--epochs", "1", "--batch-size", "16",
                  "--warmup-epochs", "0", "--no-progress"]  # fmt: skip


def test_pretraining_on_a_folder_without_class_folders_skips_the_broken_file(tmp_path, caplog, capsys):
    import json

    from deit.checkpoint import Checkpoint
    from deit.cli.main import main

    photos = plain_folder(tmp_path / "photos")
    out = tmp_path / "run"
    base = ["pretrain", "--method", "byol", "--data-set", "imagefolder", "--data-path", str(photos), *PRETRAIN_FLAGS]
    assert main([*base, "--output-dir", str(tmp_path / "refused")]) == 2  # the broken file is named, nothing runs
    assert not (tmp_path / "refused" / "checkpoint.pth").exists()
    with caplog.at_level("WARNING"):
        assert main([*base, "--bad-files", "skip", "--output-dir", str(out)]) == 0
    assert "broken.png" in caplog.text
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :]) == {"knn_acc1": None, "best_knn_acc1": None}  # no monitor ran
    saved = Checkpoint.load(out / "checkpoint.pth")
    assert saved.epoch == 1 and saved.data.dataset == "unlabeled" and "val" not in saved.history[0]
    student = tmp_path / "student"
    pretrained = str(out / "checkpoint.pth")
    code = main(["train", "--data-set", "imagefolder", "--data-path", str(photos), "--init", pretrained,
                 *PRETRAIN_FLAGS, "--output-dir", str(student)])  # fmt: skip
    assert code == 2  # a classifier needs train/<class>/ and val/<class>/ folders: said, not crashed


def test_a_broken_file_in_a_plain_folder_is_named(tmp_path, capsys):
    from deit.cli.main import main

    photos = plain_folder(tmp_path / "photos", count=20)
    code = main(["pretrain", "--method", "simclr", "--data-set", "imagefolder", "--data-path", str(photos),
                 *PRETRAIN_FLAGS])  # fmt: skip
    assert code == 2 and "broken.png" in capsys.readouterr().err


@needs_fashion_mnist
def test_simclrv2_three_commands_pretrain_finetune_on_few_labels_then_distil(tmp_path):
    """docs/pretraining.md's recipe, small: the fine-tuned network teaches the student on the unlabelled images."""
    from deit.checkpoint import Checkpoint
    from deit.cli.main import main

    small = ["--data-set", "fashion-mnist", "--train-subset", "512", "--batch-size", "64", "--warmup-epochs", "0",
             "--no-progress", "--eval-interval", "2"]  # fmt: skip
    pre, tuned, student = tmp_path / "pretrain", tmp_path / "finetune", tmp_path / "student"
    assert main(["pretrain", "--method", "simclr", "--set", "pretrain.projector_layers=3", "--model",
                 "deit_pico_patch7_28", "--epochs", "2", *small, "--output-dir", str(pre)]) == 0  # fmt: skip
    assert main(["train", "--init", str(pre / "checkpoint.pth"), "--model", "deit_pico_patch7_28", "--label-fraction",
                 "0.25", "--epochs", "2", *small, "--output-dir", str(tuned)]) == 0  # fmt: skip
    assert main(["train", "--model", "deit_pico_distilled_patch7_28", "--teacher-path", str(tuned / "checkpoint.pth"),
                 "--distillation-type", "soft", "--mixup", "0", "--cutmix", "0", "--label-fraction", "0.25",
                 "--epochs", "2", *small, "--output-dir", str(student)]) == 0  # fmt: skip
    projector = [key for key in Checkpoint.load(pre / "checkpoint.pth").model if key.startswith("projector.")]
    assert sum(key.endswith(".weight") and "running" not in key for key in projector) >= 3 + 2  # 3 linear, 2 BN
    finished = Checkpoint.load(student / "checkpoint.pth")
    assert finished.epoch == 2 and finished.history[-1]["val"]["acc1"] > 10
    assert finished.history[-1]["teacher"]["acc1"] > 10  # the fine-tuned network was the teacher, and was scored


def test_linear_probe_on_another_data_set_a_colour_image_folder(tmp_path, make_image_folder):
    """A grayscale 28 px backbone probed on colour images of other sizes: read as gray, resized, scored."""
    from deit.ssl.probe import probe_checkpoint

    save_pretrained(tmp_path / "simclr.pth")
    folder = make_image_folder(classes=("ant", "bee", "cat"), per_class={"train": 6, "val": 3})
    scores = probe_checkpoint(tmp_path / "simclr.pth", dataset="imagefolder", data_path=str(folder))
    assert [s.dim for s in scores] == [64, 64, 28 * 28]  # raw pixels: the folder read as the backbone sees it
    assert all(0 <= s.linear_acc1 <= 100 and 0 <= s.knn_acc1 <= 100 for s in scores)
