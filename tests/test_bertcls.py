"""bertcls.py: pure functions against hand-computed values, end-to-end runs on a tiny model, bad input."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bertcls
import checkpoints
import common
import data
import families
from conftest import REPO, finished_runs, run_on_read_only, train_args

# ------------------------------------------------------------------------------------ pure functions


def test_macro_prf_counts_absent_classes_as_zero():
    # gold 0 0 1 1, predicted 0 1 1 1; class 2 appears in neither
    matrix = bertcls.confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1], 3)
    assert matrix == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    per_class = bertcls.per_class_prf(matrix)
    assert per_class[0] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert per_class[1] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert per_class[2] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    macro = bertcls.macro_prf(matrix)
    assert macro["precision"] == pytest.approx((1 + 2 / 3) / 3)
    assert macro["recall"] == pytest.approx(1.5 / 3)
    assert macro["f1"] == pytest.approx((2 / 3 + 0.8) / 3)


def test_classification_metrics_true_mean_loss_and_names():
    metrics = bertcls.classification_metrics([0, 1, 1], [0, 1, 0], loss_sum=3.0, id2label={0: "a", 1: "b"})
    assert metrics["loss"] == 1.0
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"] == {"labels": ["a", "b"], "matrix": [[1, 0], [1, 1]]}
    assert metrics["per_class"]["b"]["support"] == 2


def test_get_lr_warmup_and_decay_boundaries():
    lrs = [bertcls.get_lr(s, total_steps=10, warmup_steps=4, max_lr=1.0) for s in range(11)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # reaches the peak on the last warmup step
    assert lrs[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    assert bertcls.get_lr(0, total_steps=10, warmup_steps=0, max_lr=2.0) == 2.0
    # warmup longer than training (e.g. --num_warmup_epochs 2 --epochs 1): still rising, never negative
    assert bertcls.get_lr(9, total_steps=10, warmup_steps=20, max_lr=1.0) == pytest.approx(0.5)


def test_weight_decay_groups_on_real_bert_parameter_names():
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    model = BertForSequenceClassification(config)
    decay, no_decay = bertcls.param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "bert.embeddings.LayerNorm.weight" in not_decayed
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in not_decayed
    assert "bert.encoder.layer.0.attention.self.query.bias" in not_decayed
    assert "classifier.bias" in not_decayed
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert "bert.embeddings.word_embeddings.weight" in decayed
    assert "classifier.weight" in decayed
    assert all(n.endswith("bias") or "LayerNorm" in n for n in not_decayed)
    assert len(decayed) + len(not_decayed) == len(names)


def test_pair_truncation_keeps_the_title(tiny_bert):
    tokenizer = families.load_tokenizer(str(tiny_bert))
    title, body = "野球の試合", "選手、監督、サッカー、得点が発表された。" * 20
    title_ids = tokenizer(title, add_special_tokens=False)["input_ids"]
    enc = data.encode_one(tokenizer, title, body, data.InputSpec(max_len=24, token_type_ids=True))
    assert len(enc["input_ids"]) == 24
    assert enc["input_ids"][1:1 + len(title_ids)] == title_ids  # [CLS] title [SEP] body... [SEP]
    assert enc["token_type_ids"][:len(title_ids) + 2] == [0] * (len(title_ids) + 2)
    assert enc["token_type_ids"][-1] == 1
    # a title longer than the budget alone still fits, by truncating both
    long = data.encode_one(tokenizer, title * 20, body, data.InputSpec(max_len=24, token_type_ids=False))
    assert len(long["input_ids"]) == 24


def test_label_names_are_mapped_and_text_field_used(tmp_path):
    rows = [{"text": "映画の公開", "label": "movie"}, {"title": "野球", "body": "試合", "label": 2}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                          encoding="utf-8")
    loaded = data.load_split(tmp_path, "train", {"movie": 0, "sports": 1, "tech": 2})
    assert [r["label"] for r in loaded] == [0, 2]
    assert data.example_text(loaded[0]) == ("映画の公開", None)
    assert data.example_text(loaded[1]) == ("野球", "試合")


def test_fold_record_is_read_from_fold_json(tmp_path):
    assert data.load_fold(tmp_path) is None  # a plain split
    (tmp_path / "fold.json").write_text(json.dumps({"fold": 2, "folds": 5, "seed": 42, "set": "abc"}))
    assert data.load_fold(tmp_path) == {"fold": 2, "folds": 5, "set": "abc"}
    (tmp_path / "fold.json").write_text(json.dumps({"fold": "2", "folds": 5, "set": "abc"}))
    with pytest.raises(common.UserError, match="fold.json: expected an object with integers 'fold', 'folds'"):
        data.load_fold(tmp_path)


def test_collate_pads_to_multiple_of_eight_and_masks():
    packed = data.pack({"input_ids": [[5, 6, 7], [5] * 10], "token_type_ids": [[0, 0, 1], [0] * 10]})
    batch = bertcls.collate(packed, [1, 0], torch.tensor([4, 2]), pad_id=0)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [10, 3]
    assert batch["input_ids"][1, :4].tolist() == [5, 6, 7, 0]
    assert batch["token_type_ids"][1, :3].tolist() == [0, 0, 1]
    assert batch["labels"].tolist() == [2, 4]


def test_schedule_warning_gives_the_peak_lr_reached():
    args = bertcls.parse_args(["--epochs", "1", "--lr", "3e-5"])  # the default 2 warmup epochs
    # 3 batches an epoch: 3 optimizer steps, warmup round(3 x 2) = 6, so the lr stops at 3/6 of --lr
    warning = bertcls.schedule_warning(3, 6, 3, args)
    assert warning == ("warning: the warmup (6 optimizer steps, --num_warmup_epochs 2) is longer than the run "
                       "(3 steps, --epochs 1), so the learning rate peaks at 1.5e-05, 50% of --lr 3e-05 (lower "
                       "--num_warmup_epochs, e.g. to 0.1)")
    assert bertcls.schedule_warning(9, 3, 3, bertcls.parse_args(["--epochs", "3", "--num_warmup_epochs", "1"])) is None
    assert bertcls.schedule_warning(3, 3, 3, args) is None  # the peak is reached, on the last step
    # 8 micro-batches asked, 3 there: one step of 3 per epoch; with 0.5 warmup epochs the peak is still reached
    accumulating = bertcls.parse_args(["--grad_accum_steps", "8", "--epochs", "4", "--num_warmup_epochs", "0.5"])
    assert bertcls.schedule_warning(4, 0, 3, accumulating) == (
        "warning: --grad_accum_steps 8 is more than the 3 batches of an epoch, so each optimizer step accumulates "
        "only 3 (use at most 3)")
    # both at once: 1 step per epoch x 1 epoch, warmup 1 x 2 = 2 steps
    both = bertcls.schedule_warning(1, 2, 3, bertcls.parse_args(["--grad_accum_steps", "8", "--epochs", "1"]))
    assert "--grad_accum_steps 8" in both and "peaks at 1.5e-05, 50% of --lr" in both


def test_check_labels_refuses_one_label_and_names_labels_train_never_shows():
    id2label = {0: "movie", 1: "sports", 2: "tech"}
    labels = {"train": [0, 0], "val": [1], "test": [0]}

    def check() -> str | None:
        return data.check_labels({s: torch.tensor(v) for s, v in labels.items()}, id2label, Path("d"))

    with pytest.raises(common.UserError, match=r"train.jsonl: every example has the label 'movie': a classifier "
                                               r"needs examples of at least 2 labels"):
        check()
    labels["train"].append(1)
    assert check() is None
    labels["val"] += [2, 2]
    labels["test"].append(2)
    assert check() == \
        "warning: labels that train never shows, so the model cannot learn them: 'tech' (2 in val, 1 in test)"


@pytest.mark.parametrize("pair, special", [(False, 2), (True, 3)])
def test_check_room_for_text_counts_the_special_tokens(tiny_bert, pair, special):
    tokenizer = families.load_tokenizer(str(tiny_bert))
    with pytest.raises(common.UserError, match=f"a length of {special} tokens leaves no room for text: the tokenizer "
                                               f"adds {special} special tokens"):
        data.check_room_for_text(special, tokenizer, pair)
    data.check_room_for_text(special + 1, tokenizer, pair)


def test_nonfinite_advice_suggests_only_other_settings():
    assert bertcls.nonfinite_advice(torch.float32, 1.0) == "lower --lr, or check the data"
    assert bertcls.nonfinite_advice(torch.float32, 0.0) == \
        "lower --lr, clip gradients (--max_grad_norm 1), or check the data"
    assert "--dtype fp32" in bertcls.nonfinite_advice(torch.bfloat16, 1.0)
    assert "--dtype bf16 (where supported) or fp32" in bertcls.nonfinite_advice(torch.float16, 1.0)


@pytest.mark.parametrize("content, message", [
    ('{"movie": "0", "sports": 1}', "the id of 'movie' is \"0\", not an integer"),
    ('{"movie": 0, "sports": null}', "the id of 'sports' is null, not an integer"),
    ('{"movie": 0, "sports": true}', "the id of 'sports' is true, not an integer"),
    (b'{"movie": 0, "sp\xffrts": 1}', "label2id.json:1: not UTF-8 (byte 0xff)"),
])
def test_label2id_with_bad_ids_or_bytes_is_one_line(tmp_path, content, message):
    path = tmp_path / "label2id.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(common.UserError, match=re.escape(message)):
        data.load_label2id(tmp_path)


def test_label2id_with_a_bom_is_read_like_the_jsonl_files(tmp_path):
    (tmp_path / "label2id.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": 0, "b": 1}).encode())
    assert data.load_label2id(tmp_path) == {"a": 0, "b": 1}


def svg_series(root: ET.Element) -> dict[str, list[tuple[float, float]]]:
    ns = "{http://www.w3.org/2000/svg}"
    return {g.get("data-name"): [(float(c.get("cx")), float(c.get("cy"))) for c in g.iter(f"{ns}circle")]
            for g in root.iter(f"{ns}g") if g.get("class") == "series"}


@pytest.mark.parametrize("n_epochs", [1, 2, 20])
def test_learning_curve_draws_every_epoch_with_ticks_and_a_legend_clear_of_the_data(n_epochs):
    rows = [{"epoch": e, "train_loss": 1.2 / e, "val_loss": 1.0 / e + 0.1, "val_f1": 1 - 0.5 / e}
            for e in range(1, n_epochs + 1)]
    root = ET.fromstring(bertcls.learning_curve_svg(rows))
    ns = "{http://www.w3.org/2000/svg}"
    groups = {g.get("class"): g for g in root.iter(f"{ns}g") if g.get("class") != "series"}
    [box] = [r for r in root.iter(f"{ns}rect") if r.get("class") == "plot-area"]
    left, top = float(box.get("x")), float(box.get("y"))
    right, bottom = left + float(box.get("width")), top + float(box.get("height"))
    series = svg_series(root)
    assert set(series) == {"val F1", "train loss", "val loss"}
    for name, points in series.items():  # a marker per epoch, so one epoch is still drawn; all inside the box
        assert len(points) == n_epochs, name
        assert all(left <= x <= right and top <= y <= bottom for x, y in points), name
    assert [x for x, _ in series["val F1"]] == sorted({x for x, _ in series["val F1"]})  # one x per epoch
    # the highest loss (train loss of epoch 1, 1.2) sits below the top of the loss axis, at 1.2 / 1.25 of it
    assert series["train loss"][0][1] == pytest.approx(bottom - 1.2 / 1.25 * (bottom - top), abs=0.1)
    assert [t.text for t in groups["ticks-left"].iter(f"{ns}text")] == ["0", "0.2", "0.4", "0.6", "0.8", "1"]
    assert [t.text for t in groups["ticks-right"].iter(f"{ns}text")] == ["0", "0.25", "0.5", "0.75", "1", "1.25"]
    x_ticks = [int(t.text) for t in groups["ticks-x"].iter(f"{ns}text")]
    assert x_ticks[0] == 1 and 1 <= len(x_ticks) <= 10
    legend_ys = [float(e.get(k)) for e in groups["legend"] for k in ("y", "cy", "y1") if e.get(k) is not None]
    assert len(legend_ys) == 9 and max(legend_ys) < top  # above the plot area: no line runs through it


def test_an_unpadded_batch_has_no_attention_mask():
    packed = data.pack({"input_ids": [[5, 6, 7, 8, 9, 10, 11, 12], [5] * 8, [5] * 3],
                           "token_type_ids": [[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8, [0] * 3]})
    batch = bertcls.collate(packed, [1, 0], None, pad_id=0)
    assert "attention_mask" not in batch  # SDPA may then take its flash kernel
    assert batch["input_ids"].tolist() == [[5] * 8, [5, 6, 7, 8, 9, 10, 11, 12]]
    assert batch["token_type_ids"].tolist() == [[0] * 8, [0, 0, 0, 1, 1, 1, 1, 1]]
    assert "attention_mask" in bertcls.collate(packed, [0, 2], None, pad_id=0)
    assert "attention_mask" not in bertcls.collate(packed, [2], None, pad_id=0, buckets=[3, 8])  # exactly a bucket


# -------------------------------------------------------------------------------------- end to end


def read_run(run_dir: Path) -> dict:
    return {
        "config": json.loads((run_dir / "config.json").read_text(encoding="utf-8")),
        "val": json.loads((run_dir / "val-metrics.json").read_text(encoding="utf-8")),
        "test": json.loads((run_dir / "test-metrics.json").read_text(encoding="utf-8")),
        "log": list(csv.DictReader((run_dir / "log.csv").open(encoding="utf-8"))),
        "predictions": [json.loads(line) for line in (run_dir / "test-predictions.jsonl").open(encoding="utf-8")],
    }


@pytest.fixture(scope="module")
def two_runs(tiny_bert, tiny_dataset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("outputs")
    for _ in range(2):
        assert bertcls.main(train_args(tiny_bert, tiny_dataset, output_dir)) == 0
    runs = finished_runs(output_dir)
    assert len(runs) == 2
    return [read_run(r) for r in runs], runs


def test_training_learns_and_writes_every_output(two_runs, tiny_rows, tiny_bert):
    (run, _), (run_dir, _) = two_runs
    assert run["val"]["f1"] > 0.8 and run["test"]["f1"] > 0.8  # 3 balanced classes: chance is ~0.33
    best_row = max(run["log"], key=lambda r: float(r["val_f1"]))
    assert int(best_row["epoch"]) == run["val"]["best_epoch"]
    assert float(best_row["val_f1"]) == pytest.approx(run["val"]["f1"], abs=1e-9)  # the best weights were used
    assert [int(r["epoch"]) for r in run["log"]] == list(range(1, 7))
    assert set(run["test"]) >= {"loss", "accuracy", "precision", "recall", "f1", "per_class", "confusion_matrix"}
    assert sum(map(sum, run["test"]["confusion_matrix"]["matrix"])) == len(tiny_rows["test"])
    assert [p["id"] for p in run["predictions"]] == [r["id"] for r in tiny_rows["test"]]
    accuracy = sum(p["gold"] == p["predicted"] for p in run["predictions"]) / len(run["predictions"])
    assert accuracy == pytest.approx(run["test"]["accuracy"])
    config = run["config"]
    auto_dtype = common.dtype_name(common.resolve_dtype("auto", torch.device("cpu")))  # bf16 on CPUs with bf16 units
    assert config["args"]["lr"] == 3e-3 and config["device"] == "cpu" and config["dtype"] == auto_dtype
    assert config["params"] > config["params_non_embedding"] > 0
    assert config["total_optimizer_steps"] == 6 * math.ceil(80 / 8)
    assert len(config["dataset_digest"]) == 64
    ET.parse(run_dir / "learning-curve.svg")  # well-formed XML
    model_part, date_part, time_part = run_dir.parts[-3:]
    assert model_part == str(tiny_bert).strip("/").replace("/", "__")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date_part) and re.fullmatch(r"\d{2}-\d{2}-\d{2}\.\d{6}", time_part)


def test_each_rank_draws_its_own_dropout_masks(tiny_bert, tiny_dataset, tmp_path):
    """Rank 0 (and a single process) keeps the random stream of the seed; other ranks get their own."""
    args = bertcls.parse_args(train_args(tiny_bert, tiny_dataset, tmp_path))
    quiet = lambda message: None  # noqa: E731
    rank0 = bertcls.Run(args, log=quiet)
    after_rank0 = torch.get_rng_state()
    torch.manual_seed(args.seed)  # what a single process did before ranks had their own streams
    families.load_model(args.model_name, rank0.label2id)
    assert torch.equal(torch.get_rng_state(), after_rank0)
    rank1 = bertcls.Run(args, log=quiet, rank=1)
    assert not torch.equal(torch.get_rng_state(), after_rank0)
    # the data order does not depend on the rank: each takes its turns in the one global order
    shards = [bertcls.train_batches(SimpleNamespace(args=args, packed=rank1.packed, rank=r, world_size=2, buckets=None),
                                    1) for r in (0, 1)]
    assert [b for pair in zip(*shards) for b in pair] == bertcls.train_batches(rank0, 1)  # 10 batches of 8


def test_same_seed_gives_identical_results(two_runs):
    (first, second), _ = two_runs
    assert first["test"] == second["test"]
    assert first["val"]["f1"] == second["val"]["f1"]
    assert first["predictions"] == second["predictions"]


def test_patience_stops_early_on_the_schedule_planned_for_all_epochs(two_runs, tiny_bert, tiny_dataset, tmp_path):
    (full, _), _ = two_runs
    f1 = [float(r["val_f1"]) for r in full["log"]]
    stop = next(e for e in range(2, len(f1) + 1) if f1[e - 1] <= max(f1[:e - 1]))  # first epoch without progress
    best = f1.index(max(f1[:stop])) + 1
    assert stop < len(f1), "the full run improved every epoch: patience 1 would not stop it"
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, tmp_path, "--patience", "1")) == 0
    (run_dir,) = finished_runs(tmp_path)
    run = read_run(run_dir)

    def metrics(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in ("seconds", "examples_per_s", "stop_reason")}

    # the same epochs as the full run, learning rates included: the schedule is the one planned for 6 epochs
    assert [metrics(r) for r in run["log"]] == [metrics(r) for r in full["log"][:stop]]
    reason = f"early stop: no better val F1 in the 1 epoch(s) after epoch {best} (--patience 1)"
    assert [r["stop_reason"] for r in run["log"]] == [""] * (stop - 1) + [reason]
    assert run["config"]["training_end"] == {"epochs_trained": stop, "reason": reason}
    assert full["config"]["training_end"] == {"epochs_trained": 6, "reason": "--epochs 6 done"}
    assert run["val"]["best_epoch"] == best and run["val"]["f1"] == f1[best - 1]


def test_progress_off_a_terminal_is_a_line_every_log_interval(tiny_bert, tiny_dataset, tmp_path, capsys):
    """stderr is no terminal here, as under nohup, in CI and in a sweep's run logs: a plain line every --log_interval
    optimizer steps with the step, examples/s, the epoch's mean loss so far, the learning rate and the time left."""
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, tmp_path, "--epochs", "2", "--log_interval", "3")) == 0
    err = capsys.readouterr().err
    line = re.compile(r"epoch (\d)/2: (\d+)/80 examples \((\d+)%\), (\d+) examples/s, (\S+) left, step (\d+)/20, "
                      r"loss (\S+), lr (\S+)$")
    found = [m for text in err.splitlines() if (m := line.match(text))]
    # 80 examples in 10 batches of 8 a epoch, 20 optimizer steps in all: every 3rd step, across the epochs
    assert [int(m[6]) for m in found] == [3, 6, 9, 12, 15, 18]
    for m in found:
        step = int(m[6])
        epoch, steps_in_epoch = (step - 1) // 10 + 1, (step - 1) % 10 + 1
        assert (int(m[1]), int(m[2]), int(m[3])) == (epoch, 8 * steps_in_epoch, 10 * steps_in_epoch)
        assert int(m[4]) > 0 and re.fullmatch(r"(\d+m)?\d+s", m[5]) and 0 < float(m[7]) < 10
        # the rate of the step just taken (0-based step - 1): 0.5 warmup epochs = 5 steps up to --lr 3e-3
        assert float(m[8]) == pytest.approx(bertcls.get_lr(step - 1, 20, 5, 3e-3), rel=1e-2)
    assert "\r" not in err[err.index("examples: train 80"):]  # no bar from the start of training on


