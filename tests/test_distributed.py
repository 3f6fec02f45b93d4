"""torchrun on CPU (gloo): 2 processes against 1 with the same global batch; stops agreed by every process.

Each test starts real processes with ``python -m torch.distributed.run``, as a
user would, on the small ImageFolder of test_faults.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import needs_fashion_mnist
from deit.checkpoint import load_checkpoint
from deit.config import TrainConfig, save_config, with_overrides
from deit.training import fit
from test_faults import (  # noqa: F401 (fixtures used by name)
    REPO,
    fashion_teacher,
    folder,
    in_memory_recipe,
    read_jsonl,
    recipe,
    teacher,
)

pytestmark = pytest.mark.slow


def same_run_on_two_processes(data: Path, teacher_path: Path, out: Path, **overrides) -> dict:
    """The recipe without Mixup and stochastic depth, whose draws depend on the batch each process holds."""
    no_batch_draws = {"augment.mixup": 0.0, "augment.cutmix": 0.0, "model.drop_path": 0.0}
    values = recipe(data, teacher_path, out, **no_batch_draws)
    # fp32: a process's batch of 8 and the single process's 16 round differently in bf16 (the matmul blocks
    # differ), which would hide a wrong gradient average under a tolerance of bf16's precision
    values.update({"data.num_workers": 0, "run.checkpoint_steps": None, "run.amp": "none", **overrides})
    return values


def torchrun(args: list[str], tmp_path: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.Popen(command, env=env, cwd=tmp_path, text=True, **popen)


def write_config(values: dict, path: Path) -> Path:
    save_config(with_overrides(TrainConfig(), values), path)
    return path


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(folder, teacher, tmp_path):  # noqa: F811
    one = same_run_on_two_processes(folder, teacher, tmp_path / "one", **{"optim.batch_size": 16})
    fit(with_overrides(TrainConfig(), one))
    two = same_run_on_two_processes(folder, teacher, tmp_path / "two", **{"optim.batch_size": 8})
    child = torchrun(["-m", "deit", "train", "--config", str(write_config(two, tmp_path / "two.yaml"))], tmp_path)
    assert child.wait(timeout=300) == 0

    steps_one, steps_two = read_jsonl(tmp_path / "one" / "steps.jsonl"), read_jsonl(tmp_path / "two" / "steps.jsonl")
    assert [s["step"] for s in steps_two] == [s["step"] for s in steps_one] == list(range(12))
    for a, b in zip(steps_one[:4], steps_two[:4], strict=True):
        assert a["lr"] == b["lr"]  # the learning rate follows the global batch, not the per-process one
        assert abs(a["loss"] - b["loss"]) < 1e-5
    epochs_one, epochs_two = (
        read_jsonl(tmp_path / "one" / "metrics.jsonl"),
        read_jsonl(tmp_path / "two" / "metrics.jsonl"),
    )
    for a, b in zip(epochs_one, epochs_two, strict=True):
        assert b["val"]["num_samples"] == a["val"]["num_samples"] == 12  # every image once, across both processes
        assert b["train"]["loss"] == pytest.approx(a["train"]["loss"], abs=1e-4)
    state = load_checkpoint(tmp_path / "two" / "checkpoint.pth")
    assert state["world_size"] == 2 and len(state["meters"]) == 2


@needs_fashion_mnist
def test_two_processes_match_one_with_whole_batch_randaugment(fashion_teacher, tmp_path):  # noqa: F811
    """The in-memory path: each image's crop, RandAugment ops and erased box come from its own seed."""
    no_batch_draws = {"augment.mixup": 0.0, "augment.cutmix": 0.0, "model.drop_path": 0.0, "data.num_workers": 0}
    no_batch_draws["run.amp"] = "none"  # fp32, as above: bf16 rounds batches of 8 and 16 differently
    one = in_memory_recipe(fashion_teacher, tmp_path / "one", **no_batch_draws, **{"run.checkpoint_steps": None})
    fit(with_overrides(TrainConfig(), one))
    two = {**one, "optim.batch_size": 8, "run.output_dir": str(tmp_path / "two")}
    child = torchrun(["-m", "deit", "train", "--config", str(write_config(two, tmp_path / "two.yaml"))], tmp_path)
    assert child.wait(timeout=300) == 0
    steps_one, steps_two = read_jsonl(tmp_path / "one" / "steps.jsonl"), read_jsonl(tmp_path / "two" / "steps.jsonl")
    assert [s["step"] for s in steps_two] == [s["step"] for s in steps_one] == list(range(12))
    for a, b in zip(steps_one, steps_two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)


