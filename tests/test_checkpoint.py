"""Checkpoints: atomic writes, weights-only reads, state-dict unwrapping, safetensors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import deit.checkpoint
import deit.weights
from deit.checkpoint import (
    Checkpoint,
    CheckpointError,
    DataSpec,
    ModelSpec,
    fetch_weights,
    load_checkpoint,
    model_from_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from deit.models import create_model


class NotWeights:
    """A pickled Python object: torch.load(weights_only=True) must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def weights() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.tensor([0.5, -0.5])}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- atomic save ---------------------------------------------------------------------------------


def test_save_then_load_round_trip(tmp_path):
    state = {"model": weights(), "epoch": 3, "names": ["a", "b"], "nested": {"lr": 1e-3}}
    path = save_checkpoint(state, tmp_path / "sub" / "ckpt.pth")
    assert path == tmp_path / "sub" / "ckpt.pth"
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and loaded["names"] == ["a", "b"] and loaded["nested"] == {"lr": 1e-3}
    assert_same(loaded["model"], state["model"])


def test_save_leaves_no_temporary_file(tmp_path):
    save_checkpoint({"model": weights()}, tmp_path / "ckpt.pth")
    save_checkpoint({"model": weights(), "epoch": 2}, tmp_path / "ckpt.pth")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]
    assert torch.load(tmp_path / "ckpt.pth", weights_only=True)["epoch"] == 2


def test_save_writes_through_a_temporary_file_and_renames(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((str(src), str(dst)))
        assert os.path.dirname(str(src)) == str(tmp_path)  # same folder: the rename is atomic
        assert not (tmp_path / "ckpt.pth").exists()  # nothing at the destination until the rename
        return real_replace(src, dst)

    monkeypatch.setattr(deit.checkpoint.os, "replace", spy)
    save_checkpoint({"model": weights()}, tmp_path / "ckpt.pth")
    assert len(renames) == 1
    assert renames[0][1] == str(tmp_path / "ckpt.pth")
    assert renames[0][0] != renames[0][1]


def test_failed_save_keeps_previous_checkpoint_and_removes_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": weights(), "epoch": 1}, path)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")  # bytes reach the temporary file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deit.checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"model": weights(), "epoch": 2}, path)
    monkeypatch.setattr(deit.checkpoint.torch, "save", real_save)

    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


# --- safe load -----------------------------------------------------------------------------------


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": NotWeights()}, path)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"not a checkpoint", b""], ids=["garbage", "empty"])
def test_load_refuses_damaged_files(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_load_refuses_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": {"w": torch.randn(2000)}}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_load_refuses_non_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="list"):
        load_checkpoint(path)


def test_a_missing_file_is_a_checkpoint_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pth does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing.safetensors does not exist"):
        read_state_dict(tmp_path / "missing.safetensors")


# --- state dicts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 300},
        lambda sd: {"state_dict": sd},
        lambda sd: {"model_state_dict": sd},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    ],
    ids=["bare", "official", "state_dict", "model_state_dict", "ddp-prefix", "compile-prefix"],
)
def test_read_state_dict_unwraps(tmp_path, wrap):
    path = tmp_path / "w.pth"
    torch.save(wrap(weights()), path)
    assert_same(read_state_dict(path), weights())


def test_read_state_dict_keeps_prefix_unless_every_key_has_it(tmp_path):
    state = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    torch.save(state, tmp_path / "w.pth")
    assert sorted(read_state_dict(tmp_path / "w.pth")) == ["b", "module.a"]


def test_read_state_dict_refuses_non_tensors(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="state dict"):
        read_state_dict(tmp_path / "w.pth")


def test_safetensors_files_load(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(weights(), str(path))
    assert_same(read_state_dict(path), weights())
    assert_same(load_checkpoint(path)["model"], weights())


# --- rebuilding a model --------------------------------------------------------------------------


def test_model_from_checkpoint_rebuilds_the_model(tmp_path):
    from deit.models import create_model

    torch.manual_seed(0)
    model = create_model("deit_pico_distilled_patch7_28", num_classes=4, in_chans=1, img_size=14).eval()
    state = {
        "format": "deit-checkpoint",
        "model": model.state_dict(),
        "model_spec": {
            "name": "deit_pico_distilled_patch7_28",
            "num_classes": 4,
            "in_chans": 1,
            "img_size": 14,
            "options": {"eval_output": "cls"},
        },
        "data": {
            "dataset": "fashion-mnist",
            "class_names": list("abcd"),
            "mean": [0.5],
            "std": [0.25],
            "input_size": 14,
        },
    }
    save_checkpoint(state, tmp_path / "c.pth")
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "c.pth")).eval()
    assert rebuilt.eval_output == "cls"
    assert model_from_checkpoint(state, eval_output="dist").eval_output == "dist"  # overrides win
    x = torch.randn(2, 1, 14, 14)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.forward_heads(x)["cls"], atol=1e-6)


