"""bertcls.py end to end on a tiny corpus: it learns, writes its files, resumes exactly, and every way a user can
get it wrong ends in one line."""

from __future__ import annotations

import csv
import errno
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

import bertcls
import common
from conftest import finished_runs, only_run, results, stopping_run, torchrun, train_args, write_dataset

RESULT_FILES = {"config.json", "log.csv", "val-metrics.json", "test-metrics.json", "test-predictions.jsonl",
                "learning-curve.svg", ".lock"}


def run(args: list[str], capsys) -> tuple[int, str]:
    code = bertcls.main(args)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tiny_bert, tiny_dataset, tmp_path_factory) -> Path:
    """One finished run of 6 epochs, checkpointing after every epoch."""
    out = tmp_path_factory.mktemp("trained")
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, out, "--checkpoint_minutes", "0")) == 0
    (run_dir,) = finished_runs(out)
    return run_dir


def test_it_learns_and_writes_every_result_file(trained):
    assert {p.name for p in trained.iterdir()} == RESULT_FILES  # the checkpoints went once the run finished
    test = json.loads((trained / "test-metrics.json").read_text())
    assert test["accuracy"] > 0.8 and test["f1"] > 0.8  # chance is 1/3
    assert test["confusion_matrix"]["rows"] == "gold label" and test["macro_over"] == ["movie", "sports", "tech"]
    assert sum(map(sum, test["confusion_matrix"]["matrix"])) == 20
    config = json.loads((trained / "config.json").read_text())
    assert config["args"]["epochs"] == 6 and config["device"] == "cpu" and config["world_size"] == 1
    assert config["effective_batch_size"] == 8 and config["total_optimizer_steps"] == 60
    assert config["training_end"] == {"epochs_trained": 6, "reason": "--epochs 6 done"}
    assert bertcls.experiment(config)["lr"] == 3e-3 and "output_dir" not in bertcls.experiment(config)
    rows = list(csv.DictReader((trained / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7)) and list(rows[0]) == bertcls.LOG_FIELDS
    assert float(rows[-1]["lr_at_epoch_end"]) == pytest.approx(bertcls.get_lr(59, 60, 5, 3e-3))
    val = json.loads((trained / "val-metrics.json").read_text())
    assert val["f1"] == max(float(r["val_f1"]) for r in rows) and val["best_epoch"] in range(1, 7)
    predictions = [json.loads(line) for line in (trained / "test-predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 20 and all(math.isclose(sum(p["probabilities"].values()), 1, abs_tol=1e-4)
                                          for p in predictions)
    assert sum(p["gold"] == p["predicted"] for p in predictions) / 20 == test["accuracy"]
    svg = (trained / "learning-curve.svg").read_text()
    assert svg.count('class="series"') == 3 and svg.count("<circle") == 3 * 6


def test_scores_by_hand():
    names = ["a", "b", "c", "d"]  # d is in neither gold nor predictions: macro scores leave it out
    result = bertcls.scores([0, 0, 1, 2], [0, 1, 1, 1], torch.tensor([1.0, 2.0, 3.0, 6.0]), names)
    # a: P 1/1, R 1/2, F1 2/3; b: P 1/3, R 1/1, F1 1/2; c: P 0, R 0, F1 0
    assert result["precision"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert result["recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert result["f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert result["accuracy"] == 0.5 and result["loss"] == 3.0 and result["macro_over"] == ["a", "b", "c"]
    assert result["confusion_matrix"]["matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_learning_rate_schedule_phases():
    assert [bertcls.get_lr(s, 10, 4, 1.0) for s in range(11)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    assert bertcls.get_lr(0, 10, 0, 2.0) == 2.0


def test_weight_decay_only_on_weight_matrices(tiny_bert):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    groups = bertcls.build_optimizer(model, bertcls.parse_args([])).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[0]["params"][0] is model[0].weight
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.01, 0.0)


def test_epoch_batches_cover_every_example_once_group_lengths_and_split_evenly():
    lengths = [random.Random(i).randint(10, 500) for i in range(1000)]
    args = bertcls.parse_args(["--batch_size", "16"])
    one = bertcls.epoch_batches(lengths, args, 1, 1)
    assert sorted(i for b in one for i in b) == list(range(1000))
    assert one == bertcls.epoch_batches(lengths, args, 1, 1) != bertcls.epoch_batches(lengths, args, 2, 1)
    padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in one) / sum(lengths)
    assert padding < 0.05  # random batches of 16 would pad about 50%
    two = bertcls.epoch_batches(lengths, args, 1, 3)
    assert len(two) % 3 == 0 and set(i for b in two for i in b) == set(range(1000))  # a few batches repeated
    assert bertcls.step_sizes([[1, 2], [3], [4, 5, 6], [7]], 2, 1) == [3, 4]


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(tiny_bert, tiny_dataset, tmp_path):
    def one_step(*flags: str) -> dict:
        args = bertcls.parse_args(train_args(tiny_bert, tiny_dataset, tmp_path, "--dtype", "fp32",
                                             "--max_grad_norm", "0", "--lr", "1", *flags))
        run = bertcls.set_up(args, 0, 1, False, lambda line: None)
        for module in run.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        batches = [list(range(args.batch_size))] if args.grad_accum_steps == 1 else [list(range(4)), list(range(4, 8))]
        optimizer = torch.optim.SGD(run.model.parameters(), lr=1.0)  # the step is the gradient itself
        bertcls.train_epoch(run.model, optimizer, torch.amp.GradScaler("cpu", enabled=False), run.data["train"],
                            batches, [sum(map(len, batches))], args, (1, 0), 0, run.ctx, run.device)
        return {k: v.clone() for k, v in run.model.state_dict().items()}

    whole, accumulated = one_step("--batch_size", "8"), one_step("--batch_size", "4", "--grad_accum_steps", "2")
    assert all(torch.allclose(whole[k], accumulated[k], atol=1e-6) for k in whole)
    assert not all(torch.equal(whole[k], one_step("--batch_size", "4")[k]) for k in whole)  # half the batch differs


def test_a_run_killed_mid_epoch_resumes_to_exactly_the_uninterrupted_result(trained, tiny_bert, tiny_dataset,
                                                                            tmp_path, capsys):
    args = train_args(tiny_bert, tiny_dataset, tmp_path / "out", "--checkpoint_minutes", "0")
    stopping_run(tmp_path, args, epoch=3, batch=4)
    run_dir = only_run(tmp_path / "out")
    assert sorted(p.name for p in run_dir.glob("checkpoint-epoch*")) == ["checkpoint-epoch2"]
    assert not (run_dir / "test-metrics.json").exists()
    code, err = run(["--resume", str(run_dir), "--log_interval", "5"], capsys)  # a RUN_ONLY setting may change
    assert code == 0, err
    assert "(resumed after epoch 2)" in err
    assert results(run_dir) == results(trained)  # bit for bit (bf16 autocast on this CPU where it has the units)
    resumed = json.loads((run_dir / "config.json").read_text())["resumed"]
    assert [(r["from_epoch"], r["changed"]) for r in resumed] == [(2, {"log_interval": 5})]
    assert not list(run_dir.glob("checkpoint-epoch*"))


def test_resume_refuses_what_would_compute_something_else(trained, tiny_bert, tiny_dataset, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained, unfinished)
    (unfinished / "test-metrics.json").unlink()
    for flags, message in [
        (["--resume", str(tmp_path)], "not a run directory (no config.json)"),
        (["--resume", str(trained)], "this run is already finished"),
        (["--resume", str(unfinished)], "has no checkpoint to resume from"),
    ]:
        code, err = run(flags, capsys)
        assert code == 1 and err.count("\n") == 1 and message in err, (flags, err)
    common.save_tensors(unfinished / "checkpoint-epoch2", {"model": {}}, {})  # resume reads it only after the checks
    code, err = run(["--resume", str(unfinished), "--lr", "1e-4"], capsys)
    assert code == 1 and err.count("\n") == 1 and "--lr 0.0001 contradicts the run's --lr 0.003" in err
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "args": {**config["args"], "newer_flag": 1}}))
    code, err = run(["--resume", str(unfinished)], capsys)
    assert code == 1 and "settings this bertcls.py does not know (newer_flag)" in err
    (unfinished / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    code, err = run(["--resume", str(unfinished)], capsys)
    assert code == 1 and "the run started with dtype float16" in err


def test_a_damaged_checkpoint_is_one_line_and_never_torchs_unpickling_advice(tiny_bert, tiny_dataset, tmp_path,
                                                                             capsys):
    stopping_run(tmp_path, train_args(tiny_bert, tiny_dataset, tmp_path / "out", "--checkpoint_minutes", "0"),
                 epoch=2, batch=2)
    run_dir = only_run(tmp_path / "out")
    weights = next(run_dir.glob("checkpoint-epoch1")) / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # the same size: only a digest can tell
    weights.write_bytes(bytes(damaged))
    code, err = run(["--resume", str(run_dir)], capsys)
    assert code == 1 and "is damaged (model.safetensors: not the bytes written): start the run again" in err
    assert "Traceback" not in err and "weights_only" not in err and err.count("error:") == 1


def test_ctrl_c_keeps_config_log_and_checkpoint_and_says_how_to_continue(tiny_bert, tiny_dataset, tmp_path, capsys,
                                                                          monkeypatch):
    original = bertcls.train_epoch

    def interrupt_in_epoch_2(*args, **kwargs):
        if args[-1].desc.startswith("epoch 2/"):
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(bertcls, "train_epoch", interrupt_in_epoch_2)
    code, err = run(train_args(tiny_bert, tiny_dataset, tmp_path, "--checkpoint_minutes", "0"), capsys)
    run_dir = only_run(tmp_path)
    assert code == 130
    assert err.splitlines()[-1] == (f"bertcls.py: interrupted; {run_dir} keeps checkpoint-epoch1, config.json, "
                                    f"log.csv, no metrics: continue with `python bertcls.py --resume {run_dir}`")
    assert not (run_dir / "val-metrics.json").exists() and len((run_dir / "log.csv").read_text().splitlines()) == 2


def broken_dataset(tmp_path: Path, tiny_rows: dict, change: str) -> Path:
    directory = write_dataset(tmp_path / change, tiny_rows)
    path = directory / "train.jsonl"
    if change == "bad_line":
        path.write_text(path.read_text() + '{"label": 0, "text": \n')
    elif change == "bad_label":
        path.write_text(path.read_text() + json.dumps({"label": "cooking", "text": "x"}) + "\n")
    elif change == "empty_split":
        (directory / "val.jsonl").write_text("")
    elif change == "one_label":
        path.write_text("".join(json.dumps({**r, "label": 0}) + "\n" for r in tiny_rows["train"]))
    elif change == "no_text":
        path.write_text(path.read_text() + json.dumps({"label": 0, "title": None, "body": "x"}) + "\n")
    return directory


@pytest.mark.parametrize("change, flags, message", [
    ("missing", [], "no dataset in"), ("bad_line", [], "train.jsonl:81: not valid JSON"),
    ("bad_label", [], "train.jsonl:81: label 'cooking' is not in label2id.json"),
    ("empty_split", [], "val.jsonl is empty"), ("one_label", [], "a classifier needs examples of at least 2 labels"),
    ("no_text", [], "train.jsonl:81: needs a string 'text', or string 'title' and 'body'"),
    ("none", ["--max_seq_len", "3"], "leaves no room for text after the 3 special tokens"),
    ("none", ["--device", "cuda"], "CUDA is not available here"),
    ("none", ["--dtype", "fp32", "--lr", "1e8", "--max_grad_norm", "0"], "the training loss became NaN/inf"),
    ("none", ["--max_batch_tokens", "10"], "--max_batch_tokens 10 cannot hold one example of 64 tokens"),
    ("none", ["--output_dir", "x" * 300], "File name too long"),
])
def test_what_a_user_can_get_wrong_is_one_line(tiny_bert, tiny_rows, tmp_path, capsys, change, flags, message):
    if change == "missing":
        dataset = tmp_path / "nowhere"
    else:
        dataset = broken_dataset(tmp_path, tiny_rows, change)
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = train_args(tiny_bert, dataset, tmp_path / "out", "--epochs", "2")
    code, err = run([*args, *flags], capsys)
    lines = [line for line in err.splitlines() if line.startswith("bertcls.py:")]
    assert code == 1 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not finished_runs(tmp_path / "out")


def test_an_output_dir_that_cannot_be_written_fails_before_any_work(tiny_bert, tiny_dataset, tmp_path, capsys,
                                                                     monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(bertcls, "set_up", lambda *a: pytest.fail("set up a run that cannot be written"))
    code, err = run(train_args(tiny_bert, tiny_dataset, tmp_path / "file" / "out"), capsys)
    assert code == 1 and "Not a directory" in err and err.count("\n") == 1


def test_numbers_are_checked_where_parsed(capsys):
    with pytest.raises(SystemExit) as exit_:
        bertcls.parse_args(["--seed", "100000000000000000000"])
    assert exit_.value.code == 2 and "expected a seed from 0 to 4294967295" in capsys.readouterr().err


def test_silent_wrong_results_become_warnings(tiny_bert, tiny_rows, tmp_path, capsys):
    label2id = {"movie": 0, "sports": 1, "tech": 2, "cooking": 3}  # a label no split holds
    splits = {**tiny_rows, "val": tiny_rows["train"][:20]}  # val copies part of train
    dataset = write_dataset(tmp_path / "data", splits, label2id)
    code, err = run(train_args(tiny_bert, dataset, tmp_path, "--epochs", "1"), capsys)
    assert code == 0
    assert "labels of label2id.json that no split holds: ['cooking']" in err
    assert "splits share texts (identical content): train and val share 20" in err
    test = json.loads(finished_runs(tmp_path)[0].joinpath("test-metrics.json").read_text())
    assert "cooking" not in test["macro_over"] and "cooking" not in test["per_class"]


def test_the_banner_gives_the_batch_as_used(tiny_bert, tiny_dataset, tmp_path, capsys):
    code, err = run(train_args(tiny_bert, tiny_dataset, tmp_path, "--epochs", "1", "--batch_size", "1000000000"),
                    capsys)
    assert code == 0 and "batch            80 examples per optimizer step (mean, as used)" in err


def test_early_stopping_keeps_the_schedule_and_says_why(tiny_bert, tiny_dataset, tmp_path, capsys):
    code, err = run(train_args(tiny_bert, tiny_dataset, tmp_path, "--lr", "1e-12", "--patience", "2"), capsys)
    run_dir = finished_runs(tmp_path)[0]
    rows = list(csv.DictReader((run_dir / "log.csv").open()))
    config = json.loads((run_dir / "config.json").read_text())
    assert code == 0 and len(rows) == 3 and rows[-1]["stop_reason"].startswith("early stop: no better val F1")
    assert config["training_end"]["epochs_trained"] == 3 and config["total_optimizer_steps"] == 60


def test_a_full_disk_while_writing_results_loses_no_scores_and_leaves_no_partial_result(
        tiny_bert, tiny_dataset, tmp_path, capsys, monkeypatch):
    original = bertcls.atomic_write

    def full_disk(path, text):
        if path.name == "learning-curve.svg":
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, text)

    monkeypatch.setattr(bertcls, "atomic_write", full_disk)
    code, err = run(train_args(tiny_bert, tiny_dataset, tmp_path, "--epochs", "2", "--checkpoint_minutes", "0"),
                    capsys)
    run_dir = only_run(tmp_path)
    assert code == 1 and "the test scores, which no file holds: accuracy" in err.splitlines()[-1]
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "log.csv", ".lock", "checkpoint-epoch1"}


def test_a_run_directory_in_use_is_refused(trained, tmp_path, capsys):
    unfinished = tmp_path / "run"
    shutil.copytree(trained, unfinished)
    (unfinished / "test-metrics.json").unlink()
    common.save_tensors(unfinished / "checkpoint-epoch2", {"model": {}}, {})
    with common.locked(unfinished / ".lock", str(unfinished)):
        code, err = run(["--resume", str(unfinished)], capsys)
    assert code == 1 and "is in use by another process" in err


def test_ddp_evaluates_every_example_once_as_one_process_does(tiny_bert, tiny_dataset, tmp_path, capsys):
    """Two CPU processes under torchrun (gloo): with a learning rate too small to move the weights, the val and test
    scores equal a single process's exactly, so no example was dropped or counted twice."""
    flags = ["--epochs", "1", "--lr", "1e-20", "--dtype", "fp32", "--eval_batch_size", "3"]
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, tmp_path / "one", *flags)) == 0
    ddp = torchrun(2, *train_args(tiny_bert, tiny_dataset, tmp_path / "two", *flags))
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = finished_runs(tmp_path / "one")[0], finished_runs(tmp_path / "two")[0]
    assert (one / "test-metrics.json").read_text() == (two / "test-metrics.json").read_text()
    assert json.loads((two / "config.json").read_text())["world_size"] == 2


def test_resume_under_torchrun_equals_the_uninterrupted_run(tiny_bert, tiny_dataset, tmp_path):
    flags = ["--epochs", "3", "--checkpoint_minutes", "0"]
    whole = torchrun(2, *train_args(tiny_bert, tiny_dataset, tmp_path / "whole", *flags))
    assert whole.returncode == 0, whole.stderr[-2000:]
    stopping_run(tmp_path, train_args(tiny_bert, tiny_dataset, tmp_path / "cut", *flags), epoch=2, batch=2,
                 processes=2)
    resumed = torchrun(2, "--resume", only_run(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert results(only_run(tmp_path / "cut")) == results(finished_runs(tmp_path / "whole")[0])
