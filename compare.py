"""Is the difference between two models (or two settings) real? And the statistics of sweep.py's tables.

    python compare.py outputs/org__a/2024-05-01/10-00-00.000000 outputs/org__b/2024-05-01/11-00-00.000000
    python compare.py cl-tohoku/bert-base-japanese-v3 xlm-roberta-base --dataset_dirs datasets/livedoor/fold-*
    python compare.py "models/tiny-bert --max_seq_len 32" "models/tiny-bert --max_seq_len 128"

A and B: a finished run directory, or a model name (with flags for that side inside its quotes) whose runs are
selected as a row of `sweep.py --no_run --best`. Runs are paired by seed and fold. stdout: a verdict line, then a JSON
line. README.md (区間と印) explains the procedures and cites their sources.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

from common import DTYPES, UserError, confusion_scores, dtype_name, log, positive_float, run_cli, seed_int

LEVEL, ALPHA = 0.95, 0.05
METRICS = ("accuracy", "f1")
NORMAL = statistics.NormalDist()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # an abbreviation could swallow a bertcls.py flag
    p.add_argument("a", help="a finished run directory, or a model name (quoted with flags for this side only)")
    p.add_argument("b", help="the same for B; differences are A minus B")
    p.add_argument("--output_dir", default="outputs", help="where model names' runs are (default: %(default)s)")
    p.add_argument("--lrs", nargs="+", type=positive_float, metavar="LR", help="only these lrs (default: all)")
    p.add_argument("--seeds", nargs="+", type=seed_int, metavar="SEED", help="only these seeds")
    p.add_argument("--dataset_dirs", nargs="+", metavar="DIR", help="only these, e.g. datasets/livedoor/fold-*")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args, args.bertcls_flags = p.parse_known_args(argv)
    return args


# -------------------- statistics
# Pure functions, no resampling. A run (sweep.Run) has seed, fold (None without folds), gold and predicted (label
# ids, in one example order per fold), n_labels and val_f1 (its best validation macro-F1).


def _metric(counts: Mapping[int, float], n_labels: int, metric: str) -> float:
    """The metric of confusion cells (cell = gold * n_labels + predicted) with counts or weights."""
    matrix = [[0.0] * n_labels for _ in range(n_labels)]
    for cell, weight in counts.items():
        matrix[cell // n_labels][cell % n_labels] += weight
    return confusion_scores(matrix)[metric]


def _cells(run: Any) -> list[int]:
    return [g * run.n_labels + p for g, p in zip(run.gold, run.predicted, strict=True)]


def _abc(strata: Sequence[Counter], n_labels: int, metric: str, level: float) -> tuple[float, float]:
    """ABC interval (Efron & Tibshirani 1993, 22.6), BCa without resampling, of the mean over strata (folds)."""
    k, n = len(strata), [sum(s.values()) for s in strata]
    p0 = [{c: m / size for c, m in s.items()} for s, size in zip(strata, n)]
    base = [_metric(p, n_labels, metric) for p in p0]
    eps = 1e-4  # P0 + eps (e_cell - P0) is P0 + eps / (1 - eps) e_cell rescaled; scores ignore the scale
    influence, second = [], []  # per stratum and cell: empirical influence t. and second derivative t..
    for j, p in enumerate(p0):
        plus = {c: (_metric({**p, c: p[c] + eps / (1 - eps)}, n_labels, metric) - base[j]) / k for c in p}
        minus = {c: (_metric({**p, c: p[c] - eps / (1 + eps)}, n_labels, metric) - base[j]) / k for c in p}
        influence.append({c: (plus[c] - minus[c]) / (2 * eps) for c in p})
        second.append({c: (plus[c] + minus[c]) / eps ** 2 for c in p})
    terms = [(m / n[j], influence[j][c], second[j][c], n[j]) for j, s in enumerate(strata) for c, m in s.items()]
    sigma, t0 = math.sqrt(math.fsum(w * t * t / size for w, t, _, size in terms)), statistics.fmean(base)
    if sigma == 0:
        return t0, t0
    a = math.fsum(w * t ** 3 / size ** 2 for w, t, _, size in terms) / 6 / sigma ** 3
    bias = math.fsum(w * t2 / (2 * size) for w, _, t2, size in terms)

    def along(lam: float) -> float:  # T(P0 + lam * delta) - T0, delta the least favourable direction, dT/dlam = sigma
        return sum((_metric({c: max(0.0, w + lam * w * influence[j][c] / (size * sigma)) for c, w in p.items()},
                            n_labels, metric) - base[j]) / k for j, (p, size) in enumerate(zip(p0, n)))

    step = 1e-3
    curvature = (along(step) + along(-step)) / (2 * sigma * step ** 2)
    z0 = NORMAL.inv_cdf(2 * NORMAL.cdf(a) * NORMAL.cdf(curvature - bias / sigma))
    ends = [z0 + NORMAL.inv_cdf(q) for q in ((1 - level) / 2, (1 + level) / 2)]
    return t0 + along(ends[0] / (1 - a * ends[0]) ** 2), t0 + along(ends[1] / (1 - a * ends[1]) ** 2)


def _grid(runs: Sequence[Any]) -> tuple[list[int], list[Hashable], dict[tuple[int, Hashable], Any]]:
    """Seeds, folds and runs by (seed, fold); a ValueError names a duplicate, a hole, or folds' gold that differ."""
    table: dict[tuple[int, Hashable], Any] = {}
    for run in runs:
        if (run.seed, run.fold) in table:
            raise ValueError(f"two runs with seed {run.seed} on fold {run.fold!r}")
        table[run.seed, run.fold] = run
    seeds, folds = sorted({s for s, _ in table}), list(dict.fromkeys(f for _, f in table))
    if missing := [(s, f) for s in seeds for f in folds if (s, f) not in table]:
        raise ValueError(f"incomplete grid: {len(table)} runs for {len(seeds)} seeds x {len(folds)} folds; missing "
                         f"(seed, fold): {', '.join(map(repr, missing))}")
    for f in folds:
        if len({(tuple(table[s, f].gold), table[s, f].n_labels) for s in seeds}) > 1:
            raise ValueError(f"fold {f!r}: runs with different gold labels")
    return seeds, folds, table