def test_progress_on_a_terminal_is_a_bar(tiny_bert, tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, tmp_path, "--epochs", "1", "--log_interval", "3")) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "step=3/10" in err and "loss=" in err  # the figures in the bar
    assert not re.search(r"^epoch 1/1: .* step 3/10", err, flags=re.M)  # and no plain line


def test_second_run_reuses_the_tokenization_cache(tiny_bert, tiny_dataset, tmp_path, monkeypatch, capsys):
    args = train_args(tiny_bert, tiny_dataset, tmp_path, "--epochs", "1")
    assert bertcls.main(args) == 0
    assert "tokenized" in capsys.readouterr().err

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again despite a warm cache")

    monkeypatch.setattr(data, "encode_rows", no_tokenizing)
    assert bertcls.main(args) == 0


# --------------------------------------------------------------------------------------- bad input


def run_main(args: list[str], capsys) -> tuple[int, str]:
    code = bertcls.main(args)
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    return lines[-1]


def assert_no_metrics(output_dir: Path) -> None:
    assert not list(output_dir.rglob("*metrics.json"))


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


def test_missing_dataset_points_to_prepare(tiny_bert, tmp_path, capsys):
    code, err = run_main(train_args(tiny_bert, tmp_path / "nowhere", tmp_path / "out"), capsys)
    assert code == 1
    assert "prepare.py" in error_line(err)
    assert_no_metrics(tmp_path)


