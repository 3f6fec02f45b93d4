"""The arithmetic of the benchmark scripts that judges a table's goals (the scripts themselves train for hours)."""

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import distillation_table  # noqa: E402
import precision_check  # noqa: E402


def history(curve: dict[int, float], epochs: int) -> list[dict]:
    """A run's per-epoch records, with val top-1 at the epochs in ``curve``."""
    return [{"epoch": e, **({"val": {"acc1": curve[e]}} if e in curve else {})} for e in range(1, epochs + 1)]


def test_late_movement_reads_the_endpoints_of_the_last_fifth():
    run = history({70: 50.0, 80: 60.0, 90: 61.0, 100: 60.5}, 100)
    assert distillation_table.late_movement(run) == pytest.approx(0.5)  # 60.5 at epoch 100 - 60.0 at epoch 80


def test_fitted_movement_reads_the_trend_under_the_noise():
    # a 1-point rise over epochs 80-100 plus noise that sums to zero and is uncorrelated with the epoch
    noise = {80: 0.3, 85: -0.6, 90: 0.0, 95: 0.6, 100: -0.3}
    rising = history({e: 70.0 + 0.05 * (e - 80) + n for e, n in noise.items()}, 100)
    assert distillation_table.late_movement(rising) == pytest.approx(0.4)  # the endpoints understate it
    assert distillation_table.fitted_late_movement(rising) == pytest.approx(1.0)
    flat = history({e: 70.0 + n for e, n in noise.items()}, 100)
    assert distillation_table.late_movement(flat) == pytest.approx(-0.6)  # and call a flat curve falling
    assert distillation_table.fitted_late_movement(flat) == pytest.approx(0.0, abs=1e-9)


def test_fitted_movement_needs_three_evaluations():
    assert distillation_table.fitted_late_movement(history({80: 1.0, 100: 2.0}, 100)) is None
    assert distillation_table._movement(history({80: 1.0, 100: 2.0}, 100)) == "+1.00"


def test_student_lr_and_warmup_default_to_the_preset_and_reach_every_row_when_set():
    preset = distillation_table.student_config(distillation_table.parse_args([]), distillation_table.RUNS[0], 0, Path())
    args = distillation_table.parse_args(["--lr", "0.008", "--warmup-epochs", "5"])
    for run in distillation_table.RUNS:
        optim = distillation_table.student_config(args, run, 0, Path("teacher.pth")).optim
        assert (optim.lr, optim.warmup_epochs) == (0.008, 5) != (preset.optim.lr, preset.optim.warmup_epochs)


def test_paired_verdict_calls_bf16_lower_only_when_the_whole_margin_is_below_zero():
    # the committed check's differences: +0.11 mean, standard error 0.15, so + 2 errors stays above zero
    measured = precision_check.PairedVerdict.of([0.26, -0.04])
    assert measured.mean == pytest.approx(0.11) and measured.error == pytest.approx(0.15)
    assert not measured.lower
    # consistently about a point lower on every seed: lower, even though one seed alone would not say so
    assert precision_check.PairedVerdict.of([-1.1, -0.9, -1.0]).lower
    # a large mean drop with seeds that disagree is not called lower: the margin reaches above zero
    noisy = precision_check.PairedVerdict.of([-3.0, 1.0])
    assert noisy.mean == pytest.approx(-1.0) and noisy.upper > 0 and not noisy.lower


def test_paired_verdict_needs_two_seeds():
    assert precision_check.PairedVerdict.of([-2.0]) is None