def _jackknife(run: Any, metric: str) -> tuple[float, list[int], dict[int, float]]:
    """A run's score, its cells, and per cell the delete-one deviation theta(-i) - mean theta(-.)."""
    cells = _cells(run)
    if len(cells) < 2:
        raise ValueError("a test set needs 2 or more examples")
    counts, n_labels = Counter(cells), run.n_labels
    tp, marginal = [0] * n_labels, [0] * n_labels  # per label: true positives, gold + predicted
    for cell, m in counts.items():
        gold, guess = divmod(cell, n_labels)
        marginal[gold] += m
        marginal[guess] += m
        tp[gold] += m * (gold == guess)
    f1 = [2 * t / m if m else 0.0 for t, m in zip(tp, marginal)]
    deleted = {}  # per cell, the score without one of its articles
    for cell in counts:
        gold, guess = divmod(cell, n_labels)
        if metric == "accuracy":
            deleted[cell] = (sum(tp) - (gold == guess)) / (len(cells) - 1)
            continue
        total, present = sum(f1), sum(m > 0 for m in marginal)
        for label in {gold, guess}:
            t, m = tp[label] - (gold == guess), marginal[label] - (2 if gold == guess else 1)
            total += (2 * t / m if m else 0.0) - f1[label]
            present -= m == 0
        deleted[cell] = total / present
    mean = math.fsum(m * deleted[c] for c, m in counts.items()) / len(cells)
    return _metric(counts, n_labels, metric), cells, {c: v - mean for c, v in deleted.items()}


def _seed_level(terms: Sequence[tuple[int, Hashable, float, Any]], n_seeds: int,
                metric: str) -> tuple[float, float, float]:
    """(mean, s^2 / S, c) of X_s = sum of coef * score over seed s's (seed index, fold, coef, run) terms: s^2 their
    variance, c the test error seeds share: their jackknife covariance (Efron & Stein 1981), folds as strata."""
    x, by_fold = [0.0] * n_seeds, {}
    for seed, fold, coef, run in terms:
        value, cells, deviation = _jackknife(run, metric)
        x[seed] += coef * value
        by_fold.setdefault(fold, []).append((seed, coef, cells, deviation))
    all_sq = self_sq = 0.0  # jackknife variance of sum_s X_s, and sum over s of that of X_s
    for members in by_fold.values():
        n = len(members[0][2])
        for signature, m in Counter(zip(*(cells for _, _, cells, _ in members))).items():  # articles alike in all runs
            sums = [0.0] * n_seeds
            for (seed, coef, _, deviation), cell in zip(members, signature):
                sums[seed] += coef * deviation[cell]
            all_sq += (n - 1) / n * m * sum(sums) ** 2
            self_sq += (n - 1) / n * m * sum(v * v for v in sums)
    if n_seeds == 1:
        return x[0], 0.0, all_sq
    return (statistics.fmean(x), statistics.variance(x) / n_seeds,
            max(0.0, (all_sq - self_sq) / (n_seeds * (n_seeds - 1))))


