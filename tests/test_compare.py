"""compare.py on hand-made finished runs: differences, intervals and tests checked against hand-computed values,
pairing by seed and fold, selection as sweep.py selects, and bad input as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bertcls
import compare
from conftest import finished_runs, metrics, write_predictions, write_run

LABELS = {0: "x", 1: "y", 2: "z"}


def predictions(n: int, wrong: set[int]) -> tuple[list[str], list[str]]:
    """Gold x, y, z, x, ...; predictions right except on the examples in `wrong` (predicted as the next label)."""
    gold = [LABELS[i % 3] for i in range(n)]
    return gold, [LABELS[(i + (i in wrong)) % 3] for i in range(n)]


def scored(gold: list[str], predicted: list[str]) -> dict:
    """Test metrics as bertcls.py computes them."""
    index = {name: i for i, name in LABELS.items()}
    return bertcls.classification_metrics([index[g] for g in gold], [index[p] for p in predicted], 0.0, LABELS)


def add_run(out: Path, model: str, seed: int, wrong: set[int], n: int = 60, fold: int | None = None,
            args: dict | None = None, digest: str | None = None) -> Path:
    """A finished run whose test metrics are computed from its predictions."""
    gold, predicted = predictions(n, wrong)
    computed = scored(gold, predicted)
    time_of_day = f"10-{seed:02d}-{0 if fold is None else fold:02d}.{len(finished_runs(out)):06d}"
    run_dir = write_run(out, model, 1e-5, seed, time_of_day, 0.9,
                        metrics(0.1, *(computed[m] for m in ("accuracy", "precision", "recall", "f1"))), 1,
                        args={"dataset_dir": "data/main" if fold is None else f"data/fold-{fold}", **(args or {})},
                        digest=digest or f"fold-{fold}",
                        fold=None if fold is None else {"fold": fold, "folds": 3, "set": "set-1"})
    # three labels, and each fold its own examples
    write_predictions(run_dir, gold, predicted, tuple(LABELS.values()), ids=[f"fold{fold}-{i}" for i in range(n)])
    return run_dir


def run_compare(capsys, *argv: str) -> tuple[int, str, dict | None, str]:
    rc = compare.main(list(argv))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    return rc, lines[0] if lines else "", json.loads(lines[-1]) if rc == 0 else None, err


def f1_of(wrong: set[int], n: int = 60) -> float:
    return scored(*predictions(n, wrong))["f1"]


def test_two_run_directories(tmp_path, capsys):
    a = add_run(tmp_path, "org/a", 1, wrong=set())
    b = add_run(tmp_path, "org/b", 1, wrong={0, 10, 20, 30, 40, 50})
    rc, verdict, result, _ = run_compare(capsys, str(a), str(b), "--resamples", "1000")
    assert rc == 0
    assert (result["n_examples"], result["pairs"], result["folds"], result["seeds"]) == (60, 1, 1, [1])
    assert result["accuracy_diff"] == pytest.approx(6 / 60)
    assert result["f1_diff"] == pytest.approx(1.0 - f1_of({0, 10, 20, 30, 40, 50}))
    # A is right on all 6 examples B gets wrong and B on none A gets wrong: 2 * C(6, 0) / 2^6
    assert result["mcnemar"] == [{"seed": 1, "only_a": 6, "only_b": 0, "p": 2 / 64}] and result["mcnemar_p"] == 2 / 64
    # no resample can make B better; a resample missing all 6 (probability (54/60)^60 = 0.2%) gives 0
    low, high = result["accuracy_diff_ci95"]
    assert 0 <= low < 0.1 < high <= 0.2 and result["f1_diff_ci95"][0] >= 0
    assert result["bootstrap_p"] == result["f1_bootstrap_p"] < 0.02 and result["accuracy_bootstrap_p"] < 0.02
    assert verdict.startswith(f"{a} minus {b} on 60 test examples, 1 run pair(s): macro-F1 +")
    assert verdict.endswith(f"exact McNemar p = 0.0312): {a} is significantly better than {b} in macro-F1 (5% level)")


def test_identical_predictions_differ_by_nothing(tmp_path, capsys):
    a = add_run(tmp_path, "org/a", 1, wrong={3, 4, 5})
    b = add_run(tmp_path, "org/b", 2, wrong={3, 4, 5})
    rc, verdict, result, _ = run_compare(capsys, str(a), str(b), "--resamples", "300")
    assert rc == 0
    assert (result["accuracy_diff"], result["f1_diff"], result["f1_diff_ci95"], result["accuracy_diff_ci95"]) == (
        0.0, 0.0, [0.0, 0.0], [0.0, 0.0])
    assert result["bootstrap_p"] == result["accuracy_bootstrap_p"] == result["mcnemar_p"] == 1.0
    assert verdict.endswith("no significant macro-F1 difference at the 5% level")


def test_model_names_pair_runs_by_seed_and_fold(tmp_path, capsys):
    # A is right on 2 more examples than B in each of 2 folds for seed 1, and 1 more for seed 2
    for fold in (0, 1):
        for seed, b_wrong in ((1, {0, 1}), (2, {0})):
            add_run(tmp_path, "org/a", seed, wrong=set(), n=30, fold=fold)
            add_run(tmp_path, "org/b", seed, wrong=b_wrong, n=30, fold=fold)
    add_run(tmp_path, "org/b", 3, wrong=set(), n=30, fold=0)  # no seed-3 run of A: left out, with a warning
    rc, _, result, err = run_compare(capsys, "org/a", "org/b", "--output_dir", str(tmp_path), "--resamples", "300")
    assert rc == 0
    assert (result["n_examples"], result["pairs"], result["folds"], result["seeds"]) == (60, 4, 2, [1, 2])
    assert result["accuracy_diff"] == pytest.approx((2 / 30 + 2 / 30 + 1 / 30 + 1 / 30) / 4)
    # McNemar per seed over both folds: seed 1: 4 vs 0, p = 2 / 2^4; seed 2: 2 vs 0, p = 2 / 2^2 = 1/2.
    # Both point to A; the one-sided p of the weaker seed (1/4), doubled: 1/2
    assert [(m["seed"], m["only_a"], m["only_b"], m["p"]) for m in result["mcnemar"]] == [(1, 4, 0, 2 / 16),
                                                                                          (2, 2, 0, 0.5)]
    assert result["mcnemar_p"] == 0.5
    assert "compare.py: org/a: lr 1e-05, 4 runs (2 seeds x 2 folds)" in err
    assert "warning: 4 pairs of 4 runs of A and 5 of B" in err
    # the same outputs give the same answer
    assert run_compare(capsys, "org/a", "org/b", "--output_dir", str(tmp_path), "--resamples", "300")[2] == result


def test_flags_select_runs_per_side_and_for_both(tmp_path, capsys):
    add_run(tmp_path, "org/a", 1, wrong=set(), args={"max_seq_len": 128}, digest="d")
    add_run(tmp_path, "org/a", 1, wrong={1, 2, 4}, args={"max_seq_len": 32}, digest="d")
    rc, _, _, err = run_compare(capsys, "org/a", "org/a", "--output_dir", str(tmp_path))
    assert rc == 1 and err == (f"compare.py: error: org/a has runs of 2 experiments under {tmp_path} (they differ in "
                               f"max_seq_len): select one, e.g. \"org/a --max_seq_len 128\"\n")
    rc, _, result, _ = run_compare(capsys, "org/a --max_seq_len 128", "org/a --max_seq_len 32", "--output_dir",
                                   str(tmp_path), "--resamples", "200")
    assert rc == 0 and result["accuracy_diff"] == pytest.approx(3 / 60) and result["a"] == "org/a --max_seq_len 128"
    rc, _, _, err = run_compare(capsys, "org/a", "org/a", "--output_dir", str(tmp_path), "--max_seq_len", "64")
    assert rc == 1 and err == (f"compare.py: error: no finished runs of org/a under {tmp_path} with --max_seq_len 64: "
                               f"pass a run directory, or the --output_dir, model name and flags the runs were made "
                               f"with\n")


def one_line_error(capsys, argv: list[str], message: str) -> None:
    rc, out, _, err = run_compare(capsys, *argv)
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err.splitlines()[-1] == f"compare.py: error: {message}"  # after the lines saying which runs were chosen


def test_bad_input_is_one_line_error(tmp_path, capsys):
    a = add_run(tmp_path, "org/a", 1, wrong=set())
    other_data = add_run(tmp_path, "org/b", 1, wrong=set(), digest="other")
    one_line_error(capsys, [str(a), str(other_data)], f"{a} and {other_data} were tested on different data (dataset "
                   f"digest or test example ids differ): compare runs made on the same dataset")
    no_predictions = add_run(tmp_path, "org/c", 1, wrong=set())
    (no_predictions / "test-predictions.jsonl").unlink()
    one_line_error(capsys, [str(a), str(no_predictions)], f"{no_predictions} has no test-predictions.jsonl, which "
                   f"intervals and tests need: move that run directory away and run it again (sweep.py reruns a "
                   f"missing run)")
    unfinished = add_run(tmp_path, "org/d", 1, wrong=set())
    (unfinished / "test-metrics.json").unlink()
    one_line_error(capsys, [str(a), str(unfinished)], f"{unfinished} is not a finished run (no test-metrics.json): "
                   f"pass a finished run")
    add_run(tmp_path, "org/e", 7, wrong=set(), digest="other")  # no seed and test set in common with org/a
    one_line_error(capsys, ["org/a", "org/e", "--output_dir", str(tmp_path)], "no run of A has a run of B with the "
                   "same seed on the same test examples (the seeds, or the datasets by digest or example ids, "
                   "differ): run both with the same --seeds and data")
    add_run(tmp_path, "org/a", 1, wrong=set(), fold=2)  # org/a now has runs on two datasets
    one_line_error(capsys, ["org/a", "org/e", "--output_dir", str(tmp_path)], f"org/a has runs of 2 experiments "
                   f"under {tmp_path} (they differ in dataset): select one, e.g. --dataset_dirs data/main")