def test_self_supervised_table_states_each_methods_epochs_and_judges_the_probe_against_both_baselines(tmp_path):
    import self_supervised

    def probe(pretrained: float, random_init: float, pixels: float) -> list[dict]:
        return [{"linear_acc1": acc, "knn_acc1": acc - 2} for acc in (pretrained, random_init, pixels)]

    pretrained = {
        "simclr": [
            (
                {"minutes": 24.0, "commit": "abc1234", "matmul_gflops": {"fp32": 213, "bf16": 884}},
                probe(88.5, 72.6, 83.6),
            ),
            (
                {"minutes": 26.0, "commit": "def5678", "matmul_gflops": {"fp32": 136, "bf16": 389}},
                probe(88.1, 72.4, 83.6),
            ),
        ],  # fmt: skip
        "moco": [({"minutes": 27.0}, probe(83.0, 72.6, 83.6))],
    }
    args = self_supervised.parse_args(["--output", str(tmp_path / "ssl.md"), "--fractions"])
    text = self_supervised.write(args, [], pretrained, {}, started=0.0)
    assert "| simclr | 20 | 2 | 88.30 ± 0.28 | 86.30 ± 0.28 |" in text
    assert "| 25.0 | 213 / 884, 136 / 389 | abc1234, def5678 |" in text
    assert "| 27.0 | not measured | not recorded |" in text  # moco's run predates both records
    assert f"| moco | {self_supervised.PRETRAIN_EPOCHS['moco']} | 1 | 83.00 |" in text
    assert "- simclr: the linear probe beats random init and raw pixels: **yes**" in text
    assert "- moco: the linear probe beats random init and raw pixels: **no**" in text  # 83.0 < pixels' 83.6
    assert "- A linear probe ≥ 88 %: **yes** (best: simclr, 88.30)" in text
    assert "- Each pretraining ≤ 30 minutes: **yes**" in text
    # each run is held to the budget, not its method's mean, with the machine's measure beside it
    slower_machine = {"minutes": 32.4, "matmul_gflops": {"fp32": 294, "bf16": 918}}
    slow = {"moco": [({"minutes": 25.7}, probe(87.3, 72.6, 83.6)), (slower_machine, probe(86.9, 72.6, 83.6))]}
    assert "- Each pretraining ≤ 30 minutes: **no** (moco 32.4 (294 / 918); machine" in self_supervised.report(
        args, [], slow, {}, 0.0
    )
    assert (tmp_path / "ssl.json").is_file() and (tmp_path / "ssl.md").read_text() == text
    assert "| simclr | 1 |" in self_supervised.report(self_supervised.parse_args(["--pretrain-epochs", "1"]), [],
                                                       pretrained, {}, 0.0)  # fmt: skip
    # the epochs are the runs' own, as their settings say: seeds trained for other budgets show each
    mixed = {"cpc": [({"minutes": 40.0, "config": {"optim": {"epochs": 15}}}, probe(86.2, 72.6, 83.6)),
                     ({"minutes": 29.0, "config": {"optim": {"epochs": 12}}}, probe(86.0, 72.6, 83.6))]}  # fmt: skip
    assert "| cpc | 12, 15 | 2 |" in self_supervised.report(args, [], mixed, {}, 0.0)


def test_self_supervised_few_label_table_gives_minutes_and_judges_simclrv2_against_all_the_labels():
    import self_supervised

    def runs(*accuracies: float) -> list[dict]:
        return [{"final": {"acc1": acc}, "minutes": 5.0 + i} for i, acc in enumerate(accuracies)]

    few = {
        0.1: {"supervised": runs(80.0, 81.0), "SimCLRv2: pretrain + fine-tune + distil": runs(85.0, 85.5)},
        1.0: {"supervised": runs(85.4, 85.2)},
    }
    text = self_supervised.report(self_supervised.parse_args([]), [], {}, few, 0.0)
    assert "| 10% | 80.50 ± 0.71 | n/a | n/a | n/a | 85.25 ± 0.35 |" in text
    assert "| 10% | 5.5 | n/a | n/a | n/a | 5.5 |" in text and "| 100% | 5.5 | n/a | n/a | n/a | n/a |" in text
    minutes = text.split("Minutes per run")[1]
    assert "| labels | supervised |" in minutes and "|---|" in minutes  # the header repeated above the minutes
    assert "SimCLRv2 reaches the supervised student on 100 %: **no** (85.25 against 85.30)" in text


def test_self_supervised_judges_beit_against_the_student_from_scratch_at_a_tenth_of_the_labels():
    import self_supervised

    def runs(*accuracies: float) -> list[dict]:
        return [{"final": {"acc1": acc}, "minutes": 30.0} for acc in accuracies]

    few = {0.1: {"supervised, BEiT's total epochs": runs(82.0, 82.4), "BEiT + fine-tune": runs(83.0, 83.4)}}
    text = self_supervised.report(self_supervised.parse_args(["--beit-target", "dvae"]), [], {}, few, 0.0)
    assert "beit-dvae + fine-tune beats the student from scratch for the same total epochs: **yes** (83.20" in text
    few[0.1]["BEiT + fine-tune"] = runs(82.0, 82.4)  # a tie is not a win
    assert "**no** (82.20 against 82.20)" in self_supervised.report(self_supervised.parse_args([]), [], {}, few, 0.0)


