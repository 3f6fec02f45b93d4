"""Run configuration: defaults, overrides, type checks, YAML round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from deit.config import (
    ALLOWED,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    parse_assignment,
    save_config,
    validate,
    with_overrides,
)
from deit.models import is_deit_model


def test_defaults():
    config = TrainConfig()
    assert is_deit_model(config.model.name) and "distilled" in config.model.name
    assert config.data.dataset == "fashion-mnist"
    assert config.optim.lr == 5e-4 and config.optim.batch_size == 64 and config.optim.epochs == 300
    assert config.optim.betas == (0.9, 0.999)
    assert config.optim.weight_decay == 0.05
    assert config.distill.type == "none" and config.distill.alpha == 0.5 and config.distill.tau == 1.0
    assert config.run.output_dir is None and config.run.resume is None
    assert TrainConfig() == TrainConfig()


def test_with_overrides_returns_a_new_config():
    base = TrainConfig()
    new = with_overrides(base, {"optim.lr": 1e-3, "distill.type": "hard", "model.name": "deit_pico_patch4_28"})
    assert new is not base
    assert (new.optim.lr, new.distill.type, new.model.name) == (1e-3, "hard", "deit_pico_patch4_28")
    assert base == TrainConfig()  # the original is unchanged
    assert new.data == base.data  # untouched sections are kept
    assert new.optim.batch_size == base.optim.batch_size


def test_configs_are_frozen():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim = None


@pytest.mark.parametrize(
    ("key", "named"),
    [("optim.learning_rate", "optim.learning_rate"), ("optimizer.lr", "optimizer.lr"), ("model", "model")],
)
def test_unknown_keys_raise_naming_them(key, named):
    with pytest.raises(ConfigError, match=named):
        with_overrides(TrainConfig(), {key: 1})


def test_unknown_sections_in_a_dict_raise_naming_them():
    with pytest.raises(ConfigError, match="trainer"):
        config_from_dict({"trainer": {"epochs": 3}})
    with pytest.raises(ConfigError, match="optim"):
        config_from_dict({"optim": 3})


def test_int_is_coerced_to_float():
    config = with_overrides(TrainConfig(), {"optim.lr": 1, "optim.clip_grad": 2})
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.clip_grad == 2.0 and isinstance(config.optim.clip_grad, float)


def test_list_is_coerced_to_tuple_for_betas():
    config = with_overrides(TrainConfig(), {"optim.betas": [0.8, 0.99]})
    assert config.optim.betas == (0.8, 0.99)
    assert isinstance(config.optim.betas, tuple)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("optim.epochs", 3.5),
        ("optim.epochs", "3"),
        ("optim.epochs", True),
        ("optim.lr", "fast"),
        ("optim.lr", True),
        ("optim.scale_lr", 1),
        ("model.name", 3),
        ("optim.betas", 0.9),
        ("optim.epochs", None),  # not optional
    ],
)
def test_wrong_types_raise(key, value):
    with pytest.raises(ConfigError, match=key):
        with_overrides(TrainConfig(), {key: value})


@pytest.mark.parametrize("betas", [["a", "b"], [0.9], [0.9, 0.99, 0.999]])
def test_malformed_betas_raise_config_error(betas):
    with pytest.raises(ConfigError, match="optim.betas"):
        with_overrides(TrainConfig(), {"optim.betas": betas})


def test_optional_fields_accept_none():
    config = with_overrides(TrainConfig(), {"run.output_dir": "runs/x", "optim.clip_grad": 1.0})
    config = with_overrides(config, {"run.output_dir": None, "optim.clip_grad": None})
    assert config.run.output_dir is None and config.optim.clip_grad is None


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("optim.lr=1e-3", "optim.lr", 0.001),
        ("optim.lr=0.001", "optim.lr", 0.001),
        ("optim.epochs=3", "optim.epochs", 3),
        ("run.progress=false", "run.progress", False),
        ("model.name=resnet18", "model.name", "resnet18"),
        ("optim.betas=[0.9, 0.95]", "optim.betas", [0.9, 0.95]),
        ("run.output_dir=", "run.output_dir", None),
    ],
)
def test_parse_assignment(text, key, value):
    parsed_key, parsed_value = parse_assignment(text)
    assert parsed_key == key
    applied = getattr(with_overrides(TrainConfig(), {parsed_key: parsed_value}), key.split(".")[0])
    expected = tuple(value) if isinstance(value, list) else value
    assert getattr(applied, key.split(".")[1]) == expected
    assert type(getattr(applied, key.split(".")[1])) is type(expected)


def test_parse_assignment_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("optim.lr")


def test_parsed_assignment_applies():
    config = with_overrides(
        TrainConfig(), dict([parse_assignment("optim.lr=1e-3"), parse_assignment("optim.epochs=7")])
    )
    assert config.optim.lr == 0.001 and config.optim.epochs == 7


def test_yaml_round_trip(tmp_path):
    config = with_overrides(
        TrainConfig(),
        {
            "model.name": "deit_pico_distilled_patch7_28",
            "optim.lr": 1e-3,
            "optim.min_lr": 1e-7,
            "optim.betas": [0.8, 0.95],
            "optim.clip_grad": 5.0,
            "data.train_subset": 512,
            "distill.type": "soft",
            "distill.tau": 3.0,
            "run.output_dir": str(tmp_path),
        },
    )
    save_config(config, tmp_path / "config.yaml")
    loaded = load_config(tmp_path / "config.yaml")
    assert loaded == config
    assert isinstance(loaded.optim.betas, tuple)
    assert config_from_dict(config_to_dict(config)) == config


def test_config_to_dict_is_plain():
    values = config_to_dict(TrainConfig())
    assert set(values) == {"model", "data", "augment", "optim", "distill", "pretrain", "run"}
    assert values["optim"]["betas"] == [0.9, 0.999]  # lists, not tuples: safe for YAML and weights-only files


def test_partial_yaml_keeps_the_other_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  epochs: 4\n  lr: 0.002\nmodel:\n  name: resnet18\n")
    config = load_config(tmp_path / "c.yaml")
    assert (config.optim.epochs, config.optim.lr, config.model.name) == (4, 0.002, "resnet18")
    assert config.data == TrainConfig().data


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 5e-4\n")
    assert load_config(tmp_path / "c.yaml").optim.lr == 5e-4


def test_yaml_errors_name_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  epochz: 4\n")
    with pytest.raises(ConfigError, match="c.yaml.*epochz"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_bundled_presets_load():
    assert {"fashion_mnist", "fashion_mnist_teacher"} <= set(list_presets())
    # the presets' values are tuned elsewhere; only their roles are pinned here
    student = load_config("fashion_mnist")
    assert is_deit_model(student.model.name) and "distilled" in student.model.name
    assert student.data.dataset == "fashion-mnist"
    teacher = load_config("fashion_mnist_teacher")
    assert not is_deit_model(teacher.model.name)  # a timm CNN
    base = with_overrides(TrainConfig(), {"run.seed": 7})
    assert load_config("fashion_mnist", base).run.seed == 7  # a preset only replaces what it names


# --- ranges -----------------------------------------------------------------------------------------------

# one value outside the range of every limited setting (the CLI, a YAML file and --set must all refuse it)
OUT_OF_RANGE = {
    "model.drop_path": 1.0,
    "model.dropout": -0.1,
    "model.attn_impl": "flash",
    "model.eval_output": "both",
    "data.input_size": 4,
    "data.in_chans": 2,
    "data.train_subset": 0,
    "data.num_workers": -1,
    "data.bad_files": "ignore",
    "data.decode_budget_gb": -1.0,
    "data.label_fraction": 0.0,
    "data.unlabeled_ratio": 1.0,
    "augment.hflip": 1.5,
    "augment.random_erasing": -0.25,
    "augment.mixup": -0.8,
    "augment.cutmix": -1.0,
    "augment.mix_prob": 2.0,
    "augment.mix_switch_prob": -0.5,
    "augment.repeated_aug": 0,
    "optim.epochs": -3,
    "optim.batch_size": 0,
    "optim.lr": -1.0,
    "optim.min_lr": -1e-5,
    "optim.warmup_lr": -1e-6,
    "optim.warmup_epochs": -1.0,
    "optim.weight_decay": -0.05,
    "optim.betas": [0.9, 1.0],
    "optim.eps": 0.0,
    "optim.label_smoothing": 1.5,
    "optim.clip_grad": 0.0,
    "optim.accum_steps": 0,
    "optim.ema_decay": 1.0,
    "distill.type": "medium",
    "distill.alpha": 1.5,
    "distill.tau": 0.0,
    "distill.kl_reduction": "mean",
    "distill.teacher_cache_views": 0,
    "pretrain.method": "dino",
    "pretrain.dim": 0,
    "pretrain.hidden_dim": 0,
    "pretrain.temperature": 0.0,
    "pretrain.momentum": 1.0,
    "pretrain.queue_size": 0,
    "pretrain.knn_k": 0,
    "pretrain.knn_temperature": -0.1,
    "pretrain.projector_layers": 4,
    "pretrain.mask_ratio": 1.0,
    "pretrain.mask_target": "patches",
    "pretrain.clusters": 1,
    "pretrain.pca_dim": 0,
    "pretrain.cpc_patch": 1,
    "pretrain.cpc_steps": 0,
    "run.seed": -1,
    "run.amp": "fp8",
    "run.checkpoint_steps": 0,
    "run.eval_interval": 0,
    "run.log_interval": 0,
}


def test_every_numeric_setting_has_a_range():
    numeric = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(TrainConfig)
        for f in dataclasses.fields(section.default_factory())
        if any(kind in str(f.type) for kind in ("int", "float"))
    }
    assert numeric <= set(ALLOWED) and set(ALLOWED) == set(OUT_OF_RANGE)


def test_defaults_and_presets_are_in_range():
    validate(TrainConfig())
    for name in list_presets():
        load_config(name)  # validated as it is built


def _flag_for(key: str) -> str | None:
    from deit.cli.train import TRAIN_FLAGS

    return next((flag for flag, flag_key, _, _ in TRAIN_FLAGS if flag_key == key), None)


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_out_of_range_values_are_refused_from_the_cli_yaml_and_set(key, tmp_path):
    from deit.cli import build_parser, train_config_from_args

    value = OUT_OF_RANGE[key]
    message = rf"{key} = .* is out of range: it must be "
    section, _, name = key.partition(".")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({section: {name: value}}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    text = value if isinstance(value, str) else json.dumps(value)
    with pytest.raises(ConfigError, match=message):
        train_config_from_args(build_parser().parse_args(["train", "--set", f"{key}={text}"]))
    flag = _flag_for(key)
    if flag is not None:
        with pytest.raises(ConfigError, match=message):
            train_config_from_args(build_parser().parse_args(["train", f"{flag}={value}"]))


def test_the_cli_reports_a_bad_value_in_one_line_with_exit_code_2(capsys):
    from deit.cli import main

    assert main(["train", "--epochs", "-3"]) == 2
    err = capsys.readouterr().err
    assert "optim.epochs = -3 is out of range: it must be >= 1" in err and "Traceback" not in err