NAN_ON_RANK_1 = textwrap.dedent(
    """
    import os, sys
    import deit.losses
    from deit.cli import main

    real = deit.losses.DistillationLoss.components
    calls = []

    def poisoned(self, *args, **kwargs):
        losses = real(self, *args, **kwargs)
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    deit.losses.DistillationLoss.components = poisoned
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_nan_on_one_process_stops_every_process_without_a_hang(folder, teacher, tmp_path):  # noqa: F811
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    values = same_run_on_two_processes(folder, teacher, tmp_path / "run", **{"optim.batch_size": 8})
    config = write_config(values, tmp_path / "run.yaml")
    child = torchrun([str(script), "train", "--config", str(config)], tmp_path, stderr=subprocess.PIPE)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode != 0
    assert stderr.count("the loss is not finite at step 2 on 1 of 2 process(es)") == 2, stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_sigterm_to_torchrun_stops_both_processes_at_the_same_step(folder, teacher, tmp_path):  # noqa: F811
    values = same_run_on_two_processes(folder, teacher, tmp_path / "run", **{"optim.batch_size": 8, "optim.epochs": 50})
    config = write_config(values, tmp_path / "run.yaml")
    child = torchrun(["-m", "deit", "train", "--config", str(config)], tmp_path, stderr=subprocess.PIPE)
    steps = tmp_path / "run" / "steps.jsonl"
    deadline = time.monotonic() + 180
    while not (steps.exists() and len(steps.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert time.monotonic() - sent < 30, stderr[-3000:]
    assert stderr.count("stopped by SIGTERM after finishing the step") == 2, stderr[-3000:]
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert len(state["meters"]) == 2
    last = json.loads(steps.read_text().splitlines()[-1])
    assert state["epoch"] * 6 + state["epoch_step"] == last["step"] + 1


def test_a_cuda_run_joins_a_group_that_serves_cpu_and_cuda_tensors(monkeypatch):
    """No GPU here: the CUDA path is checked with torch.distributed patched, not run."""
    import torch.distributed as dist

    from deit import distributed

    joined = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    distributed.init_process_group(distributed.Distributed(0, 2, 0), torch.device("cuda:0"))
    served = dict(part.split(":") for part in joined[0].split(","))
    # the gradient all-reduce runs on CUDA tensors, the loss / count / flag sums on CPU tensors: both need a backend
    assert served == {"cpu": "gloo", "cuda": "nccl"}
    distributed.init_process_group(distributed.Distributed(0, 2, 0), torch.device("cpu"))
    assert joined[1] == "gloo"


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """No GPU here: CUDA's presence is patched. ``auto`` and ``cuda`` name LOCAL_RANK's GPU under torchrun."""
    from deit.distributed import DeviceError, Distributed, resolve_device

    third_on_its_node = Distributed(rank=5, world_size=8, local_rank=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", third_on_its_node) == torch.device("cuda:2")
    assert resolve_device("cuda", third_on_its_node) == torch.device("cuda:2")
    assert resolve_device("cuda:1", third_on_its_node) == torch.device("cuda:1")  # named by the user: kept
    assert resolve_device("cuda") == torch.device("cuda")  # one process: whichever GPU torch picks
    assert resolve_device("cpu", third_on_its_node) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", third_on_its_node) == torch.device("cpu")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda", third_on_its_node)


@needs_fashion_mnist
def test_moco_under_torchrun_queues_the_keys_of_both_processes(tmp_path):
    """Each step queues 2 views x the global batch: the queue is the same on every process, as MoCo's across GPUs."""
    from test_ssl import pretrain_config

    small = {"optim.batch_size": 32, "optim.epochs": 1, "pretrain.queue_size": 1000, "run.eval_interval": 1}
    config = pretrain_config(tmp_path / "two", "moco", **small)
    path = tmp_path / "two.yaml"
    save_config(config, path)
    child = torchrun(["-m", "deit", "pretrain", "--method", "moco", "--config", str(path)], tmp_path)
    assert child.wait(timeout=300) == 0
    state = load_checkpoint(tmp_path / "two" / "checkpoint.pth")
    steps = 256 // (2 * 32)  # 256 images, 32 per process
    assert state["world_size"] == 2 and state["epoch"] == 1
    assert int(state["model"]["queue.position"]) == steps * 2 * (2 * 32) % 1000  # 512; one process alone: 256
    assert state["history"][0]["val"]["num_samples"] == 10000  # the kNN monitor scored each image once