def test_self_supervised_keeps_each_beit_targets_runs_apart_and_shares_the_supervised_ones(tmp_path, monkeypatch):
    import self_supervised

    folders = []
    monkeypatch.setattr(self_supervised, "train_or_read", lambda config, folder: folders.append(folder) or {})
    checkpoint = {"beit": tmp_path / "beit.pth"}
    checkpoint["beit"].touch()
    simclr_finetune = tmp_path / "labels0.1/seed0/simclr_finetune"
    simclr_finetune.mkdir(parents=True)
    (simclr_finetune / "summary.json").write_text("{}")  # finished: still not read, since no SimCLR was asked for
    for target in self_supervised.BEIT_TARGETS:
        args = self_supervised.parse_args(["--work-dir", str(tmp_path), "--beit-target", target])
        self_supervised.few_labels(args, 0.1, 0, checkpoint)
        assert self_supervised.pretrain_folder(args, "beit", 0).parent.name == self_supervised.run_name(args, "beit")
    names = [folder.name for folder in folders]
    assert names.count("supervised") == names.count("supervised_long") == 3  # one config: one run, read thrice
    assert sorted(name for name in names if name.endswith("_finetune")) == [
        "beit-dvae_finetune", "beit-pixels_finetune", "beit_finetune"]  # fmt: skip
    assert not any(name.startswith("simclr") for name in names)  # BEiT's checkpoint alone: BEiT's columns alone


def test_beit_targets_table_gives_each_targets_tokenizer_figures_and_names_the_best_fine_tuned():
    import beit_targets

    def result(finetune: float, scratch: float, tokenizer: dict | None) -> dict:
        probe = [{"linear_acc1": 70.0, "knn_acc1": 60.0}] * 3
        return {"pretrain": {"minutes": 25.0, "commit": "abc1234"}, "probe": probe,
                "finetune": {"final": {"acc1": finetune}}, "scratch": {"final": {"acc1": scratch}},
                "tokenizer": tokenizer}  # fmt: skip

    results = {
        "kmeans": [result(84.0, 83.0, {"mse": 0.1147, "perplexity": 92.4}), result(85.0, 83.0, None)],
        "pixels": [result(86.0, 83.0, None)],
    }
    text = beit_targets.report(beit_targets.parse_args([]), [], results)
    assert "| kmeans | 2 | 0.1147 | 92 | 84.50 ± 0.71 | 83.00 ± 0.00 | 70.00 ± 0.00 | 60.00 ± 0.00 | 25.0 " in text
    assert "| 25.0 | not measured | abc1234 |" in text  # each row's machine and commit
    assert "| pixels | 1 | n/a | n/a | 86.00 | 83.00 |" in text
    assert "Best fine-tuned at 10% of the labels: **pixels** (86.00)." in text


def test_a_run_read_back_with_other_settings_than_asked_says_which(tmp_path, caplog):
    from deit.config import TrainConfig, save_config, with_overrides

    folder = tmp_path / "run"
    folder.mkdir()
    trained = with_overrides(TrainConfig(), {"optim.epochs": 20, "run.output_dir": str(folder)})
    save_config(trained, folder / "config.yaml")
    (folder / "summary.json").write_text('{"minutes": 1.0, "final": {"acc1": 50.0}, "history": []}')
    # where it was written and how it was watched do not count; what it computed does
    same = with_overrides(trained, {"run.output_dir": "elsewhere", "run.progress": False})
    assert distillation_table.settings_differing(same, folder) == []
    assert "settings_differing" not in distillation_table.train_or_read(same, folder)
    longer = with_overrides(trained, {"optim.epochs": 30})
    summary = distillation_table.train_or_read(longer, folder)
    assert summary["settings_differing"] == ["optim.epochs = 20 there, 30 asked"]
    assert "trained with other settings than asked: optim.epochs = 20 there, 30 asked" in caplog.text


