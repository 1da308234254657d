"""sweep.py: a real 2 lr x 2 seed sweep of the tiny model, resuming, killed and failing runs, locks, and the
--best / --markdown tables on hand-made run directories with hand-computed values."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import shutil
import signal
import re
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import bertcls
import prepare
import sweep
from conftest import (REPO, STOPPING_BERTCLS, finished_runs, kill_when_stopped, metrics, results, stopping_env,
                      train_args, write_predictions, write_run)

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
    assert list((swept.out / ".locks").iterdir()) == []  # released, and no private files left behind


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
    assert f"sweep.py: FAILED {UNKNOWN_MODEL}: cannot load model '{UNKNOWN_MODEL}': " in stderr
    assert "its 1 run skipped" in stderr and "1 failed" in stderr
    assert not list((out / "sweep-logs").glob("no-such-org__no-such-model__*.log"))  # never launched
    assert "taking over stale lock" in stderr
    [rerun] = set(finished_runs(out)) - {d for d in before if (d / "test-metrics.json").exists()}
    assert len(finished_runs(out)) == 4 and rerun not in (victim, killed)
    [row] = csv_rows(stdout)
    assert (row["model_name"], float(row["lr"]), row["seed"]) == (str(tiny_bert), 1e-3, "1")
    assert float(row["f1"]) == json.loads((rerun / "test-metrics.json").read_text())["f1"]
    assert list((out / ".locks").glob("*.lock")) == []


def test_interrupted_run_with_a_checkpoint_is_resumed_not_run_again(swept, tmp_path, tiny_bert, tiny_dataset, capsys):
    out = shutil.copytree(swept.out, tmp_path / "outputs")
    flags = bertcls_flags(tiny_bert, tiny_dataset, out)
    finished = run_of(out, 1e-3, 1)
    expected = results(finished)
    shutil.rmtree(finished)
    # the same combination killed in epoch 2, after its checkpoint of epoch 1 (--checkpoint_minutes is not part
    # of what a combination is: it does not change results)
    script = tmp_path / "stopping_bertcls.py"
    script.write_text(STOPPING_BERTCLS, encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(script), *flags, "--model_name", str(tiny_bert), "--lr", "0.001",
                                "--seed", "1", "--output_dir", str(out), "--checkpoint_minutes", "0"],
                               cwd=tmp_path, env=stopping_env(tmp_path / "stopped", epoch=2, batch=3),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when_stopped(process, tmp_path / "stopped")
    before = run_dirs(out)
    [interrupted] = before - set(finished_runs(out))
    assert sweep.main(sweep_argv(out, flags, [str(tiny_bert)])) == 0
    stdout, stderr = capsys.readouterr()
    assert "4 combinations, 3 already finished, 1 to run" in stderr
    assert f"running {tiny_bert} lr 0.001 seed 1 (resuming {interrupted})" in stderr
    assert run_dirs(out) == before  # finished where it started: no new run
    assert results(interrupted) == expected  # all three processes ran with one thread
    rows = csv_rows(stdout)
    assert sorted((float(r["lr"]), int(r["seed"])) for r in rows) == [(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)]
    assert len(finished_runs(out)) == 4


@pytest.mark.parametrize("other_finishes", [True, False], ids=["other-finishes", "other-fails"])
def test_combination_held_by_a_live_sweep_is_waited_for_not_run(swept, tmp_path, tiny_bert, tiny_dataset, monkeypatch,
                                                                capsys, other_finishes):
    out = shutil.copytree(swept.out, tmp_path / "outputs")
    flags = bertcls_flags(tiny_bert, tiny_dataset, out)
    corrupt = run_of(out, 3e-3, 2)
    metrics = (corrupt / "test-metrics.json").read_text()
    (corrupt / "test-metrics.json").write_text("{not json")  # a corrupt run does not count: it must run again
    [combo] = sweep.combinations([("model_name", [str(tiny_bert)]), ("lr", [3e-3]), ("seed", [2])], flags, out)
    lock = sweep.lock_path(out, combo)
    before = run_dirs(out)
    held, start = threading.Event(), sweep.Sweep.start

    def start_and_tell(self, combo, position):
        holder = start(self, combo, position)
        if holder is not None:
            held.set()
        return holder

    def other_sweep_ends():  # once our sweep has seen its lock: finishes the run (or fails it), then releases
        held.wait(120)
        if other_finishes:
            (corrupt / "test-metrics.json").write_text(metrics)
        lock.unlink()

    other_sweep = subprocess.Popen(["sleep", "60"])
    other_end = threading.Thread(target=other_sweep_ends)
    try:
        lock.parent.mkdir(exist_ok=True)
        lock.write_text(sweep.lock_record(other_sweep.pid))
        monkeypatch.setattr(sweep.Sweep, "start", start_and_tell)
        monkeypatch.setattr(sweep.subprocess, "Popen", None)  # any run attempt would raise
        other_end.start()
        assert sweep.main([*sweep_argv(out, flags, [str(tiny_bert)]), "--lease_timeout", "1"]) == 0
    finally:
        held.set()
        other_end.join()
        other_sweep.kill()
        other_sweep.wait()
    stdout, stderr = capsys.readouterr()
    assert f"waiting for another sweep (pid {other_sweep.pid}) running {tiny_bert} lr 0.003 seed 2" in stderr
    if other_finishes:
        assert f"finished by another sweep: {tiny_bert} lr 0.003 seed 2 -> {corrupt}" in stderr
        assert "1 left to another sweep; 4 of 4 combinations have results" in stderr
    else:
        assert f"warning: another sweep ended {tiny_bert} lr 0.003 seed 2 without a result" in stderr
        assert f"warning: skipped {corrupt}: test-metrics.json cannot be read" in stderr
    assert run_dirs(out) == before and not lock.exists()
    assert len(csv_rows(stdout)) == (4 if other_finishes else 3)


def test_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTCLS_HOSTNAME", "host-a")
    lock, notes = tmp_path / ".locks" / "x.lock", []
    assert sweep.acquire_lock(lock, notes.append) is None
    assert json.loads(lock.read_text()) == {"pids": [os.getpid()], "host": "host-a"}
    assert sweep.acquire_lock(lock, notes.append) == f"pid {os.getpid()}"
    # this host's lock whose processes are gone: stale at once, however long the lease
    finished = subprocess.Popen(["true"])
    finished.wait()
    lock.write_text(sweep.lock_record(finished.pid))
    assert sweep.acquire_lock(lock, notes.append, lease_timeout=1e9) is None
    assert notes == [f"sweep.py: taking over stale lock {lock}: pid {finished.pid}: its processes are gone"]
    # another host's processes cannot be seen: its lock holds while it is refreshed within the lease
    lock.write_text(json.dumps({"pids": [finished.pid], "host": "host-b"}))
    assert sweep.acquire_lock(lock, notes.append, lease_timeout=60) == f"pid {finished.pid} on host-b"
    last_refresh = time.time() - 100
    os.utime(lock, (last_refresh, last_refresh))
    assert sweep.acquire_lock(lock, notes.append, lease_timeout=200) == f"pid {finished.pid} on host-b"
    assert sweep.acquire_lock(lock, notes.append, lease_timeout=60) is None
    taken = re.fullmatch(rf"sweep.py: taking over stale lock {re.escape(str(lock))}: pid {finished.pid} on host-b: "
                         r"not refreshed for (\d+) s \(--lease_timeout 60\)", notes[-1])
    assert taken and 100 <= int(taken[1]) < 160, notes[-1]
    # garbage: stale, with a warning
    for garbage, why in [("", "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"),
                         ('{"host": "host-b"}', "KeyError: 'pids'"), ('{"pids": "x", "host": 1}', "ValueError: "
                                                                       "invalid literal for int() with base 10: 'x'")]:
        lock.write_text(garbage)
        assert sweep.acquire_lock(lock, notes.append) is None
        assert notes[-1] == f"sweep.py: warning: taking over stale lock {lock}: no valid lock record in it ({why})"
    assert json.loads(lock.read_text()) == {"pids": [os.getpid()], "host": "host-a"}
    assert sorted(p.name for p in lock.parent.iterdir()) == ["x.lock"]  # no private files left behind


@pytest.fixture(scope="module")
def fold_swept(tmp_path_factory, tiny_bert, tiny_rows):
    """A real sweep over the 3 folds of prepare.py --folds 3 (120 articles: 40 / 40 / 40 per fold), one epoch each."""
    root = tmp_path_factory.mktemp("folds")
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for rows in tiny_rows.values() for r in rows))
    assert prepare.main(["--input", str(data), "--text_fields", "title,body", "--label_field", "category",
                         "--output_dir", str(root / "tiny"), "--folds", "3"]) == 0
    out = root / "outputs"
    flags = [*bertcls_flags(tiny_bert, root / "tiny", out), "--epochs", "1"]
    del flags[flags.index("--dataset_dir"):flags.index("--dataset_dir") + 2]
    argv = ["--model_names", str(tiny_bert), "--lrs", "3e-3", "--seeds", "1", "--output_dir", str(out),
            "--dataset_dirs", *(str(root / "tiny" / f"fold-{i}") for i in range(3)), *flags]
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        rc = sweep.main(argv)
    return types.SimpleNamespace(out=out, root=root, argv=argv, rc=rc, stderr=stderr.getvalue())


def test_sweep_over_folds(fold_swept, monkeypatch, capsys):
    assert fold_swept.rc == 0, fold_swept.stderr
    assert "3 combinations, 0 already finished, 3 to run" in fold_swept.stderr
    assert f"lr 0.003 seed 1 dataset_dir {fold_swept.root / 'tiny' / 'fold-2'}" in fold_swept.stderr
    configs = [json.loads((d / "config.json").read_text()) for d in finished_runs(fold_swept.out)]
    assert sorted(c["fold"]["fold"] for c in configs) == [0, 1, 2]
    assert {c["fold"]["folds"] for c in configs} == {3} and len({c["fold"]["set"] for c in configs}) == 1
    assert len({c["dataset_digest"] for c in configs}) == 3
    for run_dir in finished_runs(fold_swept.out):
        test = json.loads((run_dir / "test-metrics.json").read_text())
        predictions = sweep.load_predictions(sweep.load_run(run_dir))
        assert predictions.scores() == (test["accuracy"], test["f1"])  # the bootstrap scores as bertcls.py does
    assert sweep.main(["--no_run", "--best", "--resamples", "300", "--output_dir", str(fold_swept.out)]) == 0
    [row] = csv_rows(capsys.readouterr().out)
    runs = [json.loads((d / "test-metrics.json").read_text()) for d in finished_runs(fold_swept.out)]
    assert (row["seeds"], row["folds"]) == ("1", "3")
    assert float(row["f1"]) == pytest.approx(statistics.fmean(r["f1"] for r in runs))
    assert float(row["f1-ci95-low"]) <= float(row["f1"]) <= float(row["f1-ci95-high"])
    # --dataset_dirs selects runs too
    assert sweep.main(["--no_run", "--output_dir", str(fold_swept.out), "--dataset_dirs",
                       str(fold_swept.root / "tiny" / "fold-1")]) == 0
    assert [r["fold"] for r in csv_rows(capsys.readouterr().out)] == ["1"]
    # resumed, the sweep finds every fold finished
    monkeypatch.setattr(sweep.subprocess, "Popen", None)  # any run attempt would raise
    assert sweep.main(fold_swept.argv) == 0
    assert "3 combinations, 3 already finished, 0 to run" in capsys.readouterr().err


# ------------------------------------------------------------------------------ hand-made run dirs


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
    assert list(a) == sweep.BEST_COLUMNS and a["folds"] == b["folds"] == "1"
    # the predictions are right on 46 and 44 of 50 (a) and 47 of 50 (b): the intervals hold the accuracies
    assert 0.7 < float(a["accuracy-ci95-low"]) < 0.88 and 0.92 < float(a["accuracy-ci95-high"]) <= 1.0
    assert 0.84 < float(b["accuracy-ci95-low"]) < 0.94 < float(b["accuracy-ci95-high"]) == 1.0
    assert float(b["f1-p-vs-best"]) == 1.0 and 0.05 < float(a["f1-p-vs-best"]) < 1.0


def test_markdown_renders_the_best_table(hand_made, capsys):
    assert sweep.main(["--no_run", "--best", "--output_dir", str(hand_made)]) == 0
    b, a = csv_rows(capsys.readouterr().out)
    assert sweep.main(["--no_run", "--markdown", "--output_dir", str(hand_made)]) == 0

    def ci(row: dict, metric: str) -> str:
        return f"{100 * float(row[f'{metric}-ci95-low']):.2f}–{100 * float(row[f'{metric}-ci95-high']):.2f}"

    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "| model | lr | seeds | folds | params (M) | val F1 (%) | accuracy (%) | accuracy 95% CI | precision (%) | "
        "recall (%) | F1 (%) | F1 95% CI | loss |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        f"| org/b | 2e-05 | 1 | 1 | 337.0 | 95.00 | 94.00 | {ci(b, 'accuracy')} | 93.00 | 92.00 | 93.00 † | "
        f"{ci(b, 'f1')} | 0.2000 |",
        f"| org/a | 3e-05 | 2 | 1 | 110.0 | 88.00 ± 2.83 | 90.00 ± 2.83 | {ci(a, 'accuracy')} | 88.00 ± 2.83 | "
        f"87.00 ± 2.83 | 89.00 ± 2.83 † | {ci(a, 'f1')} | 0.3500 ± 0.0707 |"]
    assert lines[4] == "" and lines[5].startswith("† the best macro-F1 and the rows not significantly worse than it: "
                                                  "paired bootstrap test") and "p ≥ 0.05" in lines[5]


def test_markdown_marks_the_rows_not_significantly_worse_than_the_best(tmp_path, capsys):
    out, n = tmp_path / "outputs", 60
    gold = ["x", "y", "z"] * (n // 3)
    wrong = {"x": "y", "y": "z", "z": "x"}
    labels = ("x", "y", "z")
    for model, right in (("best", n), ("tie", n), ("close", n - 2), ("worse", n // 2)):
        predicted = [g if i < right else wrong[g] for i, g in enumerate(gold)]
        accuracy = right / n
        write_run(out, f"org/{model}", 1e-5, 1, "10-00-00.000000", 0.9, metrics(0.1, accuracy, 0, 0, accuracy), 1,
                  predictions=(gold, predicted))
        for run_dir in finished_runs(out / f"org__{model}"):
            write_predictions(run_dir, gold, predicted, labels)
    # a model on other data is not compared with these: it is the best of its own dataset
    write_run(out, "org/other", 1e-5, 1, "10-00-00.000000", 0.9, metrics(0.1, 0.5, 0, 0, 0.5), 1, digest="data-2",
              predictions=(["x", "y"] * 5, ["x"] * 10))
    assert sweep.main(["--no_run", "--markdown", "--resamples", "500", "--output_dir", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    marked = {line.split(" | ")[0][2:]: "†" in line for line in lines if line.startswith("| org/")}
    # identical predictions: difference 0, p = 1; 2 of 60 wrong: not significant; 30 of 60 wrong: p = 2/501
    assert marked == {"org/best": True, "org/tie": True, "org/close": True, "org/worse": False, "org/other": True}
    assert any(line.startswith("† the best macro-F1 of its dataset and") for line in lines)
    assert sweep.main(["--no_run", "--best", "--resamples", "500", "--output_dir", str(out)]) == 0
    p_values = {r["model_name"]: float(r["f1-p-vs-best"]) for r in csv_rows(capsys.readouterr().out)}
    assert p_values["org/worse"] == 2 / 501 and p_values["org/tie"] == 1.0


def test_a_row_is_one_experiment(hand_made, capsys):
    # the same model with another number of epochs, and on another dataset (by content): three rows, not one
    write_run(hand_made, "org/a", 3e-5, 1, "13-00-00.000000", 0.5, metrics(0.9, 0.5, 0.5, 0.5, 0.5), 110_000_000,
              args={"epochs": 5})
    write_run(hand_made, "org/a", 3e-5, 1, "14-00-00.000000", 0.6, metrics(0.9, 0.6, 0.6, 0.6, 0.6), 110_000_000,
              args={"dataset_dir": "datasets/other"}, digest="data-2")
    assert sweep.main(["--no_run", "--best", "--output_dir", str(hand_made)]) == 0
    out, err = capsys.readouterr()
    rows = csv_rows(out)
    assert list(rows[0])[:4] == ["model_name", "dataset", "epochs", "lr"]
    assert sorted((r["model_name"], r["dataset"], r["epochs"], r["seeds"], r["f1"]) for r in rows) == [
        ("org/a", "data-1", "3", "2", "0.89"), ("org/a", "data-1", "5", "1", "0.5"),
        ("org/a", "datasets/other@data-2", "3", "1", "0.6"), ("org/b", "data-1", "3", "1", "0.93")]
    assert "7 runs in 4 experiments (model x settings x dataset); they differ in dataset, epochs" in err
    # the run listing keeps them apart too, and --no_run with a flag selects one experiment
    assert sweep.main(["--no_run", "--output_dir", str(hand_made), "--epochs", "5"]) == 0
    assert [(r["model_name"], r["f1"]) for r in csv_rows(capsys.readouterr().out)] == [("org/a", "0.5")]


def fold_runs(out: Path, model: str, lr: float, val_f1: dict, right: dict, digests=("f0", "f1", "f2")) -> None:
    """Runs of one lr on 3 folds x seeds: val_f1[seed] the val F1 on every fold, right[(seed, fold)] how many
    of the fold's 20 test examples it gets right; test metrics computed from those predictions."""
    labels = {0: "x", 1: "y"}
    for (seed, fold), n_right in right.items():
        gold = [labels[i % 2] for i in range(20)]
        predicted = [g if i < n_right else labels[1 - i % 2] for i, g in enumerate(gold)]
        computed = bertcls.classification_metrics([i % 2 for i in range(20)], [1 - i % 2 if i >= n_right else i % 2
                                                                                for i in range(20)], 0.0, labels)
        run_dir = write_run(out, model, lr, seed, f"{seed:02d}-{fold:02d}-{int(lr * 1e6):02d}.000000", val_f1[seed],
                            {m: computed[m] for m in sweep.METRICS}, 1, digest=digests[fold],
                            args={"dataset_dir": f"datasets/x/fold-{fold}"},
                            fold={"fold": fold, "folds": 3, "set": "set-1"},
                            predictions=(gold, predicted))
        write_predictions(run_dir, gold, predicted, ids=[f"fold{fold}-{i}" for i in range(20)])


