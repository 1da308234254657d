"""sweep.py: a real 2 lr x 2 seed sweep of the tiny model, resuming, killed and failing runs, locks, and the
--best / --markdown tables on hand-made run directories with hand-computed values."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import sweep
from conftest import REPO, finished_runs, train_args

LRS = ("1e-3", "3e-3")
SEEDS = ("1", "2")
UNKNOWN_MODEL = "no-such-org/no-such-model"


@pytest.fixture(autouse=True)
def one_thread_children(monkeypatch):
    # two 2-thread torch children on 2 shared cores slow each other down tenfold
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def bertcls_flags(model: Path, dataset: Path, out: Path) -> list[str]:
    """train_args' flags for 2 epochs, without the ones the sweep sets itself."""
    flags = train_args(model, dataset, out, "--epochs", "2")
    for name in ("--model_name", "--lr", "--output_dir"):
        i = flags.index(name)
        del flags[i:i + 2]
    return flags


def sweep_argv(out: Path, flags: list[str], models: list[str], lrs=LRS, seeds=SEEDS) -> list[str]:
    return ["--model_names", *models, "--lrs", *lrs, "--seeds", *seeds, "--output_dir", str(out), *flags]


def csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def run_dirs(out: Path) -> set[Path]:
    return {p.parent for p in out.glob("*/*/*/config.json")}


def run_of(out: Path, lr: float, seed: int) -> Path:
    args = {d: json.loads((d / "config.json").read_text())["args"] for d in finished_runs(out)}
    found = [d for d, a in args.items() if math.isclose(a["lr"], lr) and a["seed"] == seed]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_bert, tiny_dataset):
    """One real sweep, two runs at a time (--devices a,b only sets CUDA_VISIBLE_DEVICES; the runs use the CPU)."""
    out = tmp_path_factory.mktemp("sweep") / "outputs"
    flags = bertcls_flags(tiny_bert, tiny_dataset, out)
    argv = sweep_argv(out, flags, [str(tiny_bert)])
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setenv("OMP_NUM_THREADS", "1")
        rc = sweep.main([*argv, "--devices", "a,b"])
    return types.SimpleNamespace(out=out, flags=flags, argv=argv, rc=rc, stdout=stdout.getvalue(),
                                 stderr=stderr.getvalue())


def test_sweep_prints_one_row_per_run(swept):
    assert swept.rc == 0, swept.stderr
    rows = csv_rows(swept.stdout)
    assert list(rows[0]) == sweep.RUN_COLUMNS
    assert sorted((float(r["lr"]), int(r["seed"])) for r in rows) == [(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)]
    assert [float(r["f1"]) for r in rows] == sorted((float(r["f1"]) for r in rows), reverse=True)
    assert len(finished_runs(swept.out)) == 4
    for row in rows:
        run_dir = run_of(swept.out, float(row["lr"]), int(row["seed"]))
        config = json.loads((run_dir / "config.json").read_text())
        val = json.loads((run_dir / "val-metrics.json").read_text())
        test = json.loads((run_dir / "test-metrics.json").read_text())
        assert row["model_name"] == config["args"]["model_name"]
        assert int(row["params"]) == config["params"] > 0
        assert int(row["best-val-epoch"]) == val["best_epoch"]
        assert float(row["best-val-f1"]) == val["f1"] and float(row["train_seconds"]) == val["train_seconds"]
        assert {m: float(row[m]) for m in sweep.METRICS} == {m: test[m] for m in sweep.METRICS}
    logs = sorted((swept.out / "sweep-logs").glob("*.log"))
    assert len(logs) == 4 and all(str(log) in swept.stderr for log in logs)
    assert "on GPU a" in swept.stderr and "on GPU b" in swept.stderr
    assert list((swept.out / ".locks").glob("*.lock")) == []  # released


