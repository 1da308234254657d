"""Run a grid of bertcls.py fine-tuning runs and print their results as CSV (or Markdown).

    python sweep.py > results/all.csv                      # 17 models x lr 1e-5 3e-5 5e-5 x seed 42
    python sweep.py --model_names cl-tohoku/bert-base-japanese-v3 xlm-roberta-base --lrs 2e-5 3e-5 \\
        --seeds 1 2 3 --epochs 3 --batch_size 32 > results/all.csv
    python sweep.py --devices 0,1,2,3 > results/all.csv    # four runs at once, one per GPU
    CUDA_VISIBLE_DEVICES=4,5 python sweep.py --devices 0,1  # GPUs 4 and 5: ids count within the visible ones
    python sweep.py --no_run --best > results/best.csv     # train nothing: best lr per model, mean +- std
    python sweep.py --no_run --markdown > results/best.md  # the same as a Markdown table
    python sweep.py --model_names xlm-roberta-base --lrs 3e-5 --seeds 1 2 \\
        --dataset_dirs datasets/livedoor/fold-* > results/all.csv   # x the folds written by prepare.py --folds 10
    python sweep.py --long_context --truncations head head_tail --seeds 1 2 3 --max_seq_len 8192 \\
        --max_batch_tokens 16384 > results/long.csv        # + the 8192-token Japanese encoders, x 2 truncations

On a cluster (see the README): a Slurm job array, one combination and one GPU per task, or one sweep per node
    python sweep.py --list                                 # the grid: index, model, lr, seed, state (--list tsv|json)
    python sweep.py --slurm --max_running 8 --sbatch="--partition gpu --time 4:00:00" > sweep.sbatch
    sbatch sweep.sbatch                                    # task I runs `sweep.py --task_index I` (same flags)
    srun --nodes 4 --ntasks-per-node 1 python sweep.py --devices 0,1,2,3 > /dev/null  # 4 nodes share the grid

Every flag sweep.py does not know is passed to each bertcls.py run, which runs in its own process (so
GPU memory is freed in between) with its output in <output_dir>/sweep-logs/. The table goes to stdout,
progress to stderr.

Resuming: a combination (model, lr, seed, dataset and the passed-through flags) that already has a finished run
(test-metrics.json) under --output_dir is not run again; an interrupted run with a checkpoint (see
bertcls.py --checkpoint_minutes) continues from it (bertcls.py --resume), in its own directory; any other
interrupted or failed run is run again.
Combinations are matched on config.json "args": every bertcls.py setting except those that do not change
results (IGNORED_FIELDS), numbers compared numerically; and on where it computed: its device type and the dtype
--dtype resolved to there (config.json "device" and "dtype"), so a CPU fp32 run never stands for the same
combination on a GPU in bf16. Of several finished runs of one combination the
newest counts, once. A combination being run holds <output_dir>/.locks/<combination>.lock (the pids of
the sweep and its child, and the host), so sweeps sharing a directory, on one host or many, never run it
twice. The lock is a lease: its sweep refreshes it every few seconds. A lock is stale and taken over (with a
line in the log) when its host is this one and its processes are all gone, or when it is another host's and
has not been refreshed for --lease_timeout seconds (a dead node, a killed sweep). A sweep waits for the
combinations other sweeps hold, so none is lost when one of them dies. BERTCLS_HOSTNAME overrides the host
name (for tests, and for containers that share a host name but not their process ids).

--dataset_dirs adds an axis over datasets (innermost): models x lrs x seeds x datasets.

--best: one row per experiment: one model with the same settings on the same data. Runs are in one experiment
when they agree in every bertcls.py setting but lr, seed and dataset_dir, and were trained on the same dataset,
known by content (config.json's dataset_digest), or on folds of one prepare.py --folds set (its fold.json);
settings that tell experiments apart become columns. Per experiment: the lr with the highest mean best-val-f1
over its seeds and folds (ties: the smaller lr), with the mean and the sample standard deviation (n - 1) over
those runs of each metric (empty for one run), the numbers of seeds and folds, and a 95% confidence interval
for test accuracy and macro-F1 from a bootstrap over the test examples and, given several seeds, over the seeds
(see mean_interval). The Markdown table marks the rows not significantly worse than the best one (paired
bootstrap, see paired_comparison and compare.py).

--long_context adds LONG_CONTEXT_MODELS (Japanese encoders of 8192 tokens) to the models; --truncations makes
bertcls.py's --truncation a grid axis. With --max_seq_len 8192 the 512-token models are capped at their own
limit (bertcls.py says so in each log) while the long-context ones read whole articles.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import errno
import hashlib
import io
import itertools
import json
import math
import os
import random
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import bertcls
import checkpoints
import data
import families
import stats
from common import (UserError, atomic_write_text, check_output_dir, dtype_name, first_line, log, positive_float,
                    positive_int, read_jsonl, resolve_dtype, run_cli, safe_name)

BERTCLS = Path(__file__).resolve().with_name("bertcls.py")
DEFAULT_MODELS = [
    "studio-ousia/luke-japanese-base-lite", "cl-tohoku/bert-base-japanese-v2", "cl-tohoku/bert-base-japanese-v3",
    "cl-tohoku/bert-base-japanese", "bert-base-multilingual-cased", "cl-tohoku/bert-base-japanese-char-v3",
    "cl-tohoku/bert-base-japanese-char-v2", "cl-tohoku/bert-base-japanese-whole-word-masking",
    "cl-tohoku/bert-base-japanese-char", "studio-ousia/luke-japanese-large-lite", "cl-tohoku/bert-large-japanese",
    "xlm-roberta-large", "studio-ousia/mluke-large-lite", "xlm-roberta-base", "studio-ousia/mluke-base-lite",
    "cl-tohoku/bert-large-japanese-v2", "cl-tohoku/bert-large-japanese-char-v2",
]
LONG_CONTEXT_MODELS = [
    "sbintuitions/modernbert-ja-30m", "sbintuitions/modernbert-ja-70m", "sbintuitions/modernbert-ja-130m",
    "sbintuitions/modernbert-ja-310m", "llm-jp/llm-jp-modernbert-base",
]
DEFAULT_LRS = [1e-5, 3e-5, 5e-5]
DEFAULT_SEEDS = [42]
# bertcls.py settings that change where or how verbosely a run works, not what it computes.
IGNORED_FIELDS = frozenset({"output_dir", "cache_dir", "debug", "log_interval", "device", "tokenize_workers",
                            "checkpoint_minutes", "resume"})
GRID_FLAGS = {"model_name": "--model_names", "lr": "--lrs", "seed": "--seeds", "truncation": "--truncations",
              "output_dir": "--output_dir"}
METRICS = ("loss", "accuracy", "precision", "recall", "f1")
# Columns after model_name come the settings that tell the table's experiments apart, if any.
RUN_COLUMNS = ["model_name", "lr", "seed", "fold", "best-val-epoch", "best-val-f1", *METRICS, "params",
               "train_seconds"]
CI_COLUMNS = ["f1-ci95-low", "f1-ci95-high", "accuracy-ci95-low", "accuracy-ci95-high"]
BEST_COLUMNS = ["model_name", "lr", "seeds", "folds", "best-val-f1", "best-val-f1-std",
                *[c for m in METRICS for c in (m, f"{m}-std")], *CI_COLUMNS, "f1-p-vs-best", "params",
                "train_seconds"]
# What may differ between the runs of one experiment (one row of --best): the lr is picked, seeds and folds are
# averaged; the dataset is compared by content instead of by path.
WITHIN_EXPERIMENT = frozenset({"model_name", "lr", "seed", "dataset_dir"})
DATASET_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "label2id.json")
DEFAULT_RESAMPLES = 2000
LEVEL, ALPHA = 0.95, 0.05  # of every interval; the significance level of every test
BOOTSTRAP_SEED = "bertcls-bootstrap-1"
POLL_S = 0.2


def device_list(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",")]
    if not all(devices):
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids such as 0,1,2,3, got {text!r}")
    return devices


def task_index(text: str) -> int | str:
    if text == "slurm":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a combination index (0, 1, ...) or slurm, got {text!r}")
    return int(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # an abbreviation could swallow a bertcls.py flag
    p.add_argument("--model_names", nargs="+", metavar="MODEL",
                   help="models to fine-tune (default: the 17 models of the tutorial's results table; "
                        "with --no_run: every model found)")
    p.add_argument("--lrs", nargs="+", type=positive_float, metavar="LR",
                   help="peak learning rates (default: 1e-5 3e-5 5e-5; with --no_run: every lr found)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="seeds (default: 42; with --no_run: every seed found)")
    p.add_argument("--long_context", action="store_true",
                   help="also the long-context Japanese encoders (LONG_CONTEXT_MODELS: sbintuitions/modernbert-ja-30m, "
                        "-70m, -130m, -310m, llm-jp/llm-jp-modernbert-base) (default: off)")
    p.add_argument("--truncations", nargs="+", choices=data.TRUNCATIONS, metavar="TRUNCATION",
                   help="bertcls.py --truncation values, head and/or head_tail (default: head; with --no_run: every "
                        "one found)")
    p.add_argument("--dataset_dirs", nargs="+", metavar="DIR",
                   help="datasets to train each combination on, e.g. datasets/livedoor/fold-* for the folds of "
                        "prepare.py --folds (default: bertcls.py's --dataset_dir; with --no_run: every dataset found)")
    p.add_argument("--devices", type=device_list, default=None,
                   help="comma-separated GPU ids, e.g. 0,1,2,3: one run per listed GPU at once, each with its "
                        "CUDA_VISIBLE_DEVICES; under an inherited CUDA_VISIBLE_DEVICES an id is a position in it "
                        "(default: one run at a time, CUDA_VISIBLE_DEVICES unchanged)")
    p.add_argument("--output_dir", default="outputs",
                   help="where the runs are written and looked for; logs go to <output_dir>/sweep-logs/ "
                        "(default: %(default)s)")
    p.add_argument("--no_run", action="store_true",
                   help="train nothing, only aggregate the finished runs in --output_dir; passed-through flags "
                        "then select the runs that were made with them (default: off)")
    p.add_argument("--best", action="store_true",
                   help="one row per experiment (model, settings, data): its best lr, mean and std over seeds and "
                        "folds, 95%% intervals (default: one row per run)")
    p.add_argument("--markdown", action="store_true", help="print the --best table as Markdown (default: off)")
    p.add_argument("--list", nargs="?", const="table", choices=("table", "tsv", "json"), metavar="FORMAT",
                   help="train nothing: print the grid in its fixed order, one combination per line (index, grid "
                        "values, state: finished / running / to do, run_dir, holder), as a table for people or "
                        "as tsv or json for scripts (FORMAT: table, tsv or json; default: table)")
    p.add_argument("--task_index", type=task_index, metavar="I",
                   help="run only combination I of the grid (numbered from 0 as --list shows), or, with "
                        "`--task_index slurm`, the one SLURM_ARRAY_TASK_ID names; a finished one exits 0 at once "
                        "(default: the whole grid)")
    p.add_argument("--slurm", action="store_true",
                   help="train nothing: print an sbatch script that runs the grid as a Slurm job array, one "
                        "combination and one GPU per array task, with the same flags (default: off)")
    p.add_argument("--max_running", type=positive_int, metavar="P",
                   help="with --slurm: at most P array tasks at once (--array=0-(N-1)%%P; default: no limit)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTIONS",
                   help='with --slurm: sbatch options for the script, e.g. --sbatch="--partition gpu --time 4:00:00" '
                        "(repeatable; they come last, so they override the script's own)")
    p.add_argument("--lease_timeout", type=positive_float, default=LEASE_TIMEOUT_S, metavar="SECONDS",
                   help="a lock held by a sweep on another host that has not been refreshed for this long is stale "
                        "(that host or sweep is taken as dead) and its combination is taken over; sweeps refresh "
                        "their locks every min(10, SECONDS / 5) s (default: %(default)g)")
    p.add_argument("--resamples", type=positive_int, default=DEFAULT_RESAMPLES,
                   help="bootstrap resamples of the test examples for --best's intervals and tests "
                        "(default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors (default: off)")
    args, args.bertcls_flags = p.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    modes = [flag for flag, on in (("--no_run", args.no_run), ("--list", args.list is not None),
                                   ("--slurm", args.slurm), ("--task_index", args.task_index is not None)) if on]
    if len(modes) > 1:
        p.error(f"{modes[0]} and {modes[1]} cannot be used together")
    if (args.sbatch or args.max_running) and not args.slurm:
        p.error("--sbatch and --max_running go with --slurm")
    if args.slurm and args.devices:
        p.error("--slurm gives each array task one GPU of its own (CUDA_VISIBLE_DEVICES set by Slurm): drop --devices")
    named = named_fields(args.bertcls_flags, bertcls_fields())
    for field in sorted(named & GRID_FLAGS.keys()):
        p.error(f"--{field} is set by the sweep: use {GRID_FLAGS[field]} (spelled in full)")
    if args.dataset_dirs and "dataset_dir" in named:
        p.error("give the datasets either as --dataset_dir (one) or as --dataset_dirs (several), not both")
    if "resume" in named:
        p.error("--resume is for one run: the sweep resumes interrupted runs that have a checkpoint by itself")
    return args


# ------------------------------------------------------------------------------- combinations


def bertcls_fields() -> list[str]:
    return list(vars(bertcls.parse_args([])))


def named_fields(flags: Sequence[str], fields: Iterable[str]) -> set[str]:
    """The bertcls.py settings that flags name, abbreviations (which argparse accepts) resolved."""
    fields, named = list(fields), set()
    for token in flags:
        if not token.startswith("--") or token == "--":
            continue
        name = token[2:].split("=", 1)[0]
        candidates = [name] if name in fields else [f for f in fields if f.startswith(name)]
        if len(candidates) == 1:
            named.add(candidates[0])
    return named


def resolve_bertcls_args(flags: Sequence[str]) -> dict[str, Any]:
    """All of bertcls.py's settings for these flags, defaults filled in, as its config.json records them."""
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            return vars(bertcls.parse_args(list(flags)))
    except SystemExit:
        reason = messages.getvalue().strip().splitlines()[-1:] or ["invalid flags"]
        raise UserError(f"flags for bertcls.py: {reason[0].split('error: ', 1)[-1]}") from None