def test_checkpoint_round_trips_through_its_file(tmp_path):
    model = create_model("deit_pico_patch7_28", num_classes=3, in_chans=1)
    spec = ModelSpec("deit_pico_patch7_28", 3, 1, 28, {"drop_path_rate": 0.0})
    data = DataSpec("imagefolder", ("ant", "bee", "cat"), (0.5,), (0.25,), 28)
    saved = Checkpoint(model.state_dict(), spec, data, epoch=3, best_acc1=71.5, history=[{"epoch": 1}])
    saved.save(tmp_path / "c.pth")
    loaded = Checkpoint.load(tmp_path / "c.pth")
    assert loaded.model_spec == spec and loaded.data == data and not loaded.resumable
    assert (loaded.epoch, loaded.best_acc1, loaded.history) == (3, 71.5, [{"epoch": 1}])
    assert all(torch.equal(loaded.model[key], value) for key, value in model.state_dict().items())
    assert isinstance(loaded.build_model(), type(model))
    with pytest.raises(CheckpointError, match="no EMA"):
        loaded.build_model(use_ema=True)


def test_a_deit_checkpoint_without_its_description_is_called_damaged(tmp_path):
    save_checkpoint({"format": "deit-checkpoint", "model": weights()}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="c.pth is a deit checkpoint without model_spec, data"):
        Checkpoint.load(tmp_path / "c.pth")


def test_model_from_foreign_file_asks_for_the_architecture():
    with pytest.raises(CheckpointError, match="--teacher-model"):
        model_from_checkpoint({"model": weights()})


# --- URLs: downloaded once, hash-checked -------------------------------------------------------


@pytest.fixture
def web_folder(tmp_path, monkeypatch):
    """A folder served over HTTP on loopback, and a private torch hub cache; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def publish(folder: Path, stem: str) -> tuple[str, str]:
    """Save a small state dict as ``<stem>-<sha256[:8]>.pth``; returns (file name, full digest)."""
    scratch = folder / "scratch.pth"
    torch.save(weights(), scratch)
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    name = f"{stem}-{digest[:8]}.pth"
    scratch.rename(folder / name)
    return name, digest


def test_url_with_hash_in_its_name_is_downloaded_once_and_loaded(web_folder):
    folder, base = web_folder
    name, _ = publish(folder, "weights")
    state = read_state_dict(f"{base}/{name}")
    assert torch.equal(state["layer.weight"], weights()["layer.weight"])
    (folder / name).unlink()  # a second read comes from the cache
    assert torch.equal(read_state_dict(f"{base}/{name}")["layer.weight"], weights()["layer.weight"])


def test_url_with_a_sha256_fragment_is_checked(web_folder):
    folder, base = web_folder
    name, digest = publish(folder, "weights")
    (folder / name).rename(folder / "plain.pth")
    assert read_state_dict(f"{base}/plain.pth#sha256={digest}")["layer.weight"].shape == weights()["layer.weight"].shape


def test_wrong_hash_is_refused_and_nothing_is_cached(web_folder):
    folder, base = web_folder
    name, _ = publish(folder, "weights")
    (folder / name).rename(folder / "weights-00000000.pth")
    with pytest.raises(CheckpointError, match="invalid hash"):
        read_state_dict(f"{base}/weights-00000000.pth")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_url_without_a_hash_is_refused(web_folder):
    folder, base = web_folder
    torch.save(weights(), folder / "weights.pth")
    with pytest.raises(CheckpointError, match="sha256"):
        read_state_dict(f"{base}/weights.pth")


def test_a_cached_file_that_changed_is_refused(web_folder):
    folder, base = web_folder
    name, _ = publish(folder, "weights")
    cached = fetch_weights(f"{base}/{name}", progress=False)
    cached.write_bytes(cached.read_bytes() + b"tampered")
    with pytest.raises(CheckpointError, match="does not match"):
        read_state_dict(f"{base}/{name}")


def test_pretrained_true_fetches_the_official_weights(monkeypatch, tmp_path, fast_init):
    """Offline here: the download is replaced by a file of the same layout; the URL asked for is checked."""
    official = timm.create_model("deit_tiny_distilled_patch16_224")
    local = tmp_path / "official.pth"
    torch.save({"model": official.state_dict()}, local)
    asked = []
    monkeypatch.setattr(deit.weights, "fetch_weights", lambda url, **_: asked.append(url) or local)
    model = create_model("deit_tiny_distilled_patch16_224", pretrained=True)
    assert asked == ["https://dl.fbaipublicfiles.com/deit/deit_tiny_distilled_patch16_224-b40b3cf7.pth"]
    assert torch.equal(model.dist_token, official.dist_token)
    with pytest.raises(ValueError, match="no published weights"):
        create_model("deit_pico_patch4_28", pretrained=True)