def test_second_sweep_runs_nothing_and_prints_the_same_table(swept, monkeypatch, capsys):
    before = run_dirs(swept.out)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a finished combination was run again")

    monkeypatch.setattr(sweep.subprocess, "Popen", no_subprocess)
    assert sweep.main(swept.argv) == 0
    out, err = capsys.readouterr()
    assert out == swept.stdout
    assert "4 combinations, 4 already finished, 0 to run" in err
    assert run_dirs(swept.out) == before
    assert sweep.main(["--no_run", "--output_dir", str(swept.out)]) == 0
    assert capsys.readouterr().out == swept.stdout
    # --no_run with a bertcls.py flag selects the runs made with it: none ran 3 epochs
    assert sweep.main(["--no_run", "--output_dir", str(swept.out), "--epochs", "3"]) == 0
    assert capsys.readouterr().out == ",".join(sweep.RUN_COLUMNS) + "\n"


def test_killed_run_is_run_again_and_an_unknown_model_fails_alone(swept, tmp_path, tiny_bert, tiny_dataset, capsys):
    out = shutil.copytree(swept.out, tmp_path / "outputs")
    flags = bertcls_flags(tiny_bert, tiny_dataset, out)
    victim = run_of(out, 1e-3, 1)
    (victim / "test-metrics.json").unlink()  # as if it had been interrupted before its last file
    before = run_dirs(out)
    # a real sweep process reruns it; SIGKILL both the sweep and its child mid-run
    with open(tmp_path / "killed.err", "w") as err:
        process = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), *sweep_argv(out, flags, [str(tiny_bert)])],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while True:
        locks = list((out / ".locks").glob("*.lock"))
        with contextlib.suppress(OSError, ValueError, IndexError):
            sweep_pid, child_pid = json.loads(locks[0].read_text())["pids"]
            if run_dirs(out) - before:
                break
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.err").read_text()
        time.sleep(0.02)
    os.kill(sweep_pid, signal.SIGKILL)
    process.wait()
    os.kill(child_pid, signal.SIGKILL)
    while sweep.pid_alive(child_pid):
        time.sleep(0.05)
    [killed] = run_dirs(out) - before
    assert (killed / "config.json").is_file() and not (killed / "test-metrics.json").exists()
    assert len(list((out / ".locks").glob("*.lock"))) == 1  # left behind, stale
    assert len(finished_runs(out)) == 3

    argv = sweep_argv(out, flags, [UNKNOWN_MODEL, str(tiny_bert)], lrs=["1e-3"], seeds=["1"])
    assert sweep.main(argv) == 1
    stdout, stderr = capsys.readouterr()
    [log] = (out / "sweep-logs").glob("no-such-org__no-such-model__*.log")
    assert f"FAILED {UNKNOWN_MODEL} lr 0.001 seed 1 (exit 1)" in stderr and f"log: {log}" in stderr
    assert "cannot load" in log.read_text()
    assert "taking over stale lock" in stderr
    [rerun] = set(finished_runs(out)) - {d for d in before if (d / "test-metrics.json").exists()}
    assert len(finished_runs(out)) == 4 and rerun not in (victim, killed)
    [row] = csv_rows(stdout)
    assert (row["model_name"], float(row["lr"]), row["seed"]) == (str(tiny_bert), 1e-3, "1")
    assert float(row["f1"]) == json.loads((rerun / "test-metrics.json").read_text())["f1"]
    assert list((out / ".locks").glob("*.lock")) == []


def test_combination_locked_by_a_live_process_is_not_run(swept, tmp_path, tiny_bert, tiny_dataset, monkeypatch,
                                                          capsys):
    out = shutil.copytree(swept.out, tmp_path / "outputs")
    flags = bertcls_flags(tiny_bert, tiny_dataset, out)
    corrupt = run_of(out, 3e-3, 2)
    (corrupt / "test-metrics.json").write_text("{not json")  # a corrupt run does not count: it must run again
    [combo] = sweep.combinations([str(tiny_bert)], [3e-3], [2], flags, out)
    lock = out / ".locks" / f"{combo.stem}.lock"
    other_sweep = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(sweep.lock_record(other_sweep.pid))
        before = run_dirs(out)
        monkeypatch.setattr(sweep.subprocess, "Popen", None)  # any run attempt would raise
        assert sweep.main(sweep_argv(out, flags, [str(tiny_bert)])) == 0
    finally:
        other_sweep.kill()
        other_sweep.wait()
    stdout, stderr = capsys.readouterr()
    assert f"skipped {tiny_bert} lr 0.003 seed 2: another sweep (pid {other_sweep.pid}) is running it" in stderr
    assert f"warning: skipped {corrupt}: test-metrics.json cannot be read" in stderr
    assert run_dirs(out) == before and lock.is_file()
    assert len(csv_rows(stdout)) == 3


