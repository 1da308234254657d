"""Compare two models (or two settings of one model) on the same test examples: is the difference real?

    python compare.py outputs/org__a/2024-05-01/10-00-00.000000 outputs/org__b/2024-05-01/11-00-00.000000
    python compare.py cl-tohoku/bert-base-japanese-v3 xlm-roberta-base                 # their runs in outputs/
    python compare.py cl-tohoku/bert-base-japanese-v3 xlm-roberta-base --dataset_dirs datasets/livedoor/fold-*
    python compare.py "models/tiny-bert --max_seq_len 32" "models/tiny-bert --max_seq_len 128"

A and B (first, before any flag) are each a finished run directory, or a model name whose finished runs under
--output_dir are selected as `sweep.py --no_run --best` selects a row: by --lrs, --seeds, --dataset_dirs and
bertcls.py flags (after A and B: for both; inside A's or B's quotes: for that side only), grouped into
experiments by the same rule (one model, the same settings, the same data), and of its one experiment the lr
with the best mean val F1. Runs of A and B are paired by seed and fold (the same test examples).

For each pair the test predictions give A's and B's accuracy and macro-F1; the reported differences are A minus
B, averaged over the pairs. The paired bootstrap resamples the test examples (each fold on its own, the same
resample for every run on it), takes the mean difference on each resample, and gives a 95% percentile interval
and a two-sided p-value (stats.bootstrap_p). The exact McNemar test compares the examples only A and only B
classify correctly, per seed over all its folds; mcnemar_p is the largest over the seeds. Differences below the
5% level are called significant.

stdout: one verdict line for people, then (the last line) one JSON object for scripts: a, b, n_examples, pairs,
folds, seeds, accuracy_a/_b/_diff, accuracy_diff_ci95, accuracy_bootstrap_p, f1_a/_b/_diff, f1_diff_ci95,
bootstrap_p (of the macro-F1 difference), mcnemar_p, mcnemar (per seed), resamples. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import sweep
from common import UserError, log, positive_float, positive_int, run_cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # an abbreviation could swallow a bertcls.py flag
    p.add_argument("a", help="a finished run directory, or a model name (in quotes with flags for this side only)")
    p.add_argument("b", help="the same for B; differences are A minus B")
    p.add_argument("--output_dir", default="outputs",
                   help="where the runs of model names are looked for (default: %(default)s)")
    p.add_argument("--lrs", nargs="+", type=positive_float, metavar="LR",
                   help="only runs with these learning rates (default: all, the best by mean val F1 is used)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="only runs with these seeds (default: all)")
    p.add_argument("--dataset_dirs", nargs="+", metavar="DIR",
                   help="only runs on these datasets, e.g. datasets/livedoor/fold-* (default: all)")
    p.add_argument("--resamples", type=positive_int, default=sweep.DEFAULT_RESAMPLES,
                   help="bootstrap resamples of the test examples (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors (default: off)")
    args, args.bertcls_flags = p.parse_known_args(argv)
    return args


def side(text: str) -> tuple[str, list[str]]:
    """A or B as given: an existing path as it is; else a model name, then flags that select its runs."""
    if Path(text).exists():
        return text, []
    words = shlex.split(text)
    if not words or words[0].startswith("-"):
        raise UserError(f"{text!r}: A and B come first, each a run directory or a model name")
    return words[0], words[1:]


def is_run_dir(path: Path) -> bool:
    """A bertcls.py run directory (a local model directory has a config.json too, but none of these)."""
    return path.is_dir() and any((path / name).is_file() for name in ("log.csv", "val-metrics.json",
                                                                       "test-metrics.json"))


def selection_hint(experiments: Sequence[sweep.Experiment], model: str) -> str:
    """The flag that picks the first experiment: a setting in which they differ, or its datasets."""
    column = sweep.distinguishing(experiments)[0]
    if column != "dataset":
        return f"\"{model} --{column} {experiments[0].settings[column]}\""
    run = experiments[0].runs[0]
    directory = Path(run.args.get("dataset_dir", ""))
    return f"--dataset_dirs {directory.parent / 'fold-*' if run.fold else directory}"


def side_runs(text: str, args: argparse.Namespace, runs: Sequence[sweep.FinishedRun], defaults: dict[str, Any],
              log: Callable[[str], None]) -> list[sweep.FinishedRun]:
    """The finished runs that stand for A (or B)."""
    target, own_flags = side(text)
    if is_run_dir(Path(target)):
        if not (Path(target) / "test-metrics.json").is_file():
            raise UserError(f"{target} is not a finished run (no test-metrics.json): pass a finished run")
        try:
            return [sweep.load_run(Path(target))]
        except ValueError as e:
            raise UserError(f"{target} cannot be read: {e}") from None
    flags = [*args.bertcls_flags, *own_flags]
    passed = sweep.resolve_bertcls_args(flags)
    wanted = sweep.experiment({k: passed[k] for k in sweep.named_fields(flags, passed)})
    chosen = sweep.select_runs(runs, [target], args.lrs, args.seeds, args.dataset_dirs, wanted, defaults)
    experiments = sweep.group_experiments(chosen, defaults)
    if not experiments:
        with_flags = f" with {' '.join(flags)}" if flags else ""
        raise UserError(f"no finished runs of {target} under {args.output_dir}{with_flags}: pass a run directory, "
                        f"or the --output_dir, model name and flags the runs were made with")
    if len(experiments) > 1:
        raise UserError(f"{target} has runs of {len(experiments)} experiments under {args.output_dir} (they differ "
                        f"in {', '.join(sweep.distinguishing(experiments))}): select one, e.g. "
                        f"{selection_hint(experiments, target)}")
    lr, chosen = sweep.best_lr(experiments[0].runs)
    log(f"compare.py: {text}: lr {lr:g}, {len(chosen)} runs "
        f"({len({r.args['seed'] for r in chosen})} seeds x {len({r.data_key for r in chosen})} folds)")
    return chosen


def verdict(result: dict[str, Any]) -> str:
    """One line for people: both differences with their intervals and tests, and what they mean."""
    def points(metric: str) -> str:
        low, high = result[f"{metric}_diff_ci95"]
        return f"{100 * result[f'{metric}_diff']:+.2f} points (95% CI {100 * low:+.2f} to {100 * high:+.2f}"

    a, b = result["a"], result["b"]
    if result["bootstrap_p"] < sweep.ALPHA:
        better, worse = (a, b) if result["f1_diff"] > 0 else (b, a)
        conclusion = f"{better} is significantly better than {worse} in macro-F1 (5% level)"
    else:
        conclusion = "no significant macro-F1 difference at the 5% level"
    return (f"{a} minus {b} on {result['n_examples']} test examples, {result['pairs']} run pair(s): macro-F1 "
            f"{points('f1')}, paired bootstrap p = {result['bootstrap_p']:.3g}), accuracy {points('accuracy')}, "
            f"p = {result['accuracy_bootstrap_p']:.3g}, exact McNemar p = {result['mcnemar_p']:.3g}): {conclusion}")


def compare(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    output_dir = Path(args.output_dir)
    runs, problems = sweep.scan_runs(output_dir)
    for problem in problems:
        log(f"compare.py: warning: {problem}")
    defaults = sweep.resolve_bertcls_args([])
    a_runs = side_runs(args.a, args, runs, defaults, log)
    b_runs = side_runs(args.b, args, runs, defaults, log)
    # two run directories are compared whatever their seeds: the user picked them
    pairs = sweep.pair_runs(a_runs, b_runs, by_seed=not (is_run_dir(Path(args.a)) and is_run_dir(Path(args.b))))
    if not pairs:
        raise UserError("no run of A has a run of B with the same seed on the same test examples (the seeds, or "
                        "the datasets by digest or example ids, differ): run both with the same --seeds and data")
    if len(pairs) < max(len(a_runs), len(b_runs)):
        log(f"compare.py: warning: {len(pairs)} pairs of {len(a_runs)} runs of A and {len(b_runs)} of B; runs "
            f"without a partner (same seed and fold) are left out")
    replicates = sweep.bootstrap_runs([r for pair in pairs for r in pair], args.resamples)
    result = {"a": args.a, "b": args.b, **sweep.paired_comparison(pairs, replicates)}
    print(verdict(result))
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("compare.py", lambda: compare(args, log), args.debug)


if __name__ == "__main__":
    sys.exit(main())