def reference_interval(runs: list[tuple[int, str, list[int], list[int]]], n_resamples: int, metric: str) -> tuple:
    """The row's interval the slow, obvious way: per replicate, each fold's examples drawn once (from its own
    seeded generator) for all runs on it, the seeds drawn with replacement, bertcls's metrics per run, the mean
    over the drawn seeds of their mean over folds; then the 2.5% and 97.5% quantiles."""
    generators = {test_set: random.Random(f"{sweep.BOOTSTRAP_SEED} {test_set}") for _, test_set, _, _ in runs}
    samples = [{test_set: rng.choices(range(20), k=20) for test_set, rng in generators.items()}
               for _ in range(n_resamples)]
    seeds, seed_rng = sorted({seed for seed, _, _, _ in runs}), random.Random(f"{sweep.BOOTSTRAP_SEED} seeds")
    means = []
    for sample in samples:
        per_seed = {seed: statistics.fmean(
            bertcls.classification_metrics([gold[i] for i in sample[test_set]],
                                           [predicted[i] for i in sample[test_set]], 0.0, {0: "x", 1: "y"})[metric]
            for run_seed, test_set, gold, predicted in runs if run_seed == seed) for seed in seeds}
        means.append(statistics.fmean(per_seed[seed] for seed in seed_rng.choices(seeds, k=len(seeds))))
    cuts = statistics.quantiles(means, n=40, method="inclusive")
    return cuts[0], cuts[-1]