def test_a_runs_settings_travel_with_its_summary_so_a_restored_run_still_says_it_differs(tmp_path, monkeypatch):
    import json

    import self_supervised

    from deit.config import TrainConfig, save_config, with_overrides

    class Result:
        final, history = {"acc1": 50.0}, []

    def fit(config):  # what a run leaves that matters here: its config.yaml
        save_config(config, Path(config.run.output_dir) / "config.yaml")
        return Result()

    trained = with_overrides(TrainConfig(), {"optim.epochs": 20})
    monkeypatch.setattr(distillation_table, "machine_speed", lambda: {"fp32": 136, "bf16": 389})
    monkeypatch.setattr(distillation_table, "fit", fit)
    args = self_supervised.parse_args(["--work-dir", str(tmp_path / "first"), "--output", str(tmp_path / "t.md")])
    folder = tmp_path / "first/pretrain/simclr/seed0"
    folder.mkdir(parents=True)
    summary = self_supervised.run_or_read(args, with_overrides(trained, {"run.output_dir": str(folder)}), folder)
    assert summary["config"]["optim"]["epochs"] == 20
    (folder / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    assert distillation_table.train_or_read(None, folder)["config"] == summary["config"]  # older runs: from disk

    probe = [{"linear_acc1": 88.0, "knn_acc1": 86.0}] * 3
    (tmp_path / "t.json").write_text(json.dumps({"pretrained": {"simclr": [(summary, probe)]}}))
    args = self_supervised.parse_args(["--work-dir", str(tmp_path / "second"), "--output", str(tmp_path / "t.md")])
    assert self_supervised.restore_finished_runs(args) == 1
    restored = tmp_path / "second/pretrain/simclr/seed0"
    assert distillation_table.settings_differing(with_overrides(trained, {"optim.epochs": 30}), restored) == [
        "optim.epochs = 20 there, 30 asked"
    ]


def test_minutes_leave_out_a_resumed_run_and_say_so():
    whole_minutes = distillation_table.whole_minutes

    assert whole_minutes([{"minutes": 12.0}, {"minutes": 14.0, "resumed_from_epoch": 0}]) == "13.0"
    assert whole_minutes([{"minutes": 12.0}, {"minutes": 5.0, "resumed_from_epoch": 130}]) == (
        "12.0 (1 resumed run(s) not counted)"
    )
    assert whole_minutes([{"minutes": 5.0, "resumed_from_epoch": 130}]).startswith("n/a")


def test_train_or_read_records_the_epoch_a_run_resumed_from(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')

    class Result:
        final, history = {"acc1": 50.0}, [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]

    monkeypatch.setattr(distillation_table, "fit", lambda config: Result())
    monkeypatch.setattr(distillation_table, "machine_speed", lambda: {"fp32": 136, "bf16": 389})
    summary = distillation_table.train_or_read(None, folder)
    assert summary["resumed_from_epoch"] == 2 and summary["final"] == {"acc1": 50.0}
    assert summary["matmul_gflops"] == {"fp32": 136, "bf16": 389}  # the machine it ran on, beside its minutes
    assert distillation_table.train_or_read(None, folder) == summary  # read back, not retrained


def test_distillation_table_rows_time_whole_runs_only_and_name_the_students_lr(tmp_path):
    curve = {e: 70.0 + e / 10 for e in range(10, 101, 10)}

    def run(minutes: float, resumed_from: int = 0, acc: float = 80.0) -> dict:
        metrics = ("acc1", "avg_logits_acc1", "cls_acc1", "dist_acc1", "softmax_sum_acc1")  # every head's
        final = dict.fromkeys(metrics, acc)
        records = [{"epoch": e, "train": {"loss": 1.0, "lr": 1e-3}, **({"val": dict.fromkeys(metrics, curve[e])}
                    if e in curve else {})} for e in range(1, 101)]  # fmt: skip
        return {"minutes": minutes, "final": final, "history": records, "resumed_from_epoch": resumed_from}

    args = distillation_table.parse_args(["--output", str(tmp_path / "table.md"), "--epochs", "100", "--lr", "0.002"])
    summaries = {"none": [run(9.0), run(3.0, resumed_from=70)], "token": [run(12.0), run(14.0)]}
    text = distillation_table.write_table(args, [], summaries, [run(20.0, acc=94.0)], 0.0, "abc1234")
    none_row = next(line for line in text.splitlines() if line.startswith("| DeiT, no distillation |"))
    assert "| 9.0 (1 resumed run(s) not counted) |" in none_row  # not the mean 6.0 with the resumed run's 3 minutes
    assert "| 13.0 |" in next(line for line in text.splitlines() if line.startswith("| DeiT⚗: class head |"))
    assert "peak lr 0.002 at batch 512 after 1 warm-up epoch(s)" in text
    assert "| DeiT, hard distillation (no distillation token) | hard | not run yet |" in text


def test_self_supervised_fine_tunes_each_cnn_method_beside_the_cnn_from_scratch(tmp_path, monkeypatch):
    import self_supervised

    folders = []
    monkeypatch.setattr(self_supervised, "train_or_read", lambda config, folder: folders.append((folder, config)) or {})
    args = self_supervised.parse_args(["--work-dir", str(tmp_path)])
    self_supervised.cnn_finetune(args, 0.1, 0, self_supervised.SCRATCH, None)
    self_supervised.cnn_finetune(args, 0.1, 0, "byol", tmp_path / "byol.pth")
    (tmp_path / "simclr.pth").touch()
    (tmp_path / "labels0.1/seed0/simclr_finetune").mkdir(parents=True)
    (tmp_path / "labels0.1/seed0/simclr_finetune/checkpoint.pth").touch()  # the teacher, once fine-tuned
    self_supervised.few_labels(args, 0.1, 0, {"simclr": tmp_path / "simclr.pth"})
    by_name = {folder.name: config for folder, config in folders}
    assert by_name["cnn_scratch"].model.init is None and by_name["byol_finetune"].model.init.endswith("byol.pth")
    assert by_name["simclr_finetune"].model == dataclasses.replace(by_name["byol_finetune"].model,
                                                                   init=str(tmp_path / "simclr.pth"))  # fmt: skip
    assert {config.data.label_fraction for config in by_name.values()} == {0.1}
    assert by_name["simclrv2_simclr"].distill.type == "hard"
    soft = self_supervised.parse_args(["--work-dir", str(tmp_path), "--simclrv2-distillation", "soft"])
    self_supervised.few_labels(soft, 0.1, 0, {"simclr": tmp_path / "simclr.pth"})
    folder, config = folders[-1]
    assert folder.name == "simclrv2_simclr_soft" and config.distill.type == "soft"  # apart from the hard student's

    def runs(*accuracies: float) -> list[dict]:
        return [{"final": {"acc1": acc}, "minutes": 7.0} for acc in accuracies]

    tuned = {self_supervised.SCRATCH: {0.1: runs(80.0, 81.0), 1.0: runs(90.0)}, "cpc": {0.1: runs(84.0)}}
    text = self_supervised.report(args, [], {}, {}, 0.0, tuned)
    assert "| start | 10% labels | minutes | 100% labels | minutes |" in text
    assert "| from scratch | 80.50 ± 0.71 | 7.0 | 90.00 | 7.0 |" in text
    assert "| cpc | 84.00 | 7.0 | not run yet | n/a |" in text


def test_self_supervised_restores_the_recorded_runs_into_a_new_work_dir_and_reads_them_back(tmp_path, monkeypatch):
    import json

    import self_supervised

    trained = []
    monkeypatch.setattr(distillation_table, "fit", lambda config: trained.append(config.run.output_dir))
    args = self_supervised.parse_args(["--work-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "ssl.md")])
    probe = [{"linear_acc1": 88.0, "knn_acc1": 86.0}] * 3
    summary = {"minutes": 25.0, "final": {"acc1": 86.0}, "history": [], "commit": "abc1234"}
    table = {
        "pretrained": {"simclr": [({**summary, "folder": "pretrain/simclr/seed0"}, probe)],
                       "byol": [(summary, probe)]},  # recorded before runs named their folders: not restored
        "few_labels": {"0.1": {"supervised": [{**summary, "folder": "labels0.1/seed0/supervised"}],
                               "pretrain + fine-tune (CNN)": [{**summary, "folder": "labels0.1/seed0/simclr_finetune"}],
                               "SimCLRv2: pretrain + fine-tune + distil": [
                                   {**summary, "folder": "labels0.1/seed0/simclrv2_simclr"}]}},
    }  # fmt: skip
    (tmp_path / "ssl.json").write_text(json.dumps(table))
    assert self_supervised.restore_finished_runs(args) == 4
    assert self_supervised.restore_finished_runs(args) == 0  # never over a run that is there
    assert json.loads((tmp_path / "runs/pretrain/simclr/seed0/probe.json").read_text()) == probe

    read, checkpoint = self_supervised.pretrain(args, "simclr", 0)
    assert read == {**summary, "folder": "pretrain/simclr/seed0"} and not checkpoint.is_file()
    assert self_supervised.probe(args, checkpoint, 0) == probe
    # the pretrained checkpoint is gone, yet its finished fine-tune and student are read; nothing retrains
    columns = self_supervised.few_labels(args, 0.1, 0, {"simclr": checkpoint, "beit": tmp_path / "none.pth"})
    assert set(columns) == {"supervised", "pretrain + fine-tune (CNN)", "SimCLRv2: pretrain + fine-tune + distil"}
    assert columns["SimCLRv2: pretrain + fine-tune + distil"]["folder"] == "labels0.1/seed0/simclrv2_simclr"
    assert trained == []
    # at 1 % nothing is finished and the checkpoint is gone: only the supervised student can train
    monkeypatch.setattr(self_supervised, "train_or_read", lambda config, folder: {})
    assert set(self_supervised.few_labels(args, 0.01, 0, {"simclr": checkpoint})) == {"supervised"}


def test_self_supervised_report_only_trains_nothing_and_leaves_unfinished_runs_out(tmp_path, monkeypatch):
    import self_supervised

    monkeypatch.setattr(self_supervised, "train_or_read", lambda config, folder: pytest.fail(f"trained {folder}"))
    args = self_supervised.parse_args(["--work-dir", str(tmp_path), "--report-only"])
    summary, checkpoint = self_supervised.pretrain(args, "moco", 1)
    assert summary is None and self_supervised.probe(args, checkpoint, 1) is None
    (tmp_path / "simclr.pth").touch()  # a checkpoint on disk does not make --report-only train from it
    assert self_supervised.few_labels(args, 0.1, 0, {"simclr": tmp_path / "simclr.pth"}) == {}
    assert self_supervised.cnn_finetune(args, 1.0, 0, self_supervised.SCRATCH, None) is None


def test_self_supervised_main_trains_each_part_once_and_a_new_work_dir_continues_from_the_json(tmp_path, monkeypatch):
    import json

    import self_supervised

    from deit.ssl.probe import ProbeScore

    trained = []

    def train(config, folder):  # what train_or_read leaves: a checkpoint (none for CMC's pretraining) and a summary
        if (folder / "summary.json").is_file():
            return json.loads((folder / "summary.json").read_text())
        trained.append(folder.as_posix().split("/runs/")[1])  # the folder under --work-dir
        folder.mkdir(parents=True, exist_ok=True)
        if config.pretrain.method != "cmc" or "pretrain" not in folder.parts:
            (folder / "checkpoint.pth").touch()
        summary = {"minutes": 1.0, "final": {"acc1": 80.0 + len(trained)}, "history": []}
        (folder / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(self_supervised, "train_or_read", train)
    monkeypatch.setattr(self_supervised, "probe_checkpoint", lambda path, **kwargs: [
        ProbeScore(name, 8, accuracy, accuracy) for name, accuracy in (("it", 88.0), ("random", 70.0), ("pixels", 83.0))
    ])  # fmt: skip
    argv = ["--methods", "simclr", "cmc", "byol", "--seeds", "1", "--fractions", "0.1", "--no-progress",
            "--output", str(tmp_path / "ssl.md")]  # fmt: skip
    self_supervised.main([*argv, "--work-dir", str(tmp_path / "first/runs")])
    assert trained == [
        "pretrain/simclr/seed0", "pretrain/cmc/seed0", "pretrain/byol/seed0",
        "labels0.1/seed0/supervised", "labels0.1/seed0/simclr_finetune", "labels0.1/seed0/simclrv2_simclr",
        "labels1/seed0/supervised",
        # part 3: the CNN from scratch first; SimCLR's fine-tune at 10 % is part 2's, read; CMC left no checkpoint
        "labels0.1/seed0/cnn_scratch", "labels0.1/seed0/byol_finetune",
        "labels1/seed0/cnn_scratch", "labels1/seed0/simclr_finetune", "labels1/seed0/byol_finetune",
    ]  # fmt: skip
    table = (tmp_path / "ssl.md").read_text()
    fine_tuned = table.split("## Each method fine-tuned")[1].split("## Goals")[0]
    assert [line.split(" | ")[0] for line in fine_tuned.splitlines() if line.startswith("| ") and "labels" not in line]\
        == ["| from scratch", "| simclr", "| byol"]  # fmt: skip

    trained.clear()  # a new machine: no checkpoint, but the table's JSON
    self_supervised.main([*argv, "--work-dir", str(tmp_path / "second/runs")])
    assert trained == [] and (tmp_path / "ssl.md").read_text().split("## The representation")[1] == \
        table.split("## The representation")[1]  # fmt: skip


def test_self_supervised_retrains_only_the_runs_an_older_commit_trained_and_keeps_them_beside(tmp_path, monkeypatch):
    import json
    import subprocess

    import self_supervised

    from deit.config import TrainConfig, with_overrides

    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    commits = []
    for message in ("before the fix", "the fix", "after it"):
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], check=True)
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        commits.append(head.stdout.strip())
    old, fix, new = commits
    subprocess.run([*git, "tag", "the-fix", fix], check=True)
    monkeypatch.setattr(self_supervised, "CHECKOUT", repo)
    assert self_supervised.resolved_commit("the-fix") == fix  # a name that could move is pinned once
    with pytest.raises(ValueError, match="--retrain-before nosuch: no such commit"):
        self_supervised.resolved_commit("nosuch")

    visited = []  # each folder train_or_read saw, and whether a finished run was there to read
    monkeypatch.setattr(
        self_supervised,
        "train_or_read",
        lambda config, folder: visited.append((folder.name, self_supervised.finished(folder))) or {},
    )
    args = self_supervised.parse_args(["--work-dir", str(tmp_path / "runs"), "--retrain-before", fix])
    config = TrainConfig()

    def finished_run(name: str, commit: str) -> Path:
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"minutes": 1.0, "commit": commit}))
        return folder

    for name, commit in (
        ("old", old),
        ("at-fix", fix),
        ("new", f"{new} with uncommitted changes"),
        ("lost", "unknown"),
    ):
        self_supervised.run_or_read(args, config, finished_run(name, commit))
    assert visited == [("old", False), ("at-fix", True), ("new", True), ("lost", True)]
    assert json.loads((tmp_path / f"runs/old-before-{fix}/summary.json").read_text())["commit"] == old

    visited.clear()  # the retrain stopped before it finished, and a restore put the old record back: kept too
    self_supervised.run_or_read(args, config, finished_run("old", old))
    assert visited == [("old", False)] and (tmp_path / f"runs/old-before-{fix}-2/summary.json").is_file()

    visited.clear()  # a fine-tune whose pretrained checkpoint is gone cannot train again: it is read as it is
    finetune = finished_run("finetune", old)
    self_supervised.run_or_read(args, with_overrides(config, {"model.init": str(tmp_path / "gone.pth")}), finetune)
    assert visited == [("finetune", True)] and not (tmp_path / f"runs/finetune-before-{fix}").exists()