@functools.lru_cache(maxsize=None)
def _inverse_chi2(k: int) -> tuple[tuple[float, float], ...]:
    """(k / U, weight) pairs integrating over U ~ chi-square(k): the trapezoid rule in log U (Trefethen & Weideman
    2014); quantiles agree with scipy's to about 1e-7."""
    a, step = k / 2, min(0.5, 0.5 * math.sqrt(2 / k))
    grid = [-28 / a + i * step for i in range(int((math.log(2 * k + 100) + 28 / a) / step) + 1)]
    logs = [a * v - math.exp(v) / 2 for v in grid]  # log density of log U, up to a constant
    weights = [math.exp(w - max(logs)) for w in logs]
    total = sum(weights)
    return tuple((k * math.exp(-v), w / total) for v, w in zip(grid, weights) if w / total > 1e-12)


def _scales(seed_part: float, shared: float, k: int) -> list[tuple[float, float]]:
    """The pivot's error Z * sqrt(seed_part * k / U + shared) as a scale mixture of normals: (scale, weight)."""
    if seed_part == 0:
        return [(math.sqrt(shared), 1.0)]
    return [(math.sqrt(seed_part * w + shared), weight) for w, weight in _inverse_chi2(k)]


def _cdf(x: float, scales: Sequence[tuple[float, float]]) -> float:
    return math.fsum(w * math.erfc(-x / (s * math.sqrt(2))) for s, w in scales) / 2


def _half_width(level: float, scales: Sequence[tuple[float, float]]) -> float:
    """h with P(|error| <= h) = level: Newton's method from a lower bound, never overshooting (concave in h)."""
    h = lowest = NORMAL.inv_cdf((1 + level) / 2) * min(s for s, _ in scales)
    for _ in range(100):
        density = math.fsum(w * math.exp(-(h / s) ** 2 / 2) / s for s, w in scales) * math.sqrt(2 / math.pi)
        h, last = max(h - (2 * _cdf(h, scales) - 1 - level) / density, lowest), h
        if abs(h - last) <= 1e-12 * h:
            break
    return h


def row_interval(runs: Sequence[Any], metric: str = "f1", level: float = LEVEL) -> tuple[float, float]:
    """Interval of a row's score expected over seeds and test articles, from a complete seeds x folds grid. S >= 2
    seeds: the generalized interval (Weerahandi 1993) of estimate - Z sqrt(s^2/S k/U + c), U ~ chi-square(S - 1).
    One seed (one run too): ABC, folds as strata."""
    seeds, folds, table = _grid(runs)
    if len(seeds) == 1:
        return _abc([Counter(_cells(r)) for r in table.values()], runs[0].n_labels, metric, level)
    estimate, seed_part, shared = _seed_level(
        [(seeds.index(s), f, 1 / len(folds), r) for (s, f), r in table.items()], len(seeds), metric)
    if seed_part + shared == 0:
        return estimate, estimate
    half = _half_width(level, _scales(seed_part, shared, len(seeds) - 1))
    return estimate - half, estimate + half