def test_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path):
    lock, notes = tmp_path / ".locks" / "x.lock", []
    assert sweep.acquire_lock(lock, notes.append) is None
    assert json.loads(lock.read_text())["pids"] == [os.getpid()]
    assert sweep.acquire_lock(lock, notes.append) == f"pid {os.getpid()}"
    finished = subprocess.Popen(["true"])
    finished.wait()
    lock.write_text(sweep.lock_record(finished.pid))
    assert sweep.acquire_lock(lock, notes.append) is None and notes == [f"sweep.py: taking over stale lock {lock}"]
    lock.write_text(json.dumps({"pids": [finished.pid], "host": "another-machine"}))
    assert sweep.acquire_lock(lock, notes.append) == f"pid {finished.pid} on another-machine"


# ------------------------------------------------------------------------------ hand-made run dirs


def write_run(out: Path, model: str, lr: float, seed: int, time_of_day: str, val_f1: float, test: dict,
              params: int, train_seconds: float = 100.0) -> Path:
    run_dir = out / model.replace("/", "__") / "2024-05-01" / time_of_day
    run_dir.mkdir(parents=True)
    args = {"model_name": model, "lr": lr, "seed": seed, "epochs": 3, "output_dir": str(out)}
    (run_dir / "config.json").write_text(json.dumps({"args": args, "params": params}))
    (run_dir / "val-metrics.json").write_text(json.dumps({"best_epoch": 2, "train_seconds": train_seconds,
                                                          "f1": val_f1}))
    (run_dir / "test-metrics.json").write_text(json.dumps(test))
    return run_dir