def test_self_supervised_retrains_a_run_whose_pretraining_or_teacher_was_written_after_it_finished(
    tmp_path, monkeypatch
):
    import json
    import os

    import self_supervised

    from deit.config import TrainConfig, with_overrides

    visited = []  # each folder train_or_read saw, and whether a finished run was there to read
    monkeypatch.setattr(
        self_supervised,
        "train_or_read",
        lambda config, folder: visited.append((folder.name, self_supervised.finished(folder))) or {},
    )
    monkeypatch.setattr(self_supervised, "commit", lambda: "abc1234 with uncommitted changes")
    args = self_supervised.parse_args(["--work-dir", str(tmp_path / "runs")])
    pretrained, teacher = tmp_path / "pretrained.pth", tmp_path / "teacher.pth"
    for path in (pretrained, teacher):
        path.write_bytes(b"weights")
        os.utime(path, (1000, 1000))

    def finished_run(name: str, at: float) -> Path:
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"minutes": 1.0}))
        os.utime(folder / "summary.json", (at, at))
        return folder

    finetune = with_overrides(TrainConfig(), {"model.init": str(pretrained)})
    student = with_overrides(TrainConfig(), {"distill.teacher_path": str(teacher)})
    self_supervised.run_or_read(args, finetune, finished_run("fresh", 2000))  # finished after its start: read
    self_supervised.run_or_read(args, finetune, finished_run("stale", 500))  # its pretraining trained again since
    self_supervised.run_or_read(args, student, finished_run("student", 500))  # its teacher trained again since
    self_supervised.run_or_read(args, TrainConfig(), finished_run("scratch", 500))  # starts from nothing: read
    tokens = with_overrides(TrainConfig(), {"pretrain.method": "beit", "pretrain.tokenizer": str(teacher)})
    self_supervised.run_or_read(args, tokens, finished_run("beit", 500))  # a tokenizer fitted again: not stale
    assert visited == [("fresh", True), ("stale", False), ("student", False), ("scratch", True), ("beit", True)]
    assert (tmp_path / "runs/stale-before-abc1234/summary.json").is_file()
    assert (tmp_path / "runs/student-before-abc1234/summary.json").is_file()

    visited.clear()  # --report-only trains nothing, and leaves a stale run out of the table
    report = self_supervised.parse_args(["--work-dir", str(tmp_path / "runs"), "--report-only"])
    assert self_supervised.run_or_read(report, finetune, finished_run("stale-read", 500)) is None
    assert self_supervised.run_or_read(report, finetune, finished_run("fresh-read", 2000)) == {"folder": "fresh-read"}
    assert visited == [("fresh-read", True)] and self_supervised.finished(tmp_path / "runs/stale-read")


