"""compare.py on hand-made finished runs: differences and the exact McNemar test against hand-computed values,
pairing by seed and fold, selection as sweep.py --best selects a row, and bad input as one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import bertcls  # noqa: E402
import compare  # noqa: E402

LABELS = ["x", "y", "z"]


def add_run(out: Path, model: str, seed: int, wrong: set[int], n: int = 60, fold: int | None = None,
            args: dict | None = None, digest: str | None = None) -> Path:
    """A finished run on the CPU in fp32: gold x, y, z, x, ...; predictions right but on the examples in `wrong`;
    test metrics as bertcls.py computes them from those predictions."""
    gold = [i % 3 for i in range(n)]
    predicted = [(g + (i in wrong)) % 3 for i, g in enumerate(gold)]
    when = f"10-{seed:02d}-{fold or 0:02d}.{len(list(out.rglob('config.json'))):06d}"  # unique, in order made
    run_dir = out / model.replace("/", "__") / "2024-05-01" / when
    run_dir.mkdir(parents=True)
    args = {"model_name": model, "lr": 1e-5, "seed": seed, "dataset_dir": "data/main" if fold is None else
            f"data/fold-{fold}", "device": "cpu", "dtype": "fp32", **(args or {})}
    (run_dir / "config.json").write_text(json.dumps({
        "args": args, "device": "cpu", "dtype": "float32", "world_size": 1, "params": 1000,
        "dataset_digest": digest or f"fold-{fold}", "fold": None if fold is None else {"fold": fold, "folds": 3,
                                                                                       "set": "set-1"}}))
    (run_dir / "val-metrics.json").write_text(json.dumps({"best_epoch": 1, "train_seconds": 1.0, "f1": 0.9}))
    (run_dir / "test-predictions.jsonl").write_text("".join(json.dumps(
        {"id": f"fold{fold}-{i}", "gold": LABELS[g], "predicted": LABELS[p], "probabilities": dict.fromkeys(LABELS,
                                                                                                            1 / 3)})
        + "\n" for i, (g, p) in enumerate(zip(gold, predicted))))
    (run_dir / "test-metrics.json").write_text(json.dumps(bertcls.scores(gold, predicted, torch.zeros(n), LABELS)))
    return run_dir


def f1_of(wrong: set[int], n: int = 60) -> float:
    gold = [i % 3 for i in range(n)]
    return bertcls.scores(gold, [(g + (i in wrong)) % 3 for i, g in enumerate(gold)], torch.zeros(n), LABELS)["f1"]


def run_compare(capsys, *argv: str) -> tuple[int, str, dict | None, str]:
    rc = compare.main(list(argv))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    return rc, lines[0] if lines else "", json.loads(lines[-1]) if rc == 0 else None, err


def test_two_run_directories(tmp_path, capsys):
    a = add_run(tmp_path, "org/a", 1, wrong=set())
    b = add_run(tmp_path, "org/b", 2, wrong={0, 10, 20, 30, 40, 50})  # another seed: the user picked the two
    rc, verdict, result, _ = run_compare(capsys, str(a), str(b))
    assert rc == 0
    assert (result["a"], result["n_examples"], result["pairs"], result["folds"], result["seeds"]) == (str(a), 60, 1,
                                                                                                       1, [1])
    assert result["accuracy_a"] == 1.0 and result["accuracy_diff"] == pytest.approx(6 / 60)
    assert result["f1_diff"] == pytest.approx(1.0 - f1_of({0, 10, 20, 30, 40, 50}))
    assert result["mcnemar_p"] == 2 / 64  # A alone right on 6, B alone on none: 2 * C(6, 0) / 2^6
    low, high = result["accuracy_diff_ci95"]
    assert low <= result["accuracy_diff"] <= high and result["f1_p"] < 0.05
    assert verdict.startswith(f"{a} minus {b} on 60 test examples, 1 run pair(s): macro-F1 +")
    assert verdict.endswith(f"exact McNemar p = 0.0312: {a} is significantly better than {b} in macro-F1 (5% level)")


def test_identical_predictions_differ_by_nothing(tmp_path, capsys):
    a = add_run(tmp_path, "org/a", 1, wrong={3, 4, 5})
    b = add_run(tmp_path, "org/b", 1, wrong={3, 4, 5})
    rc, verdict, result, _ = run_compare(capsys, str(a), str(b))
    assert rc == 0 and (result["accuracy_diff"], result["f1_diff"]) == (0.0, 0.0)
    assert result["f1_p"] == result["accuracy_p"] == result["mcnemar_p"] == 1.0
    assert verdict.endswith("no significant macro-F1 difference at the 5% level (which does not show they are equal)")


def test_model_names_pair_runs_by_seed_and_fold(tmp_path, capsys):
    # A is right on 2 more examples than B in each fold for seed 1, and 1 more for seed 2
    for fold in (0, 1):
        for seed, b_wrong in ((1, {0, 1}), (2, {0})):
            add_run(tmp_path, "org/a", seed, wrong=set(), n=30, fold=fold)
            add_run(tmp_path, "org/b", seed, wrong=b_wrong, n=30, fold=fold)
    add_run(tmp_path, "org/b", 3, wrong=set(), n=30, fold=0)  # no seed-3 run of A: left out, with a warning
    rc, verdict, result, err = run_compare(capsys, "org/a", "org/b", "--output_dir", str(tmp_path))
    assert rc == 0
    assert (result["n_examples"], result["pairs"], result["folds"], result["seeds"]) == (60, 4, 2, [1, 2])
    assert result["accuracy_diff"] == pytest.approx((2 / 30 + 2 / 30 + 1 / 30 + 1 / 30) / 4)
    assert result["mcnemar_p"] is None and "McNemar" not in verdict  # only for one run against one run
    assert "compare.py: org/a: lr 1e-05, 4 runs (2 seeds x 2 folds)" in err
    assert "warning: 4 pairs of 4 runs of A and 5 of B" in err
    # --seeds selects, for both sides
    rc, _, result, _ = run_compare(capsys, "org/a", "org/b", "--output_dir", str(tmp_path), "--seeds", "2")
    assert rc == 0 and result["seeds"] == [2] and result["accuracy_diff"] == pytest.approx(1 / 30)


def test_flags_select_runs_per_side_and_for_both(tmp_path, capsys):
    add_run(tmp_path, "org/a", 1, wrong=set(), args={"max_seq_len": 128}, digest="d")
    add_run(tmp_path, "org/a", 1, wrong={1, 2, 4}, args={"max_seq_len": 32}, digest="d")
    rc, _, _, err = run_compare(capsys, "org/a", "org/a", "--output_dir", str(tmp_path))
    assert rc == 1 and err == (f"compare.py: error: org/a has runs of 2 experiments under {tmp_path} (they differ in "
                               f"max_seq_len): select one, e.g. \"org/a --max_seq_len 128\"\n")
    rc, _, result, _ = run_compare(capsys, "org/a --max_seq_len 128", "org/a --max_seq_len 32", "--output_dir",
                                   str(tmp_path))
    assert rc == 0 and result["accuracy_diff"] == pytest.approx(3 / 60) and result["a"] == "org/a --max_seq_len 128"
    rc, _, _, err = run_compare(capsys, "org/a", "org/a", "--output_dir", str(tmp_path), "--max_seq_len", "64")
    assert rc == 1 and err == (f"compare.py: error: no finished runs of org/a under {tmp_path} with --max_seq_len 64: "
                               "pass a run directory, or the --output_dir, model name and flags of its runs\n")


def one_line_error(capsys, argv: list[str], message: str) -> None:
    rc, out, _, err = run_compare(capsys, *argv)
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err.splitlines()[-1] == f"compare.py: error: {message}"  # after the lines saying which runs were chosen


def test_bad_input_is_one_line_error(tmp_path, capsys):
    a = add_run(tmp_path, "org/a", 1, wrong=set())
    other_data = add_run(tmp_path, "org/b", 1, wrong=set(), digest="other")
    one_line_error(capsys, [str(a), str(other_data)], f"{a} and {other_data} were tested on different data (dataset "
                   "digest or test example ids differ): compare runs made on the same dataset")
    other_ids = add_run(tmp_path, "org/b", 1, wrong=set(), fold=5, digest="fold-None")  # same digest, other ids
    one_line_error(capsys, [str(a), str(other_ids)], f"{a} and {other_ids} were tested on different data (dataset "
                   "digest or test example ids differ): compare runs made on the same dataset")
    no_predictions = add_run(tmp_path, "org/c", 1, wrong=set())
    (no_predictions / "test-predictions.jsonl").unlink()
    one_line_error(capsys, [str(a), str(no_predictions)], f"{no_predictions} has no test-predictions.jsonl of "
                   "bertcls.py, which intervals and tests need: move that run directory away and run it again "
                   "(sweep.py reruns a missing run)")
    unfinished = add_run(tmp_path, "org/d", 1, wrong=set())
    (unfinished / "test-metrics.json").unlink()
    one_line_error(capsys, [str(a), str(unfinished)], f"{unfinished} is not a finished run (no test-metrics.json): "
                   "pass a finished run")
    add_run(tmp_path, "org/e", 7, wrong=set())  # no seed in common with org/a
    one_line_error(capsys, ["org/a", "org/e", "--output_dir", str(tmp_path)], "no run of A has a run of B with the "
                   "same seed on the same fold: run both with the same --seeds and data")
    add_run(tmp_path, "org/a", 1, wrong=set(), fold=2)  # org/a now has runs on two datasets
    one_line_error(capsys, ["org/a", "org/e", "--output_dir", str(tmp_path)], f"org/a has runs of 2 experiments "
                   f"under {tmp_path} (they differ in dataset): select one, e.g. --dataset_dirs data/main")
    one_line_error(capsys, ["--max_seq_len 32", "org/a"], "'--max_seq_len 32': A and B come first, each a run "
                   "directory or a model name")