def normalize(field: str, value: Any) -> Any:
    if field in ("model_name", "dataset_dir") and isinstance(value, str) and value:
        return os.path.normpath(value)
    return value


def same_value(a: Any, b: Any) -> bool:
    """Equality, numbers compared numerically (3e-5 == 0.00003, 3 == 3.0), switches strictly."""
    if isinstance(a, bool) or isinstance(b, bool):  # a switch is not the number 1
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def experiment(resolved: dict[str, Any]) -> dict[str, Any]:
    """The settings that define what a run computes."""
    return {k: normalize(k, v) for k, v in resolved.items() if k not in IGNORED_FIELDS}


def computed_on(resolved: dict[str, Any]) -> dict[str, str]:
    """Where a run with these settings computes, as its config.json records it: the device type (--device, else
    cuda where this machine has CUDA, as bertcls.py chooses) and the dtype its --dtype resolves to there."""
    import torch
    try:
        device = torch.device(resolved["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"unknown --device {resolved['device']!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here: use --device cpu")
    return {"device": device.type, "dtype": dtype_name(resolve_dtype(resolved["dtype"], device))}


def recorded_on(config: dict) -> dict[str, str]:
    """computed_on() of a finished run, from its config.json ("cuda:1" is device type cuda)."""
    return {"device": str(config.get("device", "")).split(":")[0], "dtype": str(config.get("dtype", ""))}


def matches(run_args: dict[str, Any], wanted: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Whether a run was made with the wanted settings; one older than a setting ran with its default."""
    return all(same_value(normalize(k, run_args.get(k, defaults.get(k))), v) for k, v in wanted.items())


def flag_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class Combination:
    setting: dict[str, Any]  # its value on each axis of the grid (a bertcls.py setting), in axis order
    flags: tuple[str, ...]  # the full bertcls.py command line
    wanted: dict[str, Any]  # experiment() of its resolved args
    computed: dict[str, str]  # computed_on() of its resolved args

    @property
    def model_name(self) -> str:
        return self.setting["model_name"]

    @property
    def stem(self) -> str:
        """File name for its lock and log: readable, and unique per experiment thanks to the hash."""
        digest = hashlib.sha1(json.dumps(self.wanted, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{safe_name(self.model_name)[-100:]}__lr{self.setting['lr']:g}__seed{self.setting['seed']}__{digest}"

    def describe(self) -> str:
        return " ".join([self.model_name, *(f"{axis} {value:g}" if isinstance(value, float) else f"{axis} {value}"
                                            for axis, value in self.setting.items() if axis != "model_name")])

    def axes(self) -> dict[str, Any]:
        """Its grid values, as --list shows them."""
        return dict(self.setting)


def grid_axes(args: argparse.Namespace) -> list[tuple[str, Sequence[Any]]]:
    """The axes of the grid, outermost first: a bertcls.py setting and the values it takes."""
    models = (args.model_names or DEFAULT_MODELS) + (LONG_CONTEXT_MODELS if args.long_context else [])
    axes = [("model_name", models)]
    if args.truncations:
        axes.append(("truncation", args.truncations))
    axes += [("lr", args.lrs or DEFAULT_LRS), ("seed", args.seeds or DEFAULT_SEEDS)]
    if args.dataset_dirs:
        axes.append(("dataset_dir", args.dataset_dirs))
    return axes


def combinations(axes: Sequence[tuple[str, Sequence[Any]]], passed: Sequence[str],
                 output_dir: Path) -> list[Combination]:
    """Every combination of the axes' values, in order (the last axis varies fastest)."""
    combos, seen = [], []
    for values in itertools.product(*(values for _, values in axes)):
        setting = {axis: value for (axis, _), value in zip(axes, values)}
        flags = (*passed, *(t for axis, value in setting.items() for t in (f"--{axis}", flag_value(value))),
                 "--output_dir", str(output_dir))
        resolved = resolve_bertcls_args(flags)
        wanted = experiment(resolved)
        if not any(matches(w, wanted, {}) for w in seen):  # a model or lr listed twice runs once
            seen.append(wanted)
            combos.append(Combination(setting, flags, wanted, computed_on(resolved)))
    return combos


def grid(args: argparse.Namespace, output_dir: Path) -> list[Combination]:
    """The combinations of this sweep, in the order --list numbers them and --task_index picks them."""
    return combinations(grid_axes(args), args.bertcls_flags, output_dir)


def check_dataset_dirs(dataset_dirs: Sequence[str]) -> None:
    """Every dataset of --dataset_dirs is complete before anything runs."""
    for directory in map(Path, dataset_dirs):
        if not directory.is_dir():
            raise UserError(f"--dataset_dirs: {directory} is not a directory: write it with prepare.py "
                            f"(for folds: python prepare.py --folds K --output_dir {directory.parent})")
        missing = [name for name in DATASET_FILES if not (directory / name).is_file()]
        if missing:
            raise UserError(f"--dataset_dirs: {directory} is incomplete (no {', '.join(missing)}): "
                            f"write it again with prepare.py")


# ----------------------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    args: dict[str, Any]
    params: int
    best_epoch: int
    val_f1: float
    train_seconds: float
    test: dict[str, float]
    dataset_digest: str | None = None  # of its dataset's splits and label2id.json (config.json)
    fold: dict | None = None  # {"fold", "folds", "set"} when trained on a fold of prepare.py --folds
    computed: dict[str, str] = dataclasses.field(default_factory=dict)  # recorded_on() its config.json
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # what is read on demand

    @property
    def age_key(self) -> tuple[str, str]:
        """<date>/<time> of its directory: sorts oldest first."""
        return self.run_dir.parent.name, self.run_dir.name

    @property
    def data_key(self) -> str:
        """Its train/val/test data: the same key means the same examples."""
        return self.dataset_digest or f"path {normalize('dataset_dir', self.args.get('dataset_dir'))}"

    @property
    def fold_index(self) -> int | None:
        return None if self.fold is None else self.fold["fold"]

    def row(self) -> dict[str, Any]:
        return {"model_name": self.args["model_name"], "lr": self.args["lr"], "seed": self.args["seed"],
                "fold": self.fold_index, "best-val-epoch": self.best_epoch, "best-val-f1": self.val_f1, **self.test,
                "params": self.params, "train_seconds": self.train_seconds}


def read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name} cannot be read ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return obj


def number(obj: dict, key: str, where: str, kind: type | tuple[type, ...] = (int, float)) -> Any:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ValueError(f"{where}: {key!r} is missing or not a finite number")
    return value


def load_run(run_dir: Path) -> FinishedRun:
    """A finished run's records; ValueError says what is wrong with a malformed one."""
    config = read_json_object(run_dir / "config.json")
    val = read_json_object(run_dir / "val-metrics.json")
    test = read_json_object(run_dir / "test-metrics.json")
    args = config.get("args")
    if not isinstance(args, dict) or not isinstance(args.get("model_name"), str):
        raise ValueError("config.json has no 'args' with a model_name")
    number(args, "lr", "config.json args")
    number(args, "seed", "config.json args", int)
    digest, fold = config.get("dataset_digest"), config.get("fold")
    if not (digest is None or isinstance(digest, str)) or not (fold is None or isinstance(fold, dict)):
        raise ValueError("config.json: 'dataset_digest' or 'fold' is malformed")
    if fold is not None:
        number(fold, "fold", "config.json fold", int)
        if not isinstance(fold.get("set"), str):
            raise ValueError("config.json: 'fold' has no 'set'")
    return FinishedRun(run_dir, args, number(config, "params", "config.json", int),
                       number(val, "best_epoch", "val-metrics.json", int), number(val, "f1", "val-metrics.json"),
                       number(val, "train_seconds", "val-metrics.json"),
                       {m: number(test, m, "test-metrics.json") for m in METRICS}, digest, fold,
                       recorded_on(config))


def scan_runs(directory: Path) -> tuple[list[FinishedRun], list[str]]:
    """Finished runs under directory, and a warning for each malformed one (which does not count)."""
    runs, problems = [], []
    if directory.is_dir():
        for marker in sorted(directory.rglob("test-metrics.json")):
            try:
                runs.append(load_run(marker.parent))
            except ValueError as e:
                problems.append(f"skipped {marker.parent}: {e}")
    return runs, problems


def resumable_run(directory: Path, combo: Combination, defaults: dict[str, Any]) -> Path | None:
    """The newest unfinished run under directory made with the combination's settings, on its device type and
    dtype, that has a checkpoint."""
    found = []
    for config_path in directory.glob("*/*/config.json") if directory.is_dir() else []:
        run_dir = config_path.parent
        if (run_dir / "test-metrics.json").exists():
            continue
        try:
            config = read_json_object(config_path)
        except ValueError:
            continue
        args = config.get("args")
        if (isinstance(args, dict) and matches(args, combo.wanted, defaults) and recorded_on(config) == combo.computed
                and checkpoints.usable_checkpoints(run_dir, checkpoints.run_identity(config))[0]):
            found.append(run_dir)
    return max(found, key=lambda d: (d.parent.name, d.name)) if found else None


def newest_match(runs: Iterable[FinishedRun], combo: Combination, defaults: dict[str, Any]) -> FinishedRun | None:
    """The newest run made with the combination's settings on its device type and dtype."""
    found = [r for r in runs if matches(r.args, combo.wanted, defaults) and r.computed == combo.computed]
    return max(found, key=lambda r: r.age_key) if found else None


def select_runs(runs: Sequence[FinishedRun], models: Sequence[str] | None, lrs: Sequence[float] | None,
                seeds: Sequence[int] | None, dataset_dirs: Sequence[str] | None, wanted: dict[str, Any],
                defaults: dict[str, Any], truncations: Sequence[str] | None = None
                ) -> list[FinishedRun]:
    """--no_run: among the runs made with the wanted settings, the newest of each experiment, lr, seed and dataset."""
    models = None if models is None else {normalize("model_name", m) for m in models}
    dataset_dirs = None if dataset_dirs is None else {normalize("dataset_dir", d) for d in dataset_dirs}
    newest: dict[tuple, FinishedRun] = {}
    for run in runs:
        model, lr, seed = normalize("model_name", run.args["model_name"]), run.args["lr"], run.args["seed"]
        dataset_dir = normalize("dataset_dir", run.args.get("dataset_dir", defaults.get("dataset_dir")))
        if ((models is None or model in models) and (lrs is None or any(same_value(lr, x) for x in lrs))
                and (seeds is None or seed in seeds) and (dataset_dirs is None or dataset_dir in dataset_dirs)
                and (truncations is None or run.args.get("truncation", defaults.get("truncation")) in truncations)
                and matches(run.args, wanted, defaults)):
            key = (experiment_key(run, defaults), float(lr), seed, run.data_key)
            if key not in newest or run.age_key > newest[key].age_key:
                newest[key] = run
    return list(newest.values())


# ---------------------------------------------------------------------------------- experiments


def experiment_settings(run: FinishedRun, defaults: dict[str, Any]) -> dict[str, Any]:
    """The settings that make a run's experiment, beyond its model and data (a setting newer than the run: its
    default), with the device type and the dtype it computed in (a CPU fp32 run is not a GPU bf16 one)."""
    fields = (run.args.keys() | defaults.keys()) - IGNORED_FIELDS - WITHIN_EXPERIMENT
    settings = {k: normalize(k, run.args.get(k, defaults.get(k))) for k in sorted(fields)}
    if run.computed.get("dtype"):  # runs made before config.json recorded them: as their --dtype said
        settings["device"], settings["dtype"] = run.computed["device"], run.computed["dtype"]
    return settings


def dataset_key(run: FinishedRun) -> str:
    """The data of a run's experiment: the set of folds it is one of, or its own dataset."""
    return f"folds {run.fold['set']}" if run.fold is not None else run.data_key


def experiment_key(run: FinishedRun, defaults: dict[str, Any]) -> str:
    return json.dumps([normalize("model_name", run.args["model_name"]), dataset_key(run),
                       experiment_settings(run, defaults)], sort_keys=True, default=str)


@dataclasses.dataclass
class Experiment:
    """The runs of one model with the same settings on the same data: one row of --best."""
    model_name: str
    settings: dict[str, Any]
    dataset: str  # dataset_key
    runs: list[FinishedRun]

    @property
    def dataset_label(self) -> str:
        """For people: where the newest run found its data (for folds: their parent) and the start of the digest."""
        newest = max(self.runs, key=lambda r: r.age_key)
        path = normalize("dataset_dir", newest.args.get("dataset_dir"))
        path = str(Path(path).parent) if path and newest.fold else path
        digest = (newest.fold["set"] if newest.fold else newest.dataset_digest or "")[:8]
        return "@".join(part for part in (path, digest) if part)


def group_experiments(runs: Iterable[FinishedRun], defaults: dict[str, Any]) -> list[Experiment]:
    groups: dict[str, Experiment] = {}
    for run in runs:
        key = experiment_key(run, defaults)
        if key not in groups:
            groups[key] = Experiment(normalize("model_name", run.args["model_name"]),
                                     experiment_settings(run, defaults), dataset_key(run), [])
        groups[key].runs.append(run)
    return list(groups.values())


def distinguishing(experiments: Sequence[Experiment]) -> list[str]:
    """The settings (and "dataset") whose values differ between experiments: the columns that tell rows apart."""
    if not experiments:
        return []
    fields = sorted({k for e in experiments for k in e.settings})
    differ = [k for k in fields if len({json.dumps(e.settings.get(k), default=str) for e in experiments}) > 1]
    return (["dataset"] if len({e.dataset for e in experiments}) > 1 else []) + differ


def setting_cells(experiment: Experiment, columns: Sequence[str]) -> dict[str, Any]:
    return {c: experiment.dataset_label if c == "dataset" else experiment.settings.get(c) for c in columns}


def best_lr(runs: Sequence[FinishedRun]) -> tuple[float, list[FinishedRun]]:
    """The lr with the highest mean best-val-f1 over its seeds and folds (ties: the smaller lr), and its runs."""
    by_lr: dict[float, list[FinishedRun]] = {}
    for run in runs:
        by_lr.setdefault(float(run.args["lr"]), []).append(run)
    lr = max(sorted(by_lr), key=lambda x: statistics.fmean(r.val_f1 for r in by_lr[x]))
    return lr, by_lr[lr]


# ---------------------------------------------------------------------------------------- locks
#
# A combination being run holds the lock <output_dir>/.locks/<stem>.lock, a lease: {"pids": [sweep, child],
# "host": ...}, whose mtime its sweep refreshes every refresh_interval() seconds from a background thread. A
# lock is stale, and taken over, when it cannot be read, when it is this host's and all its processes are
# gone (at once), or when it is another host's and has not been refreshed for --lease_timeout seconds (its
# processes cannot be seen from here: no refresh is how a dead host or a killed sweep shows).

LEASE_TIMEOUT_S = 300.0
REFRESH_MAX_S = 10.0


def host_name() -> str:
    """This machine's name in locks; BERTCLS_HOSTNAME overrides it (tests, containers sharing a host name)."""
    return os.environ.get("BERTCLS_HOSTNAME") or socket.gethostname()


def refresh_interval(lease_timeout: float) -> float:
    return min(REFRESH_MAX_S, lease_timeout / 5)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child whose parent died too can linger as a zombie: it is not running anything
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def lock_record(*pids: int) -> str:
    return json.dumps({"pids": list(pids), "host": host_name()}) + "\n"


@dataclasses.dataclass(frozen=True)
class LockFile:
    """A lock file as read once: its text, its inode and its mtime (the time of its last refresh)."""
    text: str
    inode: int
    mtime_ns: int


def read_lock(path: Path) -> LockFile | None:
    """The lock at path, or None when there is none.

    Text and attributes come from one open file: on NFS, open() fetches fresh attributes (close-to-open
    consistency), so the mtime is not a cached one up to a minute old."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            data = f.read(65536)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise not_a_lock(path) from None
    except OSError as e:
        if e.errno == errno.ESTALE:  # NFS: another host renamed or removed it while we opened it
            return None
        raise
    return LockFile(data.decode("utf-8", errors="replace"), stat.st_ino, stat.st_mtime_ns)


def not_a_lock(path: Path) -> UserError:
    return UserError(f"{path} is a directory where sweep.py keeps a lock file (no sweep makes one): remove it")


def lock_owner(lock: LockFile) -> tuple[list[int], str]:
    """The pids and host a lock names; ValueError when it holds no valid record."""
    try:
        record = json.loads(lock.text)
        return [int(p) for p in record["pids"]], str(record["host"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"no valid lock record in it ({type(e).__name__}: {first_line(e)})") from None


class Verdict(NamedTuple):
    holder: str | None  # who holds the lock; None when it is stale
    why: str = ""  # why it is stale
    unreadable: bool = False


def judge_lock(lock: LockFile, now: float, lease_timeout: float) -> Verdict:
    try:
        pids, host = lock_owner(lock)
    except ValueError as e:
        return Verdict(None, str(e), unreadable=True)
    listed = ", ".join(map(str, pids))
    if host == host_name():
        alive = [p for p in pids if pid_alive(p)]
        return Verdict(f"pid {', '.join(map(str, alive))}") if alive else Verdict(None, f"pid {listed}: its "
                                                                                      "processes are gone")
    age = now - lock.mtime_ns / 1e9
    if age > lease_timeout:
        return Verdict(None, f"pid {listed} on {host}: not refreshed for {age:.0f} s (--lease_timeout "
                             f"{lease_timeout:g})")
    return Verdict(f"pid {listed} on {host}")


def lock_holder(path: Path, lease_timeout: float) -> str | None:
    """Who holds the lock at path now, or None when there is none or it is stale (on this host's clock)."""
    lock = read_lock(path)
    return None if lock is None else judge_lock(lock, time.time(), lease_timeout).holder


def lock_path(output_dir: Path, combo: Combination) -> Path:
    return output_dir / ".locks" / f"{combo.stem}.lock"


def mine(pids: list[int], host: str) -> bool:
    """Whether a lock naming pids on host is this process's (its sweep pid comes first)."""
    return host == host_name() and pids[:1] == [os.getpid()]


def release_lock(path: Path) -> None:
    """Remove the lock at path if it is still this process's (not one taken over after its lease lapsed)."""
    lock = read_lock(path)
    with contextlib.suppress(ValueError):
        if lock is not None and mine(*lock_owner(lock)):
            path.unlink(missing_ok=True)


def writable_dir(path: Path) -> Path:
    """mkdir -p path, as a UserError when it cannot be made (a read-only file system, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path} ({e.strerror}): --output_dir must be on a writable file system") \
            from None
    return path


def write_private(path: Path, text: str) -> Path:
    """A new file next to path, named for this process alone, holding text."""
    private = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(private, "x", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        with contextlib.suppress(OSError):  # made but not written (a full disk), if made at all
            private.unlink(missing_ok=True)
        raise UserError(f"cannot write in {path.parent} ({e.strerror}): --output_dir must be on a writable "
                        "file system") from None
    return private


def link_lock(private: Path, path: Path) -> bool:
    """Make the complete file private the lock at path, only if there is none (link(2) does not replace)."""
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        # NFS: when the reply to a link that worked is lost, the retried request fails; our link count tells
        return os.stat(private).st_nlink == 2
    except OSError as e:
        raise UserError(f"cannot create lock {path} ({e.strerror}): sweep.py takes locks with hard links; put "
                        "--output_dir on a file system that has them (local disks, NFS, Lustre, GPFS)") from None


def remove_stale(path: Path, judged: LockFile, private: Path, now: float, lease_timeout: float) -> bool:
    """Remove the stale lock judged, if this sweep is the one to; False when another sweep is taking it over
    or it is no longer the lock judged.

    Of several sweeps taking over one stale lock at once, only the one that creates the claim named after
    that lock's inode and mtime goes on (link(2) of its private file: exclusive, as for the lock itself), and
    it removes the lock only if it is still the one judged. So no sweep ever removes a live lock, such as the
    new one of a sweep that took over just before (which renaming the lock away first, then checking, would).
    A claim left by a sweep that died while taking over is removed after --lease_timeout."""
    claim = path.with_name(f".{path.name}.claim-{judged.inode}-{judged.mtime_ns}")
    if not link_lock(private, claim):
        with contextlib.suppress(FileNotFoundError):
            if now - claim.stat().st_mtime_ns / 1e9 > lease_timeout:
                claim.unlink()
        return False
    try:
        if read_lock(path) != judged:
            return False
        grave = path.with_name(f".{path.name}.{secrets.token_hex(6)}.stale")
        os.rename(path, grave)
        if read_lock(grave) == judged:
            grave.unlink()
            return True
        # its sweep refreshed it between our read and the rename: it lives after all, so it goes back
        with contextlib.suppress(FileExistsError):
            os.link(grave, path)
        grave.unlink()
        return False
    finally:
        claim.unlink(missing_ok=True)


def acquire_lock(path: Path, log: Callable[[str], None], lease_timeout: float = LEASE_TIMEOUT_S) -> str | None:
    """Take the lock at path; returns None on success, else who holds it.

    Atomic on local file systems and on NFS (any version) alike: the record is written to a private file
    which link(2) makes the lock, so a lock appears whole, and no sweep can read a half-written one and take
    it for garbage (as after an O_EXCL create and a write). Lease ages are measured on the clock that stamps
    files (on NFS the server's: the mtime of the private file just written), so hosts' clocks need not agree.
    """
    writable_dir(path.parent)
    private = write_private(path, lock_record(os.getpid()))
    try:
        now = private.stat().st_mtime_ns / 1e9
        for _ in range(3):
            if link_lock(private, path):
                return None
            lock = read_lock(path)
            if lock is None:
                continue  # released just now
            verdict = judge_lock(lock, now, lease_timeout)
            if verdict.holder is not None:
                return verdict.holder
            if remove_stale(path, lock, private, now, lease_timeout):
                log(f"sweep.py: {'warning: ' if verdict.unreadable else ''}taking over stale lock {path}: "
                    f"{verdict.why}")
        return "another sweep, which took it just now"
    finally:
        private.unlink(missing_ok=True)


def refresh_lock(path: Path) -> str | None:
    """Renew this process's lease on the lock at path (its mtime becomes now); returns who holds the lock
    instead when it is no longer this process (its lease lapsed and another sweep took it over)."""
    lock = read_lock(path)
    if lock is None:  # released, or a sweep taking over stale locks is checking it: it comes back if live
        return None
    try:
        pids, host = lock_owner(lock)
    except ValueError as e:
        return str(e)
    if not mine(pids, host):
        return f"pid {', '.join(map(str, pids))} on {host}"
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)  # no times given: on NFS the server stamps its own time
    return None


class LeaseKeeper:
    """Refreshes the locks of the running runs every `interval` seconds from a background thread.

    A thread rather than the poll loop: the loop can be kept busy for minutes (scanning a large output
    directory on a slow file system, waiting for children to stop), and a lease must not lapse while its run
    goes on. The thread ends with the process, which is exactly when its leases should start to age."""

    def __init__(self, locks: Callable[[], list[Path]], interval: float, log: Callable[[str], None]):
        self.locks, self.interval, self.log = locks, interval, log
        self.told: set[Path] = set()  # locks already warned about, once each
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="sweep-lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def loop(self) -> None:
        while not self.stopped.wait(self.interval):
            for path in self.locks():
                try:
                    holder = refresh_lock(path)
                    problem = holder and f"lost lock {path} to {holder}: its lease lapsed and another sweep " \
                                         "took it over, so this combination may run twice (the newest run counts)"
                except OSError as e:
                    problem = f"cannot refresh lock {path} ({e.strerror}); will try again"
                if problem and path not in self.told:
                    self.told.add(path)
                    self.log(f"sweep.py: warning: {problem}")


# ------------------------------------------------------------------------------------ preflight


def check_datasets(combos: Sequence[Combination], passed: dict[str, Any], lrs: Sequence[float],
                   log: Callable[[str], None]) -> None:
    """check_dataset for each dataset the combinations train on; a warning common to them is said once."""
    said: set[str] = set()
    for dataset_dir in dict.fromkeys(c.wanted["dataset_dir"] for c in combos):
        check_dataset(Path(dataset_dir), passed, lrs, lambda line: said.add(line) if line not in said else None)
    for line in sorted(said):
        log(line)


def check_dataset(dataset_dir: Path, passed: dict[str, Any], lrs: Sequence[float],
                  log: Callable[[str], None]) -> None:
    """What every run would find out alone, said once: a dataset no run can use is an error, a schedule that
    cannot reach the swept learning rates (e.g. --epochs 1 with the default 2 warmup epochs) a warning."""
    _, splits = data.load_dataset(dataset_dir, lambda line: log(f"sweep.py: {line}"))
    if passed.get("max_batch_tokens") is not None:  # batches per epoch depend on the token lengths: runs warn
        return
    n_batches = math.ceil(len(splits["train"].labels) / passed["batch_size"])  # one process per run
    steps_per_epoch = bertcls.optimizer_steps_per_epoch(n_batches, passed["grad_accum_steps"])
    settings = argparse.Namespace(**{**passed, "lr": lrs[0]})
    warning = bertcls.schedule_warning(steps_per_epoch * passed["epochs"],
                                       round(steps_per_epoch * passed["num_warmup_epochs"]), n_batches, settings)
    if warning is not None:
        log(f"sweep.py: every run: {warning}")


def unloadable_models(combos: Sequence[Combination], log: Callable[[str], None]) -> set[str]:
    """Models that cannot be had (a missing directory, an unreachable hub, an unknown name), each checked and
    reported once instead of failing once per lr and seed (an unreachable hub costs a run ~95 s)."""
    bad = set()
    for model in dict.fromkeys(c.model_name for c in combos):
        try:
            families.check_model_source(model)
        except UserError as e:
            n = sum(c.model_name == model for c in combos)
            log(f"sweep.py: FAILED {model}: {e}; its {n} run{'s' if n > 1 else ''} skipped")
            bad.add(model)
    return bad


# ------------------------------------------------------------------------------------- running


def visible_devices(devices: Sequence[str], inherited: str | None) -> list[str]:
    """--devices as CUDA_VISIBLE_DEVICES values for the children: under an inherited CUDA_VISIBLE_DEVICES (a job
    scheduler's share of a node), an id is a position in it, as CUDA numbers the GPUs a process sees."""
    if inherited is None:
        return list(devices)
    visible = [d.strip() for d in inherited.split(",") if d.strip()]
    for device in devices:
        if not (device.isdigit() and int(device) < len(visible)):
            raise UserError(f"--devices {device}: CUDA_VISIBLE_DEVICES={inherited} leaves {len(visible)} GPU(s) "
                            f"visible, numbered 0..{len(visible) - 1} here: pass those numbers")
    return [visible[int(device)] for device in devices]


def child_env(base: dict[str, str], device: str | None) -> dict[str, str]:
    return dict(base) if device is None else {**base, "CUDA_VISIBLE_DEVICES": device}


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


@dataclasses.dataclass
class Running:
    combo: Combination
    process: subprocess.Popen
    lock: Path
    log_path: Path
    device: str | None
    started: float


class Sweep:
    """The runs of one sweep: which are running, on which device, and how many failed."""

    def __init__(self, output_dir: Path, devices: Sequence[str] | None, defaults: dict[str, Any],
                 log: Callable[[str], None], lease_timeout: float = LEASE_TIMEOUT_S):
        self.output_dir, self.defaults, self.log = output_dir, defaults, log
        self.free_devices: list[str | None] = list(devices) if devices else [None]
        self.running: list[Running] = []
        self.failed = self.locked = self.done = 0
        self.lease_timeout = lease_timeout
        self.waiting: set[str] = set()  # stems of the combinations found held by another sweep

    def finished(self, combo: Combination) -> FinishedRun | None:
        runs, _ = scan_runs(self.output_dir / safe_name(combo.model_name))
        return newest_match(runs, combo, self.defaults)

    def start(self, combo: Combination, position: str) -> str | None:
        """Run combo unless it is finished; returns who holds it when another sweep is running it."""
        lock = lock_path(self.output_dir, combo)
        if combo.stem in self.waiting and not lock.exists():  # the sweep we waited for is done with it
            self.waiting.discard(combo.stem)
            self.locked += 1
            if (run := self.finished(combo)) is not None:
                self.log(f"{position} finished by another sweep: {combo.describe()} -> {run.run_dir}")
            else:
                self.log(f"sweep.py: warning: another sweep ended {combo.describe()} without a result (its log: "
                         f"{self.output_dir / 'sweep-logs' / f'{combo.stem}.log'}); run the sweep again to retry it")
            return None
        holder = acquire_lock(lock, self.log, self.lease_timeout)
        if holder is not None:
            if combo.stem not in self.waiting:
                self.waiting.add(combo.stem)
                self.log(f"{position} waiting for another sweep ({holder}) running {combo.describe()} "
                         f"(lock {lock})")
            return holder
        self.waiting.discard(combo.stem)
        try:
            # another sweep may have finished it since we looked
            if (run := self.finished(combo)) is not None:
                self.log(f"{position} already finished: {combo.describe()} -> {run.run_dir}")
                release_lock(lock)
                return None
            resumed = resumable_run(self.output_dir / safe_name(combo.model_name), combo, self.defaults)
            device = self.free_devices.pop(0)
            log_path = self.output_dir / "sweep-logs" / f"{combo.stem}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            flags = combo.flags if resumed is None else ("--resume", str(resumed))
            with open(log_path, "a" if resumed else "w", encoding="utf-8") as out:
                process = subprocess.Popen([sys.executable, str(BERTCLS), *flags], stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=child_env(dict(os.environ), device))
        except BaseException:
            release_lock(lock)
            raise
        atomic_write_text(lock, lock_record(os.getpid(), process.pid))
        self.running.append(Running(combo, process, lock, log_path, device, time.monotonic()))
        on = "" if device is None else f" on GPU {device}"
        resuming = "" if resumed is None else f" (resuming {resumed})"
        self.log(f"{position} running {combo.describe()}{on}{resuming}: log {log_path}")
        return None

    def reap(self) -> None:
        """Report and release every run that has ended."""
        for item in [r for r in self.running if r.process.poll() is not None]:
            self.running.remove(item)
            self.free_devices.append(item.device)
            rc, seconds = item.process.returncode, time.monotonic() - item.started
            run = self.finished(item.combo) if rc == 0 else None
            if run is not None:
                self.done += 1
                self.log(f"done {item.combo.describe()} in {seconds:.0f} s: test f1 {run.test['f1']:.4f} "
                         f"-> {run.run_dir}")
            else:
                self.failed += 1
                why = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}" if rc else "no test-metrics.json"
                detail = last_line(item.log_path)
                self.log(f"sweep.py: FAILED {item.combo.describe()} ({why}){': ' + detail if detail else ''}; "
                         f"log: {item.log_path}")
            release_lock(item.lock)

    def stop(self) -> None:
        """On Ctrl-C or SIGTERM: let the children stop as interrupted runs, then release their locks."""
        for item in self.running:
            if item.process.poll() is None:
                item.process.terminate()
        for item in self.running:
            try:
                item.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                item.process.kill()
                item.process.wait()
            release_lock(item.lock)
        self.running.clear()

    def run(self, combos: Sequence[Combination]) -> None:
        """Run combos; one another sweep holds is looked at again until it is finished or its lock is stale."""
        pending = list(enumerate(combos, 1))
        waiting: list[tuple[int, Combination]] = []
        interval = refresh_interval(self.lease_timeout)
        keeper = LeaseKeeper(lambda: [r.lock for r in list(self.running)], interval, self.log).start()
        look_again = time.monotonic() + interval
        try:
            while pending or self.running or waiting:
                while pending and self.free_devices:
                    i, combo = pending.pop(0)
                    if self.start(combo, f"[{i}/{len(combos)}]") is not None:
                        waiting.append((i, combo))
                if waiting and not pending and time.monotonic() >= look_again:
                    pending, waiting = waiting, []
                    look_again = time.monotonic() + interval
                time.sleep(POLL_S)
                self.reap()
        except BaseException:
            self.stop()
            raise
        finally:
            keeper.stop()


# --------------------------------------------------------------------------- statistics over runs


@dataclasses.dataclass(frozen=True)
class TestPredictions:
    """A run's test-predictions.jsonl, labels as indices into `labels` (label2id order)."""
    ids: tuple[str, ...]
    labels: tuple[str, ...]
    gold: tuple[int, ...]
    predicted: tuple[int, ...]

    @property
    def test_set(self) -> str:
        """What the predictions were made on: the same string means the same examples, labels and order."""
        return hashlib.sha256(json.dumps([self.ids, self.labels, self.gold]).encode()).hexdigest()

    def correct(self) -> list[bool]:
        return [g == p for g, p in zip(self.gold, self.predicted)]

    def scores(self) -> tuple[float, float]:
        """(accuracy, macro-F1), equal to test-metrics.json's."""
        return stats.scores(self.gold, self.predicted, len(self.labels))


def load_predictions(run: FinishedRun) -> TestPredictions:
    """A finished run's test predictions (read once per FinishedRun); a missing or damaged file is a UserError
    saying what to do."""
    if "predictions" in run.cache:
        return run.cache["predictions"]
    path = run.run_dir / "test-predictions.jsonl"
    redo = "move that run directory away and run it again (sweep.py reruns a missing run)"
    if not path.is_file():
        raise UserError(f"{run.run_dir} has no test-predictions.jsonl, which intervals and tests need: {redo}")
    rows = read_jsonl(path)
    if not rows or not isinstance(rows[0].get("probabilities"), dict):
        raise UserError(f"{path}: expected lines with id, gold, predicted and probabilities: {redo}")
    labels = tuple(rows[0]["probabilities"])
    index = {label: i for i, label in enumerate(labels)}
    try:
        gold = tuple(index[r["gold"]] for r in rows)
        predicted = tuple(index[r["predicted"]] for r in rows)
    except (KeyError, TypeError):
        raise UserError(f"{path}: a gold or predicted label is missing or not among the labels: {redo}") from None
    run.cache["predictions"] = TestPredictions(tuple(str(r.get("id")) for r in rows), labels, gold, predicted)
    return run.cache["predictions"]


@dataclasses.dataclass(frozen=True)
class Replicates:
    """A run's test accuracy and macro-F1 on each bootstrap resample of its test examples."""
    accuracy: list[float]
    f1: list[float]


def bootstrap_runs(runs: Iterable[FinishedRun], n_resamples: int) -> dict[Path, Replicates]:
    """Each run's scores on n_resamples resamples of its test examples.

    The resamples of a test set are drawn from a generator seeded by BOOTSTRAP_SEED and the test set itself, so
    every run on those examples (another seed, lr or model) is scored on the very same resamples: the same
    outputs always give the same intervals, and differences between runs are paired. Folds have different test
    sets, so each fold is resampled on its own (a stratified bootstrap over the pooled test examples).
    """
    by_test_set: dict[str, list[FinishedRun]] = {}
    for run in runs:
        by_test_set.setdefault(load_predictions(run).test_set, []).append(run)
    replicates = {}
    for test_set, members in by_test_set.items():
        first = load_predictions(members[0])
        scored = stats.resample_scores(first.gold, [load_predictions(r).predicted for r in members],
                                       len(first.labels), n_resamples, random.Random(f"{BOOTSTRAP_SEED} {test_set}"))
        replicates.update({r.run_dir: Replicates(*s) for r, s in zip(members, scored)})
    return replicates


def by_seed(items: Iterable[tuple[int, Any]]) -> list[list[Any]]:
    grouped: dict[int, list[Any]] = {}
    for seed, item in items:
        grouped.setdefault(seed, []).append(item)
    return [grouped[seed] for seed in sorted(grouped)]


def seed_rng() -> random.Random:
    """The generator that draws seeds in the second level of the bootstrap: the same every time."""
    return random.Random(f"{BOOTSTRAP_SEED} seeds")


def mean_interval(runs: Sequence[FinishedRun], replicates: dict[Path, Replicates], metric: str) -> tuple[float, float]:
    """95% interval of a row's mean metric over its runs, from a two-level bootstrap: each fold's test examples
    resampled (one resample for all seeds on it: their examples are the same) and, with several seeds, the
    seeds drawn with replacement (stats.seed_means). It covers the test sample and, given several seeds, the
    training seed; the ± std beside it is the plain spread over seeds and folds."""
    per_seed = by_seed((r.args["seed"], getattr(replicates[r.run_dir], metric)) for r in runs)
    return stats.percentile_interval(stats.seed_means(per_seed, seed_rng()), LEVEL)


def pair_runs(a: Sequence[FinishedRun], b: Sequence[FinishedRun],
              by_seed: bool = True) -> list[tuple[FinishedRun, FinishedRun]]:
    """Runs of A and B with the same seed on the same test examples (one pair per seed and fold); without
    by_seed, the one run of A with the one run of B. A pair tested on different data is a UserError."""
    test_sets = {r.run_dir: load_predictions(r).test_set for r in [*a, *b]}
    if not by_seed:
        pairs = [(a[0], b[0])]
    else:
        b_by_key = {(r.args["seed"], test_sets[r.run_dir]): r for r in b}
        pairs = [(r, b_by_key[k]) for r in a if (k := (r.args["seed"], test_sets[r.run_dir])) in b_by_key]
    for run_a, run_b in pairs:
        if test_sets[run_a.run_dir] != test_sets[run_b.run_dir] or (
                run_a.dataset_digest and run_b.dataset_digest and run_a.dataset_digest != run_b.dataset_digest):
            raise UserError(f"{run_a.run_dir} and {run_b.run_dir} were tested on different data (dataset digest or "
                            f"test example ids differ): compare runs made on the same dataset")
    return pairs


def paired_comparison(pairs: Sequence[tuple[FinishedRun, FinishedRun]],
                      replicates: dict[Path, Replicates]) -> dict[str, Any]:
    """A minus B over the pairs: differences of mean accuracy and macro-F1 with paired-bootstrap intervals and
    p-values, and the exact McNemar test for accuracy.

    Bootstrap, on two levels as for a row's interval: each fold's test examples are resampled (the same
    resample for every run on the fold) and, with several seeds, the seeds are drawn with replacement, a drawn
    seed bringing its pairs; each replicate is the mean over the drawn pairs of A's score minus B's. Its
    percentiles give the interval, stats.bootstrap_p the p-value. A difference that only one unlucky seed makes
    is therefore not called significant.
    McNemar needs each example once: per seed, the examples only A gets right and only B gets right are counted
    over its folds (disjoint test sets), and stats.mcnemar_p_same_way combines the seeds: small only if every
    seed points the same way (valid whatever the seeds' correlation).
    """
    test_sets = {load_predictions(a).test_set: len(load_predictions(a).ids) for a, _ in pairs}
    result: dict[str, Any] = {"n_examples": sum(test_sets.values()), "pairs": len(pairs), "folds": len(test_sets),
                              "seeds": sorted({a.args["seed"] for a, _ in pairs})}
    for metric in ("accuracy", "f1"):
        observed = [(a.test[metric], b.test[metric]) for a, b in pairs]  # test-metrics.json: the predictions' scores
        differences = stats.seed_means(by_seed(
            (a.args["seed"], [x - y for x, y in zip(getattr(replicates[a.run_dir], metric),
                                                    getattr(replicates[b.run_dir], metric))]) for a, b in pairs),
            seed_rng())
        result[f"{metric}_a"] = statistics.fmean(x for x, _ in observed)
        result[f"{metric}_b"] = statistics.fmean(y for _, y in observed)
        result[f"{metric}_diff"] = statistics.fmean(x - y for x, y in observed)
        result[f"{metric}_diff_ci95"] = list(stats.percentile_interval(differences, LEVEL))
        result[f"{metric}_bootstrap_p"] = stats.bootstrap_p(differences)
    result["bootstrap_p"] = result["f1_bootstrap_p"]
    tables: dict[int, list[int]] = {}
    for a, b in pairs:
        counts = tables.setdefault(a.args["seed"], [0, 0])
        for right_a, right_b in zip(load_predictions(a).correct(), load_predictions(b).correct()):
            counts[0] += right_a and not right_b
            counts[1] += right_b and not right_a
    result["mcnemar"] = [{"seed": seed, "only_a": only_a, "only_b": only_b, "p": stats.mcnemar_p(only_a, only_b)}
                         for seed, (only_a, only_b) in sorted(tables.items())]
    result["mcnemar_p"] = stats.mcnemar_p_same_way(list(tables.values()))
    result["resamples"] = len(replicates[pairs[0][0].run_dir].f1)
    return result


# ------------------------------------------------------------------------------------- tables


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); None for a single value, whose spread is unknown."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def run_rows(experiments: Sequence[Experiment], columns: Sequence[str]) -> list[dict[str, Any]]:
    rows = [{**r.row(), **setting_cells(e, columns)} for e in experiments for r in e.runs]
    rows.sort(key=lambda r: (r["model_name"], json.dumps([r[c] for c in columns], default=str), r["lr"], r["seed"],
                             -1 if r["fold"] is None else r["fold"]))
    rows.sort(key=lambda r: r["f1"], reverse=True)
    return rows


def best_rows(experiments: Sequence[Experiment], columns: Sequence[str], n_resamples: int,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Per experiment, its best lr with mean and std of each metric over seeds and folds, and 95% intervals;
    f1-p-vs-best: the paired-bootstrap p of the F1 difference to the best row on the same test examples."""
    chosen = [(e, *best_lr(e.runs)) for e in experiments]
    replicates = bootstrap_runs([r for _, _, runs in chosen for r in runs], n_resamples)
    rows = []
    for experiment, lr, runs in chosen:
        seeds, folds = {r.args["seed"] for r in runs}, {r.data_key for r in runs}
        if len(runs) != len(seeds) * len(folds):
            log(f"sweep.py: warning: {experiment.model_name} lr {lr:g}: {len(runs)} runs for {len(seeds)} seeds x "
                f"{len(folds)} folds; the means are over the runs there are")
        row = {"model_name": experiment.model_name, **setting_cells(experiment, columns), "lr": lr,
               "seeds": len(seeds), "folds": len(folds), "runs": runs}
        row["best-val-f1"], row["best-val-f1-std"] = mean_std([r.val_f1 for r in runs])
        for metric in METRICS:
            row[metric], row[f"{metric}-std"] = mean_std([r.test[metric] for r in runs])
        for metric in ("f1", "accuracy"):
            row[f"{metric}-ci95-low"], row[f"{metric}-ci95-high"] = mean_interval(runs, replicates, metric)
        row["params"] = max(runs, key=lambda r: r.age_key).params
        row["train_seconds"] = statistics.fmean(r.train_seconds for r in runs)
        row["dataset_key"] = experiment.dataset
        rows.append(row)
    rows.sort(key=lambda r: (r["model_name"], json.dumps([r[c] for c in columns], default=str)))
    rows.sort(key=lambda r: r["f1"], reverse=True)
    for row in rows:
        best = next(r for r in rows if r["dataset_key"] == row["dataset_key"])
        pairs = pair_runs(best["runs"], row["runs"]) if row is not best else []
        row["f1-p-vs-best"] = (1.0 if row is best else
                               paired_comparison(pairs, replicates)["bootstrap_p"] if pairs else None)
    return rows


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if row[k] is None else row[k] for k in columns} for row in rows)
    return out.getvalue()


def mean_pm_std(mean: float, std: float | None, scale: float, digits: int) -> str:
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def markdown_cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], n_resamples: int) -> str:
    lines = ["| model | " + "".join(f"{c} | " for c in columns) + "lr | seeds | folds | params (M) | val F1 (%) | "
             "accuracy (%) | accuracy 95% CI | precision (%) | recall (%) | F1 (%) | F1 95% CI | loss |",
             "|:--|" + ":--|" * len(columns) + "--:|" * 12]
    for r in rows:
        mark = " †" if r["f1-p-vs-best"] is not None and r["f1-p-vs-best"] >= ALPHA else ""
        cells = [markdown_cell(r["model_name"]), *(markdown_cell(r[c]) for c in columns), f"{r['lr']:g}",
                 str(r["seeds"]), str(r["folds"]), f"{r['params'] / 1e6:.1f}",
                 mean_pm_std(r["best-val-f1"], r["best-val-f1-std"], 100, 2),
                 mean_pm_std(r["accuracy"], r["accuracy-std"], 100, 2),
                 f"{100 * r['accuracy-ci95-low']:.2f}–{100 * r['accuracy-ci95-high']:.2f}",
                 *[mean_pm_std(r[m], r[f"{m}-std"], 100, 2) for m in ("precision", "recall")],
                 mean_pm_std(r["f1"], r["f1-std"], 100, 2) + mark,
                 f"{100 * r['f1-ci95-low']:.2f}–{100 * r['f1-ci95-high']:.2f}",
                 mean_pm_std(r["loss"], r["loss-std"], 1, 4)]
        lines.append("| " + " | ".join(cells) + " |")
    best = "the best macro-F1 of its dataset" if len({r["dataset_key"] for r in rows}) > 1 else "the best macro-F1"
    lines += ["", f"† {best} and the rows not significantly worse than it: paired bootstrap test of the macro-F1 "
              f"difference on the same test examples (runs paired by seed and fold, {n_resamples} resamples), "
              f"two-sided p ≥ {ALPHA}.", "",
              "95% CI: percentile bootstrap over the test examples (each fold resampled on its own, the same "
              "resample for every seed; with several seeds, the seeds resampled too). ±: sample standard deviation "
              "over seeds and folds."]
    if any(r["f1-p-vs-best"] is None for r in rows):
        lines[-3] += " Rows that share no seed and fold with the best one are not compared (no mark)."
    return "\n".join(lines) + "\n"


def render(runs: Sequence[FinishedRun], args: argparse.Namespace, defaults: dict[str, Any],
           log: Callable[[str], None]) -> str:
    experiments = group_experiments(runs, defaults)
    columns = distinguishing(experiments)
    log(f"sweep.py: {len(runs)} runs in {len(experiments)} experiments (model x settings x dataset)"
        + (f"; they differ in {', '.join(columns)}" if columns else ""))
    if args.markdown:
        return markdown_table(best_rows(experiments, columns, args.resamples, log), columns, args.resamples)
    if args.best:
        return csv_text(best_rows(experiments, columns, args.resamples, log), [*BEST_COLUMNS[:1], *columns,
                                                                                 *BEST_COLUMNS[1:]])
    return csv_text(run_rows(experiments, columns), [*RUN_COLUMNS[:1], *columns, *RUN_COLUMNS[1:]])


# --------------------------------------------------- clusters: job arrays (--list, --task_index, --slurm)

SLURM_FLAGS = {"--slurm": False, "--sbatch": True, "--max_running": True}  # sweep.py's flags for --slurm: takes a value
GRID_STATES = ("finished", "running", "to do")


def grid_rows(combos: Sequence[Combination], output_dir: Path, defaults: dict[str, Any],
              lease_timeout: float) -> list[dict[str, Any]]:
    """--list: per combination its index, grid values, state, finished run directory and lock holder."""
    runs, _ = scan_runs(output_dir)
    rows = []
    for index, combo in enumerate(combos):
        run = newest_match(runs, combo, defaults)
        holder = None if run else lock_holder(lock_path(output_dir, combo), lease_timeout)
        state = "finished" if run else "running" if holder else "to do"
        rows.append({"index": index, **combo.axes(), "state": state, "run_dir": str(run.run_dir) if run else None,
                     "holder": holder})
    return rows


def cell(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def grid_text(rows: Sequence[dict[str, Any]], form: str) -> str:
    """The --list rows as an aligned table, tab-separated values with a header line, or a JSON list."""
    if form == "json":
        return "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"  # one combination per line
    columns = list(rows[0]) if rows else []
    if form == "tsv":
        out = io.StringIO()
        writer = csv.writer(out, dialect="excel-tab", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([("" if r[c] is None else r[c]) for c in columns] for r in rows)
        return out.getvalue()
    table = [columns, *[[cell(r[c]) for c in columns] for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "".join("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() + "\n" for line in table)


def pick_task(task: int | str, size: int, environ: dict[str, str]) -> int:
    """The grid index --task_index names (`slurm`: SLURM_ARRAY_TASK_ID's)."""
    where = "--task_index"
    if task == "slurm":
        text, where = environ.get("SLURM_ARRAY_TASK_ID"), "SLURM_ARRAY_TASK_ID"
        if text is None:
            raise UserError("--task_index slurm: SLURM_ARRAY_TASK_ID is not set; run it as a task of an sbatch "
                            "--array job (see --slurm), or pass an index")
        if not text.strip().isdigit():
            raise UserError(f"SLURM_ARRAY_TASK_ID={text!r} is not a combination index")
        task = int(text)
    if task >= size:
        raise UserError(f"{where} {task} is out of range: the grid has {size} combinations (0-{size - 1}); "
                        "see them with --list")
    return task


def task_argv(argv: Sequence[str]) -> list[str]:
    """The command line an array task repeats: this one without --slurm and its options."""
    kept, tokens = [], iter(argv)
    for token in tokens:
        name, has_value = token.split("=", 1)[0], "=" in token
        if name in SLURM_FLAGS:
            if SLURM_FLAGS[name] and not has_value:
                next(tokens, None)
            continue
        kept.append(token)
    return kept


def slurm_script(argv: Sequence[str], size: int, output_dir: Path, max_running: int | None,
                 sbatch: Sequence[str], cwd: Path) -> str:
    """An sbatch script running the grid as a job array: task I runs combination I, on one GPU."""
    passed = task_argv(argv)
    for token in [*passed, *sbatch]:
        if "\n" in token or "\r" in token:
            raise UserError(f"--slurm: {token!r} has a line break, which cannot go into a batch script")
    try:
        options = [shlex.split(text) for text in sbatch]
    except ValueError as e:
        raise UserError(f"--sbatch: {e}") from None
    sweep_py = [sys.executable, str(Path(__file__).resolve())]
    logs = str(cwd / output_dir / "sweep-logs").replace("%", "%%") + "/slurm-%A_%a.log"  # %% is a literal %
    array = f"0-{size - 1}" + (f"%{max_running}" if max_running else "")
    lines = [
        "#!/bin/bash",
        f"# bertcls sweep as a Slurm job array: task I runs combination I of {size} (one GPU each). Written by",
        "# sweep.py --slurm; submit with `sbatch FILE`. Resubmitting is safe: a finished combination exits at once.",
        f"# The grid and its state: {shlex.join([*sweep_py, '--list', *passed])}",
        f"# After the array: {shlex.join([*sweep_py, '--no_run', '--best', *passed])}",
        "#SBATCH --job-name=bertcls-sweep",
        f"#SBATCH --array={array}",
        "#SBATCH --ntasks=1",
        "#SBATCH --gres=gpu:1",
        "#SBATCH " + shlex.quote(f"--chdir={cwd}"),
        "#SBATCH " + shlex.quote(f"--output={logs}"),
        *("#SBATCH " + shlex.join(option) for option in options if option),
        "",
        "exec " + shlex.join([*sweep_py, "--task_index", "slurm", *passed]),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- main


def show_grid(args: argparse.Namespace, combos: Sequence[Combination], output_dir: Path, defaults: dict[str, Any],
              log: Callable[[str], None]) -> int:
    """--list: the grid and its state; --slurm: an sbatch script running it as a job array."""
    if args.list:
        rows = grid_rows(combos, output_dir, defaults, args.lease_timeout)
        sys.stdout.write(grid_text(rows, args.list))
        log(f"sweep.py: {len(rows)} combinations: " + ", ".join(
            f"{sum(r['state'] == state for r in rows)} {state}" for state in GRID_STATES))
    else:
        script = slurm_script(args.argv, len(combos), output_dir, args.max_running, args.sbatch, Path.cwd())
        writable_dir(output_dir / "sweep-logs")  # Slurm does not create the directory of a task's log
        sys.stdout.write(script)
        log(f"sweep.py: sbatch script for {len(combos)} combinations (array 0-{len(combos) - 1}); task logs in "
            f"{output_dir / 'sweep-logs'}")
        if len(combos) > 1001:
            log("sweep.py: warning: Slurm's default MaxArraySize is 1001 (see `scontrol show config`): split the "
                "grid, e.g. by --model_names, if sbatch refuses the array")
    sys.stdout.flush()
    return 0


def sweep(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir)  # a file, or under one; writing is checked when there is something to write
    defaults = resolve_bertcls_args([])
    passed = resolve_bertcls_args(args.bertcls_flags)  # also rejects bad flags before anything runs
    failed = 0
    if args.list or args.slurm:
        return show_grid(args, grid(args, output_dir), output_dir, defaults, log)
    if args.no_run:
        if not output_dir.is_dir():
            raise UserError(f"--output_dir {output_dir} does not exist: nothing to aggregate "
                            "(run the sweep without --no_run first)")
        runs, problems = scan_runs(output_dir)
        wanted = experiment({k: passed[k] for k in named_fields(args.bertcls_flags, passed)})
        for problem in problems:
            log(f"sweep.py: warning: {problem}")
        models = args.model_names and args.model_names + (LONG_CONTEXT_MODELS if args.long_context else [])
        chosen = select_runs(runs, models, args.lrs, args.seeds, args.dataset_dirs, wanted, defaults,
                             args.truncations)
        log(f"sweep.py: {len(chosen)} finished runs selected of {len(runs)} in {output_dir}")
    else:
        devices = args.devices and visible_devices(args.devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if args.dataset_dirs:
            check_dataset_dirs(args.dataset_dirs)
        combos = grid(args, output_dir)
        if args.task_index is not None:
            index = pick_task(args.task_index, len(combos), dict(os.environ))
            log(f"sweep.py: task {index} of 0-{len(combos) - 1}: {combos[index].describe()}")
            combos = [combos[index]]
        runs, _ = scan_runs(output_dir)
        todo = [c for c in combos if newest_match(runs, c, defaults) is None]
        log(f"sweep.py: {len(combos)} combinations, {len(combos) - len(todo)} already finished, {len(todo)} to run "
            f"(logs in {output_dir / 'sweep-logs'})")
        if todo:
            blocked = [path for path in (lock_path(output_dir, c) for c in todo) if path.is_dir()]
            if blocked:  # said now, not after the runs before it
                raise not_a_lock(blocked[0])
            check_datasets(todo, passed, args.lrs or DEFAULT_LRS, log)
        bad_models = unloadable_models(todo, log)
        skipped = [c for c in todo if c.model_name in bad_models]
        writable_dir(output_dir)
        runner = Sweep(output_dir, devices, defaults, log, args.lease_timeout)
        runner.failed = len(skipped)
        runner.run([c for c in todo if c.model_name not in bad_models])
        failed = runner.failed
        runs, problems = scan_runs(output_dir)
        for problem in problems:
            log(f"sweep.py: warning: {problem}")
        chosen = [run for c in combos if (run := newest_match(runs, c, defaults)) is not None]
        log(f"sweep.py: {runner.done} runs done, {runner.failed} failed, {runner.locked} left to another sweep; "
            f"{len(chosen)} of {len(combos)} combinations have results")
    sys.stdout.write(render(chosen, args, defaults, log))
    sys.stdout.flush()
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("sweep.py", lambda: sweep(args, log), args.debug,
                   stopped=lambda: "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