def paired_test(runs_a: Sequence[Any], runs_b: Sequence[Any], metric: str = "f1", level: float = LEVEL) -> dict:
    """A minus B over the runs they share by (seed, fold), row_interval's estimator on paired differences: diff, ci,
    p (two-sided generalized p-value, Tsui & Weerahandi 1989), p_less (H1: A < B), seeds, folds, left_out."""
    b_by_key = {(r.seed, r.fold): r for r in runs_b}
    if len(b_by_key) < len(runs_b):
        raise ValueError("B has two runs with the same seed and fold")
    if not (pairs := [(r, b_by_key[r.seed, r.fold]) for r in runs_a if (r.seed, r.fold) in b_by_key]):
        raise ValueError("A and B share no (seed, fold) run")
    seeds, folds, _ = _grid([a for a, _ in pairs])
    for a, b in pairs:
        if (tuple(a.gold), a.n_labels) != (tuple(b.gold), b.n_labels):
            raise ValueError(f"seed {a.seed}, fold {a.fold!r}: A and B were tested on different gold labels")
    terms = [(seeds.index(a.seed), a.fold, sign / len(folds), run) for a, b in pairs for sign, run in ((1, a), (-1, b))]
    diff, seed_part, shared = _seed_level(terms, len(seeds), metric)
    if seed_part + shared == 0:  # no variation: no evidence but diff itself
        p_less, p, half = (1.0 if diff >= 0 else 0.0), (1.0 if diff == 0 else 0.0), 0.0
    else:
        scales = _scales(seed_part, shared, len(seeds) - 1)
        p_less, p, half = _cdf(diff, scales), min(1.0, 2 * _cdf(-abs(diff), scales)), _half_width(level, scales)
    return {"diff": diff, "ci": (diff - half, diff + half), "p": p, "p_less": p_less, "seeds": len(seeds),
            "folds": len(folds), "left_out": len(runs_a) + len(runs_b) - 2 * len(pairs)}


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) adjusted p-values: rejecting those <= alpha controls the family-wise error at alpha."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def table_marks(rows: Sequence[Sequence[Any]], metric: str = "f1", alpha: float = ALPHA) -> dict:
    """Rows (lists of runs) on one test set against the best mean val_f1, one-sided (H1: worse), Holm-adjusted: per
    row diff, p_worse, p_holm, mark (True: reference or not shown worse; None: not compared) and note."""
    reference = max(range(len(rows)), key=lambda i: (statistics.fmean(r.val_f1 for r in rows[i]), -i))
    results: list[dict] = []
    for i, runs in enumerate(rows):
        entry = {"diff": 0.0, "p_worse": None, "p_holm": None, "mark": True if i == reference else None, "note": ""}
        if i != reference:
            try:
                test = paired_test(runs, rows[reference], metric)
                entry.update(diff=test["diff"], p_worse=test["p_less"])
            except ValueError as e:
                entry.update(diff=None, note=str(e))
        results.append(entry)
    compared = [e for e in results if e["p_worse"] is not None]
    for entry, adjusted in zip(compared, holm_adjusted([e["p_worse"] for e in compared])):
        entry["p_holm"], entry["mark"] = adjusted, adjusted > alpha
    return {"reference": reference, "rows": results}


def best_lr(runs_by_lr: Mapping[float, Sequence[Any]]) -> tuple[float, list[Any], str]:
    """(lr, its runs, note): the highest mean val_f1 over the (seed, fold) runs all lrs have (ties: the smaller lr);
    note names the runs left out."""
    keys = {lr: {(r.seed, r.fold) for r in runs} for lr, runs in runs_by_lr.items()}
    if not (common := set.intersection(*keys.values())):
        raise ValueError("its lrs share no (seed, fold) run, so their validation scores cannot be compared: "
                         + "; ".join(f"lr {lr:g} has {sorted(k, key=repr)}" for lr, k in sorted(keys.items())))
    mean_val = {lr: statistics.fmean(r.val_f1 for r in runs if (r.seed, r.fold) in common)
                for lr, runs in runs_by_lr.items()}
    lr = max(sorted(runs_by_lr), key=mean_val.__getitem__)
    left_out = [f"lr {x:g} {', '.join(map(repr, sorted(keys[x] - common, key=repr)))}" for x in sorted(keys)
                if keys[x] - common]
    note = left_out and f"lrs compared on the {len(common)} (seed, fold) runs they all have; left out: " + "; ".join(
        left_out)
    return lr, list(runs_by_lr[lr]), note or ""


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact McNemar test of one run against one run (accuracy), in integers: no underflow."""
    n = only_a + only_b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n)


# -------------------- compare


def is_run_dir(path: Path) -> bool:
    """A bertcls.py run directory, not a model directory."""
    return path.is_dir() and any((path / n).is_file() for n in ("log.csv", "val-metrics.json", "test-metrics.json"))


def side_runs(text: str, args: argparse.Namespace, runs: Callable[[], Sequence[Any]]) -> list[Any]:
    """A's (or B's) finished runs: a run directory, or one experiment's runs at its best lr."""
    import sweep  # here, not at the top: sweep.py imports this module's statistics
    target, *own_flags = [text] if Path(text).exists() else shlex.split(text) or [""]
    if not target or target.startswith("-"):
        raise UserError(f"{text!r}: A and B come first, each a run directory or a model name")
    if is_run_dir(Path(target)):
        if not (Path(target) / "test-metrics.json").is_file():
            raise UserError(f"{target} is not a finished run (no test-metrics.json): pass a finished run")
        try:
            return [sweep.load_run(Path(target), sweep.resolve([])[0])]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{target} cannot be read: {e}") from None
    flags = [*args.bertcls_flags, *own_flags]
    values = {"model_name": [target], "lr": args.lrs, "seed": args.seeds, "dataset_dir": args.dataset_dirs}
    if not (groups := sweep.experiments(sweep.select(runs(), flags, values))):
        raise UserError(f"no finished runs of {target} under {args.output_dir}" + (f" with {' '.join(flags)}" if flags
                        else "") + ": pass a run directory, or the --output_dir, model name and flags of its runs")
    if len(groups) > 1:
        column, run = sweep.distinguishing(groups)[0], groups[0][0]
        value = {dtype_name(t): flag for flag, t in DTYPES.items()}.get(run.key.get(column), run.key.get(column))
        data = Path(run.key["dataset_dir"])
        hint = (f"--dataset_dirs {data.parent / 'fold-*' if run.fold is not None else data}" if column == "dataset"
                else f'"{target} --{column} {value}"' if column in sweep.resolve([])[0]
                else "pass run directories")  # e.g. world_size: no flag selects it
        raise UserError(f"{target} has runs of {len(groups)} experiments under {args.output_dir} (they differ in "
                        f"{', '.join(sweep.distinguishing(groups))}): select one, e.g. {hint}")
    lr, chosen, note = sweep.best_lr_of(groups[0])
    log(f"compare.py: {text}: lr {lr:g}, {len(chosen)} runs ({len({r.seed for r in chosen})} seeds x "
        f"{len({r.fold for r in chosen})} folds)" + (f"; {note}" if note else ""))
    return chosen