def metrics(loss: float, accuracy: float, precision: float, recall: float, f1: float) -> dict:
    return {"loss": loss, "accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}


@pytest.fixture
def hand_made(tmp_path) -> Path:
    out = tmp_path / "outputs"
    write_run(out, "org/a", 1e-5, 1, "10-00-00.000000", 0.80, metrics(0.5, 0.80, 0.78, 0.77, 0.78), 110_000_000)
    write_run(out, "org/a", 1e-5, 2, "10-00-01.000000", 0.84, metrics(0.5, 0.84, 0.82, 0.81, 0.82), 110_000_000)
    # an older run of (a, 3e-5, 1): if it counted, 3e-5's mean val F1 would drop to 0.62 and lose to 1e-5's 0.82
    write_run(out, "org/a", 3e-5, 1, "09-00-00.000000", 0.10, metrics(2.0, 0.10, 0.10, 0.10, 0.10), 110_000_000)
    write_run(out, "org/a", 3e-5, 1, "11-00-00.000000", 0.90, metrics(0.30, 0.92, 0.90, 0.89, 0.91), 110_000_000,
              train_seconds=100.0)
    write_run(out, "org/a", 3e-5, 2, "11-00-01.000000", 0.86, metrics(0.40, 0.88, 0.86, 0.85, 0.87), 110_000_000,
              train_seconds=120.0)
    write_run(out, "org/b", 2e-5, 1, "12-00-00.000000", 0.95, metrics(0.20, 0.94, 0.93, 0.92, 0.93), 337_000_000)
    return out


def test_best_picks_the_lr_with_the_highest_mean_val_f1(hand_made, capsys):
    assert sweep.main(["--no_run", "--best", "--output_dir", str(hand_made)]) == 0
    b, a = csv_rows(capsys.readouterr().out)
    assert (a["model_name"], float(a["lr"]), a["seeds"], a["params"]) == ("org/a", 3e-5, "2", "110000000")
    spread = 0.04 / math.sqrt(2)  # sample std of two values d apart: d / sqrt(2)
    expected = {"best-val-f1": (0.88, spread), "loss": (0.35, 0.1 / math.sqrt(2)), "accuracy": (0.90, spread),
                "precision": (0.88, spread), "recall": (0.87, spread), "f1": (0.89, spread)}
    for column, (mean, std) in expected.items():
        assert float(a[column]) == pytest.approx(mean) and float(a[f"{column}-std"]) == pytest.approx(std), column
    assert float(a["train_seconds"]) == pytest.approx(110.0)
    assert (b["model_name"], float(b["lr"]), b["seeds"], float(b["f1"]), b["f1-std"]) == ("org/b", 2e-5, "1", 0.93, "")


def test_markdown_renders_the_best_table(hand_made, capsys):
    assert sweep.main(["--no_run", "--markdown", "--output_dir", str(hand_made)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| model | lr | seeds | params (M) | val F1 (%) | accuracy (%) | precision (%) | recall (%) | F1 (%) | loss |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        "| org/b | 2e-05 | 1 | 337.0 | 95.00 | 94.00 | 93.00 | 92.00 | 93.00 | 0.2000 |",
        "| org/a | 3e-05 | 2 | 110.0 | 88.00 ± 2.83 | 90.00 ± 2.83 | 88.00 ± 2.83 | 87.00 ± 2.83 | 89.00 ± 2.83 "
        "| 0.3500 ± 0.0707 |"]


def test_malformed_run_directories_are_skipped_with_a_warning(hand_made, capsys):
    good = metrics(0.1, 0.99, 0.99, 0.99, 0.99)
    bad_test = write_run(hand_made, "org/c", 1e-5, 1, "10-00-00.000000", 0.99, good, 1)
    (bad_test / "test-metrics.json").write_text('{"loss": 0.1, "accur')
    bad_config = write_run(hand_made, "org/c", 1e-5, 2, "10-00-01.000000", 0.99, good, 1)
    (bad_config / "config.json").write_text("")
    no_val = write_run(hand_made, "org/c", 1e-5, 3, "10-00-02.000000", 0.99, good, 1)
    (no_val / "val-metrics.json").unlink()
    no_params = write_run(hand_made, "org/c", 1e-5, 4, "10-00-03.000000", 0.99, good, 1)
    (no_params / "config.json").write_text(json.dumps({"args": {"model_name": "org/c", "lr": 1e-5, "seed": 4}}))
    unfinished = write_run(hand_made, "org/c", 1e-5, 5, "10-00-04.000000", 0.99, good, 1)
    (unfinished / "test-metrics.json").unlink()
    assert sweep.main(["--no_run", "--output_dir", str(hand_made)]) == 0
    out, err = capsys.readouterr()
    assert [(r["model_name"], r["seed"]) for r in csv_rows(out)] == [
        ("org/b", "1"), ("org/a", "1"), ("org/a", "2"), ("org/a", "2"), ("org/a", "1")]
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [f"sweep.py: warning: skipped {bad_test}: test-metrics.json cannot be read "
                        "(Unterminated string starting at: line 1 column 15 (char 14))",
                        f"sweep.py: warning: skipped {bad_config}: config.json cannot be read "
                        "(Expecting value: line 1 column 1 (char 0))",
                        f"sweep.py: warning: skipped {no_val}: val-metrics.json is missing",
                        f"sweep.py: warning: skipped {no_params}: config.json: 'params' is missing or not a "
                        "finite number"]


def test_no_run_filters_by_grid_and_passed_flags(hand_made, capsys):
    assert sweep.main(["--no_run", "--output_dir", str(hand_made), "--model_names", "org/a", "--lrs", "0.00003",
                       "--epochs", "3"]) == 0
    assert sorted(r["seed"] for r in csv_rows(capsys.readouterr().out)) == ["1", "2"]


@pytest.mark.parametrize("extra", [[], ["--no_run"]])
def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys, extra):
    path = tmp_path / "outputs"
    path.write_text("")
    assert sweep.main(["--output_dir", str(path), *extra]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"sweep.py: error: --output_dir {path} is a file: pass a directory\n"


def test_bad_flags_for_bertcls_are_a_one_line_error(tmp_path, capsys):
    assert sweep.main(["--output_dir", str(tmp_path), "--epochs", "0"]) == 1
    assert capsys.readouterr().err == ("sweep.py: error: flags for bertcls.py: argument --epochs: "
                                       "must be a positive integer, got 0\n")
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--lr", "3e-5"])  # the grid's flags are the sweep's, not a run's
    assert exit_info.value.code == 2
    assert "--lr is set by the sweep: use --lrs" in capsys.readouterr().err


def test_matching_helpers():
    assert sweep.same_value(3e-5, 0.00003) and sweep.same_value(3, 3.0) and not sweep.same_value(True, 1)
    assert sweep.same_value(False, False) and not sweep.same_value("a", "b")
    assert not sweep.same_value(1e-5, 1.0000001e-5)
    fields = ["epochs", "batch_size", "max_seq_len", "max_grad_norm"]
    # abbreviations as argparse takes them; "--max" is ambiguous, so bertcls.py would reject it anyway
    assert sweep.named_fields(["--epoch", "3", "--batch_size=8", "x", "--max"], fields) == {"epochs", "batch_size"}
    assert sweep.child_env({"A": "1"}, "2") == {"A": "1", "CUDA_VISIBLE_DEVICES": "2"}
    assert sweep.child_env({"A": "1"}, None) == {"A": "1"}
    assert sweep.mean_std([0.5]) == (0.5, None)
    assert sweep.mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(math.sqrt(7.0)))  # ((4 + 1 + 9) / 2) ** 0.5


# ------------------------------------------------------------------------------ device and precision


def write_run_on(out: Path, time_of_day: str, device: str, dtype: str) -> Path:
    run_dir = write_run(out, "org/a", 1e-5, 1, time_of_day, 0.8, metrics(0.5, 0.8, 0.8, 0.8, 0.8), 1000)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "device": device, "dtype": dtype}))
    return run_dir