def test_self_supervised_restore_leaves_a_folder_being_trained_alone_and_keeps_only_the_runs_own_record(tmp_path):
    import json

    import self_supervised

    args = self_supervised.parse_args(["--work-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "t.md")])
    summary = {"minutes": 1.0, "final": {"acc1": 80.0}, "history": [], "settings_differing": ["optim.lr = 1 there"]}
    runs = [{**summary, "folder": f"labels0.1/seed0/{name}"} for name in ("supervised", "simclr_finetune")]
    (tmp_path / "t.json").write_text(json.dumps({"few_labels": {"0.1": {"supervised": runs}}}))
    training = tmp_path / "runs/labels0.1/seed0/simclr_finetune"  # a retrain under way: no summary yet
    training.mkdir(parents=True)
    assert self_supervised.restore_finished_runs(args) == 1 and not self_supervised.finished(training)
    restored = json.loads((tmp_path / "runs/labels0.1/seed0/supervised/summary.json").read_text())
    assert restored == {"minutes": 1.0, "final": {"acc1": 80.0}, "history": []}


def test_self_supervised_students_of_another_budget_train_in_their_own_folders_on_the_seeds_asked(
    tmp_path, monkeypatch
):
    import self_supervised

    trained = []
    monkeypatch.setattr(self_supervised, "train_or_read", lambda config, folder: trained.append(
        (folder.relative_to(tmp_path).as_posix(), config.optim.epochs)) or {})  # fmt: skip
    teacher = tmp_path / "labels0.1/seed1/simclr_finetune/checkpoint.pth"
    teacher.parent.mkdir(parents=True)
    teacher.touch()
    pretrained = tmp_path / "simclr.pth"
    pretrained.touch()
    argv = ["--work-dir", str(tmp_path), "--first-seed", "1", "--seeds", "1", "--student-epochs", "30"]
    args = self_supervised.parse_args(argv)
    assert list(self_supervised.seeds(args)) == [1]
    self_supervised.few_labels(args, 0.1, 1, {"simclr": pretrained})
    assert trained == [
        ("labels0.1/seed1/supervised_30_epochs", 30),
        ("labels0.1/seed1/simclr_finetune", 10),  # the CNN's budget is --finetune-epochs: the same run as the table's
        ("labels0.1/seed1/simclrv2_simclr_30_epochs", 30),
    ]
    trained.clear()  # the table's own budget keeps the folders it always had
    self_supervised.few_labels(
        self_supervised.parse_args(["--work-dir", str(tmp_path)]), 0.1, 1, {"simclr": pretrained}
    )
    assert [folder for folder, _ in trained] == [
        "labels0.1/seed1/supervised", "labels0.1/seed1/simclr_finetune", "labels0.1/seed1/simclrv2_simclr"
    ]  # fmt: skip