def test_invalid_jsonl_line_names_file_and_line(tiny_bert, dataset_copy, tmp_path, capsys):
    with (dataset_copy / "val.jsonl").open("a", encoding="utf-8") as f:
        f.write("{not json\n")
    code, err = run_main(train_args(tiny_bert, dataset_copy, tmp_path / "out"), capsys)
    assert code == 1
    assert "val.jsonl:21: not valid JSON" in error_line(err)
    assert_no_metrics(tmp_path)


def test_label_not_in_label2id(tiny_bert, dataset_copy, tmp_path, capsys):
    (dataset_copy / "label2id.json").write_text(json.dumps({"movie": 0, "sports": 1}), encoding="utf-8")
    code, err = run_main(train_args(tiny_bert, dataset_copy, tmp_path / "out"), capsys)
    assert code == 1
    assert "label 2 is not in" in error_line(err) and "disagree" in error_line(err)
    assert_no_metrics(tmp_path)


def test_empty_split(tiny_bert, dataset_copy, tmp_path, capsys):
    (dataset_copy / "test.jsonl").write_text("", encoding="utf-8")
    code, err = run_main(train_args(tiny_bert, dataset_copy, tmp_path / "out"), capsys)
    assert code == 1
    assert "test.jsonl is empty" in error_line(err)