def test_a_finished_run_counts_only_on_its_device_type_and_dtype(tmp_path, monkeypatch):
    import torch

    import common
    out = tmp_path / "outputs"
    cpu_dtype = common.dtype_name(common.resolve_dtype("auto", torch.device("cpu")))
    on_cpu = write_run_on(out, "10-00-00.000000", "cpu", cpu_dtype)
    on_gpu = write_run_on(out, "09-00-00.000000", "cuda:1", "bfloat16")  # older: newest-first alone would not pick it
    runs, _ = sweep.scan_runs(out)
    defaults = sweep.resolve_bertcls_args([])

    def found(*flags: str) -> Path | None:
        [combo] = sweep.combinations(["org/a"], [1e-5], [1], ["--epochs", "3", *flags], out)
        run = sweep.newest_match(runs, combo, defaults)
        return run and run.run_dir

    assert found() == on_cpu  # this machine has no CUDA: the default device is the CPU
    assert found("--dtype", "fp16") is None  # the CPU run computed in its auto dtype, not fp16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # now a GPU with bf16 units is the default
    monkeypatch.setattr(common, "cuda_has_native_bf16", lambda device: True)
    assert found() == on_gpu
    assert found("--device", "cpu") == on_cpu
    assert found("--dtype", "fp32") is None


def test_devices_are_positions_in_an_inherited_cuda_visible_devices(tmp_path, monkeypatch, capsys):
    assert sweep.visible_devices(["0", "1"], None) == ["0", "1"]
    assert sweep.visible_devices(["0", "1"], "4,5") == ["4", "5"]
    assert sweep.visible_devices(["1"], "GPU-aaa,GPU-bbb") == ["GPU-bbb"]
    for devices, inherited in [(["2"], "4,5"), (["a"], "4,5"), (["0"], "")]:
        with pytest.raises(sweep.UserError, match="pass those numbers"):
            sweep.visible_devices(devices, inherited)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")
    assert sweep.main(["--model_names", "org/a", "--output_dir", str(tmp_path), "--devices", "0,1"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == ("sweep.py: error: --devices 1: CUDA_VISIBLE_DEVICES=4 leaves "
                                                        "1 GPU(s) visible, numbered 0..0 here: pass those numbers")
