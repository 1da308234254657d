"""sweep.py: the grid, running it with a stand-in for bertcls.py (resuming, skipping, failing, locks, devices, Slurm),
one real sweep of the tiny model, and the tables on hand-made run directories against hand-computed values."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_rows, stopping_run, write_dataset

import bertcls  # noqa: E402
import common  # noqa: E402
import compare  # noqa: E402
import sweep  # noqa: E402

# Flags every scheduling test passes: the runs then compute on the CPU in fp32 on any machine, as the runs below say.
ON_CPU = ["--device", "cpu", "--dtype", "fp32"]

# A stand-in for bertcls.py: its settings are FAKE_DEFAULTS updated by its flags; it appends its argv and
# CUDA_VISIBLE_DEVICES to FAKE_CALLS, writes config.json, waits FAKE_SECONDS, then fails when its lr is FAKE_FAIL_LR,
# else writes the metrics (f1 from the lr and seed), test-metrics.json last. With --resume it finishes that run.
FAKE_BERTCLS = r'''
import json, os, sys, time, datetime
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"argv": argv, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": time.time()}) + "\n")
if argv[0] == "--resume":
    run_dir = Path(argv[1])
    args = json.loads((run_dir / "config.json").read_text())["args"]
else:
    args, i = json.loads(os.environ["FAKE_DEFAULTS"]), 0
    while i < len(argv):
        name, default = argv[i][2:], args.get(argv[i][2:])
        args[name] = type(default)(argv[i + 1]) if default is not None else argv[i + 1]
        i += 2
    now = datetime.datetime.now()
    run_dir = (Path(args["output_dir"]) / args["model_name"].strip("/").replace("/", "__") / now.strftime("%Y-%m-%d")
               / now.strftime(f"%H-%M-%S.%f-{os.getpid()}"))  # two at once: same microsecond, seen here
    run_dir.mkdir(parents=True)
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args["dtype"]]
    (run_dir / "config.json").write_text(json.dumps({"args": args, "device": args["device"], "dtype": dtype,
        "world_size": 1, "params": 1000, "dataset_digest": "data-1", "fold": None}))
time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
if os.environ.get("FAKE_FAIL_LR") and float(os.environ["FAKE_FAIL_LR"]) == args["lr"]:
    sys.exit("boom: this run fails")
f1 = round(0.5 + args["lr"] * 100 + args["seed"] / 1000, 6)
(run_dir / "val-metrics.json").write_text(json.dumps({"best_epoch": 1, "train_seconds": 1.0, "f1": f1}))
(run_dir / "test-predictions.jsonl").write_text(
    "".join(json.dumps({"id": i, "gold": "x", "predicted": "x", "probabilities": {"x": 1.0, "y": 0.0}}) + "\n"
            for i in range(4)))
(run_dir / "test-metrics.json").write_text(json.dumps(dict.fromkeys(["loss", "accuracy", "precision", "recall",
                                                                     "f1"], f1)))
'''


def csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def finished_runs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob("*/*/*/test-metrics.json"))


def run_dirs(out: Path) -> set[Path]:
    return {p.parent for p in out.glob("*/*/*/config.json")}


def stub_dataset(directory: Path) -> Path:
    """A dataset directory with every file sweep.py checks for before it runs anything (the stand-in reads none)."""
    return write_dataset(directory, {split: make_rows(1) for split in ("train", "val", "test")})


@pytest.fixture(autouse=True)
def one_thread_children(monkeypatch):
    # two 2-thread torch processes on 2 shared cores slow each other down tenfold
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    """sweep.py runs the stand-in; returns the file listing its calls."""
    script = tmp_path / "fake_bertcls.py"
    script.write_text(FAKE_BERTCLS)
    monkeypatch.setattr(sweep, "BERTCLS", script)
    monkeypatch.setenv("FAKE_DEFAULTS", json.dumps(sweep.resolve([])[0]))
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path / "calls.jsonl"


def calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def lrs_run(path: Path) -> list[float]:
    return sorted(float(c["argv"][c["argv"].index("--lr") + 1]) for c in calls(path) if "--lr" in c["argv"])


def grid_argv(tmp_path: Path, *extra: str, lrs=("1e-3", "3e-3"), seeds=("1",)) -> list[str]:
    data = stub_dataset(tmp_path / "data")
    return ["--model_names", "org/a", "--lrs", *lrs, "--seeds", *seeds, "--output_dir", str(tmp_path / "out"),
            "--dataset_dir", str(data), *ON_CPU, *extra]


def one_line_error(capsys, argv: list[str], message: str) -> None:
    assert sweep.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == f"sweep.py: error: {message}" and "Traceback" not in err


def no_runs(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(sweep.subprocess, "Popen", refuse)


# ------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("argv, message", [
    (["--lr", "3e-5"], "--lr is set by the sweep: use --lrs"),
    (["--model_name", "org/a"], "--model_name is set by the sweep: use --model_names"),
    (["--seed", "1"], "--seed is set by the sweep: use --seeds"),
    (["--truncation", "head_tail"], "--truncation is set by the sweep: use --truncations"),
    (["--resume", "outputs/x"], "--resume is set by the sweep: it resumes interrupted runs by itself"),
    (["--epochs", "0"], "flags for bertcls.py: argument --epochs: expected a positive integer, got 0"),
    (["--no_such_flag"], "flags for bertcls.py: unrecognized arguments: --no_such_flag"),
    (["--sbatch=-p gpu"], "--sbatch and --max_running go with --slurm"),
    (["--slurm", "--devices", "0"], "--slurm gives each array task a GPU of its own: drop --devices"),
    (["--dataset_dir", "d", "--dataset_dirs", "d1", "d2"],
     "give the datasets either as --dataset_dir (one) or as --dataset_dirs (several), not both"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    no_runs(monkeypatch)
    one_line_error(capsys, ["--output_dir", str(tmp_path / "out"), *argv], message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1", "-1"], "argument --seeds: expected a seed from 0 to 4294967295"),
    (["--lrs", "1e-5", "0"], "argument --lrs: expected a positive number, got 0"),
    (["--list", "csv"], "argument --list: invalid choice: 'csv'"),
    (["--no_run", "--list"], "argument --list: not allowed with argument --no_run"),
    (["--slurm", "--task_index", "0"], "argument --task_index: not allowed with argument --slurm"),
])
def test_bad_numbers_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(argv)
    assert exit_info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err.splitlines()[-1]


def test_datasets_are_checked_and_output_is_refused_before_anything_runs(tmp_path, fake, monkeypatch, capsys):
    argv = grid_argv(tmp_path)
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "test.jsonl").unlink()
    (data / "label2id.json").unlink()
    one_line_error(capsys, argv, f"dataset {data} has no test.jsonl, label2id.json: write it with prepare.py")
    # every dataset of --dataset_dirs, before the first run
    argv = ["--model_names", "org/a", "--lrs", "1e-3", "--output_dir", str(out), *ON_CPU]
    good, bad = stub_dataset(tmp_path / "fold-0"), stub_dataset(tmp_path / "fold-1")
    (bad / "val.jsonl").unlink()
    one_line_error(capsys, [*argv, "--dataset_dirs", str(good), str(bad)],
                   f"dataset {bad} has no val.jsonl: write it with prepare.py")
    assert calls(fake) == [] and not out.exists()
    # --output: checked before the runs, not after them
    argv = grid_argv(tmp_path)
    for output, message in [(data, f"--output {data}: expected a file in an existing directory"),
                            (tmp_path / "no" / "t.csv", f"--output {tmp_path / 'no' / 't.csv'}: expected a file in an "
                                                        "existing directory"),
                            (data / "train.jsonl", f"--output {data / 'train.jsonl'} would overwrite the input "
                                                   f"{data / 'train.jsonl'}: write somewhere else")]:
        one_line_error(capsys, [*argv, "--output", str(output)], message)
    one_line_error(capsys, [*argv, "--output", f"{tmp_path}/./data/../data/label2id.json"],
                   f"--output {tmp_path}/data/../data/label2id.json would overwrite the input "
                   f"{data / 'label2id.json'}: write somewhere else")
    assert calls(fake) == [] and not out.exists()


def test_devices_without_cuda_are_refused(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(capsys, grid_argv(tmp_path, "--devices", "0,1"), "--devices needs CUDA, which is not available "
                   "here: drop --devices")
    assert calls(fake) == [] and not (tmp_path / "out").exists()
    with pytest.raises(common.UserError, match="--devices needs CUDA"):
        sweep.visible_devices(["0"])


# ------------------------------------------------------------------------------------------- running the grid


def test_a_failed_run_is_reported_and_output_is_written_only_on_success(tmp_path, fake, monkeypatch, capsys):
    output = tmp_path / "table.csv"
    output.write_text("the table of an earlier sweep\n")
    argv = grid_argv(tmp_path, "--output", str(output))
    monkeypatch.setenv("FAKE_FAIL_LR", "0.003")
    assert sweep.main(argv) == 1
    out, err = capsys.readouterr()
    [combo] = [c for c in sweep.grid(sweep.parse_args(argv)) if c.values["lr"] == 3e-3]
    log_path = combo.log
    assert f"sweep.py: FAILED org/a lr 0.003 seed 1 (exit 1): boom: this run fails; log: {log_path}" in err
    assert "sweep.py: 1 runs done, 1 failed, 0 left to another sweep; 1 of 2 combinations have results" in err
    assert out == "" and err.splitlines()[-1] == (f"sweep.py: error: 1 run(s) failed, so --output {output} was not "
                                                  "written: run the same command again to retry them")
    assert output.read_text() == "the table of an earlier sweep\n"
    # without --output: the table of what finished on stdout, and exit 1
    assert sweep.main(argv[:-2]) == 1
    out, err = capsys.readouterr()
    assert "2 combinations, 1 already finished, 1 to run" in err
    assert [(r["lr"], r["f1"]) for r in csv_rows(out)] == [("0.001", "0.601")]
    # fixed: the failed combination runs again (a new run: the failed one has no checkpoint) and --output is written
    monkeypatch.delenv("FAKE_FAIL_LR")
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out == ""
    assert [(r["lr"], r["f1"]) for r in csv_rows(output.read_text())] == [("0.003", "0.801"), ("0.001", "0.601")]
    assert lrs_run(fake) == [1e-3, 3e-3, 3e-3, 3e-3] and len(run_dirs(tmp_path / "out")) == 4
    assert len(finished_runs(tmp_path / "out")) == 2 and "boom" not in log_path.read_text()


def test_a_finished_combination_is_skipped_and_its_newest_run_counts_once(tmp_path, fake, capsys):
    argv = grid_argv(tmp_path, lrs=("1e-3",))
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    [run_dir] = finished_runs(tmp_path / "out")
    # a newer run of the same combination (another sweep's, say) with another result; an older one too
    newer = shutil.copytree(run_dir, run_dir.parents[1] / "9999-12-31" / "00-00-00.000000")
    (newer / "test-metrics.json").write_text(json.dumps(dict.fromkeys(sweep.METRICS, 0.42)))
    older = shutil.copytree(run_dir, run_dir.parents[1] / "2000-01-01" / "00-00-00.000000")
    (older / "test-metrics.json").write_text(json.dumps(dict.fromkeys(sweep.METRICS, 0.99)))
    assert sweep.main(argv) == 0
    out, err = capsys.readouterr()
    assert "1 combinations, 1 already finished, 0 to run" in err and len(calls(fake)) == 1
    assert [(r["lr"], r["f1"]) for r in csv_rows(out)] == [("0.001", "0.42")]
    assert [r["f1"] for r in csv_rows(first)] == ["0.601"]
    assert sweep.main(["--no_run", "--output_dir", str(tmp_path / "out")]) == 0
    assert [r["f1"] for r in csv_rows(capsys.readouterr().out)] == ["0.42"]


def test_an_interrupted_run_with_a_checkpoint_is_resumed_one_without_is_run_again(tmp_path, fake, monkeypatch,
                                                                                   capsys):
    argv, out = grid_argv(tmp_path), tmp_path / "out"
    monkeypatch.setenv("FAKE_FAIL_LR", "0.001")
    assert sweep.main(argv) == 1
    capsys.readouterr()
    monkeypatch.delenv("FAKE_FAIL_LR")
    [failed] = run_dirs(out) - set(finished_runs(out))  # lr 0.001: config.json, no results, no checkpoint
    [interrupted] = finished_runs(out)  # lr 0.003: made interrupted after its checkpoint of epoch 1
    (interrupted / "test-metrics.json").unlink()
    (interrupted / "checkpoint-epoch1").mkdir()
    # an older interrupted run with a checkpoint: the newest one is resumed
    older = shutil.copytree(interrupted, interrupted.parents[1] / "2000-01-01" / "00-00-00.000000")
    combos = {c.values["lr"]: c for c in sweep.grid(sweep.parse_args(argv))}
    logs = {lr: c.log for lr, c in combos.items()}
    logs[3e-3].write_text("the interrupted run's log\n")
    assert "boom" in logs[1e-3].read_text()
    assert sweep.main(argv) == 0
    stdout, err = capsys.readouterr()
    assert "2 combinations, 0 already finished, 2 to run" in err
    assert f"running org/a lr 0.003 seed 1 (resuming {interrupted}): log {logs[3e-3]}" in err
    assert f"running org/a lr 0.001 seed 1: log {logs[1e-3]}" in err
    rerun, resumed = calls(fake)[-2:]  # one at a time, in the grid's order
    assert resumed["argv"] == ["--resume", str(interrupted)] and rerun["argv"] == combos[1e-3].flags
    [new] = run_dirs(out) - {failed, interrupted, older}
    assert set(finished_runs(out)) == {interrupted, new}
    assert logs[3e-3].read_text() == "the interrupted run's log\n"  # appended to (the stand-in writes nothing)
    assert logs[1e-3].read_text() == ""  # written anew
    assert sorted((r["lr"], r["f1"]) for r in csv_rows(stdout)) == [("0.001", "0.601"), ("0.003", "0.801")]


def test_a_combination_locked_by_another_sweep_is_left_to_it(tmp_path, fake, capsys):
    argv = grid_argv(tmp_path)
    combos = sweep.grid(sweep.parse_args(argv))
    lock = combos[0].lock
    lock.parent.mkdir(parents=True)
    with common.locked(lock, "another sweep's lock"):  # flock: another open file, as another process
        assert sweep.main([*argv, "--list", "tsv"]) == 0
        assert [line.split("\t")[4] for line in capsys.readouterr().out.splitlines()] == ["state", "running", "to do"]
        assert sweep.main(argv) == 0
        out_text, err = capsys.readouterr()
    assert f"[1/2] left to another sweep: org/a lr 0.001 seed 1 (lock {lock})" in err
    assert "1 runs done, 0 failed, 1 left to another sweep; 1 of 2 combinations have results" in err
    assert lrs_run(fake) == [3e-3] and [r["lr"] for r in csv_rows(out_text)] == ["0.003"]
    # released (its file left behind): the combination is to do, and runs
    assert lock.exists() and sweep.main([*argv, "--list", "tsv"]) == 0
    assert [line.split("\t")[4] for line in capsys.readouterr().out.splitlines()] == ["state", "to do", "finished"]
    assert sweep.main(argv) == 0 and lrs_run(fake) == [1e-3, 3e-3]


def test_under_its_lock_a_combination_is_looked_at_again(tmp_path, fake, monkeypatch, capsys):
    argv, out = grid_argv(tmp_path, lrs=("1e-3",)), tmp_path / "out"
    assert sweep.main([*argv[:argv.index("--output_dir") + 1], str(tmp_path / "elsewhere"),
                       *argv[argv.index("--output_dir") + 2:]]) == 0
    [made] = finished_runs(tmp_path / "elsewhere")
    capsys.readouterr()
    locked, copied = sweep.locked, []

    def locked_after_another_sweep_finished(path, what):  # between the sweep's look and its lock
        copied.append(shutil.copytree(made, out / made.relative_to(tmp_path / "elsewhere")))
        return locked(path, what)

    monkeypatch.setattr(sweep, "locked", locked_after_another_sweep_finished)
    assert sweep.main(argv) == 0
    stdout, err = capsys.readouterr()
    assert "1 combinations, 0 already finished, 1 to run" in err
    assert f"[1/1] finished by another sweep: org/a lr 0.001 seed 1 -> {copied[0]}" in err
    assert "0 runs done, 0 failed, 1 left to another sweep; 1 of 1 combinations have results" in err
    assert len(calls(fake)) == 1 and [r["f1"] for r in csv_rows(stdout)] == ["0.601"]


def test_the_lock_lives_as_long_as_the_run_even_when_the_sweep_is_killed(tmp_path, fake, capsys):
    argv, out = grid_argv(tmp_path, lrs=("1e-3",)), tmp_path / "out"
    [combo] = sweep.grid(sweep.parse_args(argv))
    lock = combo.lock
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import sweep; from pathlib import Path; "
            f"sweep.BERTCLS = Path({str(tmp_path / 'fake_bertcls.py')!r}); sys.exit(sweep.main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", code, *argv], env={**os.environ, "FAKE_SECONDS": "3"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not run_dirs(tmp_path / "out"):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.kill()  # SIGKILL: the sweep cannot stop its run
    process.wait()
    with pytest.raises(common.UserError, match=f"pid {process.pid}"):  # the lock file names the sweep
        with common.locked(lock, "lock"):
            pass
    assert sweep.main([*argv, "--list", "json"]) == 0
    assert [r["state"] for r in json.loads(capsys.readouterr().out)] == ["running"]
    assert sweep.main(argv) == 0  # another sweep leaves it to the run
    assert "left to another sweep: org/a lr 0.001 seed 1" in capsys.readouterr().err and len(calls(fake)) == 1
    while not finished_runs(out):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while True:  # the run writes test-metrics.json last, then exits: its lock goes with it
        try:
            with common.locked(lock, "lock"):
                break
        except common.UserError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert sweep.main([*argv, "--list", "json"]) == 0
    assert [(r["state"], r["run_dir"]) for r in json.loads(capsys.readouterr().out)] == [
        ("finished", str(finished_runs(out)[0]))]
    # Ctrl-C or SIGTERM: the sweep stops its run (to be resumed) and says so
    argv, deadline = grid_argv(tmp_path, lrs=("3e-3",)), time.monotonic() + 60
    process = subprocess.Popen([sys.executable, "-c", code, *argv], env={**os.environ, "FAKE_SECONDS": "60"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while len(run_dirs(out)) < 2:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.terminate()
    assert process.wait(timeout=30) == 143
    err = process.stderr.read()
    assert "FAILED org/a lr 0.003 seed 1 (killed by signal 15)" in err
    assert err.splitlines()[-1] == "sweep.py: terminated; run the same command again to resume"
    with common.locked(sweep.grid(sweep.parse_args(argv))[0].lock, "lock"):
        pass  # its run ended with it
    assert len(finished_runs(out)) == 1


def test_devices_run_one_run_per_gpu_at_once(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the runs are on the CPU (--device cpu) anyway
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setenv("FAKE_SECONDS", "1.5")
    assert sweep.main(grid_argv(tmp_path, "--devices", "1,0")) == 0
    made = calls(fake)
    assert sorted(c["gpu"] for c in made) == ["4", "5"]  # positions in the inherited CUDA_VISIBLE_DEVICES
    assert abs(made[0]["start"] - made[1]["start"]) < 1.0  # both at once
    assert "on GPU 5" in capsys.readouterr().err
    one_line_error(capsys, grid_argv(tmp_path, "--devices", "2"), "--devices 2: CUDA_VISIBLE_DEVICES=4,5 leaves 2 "
                   "GPU(s) visible, numbered 0..1 here: pass those numbers")


def test_a_default_and_the_same_value_given_as_a_flag_are_one_setting(tmp_path, fake, monkeypatch, capsys):
    argv = grid_argv(tmp_path, lrs=("1e-3",))
    assert sweep.main(argv) == 0
    table = capsys.readouterr().out
    [run_dir] = finished_runs(tmp_path / "out")
    # a run made before bertcls.py had --truncation and --mecab_dic: they take their defaults
    config = json.loads((run_dir / "config.json").read_text())
    del config["args"]["truncation"], config["args"]["mecab_dic"]
    (run_dir / "config.json").write_text(json.dumps(config))
    no_runs(monkeypatch)
    # the defaults given as flags (2.0 for bertcls.py's 2), ./org/a for org/a, 0.0010 for 1e-3
    same = ["--epochs", "20", "--num_warmup_epochs", "2.0", "--truncations", "head", "--mecab_dic", "auto"]
    argv = grid_argv(tmp_path, *same, lrs=("0.0010",))
    argv[argv.index("org/a")] = "./org/a"
    assert sweep.main(argv) == 0
    out, err = capsys.readouterr()
    assert "1 combinations, 1 already finished, 0 to run" in err and out == table
    assert sweep.frozen(3) == sweep.frozen(3.0) != sweep.frozen(True)
    assert sweep.frozen({"b": 1, "a": 2.0}) == sweep.frozen({"a": 2, "b": 1.0})
    # --no_run selects it by the same settings
    assert sweep.main(["--no_run", "--output_dir", str(tmp_path / "out"), *same[:4]]) == 0
    assert capsys.readouterr().out == table
    assert sweep.main(["--no_run", "--output_dir", str(tmp_path / "out"), "--epochs", "3"]) == 0
    assert capsys.readouterr().out == ",".join(sweep.RUN_COLUMNS) + "\n"


# ------------------------------------------------------------------------------------------- the grid, clusters


def test_grid_order_axes_and_duplicates(tmp_path):
    args = sweep.parse_args(["--model_names", "org/a", "org/b", "./org/a", "--truncations", "head", "head_tail",
                             "--lrs", "1e-5", "3e-5", "--seeds", "1", "2", "--dataset_dirs", "d1", "d2", *ON_CPU])
    combos = sweep.grid(args)
    assert len(combos) == 2 * 2 * 2 * 2 * 2  # ./org/a is org/a
    assert [c.name for c in combos[:3]] == ["org/a truncation head lr 1e-05 seed 1 dataset_dir d1",
                                            "org/a truncation head lr 1e-05 seed 1 dataset_dir d2",
                                            "org/a truncation head lr 1e-05 seed 2 dataset_dir d1"]
    assert combos[16].values["model_name"] == "org/b" and len({c.lock for c in combos}) == 32
    # its lock and log files: under --output_dir, named by its values and a digest of its whole setting
    assert re.fullmatch(r"org_a_truncation_head_lr_1e-05_seed_1_dataset_dir_d1__[0-9a-f]{8}\.log", combos[0].log.name)
    assert (combos[0].log.parent, combos[0].lock) == (Path("outputs/sweep-logs"),
                                                      Path("outputs/.locks", combos[0].log.stem + ".lock"))
    assert combos[0].flags[-12:] == ["--model_name", "org/a", "--truncation", "head", "--lr", "1e-05", "--seed", "1",
                                     "--dataset_dir", "d1", "--output_dir", "outputs"]
    long = sweep.grid(sweep.parse_args(["--model_names", "org/a", "--long_context", "--lrs", "3e-5", *ON_CPU]))
    assert [c.values["model_name"] for c in long] == ["org/a", *sweep.LONG_CONTEXT_MODELS]
    assert "--truncation" not in long[0].flags and long[0].key["truncation"] == "head"  # bertcls.py's default
    assert len(sweep.grid(sweep.parse_args(ON_CPU))) == 17 * 3


def test_list_task_index_and_its_errors(tmp_path, fake, monkeypatch, capsys):
    argv = grid_argv(tmp_path, lrs=("1e-3", "3e-3", "5e-3"))
    assert sweep.main([*argv, "--task_index", "1"]) == 0
    [row] = csv_rows(capsys.readouterr().out)
    assert lrs_run(fake) == [3e-3] and float(row["lr"]) == 3e-3
    [run_dir] = finished_runs(tmp_path / "out")
    assert sweep.main([*argv, "--list", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"index": 0, "model_name": "org/a", "lr": 1e-3, "seed": 1, "state": "to do", "run_dir": None},
        {"index": 1, "model_name": "org/a", "lr": 3e-3, "seed": 1, "state": "finished", "run_dir": str(run_dir)},
        {"index": 2, "model_name": "org/a", "lr": 5e-3, "seed": 1, "state": "to do", "run_dir": None}]
    assert sweep.main([*argv, "--list"]) == 0
    assert capsys.readouterr().out == (
        "index  model_name  lr     seed  state     run_dir\n"
        "0      org/a       0.001  1     to do\n"
        f"1      org/a       0.003  1     finished  {run_dir}\n"
        "2      org/a       0.005  1     to do\n")
    assert sweep.main([*argv, "--list", "tsv"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == f"1\torg/a\t0.003\t1\tfinished\t{run_dir}"
    # Slurm's array task id
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert sweep.main([*argv, "--task_index", "slurm"]) == 0
    out, err = capsys.readouterr()
    assert "1 combinations, 0 already finished" in err and "[1/1] running org/a lr 0.005 seed 1" in err
    assert lrs_run(fake) == [3e-3, 5e-3] and [r["lr"] for r in csv_rows(out)] == ["0.005"]
    for index, shown in [("3", "3 (3)"), ("-1", "-1 (-1)"), ("x", "x (x)")]:
        one_line_error(capsys, [*argv, "--task_index", index], f"--task_index {shown}: the grid's combinations are "
                       "0-2 (see --list)")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    one_line_error(capsys, [*argv, "--task_index", "slurm"], "--task_index slurm (unset): the grid's combinations are "
                   "0-2 (see --list)")
    assert len(calls(fake)) == 2


def test_slurm_script(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out, sbatch = tmp_path / "out%x", tmp_path / "sweep.sbatch"
    argv = ["--slurm", "--max_running", "4", "--model_names", "org/a", "--lrs", "1e-3", "3e-3", "--output_dir",
            "out%x", "--sbatch=--partition gpu --time 1:00:00", "--sbatch", "--mem '8 G'\necho injected", "--sbatch",
            "  ", "--output", str(sbatch),
            "--epochs", "3"]
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out == "" and (out / "sweep-logs").is_dir() and calls(fake) == []
    sweep_py = f"{sys.executable} {REPO / 'sweep.py'}"
    passed = "--model_names org/a --lrs 1e-3 3e-3 --output_dir out%x --epochs 3"
    assert sbatch.read_text() == "\n".join([
        "#!/bin/bash",
        f"# task I runs combination I of 2; resubmitting is safe. Then: {sweep_py} {passed} --no_run",
        "#SBATCH --job-name=bertcls-sweep",
        "#SBATCH --array=0-1%4",
        "#SBATCH --gres=gpu:1",
        f"#SBATCH --chdir={tmp_path}",
        f"#SBATCH --output={tmp_path}/out%%x/sweep-logs/slurm-%A_%a.log",
        "#SBATCH --partition gpu --time 1:00:00",
        "#SBATCH --mem '8 G' echo injected",  # a line break cannot add a line to the script
        "",
        f"exec {sweep_py} --task_index slurm {passed}", ""])
    # the task's command is this sweep's: array task I runs combination I
    task = sweep.parse_args(sbatch.read_text().splitlines()[-1].split()[3:])
    assert task.task_index == "slurm" and not task.slurm and task.output is None
    assert [c.name for c in sweep.grid(task)] == ["org/a lr 0.001 seed 42", "org/a lr 0.003 seed 42"]
    assert sweep.main(["--slurm", "--model_names", "org/a"]) == 0
    assert "#SBATCH --array=0-2\n" in capsys.readouterr().out  # no --max_running: no %


# ------------------------------------------------------------------------------------------- a real sweep


def test_a_real_sweep_resumes_a_killed_run_prints_its_runs_and_a_rerun_runs_nothing(tmp_path, tiny_bert,
                                                                                   tiny_dataset, monkeypatch, capsys):
    out = tmp_path / "outputs"
    argv = ["--model_names", str(tiny_bert), "--lrs", "3e-3", "--seeds", "1", "--output_dir", str(out),
            "--dataset_dir", str(tiny_dataset), "--epochs", "2", "--batch_size", "8", "--num_warmup_epochs", "0.5",
            "--max_seq_len", "64", "--cache_dir", str(tmp_path / "cache"), "--checkpoint_minutes", "0", *ON_CPU]
    [combo] = sweep.grid(sweep.parse_args(argv))
    # the combination's run, killed in epoch 2 after its checkpoint of epoch 1
    stopping_run(tmp_path, combo.flags, epoch=2, batch=3)
    [killed] = run_dirs(out)
    assert (killed / "checkpoint-epoch1").is_dir() and not (killed / "test-metrics.json").exists()
    assert sweep.main(argv) == 0
    stdout, err = capsys.readouterr()
    log_path = combo.log
    assert "1 combinations, 0 already finished, 1 to run" in err
    assert f"[1/1] running {tiny_bert} lr 0.003 seed 1 (resuming {killed}): log {log_path}" in err
    assert finished_runs(out) == [killed] and run_dirs(out) == {killed}  # finished where it started
    [row] = csv_rows(stdout)
    config, val, test = (json.loads((killed / name).read_text()) for name in ("config.json", "val-metrics.json",
                                                                              "test-metrics.json"))
    assert list(row) == sweep.RUN_COLUMNS and config["resumed"][0]["from_epoch"] == 1
    assert row == {"model_name": str(tiny_bert), "lr": "0.003", "seed": "1", "fold": "",
                   "best-val-epoch": str(val["best_epoch"]), "best-val-f1": str(val["f1"]),
                   **{m: str(test[m]) for m in sweep.METRICS}, "params": str(config["params"]),
                   "train_seconds": str(val["train_seconds"])}
    assert f"done {tiny_bert} lr 0.003 seed 1: test f1 {test['f1']:.4f} -> {killed}" in err
    no_runs(monkeypatch)
    assert sweep.main(argv) == 0
    again, err = capsys.readouterr()
    assert again == stdout and "1 combinations, 1 already finished, 0 to run" in err
    assert list((out / ".locks").iterdir()) == [combo.lock]
    with common.locked(combo.lock, "lock"):
        pass  # free: the flock went with the run


# ------------------------------------------------------------------------------------------- hand-made run dirs


def metrics(loss: float, accuracy: float, precision: float, recall: float, f1: float) -> dict[str, float]:
    return {"loss": loss, "accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}


LABELS = ("x", "y", "z")


def write_run(out: Path, model: str, lr: float, seed: int, when: str, val_f1: float, test: dict, params: int = 1000,
              right: int = 50, n: int = 50, fold: int | None = None, digest: str | None = None,
              args: dict | None = None, train_seconds: float = 1.0, device: str = "cpu", dtype: str = "float32",
              world_size: int = 1) -> Path:
    """A finished run as bertcls.py writes one, made on 2024-05-01 at `when`: its test metrics `test`, and predictions
    right on the first `right` of n examples (gold x, y, z, x, ...; a wrong one is the next label)."""
    run_dir = out / model.replace("/", "__") / "2024-05-01" / when
    run_dir.mkdir(parents=True)
    args = {"model_name": model, "lr": lr, "seed": seed, "epochs": 3, "dataset_dir": "datasets/x" if fold is None
            else f"datasets/x/fold-{fold}", **(args or {})}
    (run_dir / "config.json").write_text(json.dumps({
        "args": args, "device": device, "dtype": dtype, "world_size": world_size, "params": params,
        "dataset_digest": digest or ("data-1" if fold is None else f"fold-{fold}"),
        "fold": None if fold is None else {"fold": fold, "folds": 3, "set": "set-1"}}))
    (run_dir / "val-metrics.json").write_text(json.dumps({"best_epoch": 2, "train_seconds": train_seconds,
                                                          "f1": val_f1}))
    gold = [i % 3 for i in range(n)]
    (run_dir / "test-predictions.jsonl").write_text("".join(json.dumps({
        "id": f"{fold}-{i}", "gold": LABELS[g], "predicted": LABELS[(g + (i >= right)) % 3],
        "probabilities": dict.fromkeys(LABELS, 1 / 3)}) + "\n" for i, g in enumerate(gold)))
    (run_dir / "test-metrics.json").write_text(json.dumps(test))
    return run_dir


@pytest.fixture
def hand_made(tmp_path) -> Path:
    out = tmp_path / "outputs"
    write_run(out, "org/a", 1e-5, 1, "10-00-00.000000", 0.80, metrics(0.5, 0.80, 0.78, 0.77, 0.78), 110_000_000, 40)
    write_run(out, "org/a", 1e-5, 2, "10-00-01.000000", 0.84, metrics(0.5, 0.84, 0.82, 0.81, 0.82), 110_000_000, 42)
    # an older run of (a, 3e-5, 1): if it counted, 3e-5's mean val F1 would drop to 0.48 and lose to 1e-5's 0.82
    write_run(out, "org/a", 3e-5, 1, "09-00-00.000000", 0.10, metrics(2.0, 0.10, 0.10, 0.10, 0.10), 110_000_000, 5)
    write_run(out, "org/a", 3e-5, 1, "11-00-00.000000", 0.90, metrics(0.30, 0.92, 0.90, 0.89, 0.91), 110_000_000, 46,
              train_seconds=100.0)
    write_run(out, "org/a", 3e-5, 2, "11-00-01.000000", 0.86, metrics(0.40, 0.88, 0.86, 0.85, 0.87), 110_000_000, 44,
              train_seconds=120.0)
    write_run(out, "org/b", 2e-5, 1, "12-00-00.000000", 0.95, metrics(0.20, 0.94, 0.93, 0.92, 0.93), 337_000_000, 47)
    return out


def loaded(out: Path, model: str, lr: float) -> list[sweep.Run]:
    """The runs of `model` at `lr` that sweep.py --no_run selects: the newest of each seed."""
    return sweep.select(sweep.scan(out), [], {"model_name": [model], "lr": [lr]})


def test_run_rows_are_sorted_by_test_f1(hand_made, capsys):
    write_run(hand_made, "org/c", 1e-5, 1, "12-00-01.000000", 0.5, metrics(0.25, 0.91, 0.9, 0.9, 0.91), 5, 45)
    assert sweep.main(["--no_run", "--output_dir", str(hand_made)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == ",".join(sweep.RUN_COLUMNS)
    # the newest run of (org/a, 3e-5, 1) only; a tie in f1 goes by model name
    assert out.splitlines()[1:] == [
        "org/b,2e-05,1,,2,0.95,0.2,0.94,0.93,0.92,0.93,337000000,1.0",
        "org/a,3e-05,1,,2,0.9,0.3,0.92,0.9,0.89,0.91,110000000,100.0",
        "org/c,1e-05,1,,2,0.5,0.25,0.91,0.9,0.9,0.91,5,1.0",
        "org/a,3e-05,2,,2,0.86,0.4,0.88,0.86,0.85,0.87,110000000,120.0",
        "org/a,1e-05,2,,2,0.84,0.5,0.84,0.82,0.81,0.82,110000000,1.0",
        "org/a,1e-05,1,,2,0.8,0.5,0.8,0.78,0.77,0.78,110000000,1.0"]
    assert f"sweep.py: 6 of the 7 finished runs in {hand_made}" in err
    assert "sweep.py: 6 runs in 3 experiments (model x settings x data)\n" in err
    # the axes select
    assert sweep.main(["--no_run", "--output_dir", str(hand_made), "--model_names", "org/a", "--lrs", "0.00003",
                       "--seeds", "2", "1"]) == 0
    assert [r["seed"] for r in csv_rows(capsys.readouterr().out)] == ["1", "2"]
    # equal F1: seeds and lrs in numeric order, not as text
    for when, lr, seed in [("13-00-00.000000", 3e-5, 10), ("13-00-01.000000", 3e-5, 9), ("13-00-02.000000", 5e-6, 9)]:
        write_run(hand_made, "org/e", lr, seed, when, 0.5, metrics(0.1, 0.99, 0.99, 0.99, 0.99))
    assert sweep.main(["--no_run", "--output_dir", str(hand_made), "--model_names", "org/e"]) == 0
    assert [(r["lr"], r["seed"]) for r in csv_rows(capsys.readouterr().out)] == [("5e-06", "9"), ("3e-05", "9"),
                                                                              ("3e-05", "10")]


def test_best_picks_the_lr_with_the_highest_mean_val_f1(hand_made, capsys):
    assert sweep.main(["--no_run", "--best", "--output_dir", str(hand_made)]) == 0
    out, err = capsys.readouterr()
    b, a = csv_rows(out)
    assert list(a) == sweep.BEST_COLUMNS and "warning" not in err
    assert (a["model_name"], float(a["lr"]), a["seeds"], a["folds"], a["params"]) == ("org/a", 3e-5, "2", "1",
                                                                                      "110000000")
    spread = 0.04 / math.sqrt(2)  # sample std of two values d apart: d / sqrt(2)
    expected = {"best-val-f1": (0.88, spread), "loss": (0.35, 0.1 / math.sqrt(2)), "accuracy": (0.90, spread),
                "precision": (0.88, spread), "recall": (0.87, spread), "f1": (0.89, spread)}
    for column, (mean, std) in expected.items():
        assert float(a[column]) == pytest.approx(mean) and float(a[f"{column}-std"]) == pytest.approx(std), column
    assert float(a["train_seconds"]) == pytest.approx(110.0)
    assert (b["model_name"], float(b["lr"]), b["seeds"], float(b["f1"]), b["f1-std"]) == ("org/b", 2e-5, "1", 0.93, "")
    # the intervals and the test are compare.py's, on the runs at the best lr (46 and 44 of 50 right; 47 of 50)
    a_runs, b_runs = loaded(hand_made, "org/a", 3e-5), loaded(hand_made, "org/b", 2e-5)
    assert len(a_runs) == 2 and len(b_runs) == 1
    for row, runs in ((a, a_runs), (b, b_runs)):
        for metric in ("accuracy", "f1"):
            interval = (float(row[f"{metric}-ci95-low"]), float(row[f"{metric}-ci95-high"]))
            assert interval == compare.row_interval(runs, metric)
    assert float(a["accuracy-ci95-low"]) < 0.90 < float(a["accuracy-ci95-high"])
    # org/b has the best mean val F1: the reference; org/a is tested against it on the run they share (seed 1)
    assert (b["mark"], b["f1-p-holm"]) == ("ref", "")
    p_worse = compare.paired_test(a_runs, b_runs)["p_less"]
    assert a["mark"] == "†" and float(a["f1-p-holm"]) == p_worse > 0.05  # one comparison: Holm leaves it
    # lrs compared only on the runs they share: a seed-3 run of 1e-5 with a high val F1 is left out, and named
    write_run(hand_made, "org/a", 1e-5, 3, "10-00-02.000000", 0.99, metrics(0.5, 0.8, 0.8, 0.8, 0.8), 110_000_000)
    assert sweep.main(["--no_run", "--best", "--output_dir", str(hand_made)]) == 0
    out, err = capsys.readouterr()
    assert [(r["model_name"], r["lr"]) for r in csv_rows(out)] == [("org/b", "2e-05"), ("org/a", "3e-05")]
    assert ("sweep.py: warning: org/a lr 3e-05: lrs compared on the 2 (seed, fold) runs they all have; left out: "
            "lr 1e-05 (3, None)") in err
    assert sweep.best_lr_of(loaded(hand_made, "org/a", 1e-5) + a_runs)[0] == 3e-5
    # no run in common: an error that says what to do
    write_run(hand_made, "org/d", 1e-5, 1, "13-00-00.000000", 0.9, metrics(0.5, 0.8, 0.8, 0.8, 0.8))
    write_run(hand_made, "org/d", 3e-5, 2, "13-00-01.000000", 0.9, metrics(0.5, 0.8, 0.8, 0.8, 0.8))
    one_line_error(capsys, ["--no_run", "--best", "--output_dir", str(hand_made)], "org/d: its lrs share no (seed, "
                   "fold) run, so their validation scores cannot be compared: lr 1e-05 has [(1, None)]; lr 3e-05 has "
                   "[(2, None)]: run the missing ones, or select lrs with --lrs")


def test_best_needs_test_predictions(hand_made, capsys):
    [run_dir] = [d for d in finished_runs(hand_made) if "org__b" in str(d)]
    (run_dir / "test-predictions.jsonl").unlink()
    assert sweep.main(["--no_run", "--output_dir", str(hand_made)]) == 0  # the run listing does not read them
    capsys.readouterr()
    one_line_error(capsys, ["--no_run", "--best", "--output_dir", str(hand_made)], f"{run_dir} has no "
                   "test-predictions.jsonl of bertcls.py, which intervals and tests need: move that run directory away "
                   "and run it again (sweep.py reruns a missing run)")


def test_markdown_marks_the_rows_not_significantly_worse(tmp_path, capsys):
    out = tmp_path / "outputs"
    # on data-1: the reference (best val F1), one with the same predictions, one wrong on 30 of 60 (worse), and one
    # whose only run has another seed (not compared); on data-2 a row of its own, its own reference
    for model, seed, val_f1, right, digest in (("org/best", 1, 0.95, 60, "data-1"), ("org/tie", 1, 0.90, 60, "data-1"),
                                               ("org/worse", 1, 0.90, 30, "data-1"), ("org/lone", 2, 0.5, 60, "data-1"),
                                               ("org/other", 1, 0.5, 50, "data-2")):
        f1 = right / 60
        write_run(out, model, 1e-5, seed, "10-00-00.000000", val_f1, metrics(0.1, f1, f1, f1, f1), 1_500_000, right,
                  n=60, digest=digest)
    assert sweep.main(["--no_run", "--best", "--output_dir", str(out)]) == 0
    text, err = capsys.readouterr()
    rows = {r["model_name"]: r for r in csv_rows(text)}
    assert list(rows) == ["org/best", "org/lone", "org/tie", "org/other", "org/worse"]  # by test F1, then name
    assert {m: r["mark"] for m, r in rows.items()} == {"org/best": "ref", "org/tie": "†", "org/worse": "",
                                                       "org/lone": "?", "org/other": "ref"}
    assert {m: r["dataset"] for m, r in rows.items()} == {**dict.fromkeys(rows, "datasets/x@data-1"),
                                                          "org/other": "datasets/x@data-2"}
    # Holm over the two compared rows: the tie's p is 1 (no difference on any article), the worse one's p doubled
    runs = {m: [r for r in sweep.scan(out) if r.key["model_name"] == m] for m in rows}
    p_worse = compare.paired_test(runs["org/worse"], runs["org/best"])["p_less"]
    assert float(rows["org/tie"]["f1-p-holm"]) == 1.0
    assert float(rows["org/worse"]["f1-p-holm"]) == pytest.approx(2 * p_worse) and 2 * p_worse < 0.05
    assert rows["org/lone"]["f1-p-holm"] == rows["org/best"]["f1-p-holm"] == ""
    assert ("sweep.py: warning: org/lone is not compared with the reference row: A and B share no (seed, fold) run"
            in err)
    assert sweep.main(["--no_run", "--markdown", "--output_dir", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "| model | dataset | lr | seeds | folds | params (M) | val F1 (%) | accuracy (%) | accuracy 95% CI | "
        "precision (%) | recall (%) | F1 (%) | F1 95% CI | loss |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    assert lines[2] == ("| org/best | datasets/x@data-1 | 1e-05 | 1 | 1 | 1.5 | 95.00 | 100.00 | 100.00–100.00 | "
                        "100.00 | 100.00 | 100.00 † ref | 100.00–100.00 | 0.1000 |")
    f1_cells = {line.split(" | ")[0][2:]: line.split(" | ")[11] for line in lines[2:7]}
    assert f1_cells == {"org/best": "100.00 † ref", "org/lone": "100.00 ?", "org/tie": "100.00 †",
                        "org/other": "83.33 † ref", "org/worse": "50.00"}
    assert lines[7:] == ["", sweep.MARK_FOOTNOTE]


def test_a_row_is_one_experiment(hand_made, capsys):
    # the same model with another number of epochs, on another dataset (by content), and with 2 processes (another
    # effective batch): four more rows
    write_run(hand_made, "org/a", 3e-5, 1, "13-00-00.000000", 0.5, metrics(0.9, 0.5, 0.5, 0.5, 0.5), 110_000_000,
              args={"epochs": 5})
    write_run(hand_made, "org/a", 3e-5, 1, "14-00-00.000000", 0.6, metrics(0.9, 0.6, 0.6, 0.6, 0.6), 110_000_000,
              args={"dataset_dir": "datasets/other"}, digest="data-2")
    write_run(hand_made, "org/a", 3e-5, 1, "15-00-00.000000", 0.7, metrics(0.9, 0.7, 0.7, 0.7, 0.7), 110_000_000,
              world_size=2)
    # the same data under another path is the same data: one experiment with the first runs
    write_run(hand_made, "org/a", 3e-5, 3, "16-00-00.000000", 0.88, metrics(0.35, 0.9, 0.88, 0.87, 0.89),
              110_000_000, args={"dataset_dir": "/elsewhere/x"})
    assert sweep.main(["--no_run", "--best", "--output_dir", str(hand_made)]) == 0
    out, err = capsys.readouterr()
    rows = csv_rows(out)
    assert list(rows[0])[:6] == ["model_name", "dataset", "epochs", "world_size", "lr", "seeds"]
    # a row's data is named by its newest run's path
    assert [(r["model_name"], r["dataset"], r["epochs"], r["world_size"], r["seeds"], float(r["f1"]))
            for r in rows] == [
        ("org/b", "datasets/x@data-1", "3", "1", "1", 0.93),
        ("org/a", "/elsewhere/x@data-1", "3", "1", "3", pytest.approx(0.89)),
        ("org/a", "datasets/x@data-1", "3", "2", "1", 0.7), ("org/a", "datasets/other@data-2", "3", "1", "1", 0.6),
        ("org/a", "datasets/x@data-1", "5", "1", "1", 0.5)]
    assert "9 runs in 5 experiments (model x settings x data); they differ in dataset, epochs, world_size" in err
    # the run listing keeps them apart too, and --no_run with a flag selects one experiment
    assert sweep.main(["--no_run", "--output_dir", str(hand_made), "--epochs", "5"]) == 0
    assert [(r["model_name"], r["f1"]) for r in csv_rows(capsys.readouterr().out)] == [("org/a", "0.5")]
    groups = sweep.experiments(sweep.scan(hand_made))
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1, 6]
    assert sweep.distinguishing(groups) == ["dataset", "epochs", "world_size"]


def test_folds_are_one_experiment_and_dataset_dirs_select(tmp_path, capsys):
    out = tmp_path / "outputs"
    right = {(1, 0): 18, (1, 1): 16, (1, 2): 20, (2, 0): 17, (2, 1): 19, (2, 2): 14}
    made = {}
    for (seed, fold), n_right in right.items():
        accuracy = n_right / 20
        made[seed, fold] = write_run(out, "org/a", 1e-5, seed, f"10-{seed:02d}-{fold:02d}.000000", 0.8,
                                     metrics(0.1, accuracy, accuracy, accuracy, accuracy), 1000, n_right, n=20,
                                     fold=fold)
    write_run(out, "org/a", 1e-5, 1, "11-00-00.000000", 0.7, metrics(0.1, 0.5, 0.5, 0.5, 0.5), 1000, 10, n=20)
    assert sweep.main(["--no_run", "--best", "--output_dir", str(out)]) == 0
    text, err = capsys.readouterr()
    folds, plain = csv_rows(text)
    assert (folds["dataset"], folds["seeds"], folds["folds"], folds["mark"]) == ("datasets/x@set-1", "2", "3", "ref")
    assert (plain["dataset"], plain["seeds"], plain["folds"], plain["mark"]) == ("datasets/x@data-1", "1", "1", "ref")
    accuracies = [n / 20 for n in right.values()]
    assert float(folds["accuracy"]) == pytest.approx(sum(accuracies) / 6)
    runs = [r for r in sweep.scan(out) if r.fold is not None]
    assert sorted((r.seed, r.fold) for r in runs) == sorted(right)
    assert (float(folds["f1-ci95-low"]), float(folds["f1-ci95-high"])) == compare.row_interval(runs, "f1")
    assert "warning" not in err
    # --dataset_dirs selects runs, however the path is spelled
    assert sweep.main(["--no_run", "--output_dir", str(out), "--dataset_dirs", "datasets/x/fold-1",
                       "./datasets/x/fold-2"]) == 0
    assert sorted((r["seed"], r["fold"]) for r in csv_rows(capsys.readouterr().out)) == [
        ("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    # an incomplete seeds x folds grid: a warning naming the hole, and no interval
    (made[2, 2] / "test-metrics.json").unlink()
    assert sweep.main(["--no_run", "--best", "--output_dir", str(out), "--dataset_dirs", *(f"datasets/x/fold-{f}"
                                                                                          for f in range(3))]) == 0
    text, err = capsys.readouterr()
    [row] = csv_rows(text)
    assert (row["seeds"], row["folds"], row["f1-ci95-low"], row["accuracy-ci95-high"]) == ("2", "3", "", "")
    assert float(row["accuracy"]) == pytest.approx(sum(accuracies[:5]) / 5)
    assert ("sweep.py: warning: org/a lr 1e-05: no interval: incomplete grid: 5 runs for 2 seeds x 3 folds; missing "
            "(seed, fold): (2, 2)") in err


def test_no_run_device_and_dtype_select(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "outputs"
    for when, device, dtype, f1 in (("10-00-00.000000", "cpu", "float32", 0.5), ("10-00-01.000000", "cuda:1",
                                    "bfloat16", 0.6), ("10-00-02.000000", "cuda:0", "float16", 0.7)):
        write_run(out, "org/a", 1e-5, 1, when, 0.8, metrics(0.1, f1, f1, f1, f1), device=device, dtype=dtype)

    def selected(*flags: str) -> list[str]:
        assert sweep.main(["--no_run", "--output_dir", str(out), *flags]) == 0
        return [r["f1"] for r in csv_rows(capsys.readouterr().out)]

    assert sweep.main(["--no_run", "--output_dir", str(out)]) == 0
    assert "3 runs in 3 experiments (model x settings x data); they differ in device, dtype" in capsys.readouterr().err
    assert selected() == ["0.7", "0.6", "0.5"]
    assert selected("--device", "cpu") == ["0.5"]
    assert selected("--device", "cuda") == ["0.7", "0.6"]
    assert selected("--device", "cuda:1", "--dtype", "bf16") == ["0.6"]  # the device's type, not its index
    assert selected("--dtype", "fp16") == ["0.7"]
    assert selected("--device", "cpu", "--dtype", "fp16") == []
    assert selected("--device", "cuda", "--dtype", "auto") == ["0.7", "0.6"]  # auto without CUDA: any dtype
    one_line_error(capsys, ["--no_run", "--output_dir", str(out), "--device", "tpu"],
                   "unknown --device 'tpu': use cpu, cuda or cuda:N")
    # the grid's runs compute where bertcls.py would: here, without CUDA, on the CPU in its auto dtype
    [combo] = sweep.grid(sweep.parse_args(["--model_names", "org/a", "--lrs", "1e-5", "--seeds", "1"]))
    auto = common.dtype_name(common.resolve_dtype("auto", torch.device("cpu")))
    assert (combo.key["device"], combo.key["dtype"], combo.key["world_size"]) == ("cpu", auto, 1)
    # a run's key: bertcls.experiment of its config, the settings it does not record at their defaults
    [on_cpu] = [run for run in sweep.scan(out) if run.key["device"] == "cpu"]
    assert on_cpu.key == bertcls.experiment({"args": sweep.resolve(["--model_name", "org/a", "--lr", "1e-5", "--seed",
                                                                    "1", "--dataset_dir", "datasets/x", "--epochs",
                                                                    "3"])[0], "device": "cpu", "dtype": "float32"})


def test_malformed_runs_are_skipped_with_a_warning(hand_made, capsys):
    good = metrics(0.1, 0.99, 0.99, 0.99, 0.99)
    bad_test = write_run(hand_made, "org/c", 1e-5, 1, "10-00-00.000000", 0.99, good)
    (bad_test / "test-metrics.json").write_text('{"loss": 0.1, "accur')
    bad_config = write_run(hand_made, "org/c", 1e-5, 2, "10-00-01.000000", 0.99, good)
    (bad_config / "config.json").write_text("")
    no_val = write_run(hand_made, "org/c", 1e-5, 3, "10-00-02.000000", 0.99, good)
    (no_val / "val-metrics.json").unlink()
    no_params = write_run(hand_made, "org/c", 1e-5, 4, "10-00-03.000000", 0.99, good)
    (no_params / "config.json").write_text(json.dumps({"args": {"model_name": "org/c", "lr": 1e-5, "seed": 4}}))
    no_f1 = write_run(hand_made, "org/c", 1e-5, 5, "10-00-04.000000", 0.99, {**good, "f1": "0.99"})
    no_args = write_run(hand_made, "org/c", 1e-5, 6, "10-00-05.000000", 0.99, good)
    (no_args / "config.json").write_text(json.dumps({"params": 1}))
    a_list = write_run(hand_made, "org/c", 1e-5, 7, "10-00-06.000000", 0.99, good)
    (a_list / "val-metrics.json").write_text("[]")
    unfinished = write_run(hand_made, "org/c", 1e-5, 8, "10-00-07.000000", 0.99, good)
    (unfinished / "test-metrics.json").unlink()
    assert sweep.main(["--no_run", "--output_dir", str(hand_made)]) == 0
    out, err = capsys.readouterr()
    assert sorted((r["model_name"], r["lr"], r["seed"]) for r in csv_rows(out)) == [
        ("org/a", "1e-05", "1"), ("org/a", "1e-05", "2"), ("org/a", "3e-05", "1"), ("org/a", "3e-05", "2"),
        ("org/b", "2e-05", "1")]
    warnings = sorted(line for line in err.splitlines() if "warning" in line)
    assert warnings == sorted([
        f"sweep.py: warning: skipped {bad_test}: {bad_test / 'test-metrics.json'}: not valid JSON (Unterminated "
        "string starting at); fix or remove it",
        f"sweep.py: warning: skipped {bad_config}: {bad_config / 'config.json'}: not valid JSON (Expecting value); "
        "fix or remove it",
        f"sweep.py: warning: skipped {no_val}: [Errno 2] No such file or directory: '{no_val / 'val-metrics.json'}'",
        f"sweep.py: warning: skipped {no_params}: config.json has no number 'params'",
        f"sweep.py: warning: skipped {no_f1}: test-metrics.json has no number 'f1'",
        f"sweep.py: warning: skipped {no_args}: 'args'",
        f"sweep.py: warning: skipped {a_list}: val-metrics.json has no number 'best_epoch'"])
    assert f"sweep.py: 5 of the 6 finished runs in {hand_made}" in err  # the unfinished one: no warning
    # --list and the runs' own scan say nothing
    assert len(sweep.scan(hand_made)) == 7 and sweep.main(["--list", "--output_dir", str(hand_made), "--model_names",
                                                           "org/c", "--lrs", "1e-5", "--seeds", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