def test_best_over_seeds_and_folds(tmp_path, capsys):
    out = tmp_path / "outputs"
    # lr 1e-5 wins on seed 1 (0.90 > 0.80) but loses the mean over both seeds (0.75 < 0.80)
    fold_runs(out, "org/a", 1e-5, {1: 0.90, 2: 0.60}, {(s, f): 10 for s in (1, 2) for f in range(3)})
    right = {(1, 0): 18, (1, 1): 16, (1, 2): 20, (2, 0): 17, (2, 1): 19, (2, 2): 14}
    fold_runs(out, "org/a", 3e-5, {1: 0.80, 2: 0.80}, right)
    assert sweep.main(["--no_run", "--best", "--resamples", "300", "--output_dir", str(out)]) == 0
    [row] = csv_rows(capsys.readouterr().out)
    assert (float(row["lr"]), row["seeds"], row["folds"]) == (3e-5, "2", "3")
    accuracies = [n / 20 for n in right.values()]
    assert float(row["accuracy"]) == pytest.approx(statistics.fmean(accuracies))
    assert float(row["accuracy-std"]) == pytest.approx(statistics.stdev(accuracies))
    chosen = [run for run in sweep.scan_runs(out)[0] if math.isclose(run.args["lr"], 3e-5)]
    runs = [(r.args["seed"], sweep.load_predictions(r).test_set, [i % 2 for i in range(20)],
             [i % 2 if i < right[(r.args["seed"], r.fold["fold"])] else 1 - i % 2 for i in range(20)]) for r in chosen]
    for metric in ("accuracy", "f1"):
        expected = reference_interval(runs, 300, metric)
        assert (float(row[f"{metric}-ci95-low"]), float(row[f"{metric}-ci95-high"])) == pytest.approx(expected)
    # the same outputs give the same table
    assert sweep.main(["--no_run", "--best", "--resamples", "300", "--output_dir", str(out)]) == 0
    assert csv_rows(capsys.readouterr().out) == [row]