def verdict(result: dict[str, Any]) -> str:
    def points(metric: str) -> str:
        low, high = result[f"{metric}_diff_ci95"]
        return (f"{100 * result[f'{metric}_diff']:+.2f} points (95% CI {100 * low:+.2f} to {100 * high:+.2f}, "
                f"p = {result[f'{metric}_p']:.3g})")

    a, b = result["a"], result["b"]
    if result["f1_p"] < ALPHA:
        better, worse = (a, b) if result["f1_diff"] > 0 else (b, a)
        conclusion = f"{better} is significantly better than {worse} in macro-F1 (5% level)"
    else:
        conclusion = "no significant macro-F1 difference at the 5% level (which does not show they are equal)"
    mcnemar = "" if result["mcnemar_p"] is None else f", exact McNemar p = {result['mcnemar_p']:.3g}"
    return (f"{a} minus {b} on {result['n_examples']} test examples, {result['pairs']} run pair(s): macro-F1 "
            f"{points('f1')}, accuracy {points('accuracy')}{mcnemar}: {conclusion}")


def compare(args: argparse.Namespace) -> int:
    import sweep
    runs = functools.cache(lambda: sweep.scan(Path(args.output_dir), warn=True))  # for model names only
    a_runs, b_runs = side_runs(args.a, args, runs), side_runs(args.b, args, runs)
    if is_run_dir(Path(args.a)) and is_run_dir(Path(args.b)):  # two runs, whatever their seeds
        b_runs = [b_runs[0]._replace(key={**b_runs[0].key, "seed": a_runs[0].seed}, fold=a_runs[0].fold)]
    pairs = [(a, b) for a in a_runs for b in b_runs if (a.seed, a.fold) == (b.seed, b.fold)]
    if not pairs:
        raise UserError("no run of A has a run of B with the same seed on the same fold: run both with the same "
                        "--seeds and data")
    for a, b in pairs:
        if a.config.get("dataset_digest") != b.config.get("dataset_digest") or a.ids != b.ids:
            raise UserError(f"{a.run_dir} and {b.run_dir} were tested on different data (dataset digest or test "
                            "example ids differ): compare runs made on the same dataset")
    if len(pairs) < max(len(a_runs), len(b_runs)):
        log(f"compare.py: warning: {len(pairs)} pairs of {len(a_runs)} runs of A and {len(b_runs)} of B; runs "
            "without a partner (same seed and fold) are left out")
    a_runs, b_runs = [a for a, _ in pairs], [b for _, b in pairs]
    test_sets = {a.fold: len(a.gold) for a in a_runs}
    result = {"a": args.a, "b": args.b, "n_examples": sum(test_sets.values()), "pairs": len(pairs),
              "folds": len(test_sets), "seeds": sorted({a.seed for a in a_runs})}
    for metric in METRICS:
        try:
            test = paired_test(a_runs, b_runs, metric)
        except ValueError as e:
            raise UserError(f"A and B cannot be compared: {e}") from None
        result |= {f"{metric}_a": statistics.fmean(a.test[metric] for a in a_runs), f"{metric}_b": statistics.fmean(
            b.test[metric] for b in b_runs), f"{metric}_diff": test["diff"], f"{metric}_diff_ci95": list(test["ci"]),
            f"{metric}_p": test["p"]}
    right = [(x == g, y == g) for g, x, y in zip(a_runs[0].gold, a_runs[0].predicted, b_runs[0].predicted)]
    result["mcnemar_p"] = mcnemar_p(right.count((True, False)), right.count((False, True))) if len(pairs) == 1 else None
    print(verdict(result))
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("compare.py", lambda: compare(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