@pytest.mark.parametrize("model_name", ["no-such-org/no-such-model", "missing-weights"])
def test_model_that_cannot_be_loaded(model_name, tiny_bert, tiny_dataset, tmp_path, capsys):
    if model_name == "missing-weights":
        model_dir = Path(shutil.copytree(tiny_bert, tmp_path / "missing-weights"))
        (model_dir / "model.safetensors").unlink()
        model_name = str(model_dir)
    args = train_args(tiny_bert, tiny_dataset, tmp_path / "out")
    args[args.index("--model_name") + 1] = model_name
    code, err = run_main(args, capsys)
    assert code == 1
    assert model_name in error_line(err) and "cannot load" in error_line(err)
    assert_no_metrics(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(tiny_bert, tiny_dataset, tmp_path, capsys):
    args = train_args(tiny_bert, tiny_dataset, tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    code, err = run_main(args, capsys)
    assert code == 1
    assert "CUDA is not available" in error_line(err) and "--device cpu" in error_line(err)


@pytest.mark.parametrize("flag,value", [("--batch_size", "0"), ("--epochs", "-1"), ("--lr", "0"),
                                        ("--lr", "nan"), ("--num_warmup_epochs", "-1"), ("--dtype", "fp8")])
def test_impossible_flag_values_are_rejected_by_argparse(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        bertcls.parse_args([flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_nan_loss_stops_with_epoch_and_step(tiny_bert, tiny_dataset, tmp_path, capsys):
    args = train_args(tiny_bert, tiny_dataset, tmp_path / "out", "--max_grad_norm", "0", "--log_interval", "1",
                      "--dtype", "fp32")
    args[args.index("--lr") + 1] = "1e30"
    code, err = run_main(args, capsys)
    assert code == 1
    line = error_line(err)
    assert "NaN/inf" in line and "epoch 1" in line and "step" in line
    assert "--dtype" not in line and "--max_grad_norm 1" in line  # what differs from this fp32, unclipped run
    assert_no_metrics(tmp_path)


def test_out_of_memory_suggests_remedies(tiny_bert, tiny_dataset, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bertcls, "train_epoch", out_of_memory)
    code, err = run_main(train_args(tiny_bert, tiny_dataset, tmp_path / "out"), capsys)
    assert code == 1
    assert "--batch_size" in error_line(err) and "--gradient_checkpointing" in error_line(err)
    assert_no_metrics(tmp_path)


def test_output_dir_that_is_a_file(tiny_bert, tiny_dataset, tmp_path, capsys):
    (tmp_path / "out").write_text("", encoding="utf-8")
    code, err = run_main(train_args(tiny_bert, tiny_dataset, tmp_path / "out"), capsys)
    assert code == 1
    assert "is a file" in error_line(err)


def test_output_dir_under_a_file_is_refused_before_the_model_is_loaded(tmp_path, capsys):
    (tmp_path / "file").write_text("", encoding="utf-8")
    out = tmp_path / "file" / "outputs"
    # no such model or dataset: a check made after loading them would report those instead
    code, err = run_main(["--model_name", str(tmp_path / "no-model"), "--dataset_dir", str(tmp_path / "no-data"),
                          "--output_dir", str(out)], capsys)
    assert code == 1
    assert error_line(err) == (f"bertcls.py: error: --output_dir {out} is under {tmp_path / 'file'}, which is a file: "
                               "pass a directory")


def test_read_only_output_dir_is_refused_before_the_model_is_loaded(tmp_path):
    read_only = tmp_path / "outputs"
    # no such model or dataset: a check made after loading them would report those instead
    result = run_on_read_only(read_only, [sys.executable, str(REPO / "bertcls.py"), "--model_name",
                                          str(tmp_path / "none"), "--dataset_dir", str(tmp_path / "none"),
                                          "--output_dir", str(read_only / "runs")])
    assert result.returncode == 1
    assert error_line(result.stderr) == (f"bertcls.py: error: cannot write in {read_only} (Read-only file system): "
                                         "--output_dir needs a directory you can write to")
    assert list(read_only.iterdir()) == []


def full_disk_at(monkeypatch, name: str, nth: int = 1) -> dict[str, str]:
    """The nth write of a file called `name` fails as on a full disk (atomic_write_text then leaves nothing, as it
    does when the disk is full); returns the text that was to be written."""
    write, attempts, lost = common.atomic_write_text, [], {}

    def atomic_write_text(path: Path, text: str) -> None:
        if Path(path).name == name:
            attempts.append(path)
            if len(attempts) == nth:
                lost[name] = text
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, text)

    monkeypatch.setattr(common, "atomic_write_text", atomic_write_text)  # what write_json calls
    monkeypatch.setattr(bertcls, "atomic_write_text", atomic_write_text)
    return lost


@pytest.mark.parametrize("name,nth", [("test-metrics.json", 1), ("bertcls.json", 1), ("log.csv", 2)])
def test_a_full_disk_loses_no_scores_and_leaves_no_partial_result(name, nth, tiny_bert, tiny_dataset, tmp_path,
                                                                  capsys, monkeypatch):
    """log.csv of epoch 2, the model's bertcls.json (inside .model.tmp/), test-metrics.json: one line saying how to
    go on, the test scores when they are known, and a run directory that is that of an unfinished run."""
    out = tmp_path / "out"
    args = train_args(tiny_bert, tiny_dataset, out, "--epochs", "2", "--checkpoint_minutes", "0", "--save_model")
    lost = full_disk_at(monkeypatch, name, nth)
    code, err = run_main(args, capsys)
    (run_dir,) = out.glob("*/*/*")
    assert code == 1
    line = error_line(err)
    what = run_dir / "log.csv" if name == "log.csv" else f"the results in {run_dir}"
    assert line.startswith(f"bertcls.py: error: could not write {what} ([Errno 28] No space left on device; ")
    assert f"MiB free on its disk); the checkpoint of epoch 1 is kept: free space, then continue with " \
           f"`python bertcls.py --resume {run_dir}`" in line
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint-epoch1", "config.json", "log.csv"]
    monkeypatch.undo()
    assert bertcls.main(["--resume", str(run_dir)]) == 0  # the run goes on from there, to the same result
    if name == "test-metrics.json":
        test = json.loads((run_dir / "test-metrics.json").read_text(encoding="utf-8"))
        best = json.loads((run_dir / "val-metrics.json").read_text(encoding="utf-8"))["best_epoch"]
        assert test == json.loads(lost[name])
        assert line.endswith(f"; the test scores, which no file holds: accuracy {test['accuracy']:.4f}, "
                             f"f1 {test['f1']:.4f} (best epoch {best})")
    elif name == "log.csv":  # in training: no scores yet
        assert "test scores" not in line
    else:  # the model's files, after the evaluation
        assert "; the test scores, which no file holds: accuracy " in line


@pytest.mark.parametrize("signum,exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_training_keeps_config_and_log_but_no_metrics(signum, exit_code, tiny_bert, tiny_dataset,
                                                                 tmp_path):
    output_dir = tmp_path / "out"
    # a checkpoint after every epoch, so the signal may well come while one is being written
    args = train_args(tiny_bert, tiny_dataset, output_dir, "--checkpoint_minutes", "0")
    args[args.index("--epochs") + 1] = "1000"  # long enough to be interrupted mid-way
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "bertcls.py"), *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # an epoch finished: its checkpoint is written
        while not list(output_dir.rglob(f"{checkpoints.CHECKPOINT_PREFIX}*/{checkpoints.MANIFEST}")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.1)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == exit_code, err
    assert "Traceback" not in err
    (run_dir,) = [p.parent for p in output_dir.rglob("config.json")]
    assert (run_dir / "log.csv").is_file()
    assert_no_metrics(output_dir)
    assert not (run_dir / "test-predictions.jsonl").exists()
    # the newest complete checkpoint is kept whole; what the signal cut short is gone
    run_id = checkpoints.run_identity(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    newest = checkpoints.usable_checkpoints(run_dir, run_id)[0][0]
    assert checkpoints.read_checkpoint(newest, run_id)["state"]["epoch"] == checkpoints.checkpoint_epoch(newest)
    assert not list(run_dir.glob(".*.tmp"))
    assert f"checkpoint of epoch {checkpoints.checkpoint_epoch(newest)}" in err and "--resume" in err


def test_debug_shows_the_traceback(tiny_bert, tmp_path, monkeypatch):
    with pytest.raises(common.UserError, match="prepare.py"):
        bertcls.main([*train_args(tiny_bert, tmp_path / "nowhere", tmp_path / "out"), "--debug"])
    monkeypatch.setenv("BERTCLS_DEBUG", "1")
    with pytest.raises(common.UserError, match="prepare.py"):
        bertcls.main(train_args(tiny_bert, tmp_path / "nowhere", tmp_path / "out"))


def test_warmup_longer_than_the_run_is_one_warning_line(tiny_bert, tiny_dataset, tmp_path, capsys):
    args = train_args(tiny_bert, tiny_dataset, tmp_path / "out", "--epochs", "1", "--num_warmup_epochs", "2")
    code, err = run_main(args, capsys)
    assert code == 0, err
    [warning] = [line for line in err.splitlines() if "warning" in line]
    # 80 examples in batches of 8: 10 steps; warmup 20 steps, so the lr peaks at 10/20 of --lr 3e-3
    assert warning.startswith("warning: the warmup (20 optimizer steps") and "peaks at 0.0015, 50% of --lr" in warning


def test_single_label_train_is_refused(tiny_bert, dataset_copy, tmp_path, capsys):
    rows = [json.loads(line) for line in (dataset_copy / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    (dataset_copy / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows
                                                      if r["category"] == "sports"), encoding="utf-8")
    code, err = run_main(train_args(tiny_bert, dataset_copy, tmp_path / "out"), capsys)
    assert code == 1
    assert "every example has the label 'sports': a classifier needs examples of at least 2 labels" in error_line(err)
    assert_no_metrics(tmp_path)


def test_max_seq_len_without_room_for_text_is_refused(tiny_bert, tiny_dataset, tmp_path, capsys):
    args = train_args(tiny_bert, tiny_dataset, tmp_path / "out")
    args[args.index("--max_seq_len") + 1] = "3"  # [CLS] title [SEP] body [SEP]: 3 special tokens
    code, err = run_main(args, capsys)
    assert code == 1
    assert "a length of 3 tokens leaves no room for text" in error_line(err) and "--max_seq_len" in error_line(err)
    assert_no_metrics(tmp_path)


def test_interrupt_before_an_epoch_ends_names_only_what_is_kept(tiny_bert, tiny_dataset, tmp_path, capsys,
                                                                monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bertcls, "train_epoch", interrupted)
    code, err = run_main(train_args(tiny_bert, tiny_dataset, tmp_path / "out"), capsys)
    assert code == 130
    [run_dir] = [p.parent for p in (tmp_path / "out").rglob("config.json")]
    assert error_line(err) == f"bertcls.py: interrupted; {run_dir} keeps config.json, no metrics"


@pytest.mark.parametrize("removed, message", [
    (("vocab.txt",), "(the directory needs its tokenizer's files as tokenizer.save_pretrained writes them: "
                     "tokenizer_config.json with vocab.txt, tokenizer.json or sentencepiece.bpe.model)"),
    (("vocab.txt", "tokenizer_config.json"), "has no vocabulary beyond its 5 special tokens: the directory needs "
                                             "its tokenizer's files"),
    (("config.json",), "the directory has no config.json"),
])
def test_model_directory_with_missing_files_says_what_is_missing(tiny_bert, tiny_dataset, tmp_path, capsys,
                                                                 removed, message):
    model_dir = Path(shutil.copytree(tiny_bert, tmp_path / "model"))
    for name in removed:
        (model_dir / name).unlink()
    code, err = run_main(train_args(model_dir, tiny_dataset, tmp_path / "out"), capsys)
    assert code == 1
    assert message in error_line(err) and "pass a local directory" not in error_line(err)
    assert_no_metrics(tmp_path)


def test_unreachable_hub_fails_at_once_without_retries(tiny_dataset, tmp_path):
    import socket
    silent = socket.socket()  # accepts connections (the kernel does) and never answers them
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}", "HF_HUB_ETAG_TIMEOUT": "1",
            "HF_HOME": str(tmp_path / "hf-home")}
    try:
        result = subprocess.run([sys.executable, str(REPO / "bertcls.py"),
                                 *train_args("some-org/some-model", tiny_dataset, tmp_path / "out")],
                                env=env, capture_output=True, text=True, timeout=120)  # huggingface_hub: minutes
        silent.setblocking(False)
        attempts = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                silent.accept()[0].close()
                attempts += 1
    finally:
        silent.close()
    assert result.returncode == 1
    assert error_line(result.stderr) == (
        f"bertcls.py: error: cannot load model 'some-org/some-model': the Hugging Face Hub at {env['HF_ENDPOINT']} "
        "cannot be reached (no answer in 1 s); check your network, or work offline with HF_HUB_OFFLINE=1 and a "
        "cached model (it is not in the cache yet) or a local directory")
    assert attempts == 1  # one probe, no retries
    assert_no_metrics(tmp_path)