def test_best_needs_test_predictions(hand_made, capsys):
    [run_dir] = [d for d in finished_runs(hand_made) if "org__b" in str(d)]
    (run_dir / "test-predictions.jsonl").unlink()
    assert sweep.main(["--no_run", "--best", "--output_dir", str(hand_made)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == (
        f"sweep.py: error: {run_dir} has no test-predictions.jsonl, which intervals and tests need: move that run "
        f"directory away and run it again (sweep.py reruns a missing run)")
    assert "Traceback" not in err


def test_dataset_dirs_must_be_complete_before_anything_runs(tmp_path, tiny_dataset, monkeypatch, capsys):
    monkeypatch.setattr(sweep.subprocess, "Popen", None)  # any run attempt would raise
    incomplete = shutil.copytree(tiny_dataset, tmp_path / "fold-1")
    (incomplete / "test.jsonl").unlink()
    argv = ["--model_names", "m", "--lrs", "1e-3", "--output_dir", str(tmp_path / "out"), "--dataset_dirs",
            str(tiny_dataset)]
    assert sweep.main([*argv, str(tmp_path / "fold-*")]) == 1
    assert capsys.readouterr().err == (f"sweep.py: error: --dataset_dirs: {tmp_path / 'fold-*'} is not a directory: "
                                       f"write it with prepare.py (for folds: python prepare.py --folds K "
                                       f"--output_dir {tmp_path})\n")
    assert sweep.main([*argv, str(incomplete)]) == 1
    assert capsys.readouterr().err == (f"sweep.py: error: --dataset_dirs: {incomplete} is incomplete (no test.jsonl): "
                                       f"write it again with prepare.py\n")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        sweep.parse_args([*argv, "--dataset_dir", str(tiny_dataset)])
    assert "either as --dataset_dir (one) or as --dataset_dirs (several)" in capsys.readouterr().err


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


@pytest.mark.parametrize("extra", [[], ["--no_run"], ["--list"]])
def test_output_dir_under_a_file_is_a_one_line_error(tmp_path, capsys, extra):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "outputs"
    assert sweep.main(["--output_dir", str(path), *extra]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (f"sweep.py: error: --output_dir {path} is under {tmp_path / 'file'}, which is a file: "
                                 "pass a directory\n")


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


def test_truncation_is_a_grid_axis_and_long_context_models_join_the_grid(tmp_path, capsys):
    args = sweep.parse_args(["--model_names", "org/a", "--long_context", "--truncations", "head", "head_tail",
                             "--lrs", "3e-5", "--seeds", "1", "--epochs", "3"])
    combos = sweep.grid(args, tmp_path)
    assert len(combos) == 6 * 2
    assert [(c.model_name, c.setting["truncation"]) for c in combos[:2]] == [("org/a", "head"), ("org/a", "head_tail")]
    assert combos[1].flags[-10:] == ("--model_name", "org/a", "--truncation", "head_tail", "--lr", "3e-05", "--seed",
                                     "1", "--output_dir", str(tmp_path))
    assert combos[1].describe() == "org/a truncation head_tail lr 3e-05 seed 1"
    assert [c.model_name for c in combos[2::2]] == sweep.LONG_CONTEXT_MODELS
    assert len({c.stem for c in combos}) == 12
    # without --truncations, bertcls.py's default: the combination of a run made before the flag existed
    [plain] = sweep.grid(sweep.parse_args(["--model_names", "org/a", "--lrs", "3e-5", "--seeds", "1"]), tmp_path)
    assert plain.wanted["truncation"] == "head" and "--truncation" not in plain.flags
    with pytest.raises(SystemExit):
        sweep.parse_args(["--truncation", "head_tail"])
    assert "--truncation is set by the sweep: use --truncations" in capsys.readouterr().err


def test_tables_keep_truncations_apart(hand_made, capsys):
    long_model = sweep.LONG_CONTEXT_MODELS[2]
    for time_of_day, val_f1, test_f1, truncation in (("13-00-00.000000", 0.97, 0.95, "head"),
                                                     ("13-00-01.000000", 0.98, 0.96, "head_tail")):
        write_run(hand_made, long_model, 3e-5, 1, time_of_day, val_f1, metrics(0.1, 0.96, 0.95, 0.94, test_f1),
                  132_000_000, args={"truncation": truncation})
    assert sweep.main(["--no_run", "--best", "--output_dir", str(hand_made)]) == 0
    rows = csv_rows(capsys.readouterr().out)
    # a run without a recorded truncation kept the head (bertcls.py's default)
    assert [(r["model_name"], r["truncation"], r["f1"]) for r in rows] == [
        (long_model, "head_tail", "0.96"), (long_model, "head", "0.95"), ("org/b", "head", "0.93"),
        ("org/a", "head", "0.89")]
    assert sweep.main(["--no_run", "--best", "--output_dir", str(hand_made), "--truncations", "head_tail"]) == 0
    assert [(r["model_name"], r["f1"]) for r in csv_rows(capsys.readouterr().out)] == [(long_model, "0.96")]
    # --long_context adds its models to those named
    assert sweep.main(["--no_run", "--output_dir", str(hand_made), "--model_names", "org/b", "--long_context"]) == 0
    assert sorted({r["model_name"] for r in csv_rows(capsys.readouterr().out)}) == ["org/b", long_model]



def test_unloadable_models_are_reported_once_and_their_runs_skipped(tmp_path, tiny_dataset):
    import socket
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there: the hub is unreachable
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home")}
    out = tmp_path / "outputs"
    argv = sweep_argv(out, ["--dataset_dir", str(tiny_dataset), "--epochs", "3"],
                      ["some-org/model-a", str(tmp_path / "missing-model"), "some-org/model-a"], seeds=["1", "2"])
    result = subprocess.run([sys.executable, str(REPO / "sweep.py"), *argv], env=env, capture_output=True, text=True,
                            timeout=120)  # 4 runs of each hub model would wait ~95 s each for huggingface_hub
    assert result.returncode == 1 and result.stdout == ",".join(sweep.RUN_COLUMNS) + "\n"
    failed = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert failed == [
        f"sweep.py: FAILED some-org/model-a: cannot load model 'some-org/model-a': the Hugging Face Hub at {endpoint} "
        "cannot be reached ([Errno 111] Connection refused); check your network, or work offline with "
        "HF_HUB_OFFLINE=1 and a cached model (it is not in the cache yet) or a local directory; its 4 runs skipped",
        f"sweep.py: FAILED {tmp_path / 'missing-model'}: model directory {tmp_path / 'missing-model'} not found: pass "
        "an existing directory or a hub name such as cl-tohoku/bert-base-japanese-v3; its 4 runs skipped"]
    assert "0 runs done, 8 failed" in result.stderr and not (out / "sweep-logs").exists()


def test_the_dataset_and_the_schedule_are_checked_once_before_any_run(tmp_path, tiny_bert, tiny_dataset,
                                                                       monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(sweep.Sweep, "run", lambda self, combos: launched.extend(combos))
    flags = ["--dataset_dir", str(tiny_dataset), "--epochs", "1", "--batch_size", "8"]
    assert sweep.main(sweep_argv(tmp_path / "out", flags, [str(tiny_bert)])) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    # 80 examples in batches of 8: 10 steps, the default 2 warmup epochs 20: the lr peaks at half of each --lrs
    assert warnings == ["sweep.py: every run: warning: the warmup (20 optimizer steps, --num_warmup_epochs 2) is "
                        "longer than the run (10 steps, --epochs 1), so the learning rate peaks at 0.0005, 50% of "
                        "--lr 0.001 (lower --num_warmup_epochs, e.g. to 0.1)"]
    assert len(launched) == 4
    one_label = shutil.copytree(tiny_dataset, tmp_path / "one-label")
    (one_label / "label2id.json").write_text(json.dumps({"only": 0}), encoding="utf-8")
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in (one_label / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        (one_label / f"{split}.jsonl").write_text("".join(json.dumps({**r, "label": 0}) + "\n" for r in rows),
                                                  encoding="utf-8")
    launched.clear()
    flags[1] = str(one_label)
    assert sweep.main(sweep_argv(tmp_path / "out", flags, [str(tiny_bert)])) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sweep.py: error: {one_label / 'train.jsonl'}: every example has the label 'only': a classifier needs "
        "examples of at least 2 labels in train")
    assert launched == []


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
        axes = [("model_name", ["org/a"]), ("lr", [1e-5]), ("seed", [1])]
        [combo] = sweep.combinations(axes, ["--epochs", "3", *flags], out)
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
