"""Checkpoints and --resume: a run killed in the middle of an epoch and resumed writes the results of the same
run never interrupted; damaged or foreign checkpoints, contradicting flags, a changed dataset or model, a full
disk and a signal while a checkpoint is written are each handled, and nothing unfinished looks finished."""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bertcls
import checkpoints
import common
from conftest import (REPO, STOPPING_BERTCLS, build_tiny_bert, kill_when_stopped, only_run, results,
                      run_on_read_only, stopping_env, train_args)

EPOCHS = ("--epochs", "3")


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name)


def config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))


def error_line(err: str) -> str:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()][-1]


def log_rows(run_dir: Path) -> int:
    return len(list(csv.DictReader((run_dir / "log.csv").open(encoding="utf-8"))))


# ------------------------------------------------------------------------------------ SIGKILL, resume


def test_run_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(tiny_bert, tiny_dataset, tmp_path):
    """SIGKILL half-way through epoch 2, then --resume: the same files as the run never interrupted, with the
    default --dtype (bf16 autocast on a CPU with bf16 units). Both run at once, one thread each."""
    script = tmp_path / "stopping_bertcls.py"
    script.write_text(STOPPING_BERTCLS, encoding="utf-8")
    env = stopping_env(tmp_path / "stopped", epoch=2, batch=5)  # 10 batches per epoch
    flags = [*EPOCHS, "--checkpoint_minutes", "0"]
    whole = subprocess.Popen([sys.executable, str(REPO / "bertcls.py"),
                              *train_args(tiny_bert, tiny_dataset, tmp_path / "whole", *flags)],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen([sys.executable, str(script), *train_args(tiny_bert, tiny_dataset, tmp_path / "killed",
                                                                        *flags)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when_stopped(killed, tmp_path / "stopped")
    assert killed.returncode == -signal.SIGKILL
    run_dir = only_run(tmp_path / "killed")
    assert log_rows(run_dir) == 1 and checkpoint_files(run_dir) == ["checkpoint-epoch1"]

    resumed = subprocess.run([sys.executable, str(REPO / "bertcls.py"), "--resume", str(run_dir)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run_dir} after epoch 1 (optimizer step 10)" in resumed.stderr
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    uninterrupted = only_run(tmp_path / "whole")
    assert results(run_dir) == results(uninterrupted)
    assert checkpoint_files(run_dir) == checkpoint_files(uninterrupted) == []  # removed once finished
    [resume] = config(run_dir)["resumed"]
    assert resume["from_epoch"] == 1 and resume["changed"] == {}
    assert config(run_dir)["training_end"] == config(uninterrupted)["training_end"] == {
        "epochs_trained": 3, "reason": "--epochs 3 done"}


# ------------------------------------------------------------------------- in-process runs to resume


@pytest.fixture(scope="module")
def reference(tiny_bert, tiny_dataset, tmp_path_factory) -> Path:
    """A 3-epoch run never interrupted, in this process (so with its threads, like the resumed runs here).
    With the default --checkpoint_minutes, a run this short writes no checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bertcls, "save_checkpoint", None)  # calling it would fail the run
        assert bertcls.main(train_args(tiny_bert, tiny_dataset, out, *EPOCHS)) == 0
    return only_run(out)


def interrupt(argv: list[str], epoch: int, keep_old_checkpoints: bool = False) -> Path:
    """Run bertcls.py in this process and stop it (as Ctrl-C would) when training of `epoch` begins."""
    train_epoch = bertcls.train_epoch

    def stop(*args, **kwargs):
        if kwargs["epoch"] == epoch:
            raise KeyboardInterrupt
        return train_epoch(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bertcls, "train_epoch", stop)
        if keep_old_checkpoints:
            mp.setattr(checkpoints, "remove_checkpoints", lambda run_dir, keep=None: None)
        assert bertcls.main([*argv, "--checkpoint_minutes", "0"]) == 130
    return only_run(Path(argv[argv.index("--output_dir") + 1]))


@pytest.fixture(scope="module")
def interrupted(tiny_bert, tiny_dataset, tmp_path_factory) -> Path:
    """The reference run once more, stopped during epoch 3, keeping the checkpoints of epochs 1 and 2: both are
    there when a kill comes between writing the newer one and removing the older."""
    out = tmp_path_factory.mktemp("interrupted")
    run_dir = interrupt(train_args(tiny_bert, tiny_dataset, out, *EPOCHS), epoch=3, keep_old_checkpoints=True)
    assert checkpoint_files(run_dir) == ["checkpoint-epoch1", "checkpoint-epoch2"] and log_rows(run_dir) == 2
    return run_dir


@pytest.fixture
def run_dir(interrupted, tmp_path) -> Path:
    """A copy of the interrupted run to resume or damage."""
    return Path(shutil.copytree(interrupted, tmp_path / "outputs" / interrupted.name))


def test_resume_continues_from_the_newest_checkpoint(run_dir, reference, capsys):
    assert bertcls.main(["--resume", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert f"resuming {run_dir} after epoch 2 (optimizer step 20)" in err
    assert "checkpoint of epoch" not in err  # none after the last epoch: only val and test are left
    assert results(run_dir) == results(reference)
    assert checkpoint_files(run_dir) == []
    assert [r["from_epoch"] for r in config(run_dir)["resumed"]] == [2]


def test_damaged_and_half_written_checkpoints_are_passed_over(run_dir, reference, capsys):
    newest = run_dir / "checkpoint-epoch2"
    weights = newest / checkpoints.WEIGHTS
    weights.write_bytes(b"\0" * weights.stat().st_size)  # damaged in place: the size still matches
    half_written = shutil.copytree(newest, run_dir / "checkpoint-epoch3")
    (half_written / checkpoints.MANIFEST).unlink()
    shutil.copytree(newest, run_dir / ".checkpoint-epoch3.tmp")  # what a kill while writing leaves
    # flags that agree with the run's settings, and one that only changes how it reports
    assert bertcls.main(["--resume", str(run_dir), *EPOCHS, "--lr", "0.003", "--log_interval", "5"]) == 0
    err = capsys.readouterr().err
    assert f"warning: not resuming from {run_dir / 'checkpoint-epoch3'}: half-written (no manifest)" in err
    assert f"warning: not resuming from {newest}: cannot be read" in err
    assert f"resuming {run_dir} after epoch 1 (optimizer step 10)" in err
    assert results(run_dir) == results(reference)
    assert checkpoint_files(run_dir) == []
    assert config(run_dir)["resumed"][0]["changed"] == {"log_interval": 5}


# ---------------------------------------------------------------------------------------- refusals


def refused(argv: list[str], capsys) -> str:
    assert bertcls.main(argv) == 1
    return error_line(capsys.readouterr().err)


def assert_unchanged(run_dir: Path, before: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert not (run_dir / "test-metrics.json").exists()


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def edit_config(run_dir: Path, **changes) -> None:
    record = config(run_dir)
    for key, value in changes.items():
        if key.startswith("args."):
            record["args"][key[5:]] = value
        else:
            record[key] = value
    (run_dir / "config.json").write_text(json.dumps(record), encoding="utf-8")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "not a run directory (no config.json)" in refused(["--resume", str(tmp_path / "empty")], capsys)


def test_resume_of_a_finished_run(reference, capsys):
    before = snapshot(reference)
    assert "this run is already finished" in refused(["--resume", str(reference)], capsys)
    assert snapshot(reference) == before


def test_resume_with_a_contradicting_flag_names_it(run_dir, capsys):
    before = snapshot(run_dir)
    line = refused(["--resume", str(run_dir), "--lr", "1e-3"], capsys)
    assert "--lr 0.001 contradicts the run's --lr 0.003" in line and "leave it out" in line
    line = refused(["--resume", str(run_dir), "--patience", "2"], capsys)
    assert "--patience 2 contradicts the run's --patience None" in line
    assert_unchanged(run_dir, before)


def test_resume_with_another_dtype_is_refused(run_dir, capsys):
    used = config(run_dir)["dtype"]
    other = "fp32" if used == "bfloat16" else "bf16"
    line = refused(["--resume", str(run_dir), "--dtype", other], capsys)
    assert f"the run started with dtype {used}, here it would be" in line


def test_resume_after_the_dataset_changed(tiny_bert, tiny_dataset, tmp_path, capsys):
    dataset = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    run_dir = interrupt(train_args(tiny_bert, dataset, tmp_path / "out", *EPOCHS), epoch=2)
    val = dataset / "val.jsonl"
    val.write_text(val.read_text(encoding="utf-8").replace('"label": 0', '"label": 1', 1), encoding="utf-8")
    before = snapshot(run_dir)
    line = refused(["--resume", str(run_dir)], capsys)
    assert f"the dataset in {dataset} changed since the run started (its digest differs" in line
    assert_unchanged(run_dir, before)


def test_resume_after_the_model_changed(tiny_bert, tiny_dataset, tiny_rows, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_bert, tmp_path / "model"))
    run_dir = interrupt(train_args(model, tiny_dataset, tmp_path / "out", *EPOCHS), epoch=2)
    shutil.rmtree(model)
    texts = [r[f] for rows in tiny_rows.values() for r in rows for f in ("title", "body")]
    build_tiny_bert(model, texts, layers=1)
    before = snapshot(run_dir)
    assert f"{model} is not the model the run started with" in refused(["--resume", str(run_dir)], capsys)
    assert_unchanged(run_dir, before)


def test_resume_with_settings_this_version_does_not_know(run_dir, capsys):
    edit_config(run_dir, **{"args.label_smoothing": 0.1})
    assert "does not know (label_smoothing)" in refused(["--resume", str(run_dir)], capsys)


def test_checkpoints_of_another_run_are_not_used(run_dir, capsys):
    edit_config(run_dir, started_at="2000-01-01T00:00:00")  # as if the checkpoints were copied from elsewhere
    line = refused(["--resume", str(run_dir)], capsys)
    assert "no usable checkpoint" in line and "written by another run" in line


def test_resume_without_a_checkpoint(run_dir, capsys):
    for path in run_dir.glob("checkpoint-epoch*"):
        shutil.rmtree(path)
    line = refused(["--resume", str(run_dir)], capsys)
    assert "no usable checkpoint to resume from (it stopped before its first one" in line


def test_resume_with_only_truncated_checkpoints(run_dir, capsys):
    for path in run_dir.glob("checkpoint-epoch*/" + checkpoints.WEIGHTS):
        path.write_bytes(path.read_bytes()[:1000])
    line = refused(["--resume", str(run_dir)], capsys)
    assert "no usable checkpoint" in line and "model.safetensors is damaged (1000 bytes instead of" in line
    assert not (run_dir / "test-metrics.json").exists()


class RunsCode:
    def __reduce__(self):
        return os.system, ("touch ran-code",)


def test_a_checkpoint_that_would_run_code_is_not_loaded(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for checkpoint in run_dir.glob("checkpoint-epoch*"):
        state = checkpoint / checkpoints.TRAINING_STATE
        state.write_bytes(pickle.dumps({"epoch": 1, "payload": RunsCode()}, protocol=2))
        manifest = json.loads((checkpoint / checkpoints.MANIFEST).read_text())
        manifest["files"][state.name] = state.stat().st_size
        (checkpoint / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    line = refused(["--resume", str(run_dir)], capsys)
    assert "no usable checkpoint" in line and "cannot be read" in line
    assert not (tmp_path / "ran-code").exists()


def test_resume_of_a_run_that_another_process_is_running(run_dir, capsys):
    with common.hold_run_dir(run_dir):
        line = refused(["--resume", str(run_dir)], capsys)
    assert f"{run_dir} is in use by another process (pid {os.getpid()})" in line


def test_resume_on_a_read_only_file_system_is_one_line(run_dir):
    before = snapshot(run_dir)
    result = run_on_read_only(run_dir, [sys.executable, str(REPO / "bertcls.py"), "--resume", str(run_dir)])
    assert result.returncode == 1
    assert error_line(result.stderr) == (f"bertcls.py: error: cannot write in {run_dir} (Read-only file system): "
                                         "a run writes in its directory")
    assert_unchanged(run_dir, before)


# ------------------------------------------------------------------ faults while writing a checkpoint


@pytest.mark.parametrize("fault,exit_code,message", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 1,
     "error: could not write the checkpoint of epoch 2 ([Errno 28] No space left on device; "),
    (common.Terminated(), 143, "terminated; "),
], ids=["disk-full", "sigterm"])
def test_fault_while_writing_a_checkpoint_keeps_the_previous_one(fault, exit_code, message, reference, tiny_bert,
                                                                 tiny_dataset, tmp_path, monkeypatch, capsys):
    save_weights = checkpoints.save_weights

    def fail_in_epoch_2(path: Path, weights: dict) -> None:
        if path.parent.name == ".checkpoint-epoch2.tmp":
            path.write_bytes(b"\0" * 1000)  # part of the file is written, then the fault
            raise fault
        save_weights(path, weights)

    monkeypatch.setattr(checkpoints, "save_weights", fail_in_epoch_2)
    out = tmp_path / "out"
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, out, *EPOCHS, "--checkpoint_minutes", "0")) == exit_code
    line = error_line(capsys.readouterr().err)
    run_dir = only_run(out)
    assert message in line
    assert "the checkpoint of epoch 1" in line
    assert f"`python bertcls.py --resume {run_dir}`" in line
    assert checkpoint_files(run_dir) == ["checkpoint-epoch1"]  # whole; the half-written one is gone
    assert log_rows(run_dir) == 2 and not list(run_dir.glob("*metrics.json"))
    if exit_code == 1:
        monkeypatch.undo()
        assert bertcls.main(["--resume", str(run_dir)]) == 0
        err = capsys.readouterr().err
        assert "checkpoint of epoch 2" in err and "checkpoint of epoch 3" not in err
        assert results(run_dir) == results(reference)


def test_checkpoint_due():
    now = time.monotonic()
    assert checkpoints.checkpoint_due(0, now, 1) and checkpoints.checkpoint_due(10, now - 600, 1)
    assert not checkpoints.checkpoint_due(10, now - 599, 1) and not checkpoints.checkpoint_due(-1, now - 1e9, 1)


def test_checkpoint_contents(interrupted):
    run_id = checkpoints.run_identity(config(interrupted))
    checkpoint = checkpoints.read_checkpoint(interrupted / "checkpoint-epoch2", run_id)
    state = checkpoint["state"]
    assert (state["epoch"], state["step"], len(state["history"])) == (2, 20, 2)
    assert state["best_epoch"] == max(state["history"], key=lambda r: r["val_f1"])["epoch"]
    assert len(state["rng"]) == 1 and isinstance(state["rng"][0]["torch"], torch.Tensor)
    moments = state["optimizer"]["state"]
    assert len(moments) == sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
    assert all({"exp_avg", "exp_avg_sq"} <= set(m) for m in moments.values())
    manifest = json.loads((interrupted / "checkpoint-epoch2" / checkpoints.MANIFEST).read_text())
    assert set(manifest["files"]) <= {checkpoints.WEIGHTS, checkpoints.BEST_WEIGHTS, checkpoints.TRAINING_STATE}


# ------------------------------------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_random_states_are_restored():
    device = torch.device("cuda")
    torch.manual_seed(0)
    saved = checkpoints.rng_state(device)
    first = torch.nn.functional.dropout(torch.ones(1000, device=device), 0.5)
    checkpoints.set_rng_state(saved, device)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(1000, device=device), 0.5), first)
    assert saved["cuda"] is not None and not torch.equal(torch.nn.functional.dropout(
        torch.ones(1000, device=device), 0.5), first)


@needs_cuda
def test_resume_on_cuda(tiny_bert, tiny_dataset, tmp_path):
    """On a GPU the resumed run matches the uninterrupted one as closely as two uninterrupted runs do
    (some GPU kernels add in a varying order)."""
    def on_cuda(argv: list[str]) -> list[str]:
        argv[argv.index("--device") + 1] = "cuda"
        return argv

    assert bertcls.main(on_cuda(train_args(tiny_bert, tiny_dataset, tmp_path / "whole", *EPOCHS))) == 0
    run_dir = interrupt(on_cuda(train_args(tiny_bert, tiny_dataset, tmp_path / "resumed", *EPOCHS)), epoch=3)
    checkpoint = checkpoints.read_checkpoint(run_dir / "checkpoint-epoch2", checkpoints.run_identity(config(run_dir)))
    assert checkpoint["state"]["rng"][0]["cuda"] is not None
    assert bertcls.main(["--resume", str(run_dir)]) == 0
    whole, resumed = results(only_run(tmp_path / "whole")), results(run_dir)
    for a, b in zip(whole["log"], resumed["log"], strict=True):
        for column in ("train_loss", "val_loss", "lr"):
            assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-3), column
