"""Run a grid of bertcls.py runs and print their results as CSV (or Markdown).

    python sweep.py --output results/all.csv               # 17 models x lr 1e-5 3e-5 5e-5 x seed 42
    python sweep.py --model_names xlm-roberta-base --lrs 2e-5 3e-5 --seeds 1 2 3 --epochs 3
    python sweep.py --devices 0,1,2,3 --dataset_dirs datasets/livedoor/fold-* --output results/cv.csv
    python sweep.py --no_run --markdown --output best.md  # train nothing: a row per experiment, at its best lr
    python sweep.py --slurm --sbatch="--partition gpu" > sweep.sbatch && sbatch sweep.sbatch

Other flags go to every run. A rerun skips finished runs and resumes interrupted ones. Sweeps on one host may share
--output_dir (each combination is locked while it runs); across hosts, use --slurm.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch

import bertcls
import compare
from common import (LOG_LOCK, UserError, atomic_write, dtype_name, first_line, iter_jsonl, locked, log, parse_device,
                    positive_float, positive_int, read_json, refuse_overwrite, resolve_dtype, run_cli, seed_int)
from data import SPLITS, TRUNCATIONS

BERTCLS = Path(__file__).resolve().with_name("bertcls.py")
DEFAULT_MODELS = [
    "studio-ousia/luke-japanese-base-lite", "cl-tohoku/bert-base-japanese-v2", "cl-tohoku/bert-base-japanese-v3",
    "cl-tohoku/bert-base-japanese", "bert-base-multilingual-cased", "cl-tohoku/bert-base-japanese-char-v3",
    "cl-tohoku/bert-base-japanese-char-v2", "cl-tohoku/bert-base-japanese-whole-word-masking",
    "cl-tohoku/bert-base-japanese-char", "studio-ousia/luke-japanese-large-lite", "cl-tohoku/bert-large-japanese",
    "xlm-roberta-large", "studio-ousia/mluke-large-lite", "xlm-roberta-base", "studio-ousia/mluke-base-lite",
    "cl-tohoku/bert-large-japanese-v2", "cl-tohoku/bert-large-japanese-char-v2"]
LONG_CONTEXT_MODELS = [*(f"sbintuitions/modernbert-ja-{size}" for size in ("30m", "70m", "130m", "310m")),
                       "llm-jp/llm-jp-modernbert-base"]
# bertcls.py flags that are the sweep's to set
GRID_FLAGS = {**{name: f"use --{name}s" for name in ("model_name", "lr", "seed", "truncation")},
              "resume": "it resumes interrupted runs by itself"}
DATASET_FILES = (*(f"{split}.jsonl" for split in SPLITS), "label2id.json")
METRICS = ("loss", "accuracy", "precision", "recall", "f1")
RUN_COLUMNS = ["model_name", "lr", "seed", "fold", "best-val-epoch", "best-val-f1", *METRICS, "params", "train_seconds"]
BEST_COLUMNS = ["model_name", "lr", "seeds", "folds", *[c for m in ("best-val-f1", *METRICS) for c in (m, f"{m}-std")],
                *[f"{m}-ci95-{end}" for m in ("f1", "accuracy") for end in ("low", "high")], "mark", "f1-p-holm",
                "params", "train_seconds"]
SLURM_ONLY = {"--slurm": 0, "--sbatch": 1, "--max_running": 1, "--output": 1}  # flag: values it takes


def id_list(text: str) -> list[str]:
    return [d.strip() for d in text.split(",") if d.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # an abbreviation could swallow a bertcls.py flag
    add, mode = p.add_argument, p.add_mutually_exclusive_group().add_argument
    add("--model_names", nargs="+", metavar="MODEL", help="(default: the tutorial's 17)")
    add("--long_context", action="store_true", help="add the 8192-token LONG_CONTEXT_MODELS")
    add("--truncations", nargs="+", choices=TRUNCATIONS, metavar="T", help="bertcls.py --truncation as an axis")
    add("--lrs", nargs="+", type=positive_float, metavar="LR", help="(default: 1e-5 3e-5 5e-5)")
    add("--seeds", nargs="+", type=seed_int, metavar="SEED", help="(default: 42)")
    add("--dataset_dirs", nargs="+", metavar="DIR", help="datasets as an axis, e.g. datasets/livedoor/fold-*")
    add("--devices", type=id_list, help="GPU ids: a run on each")
    add("--output_dir", default="outputs", help="where runs are written and found (default: %(default)s)")
    add("--output", metavar="FILE", help="the table to FILE, only if every run succeeded (default: stdout)")
    mode("--no_run", action="store_true", help="train nothing: the finished runs (axes not given: all)")
    add("--best", action="store_true", help="one row per experiment, at its best lr, with 95%% intervals")
    add("--markdown", action="store_true", help="the --best table as Markdown, with marks")
    mode("--list", nargs="?", const="table", choices=("table", "tsv", "json"), help="the grid's state")
    mode("--task_index", metavar="I", help="run combination I only; slurm: $SLURM_ARRAY_TASK_ID")
    mode("--slurm", action="store_true", help="an sbatch job array script, one combination per task")
    add("--max_running", type=positive_int, metavar="P", help="with --slurm: at most P tasks at once")
    add("--sbatch", action="append", default=[], metavar="OPTIONS", help='with --slurm, e.g. --sbatch="-p gpu"')
    add("--debug", action="store_true", help="show tracebacks")
    args, args.bertcls_flags = p.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


# -------------------- flags and runs


def resolve(flags: Sequence[str]) -> tuple[dict[str, Any], set[str]]:
    """bertcls.py's settings for flags, defaults filled in, and the names given; bad flags: one line."""
    messages, unset = io.StringIO(), object()
    try:  # redirect_stderr is process-wide: no logging meanwhile
        with LOG_LOCK, contextlib.redirect_stderr(messages):
            named = {k for k, v in vars(bertcls.parse_args(flags, unset)).items() if v is not unset}
            return vars(bertcls.parse_args(flags)), named
    except SystemExit:
        reason = messages.getvalue().partition(": error: ")[2].strip() or "invalid flags"
        raise UserError(f"flags for bertcls.py: {reason}") from None


def check_flags(args: argparse.Namespace) -> None:
    if (args.sbatch or args.max_running) and not args.slurm:
        raise UserError("--sbatch and --max_running go with --slurm")
    if args.slurm and args.devices:
        raise UserError("--slurm gives each array task a GPU of its own: drop --devices")
    resolved, named = resolve(args.bertcls_flags)
    if flag := min(named & GRID_FLAGS.keys(), default=None):
        raise UserError(f"--{flag} is set by the sweep: {GRID_FLAGS[flag]}")
    if args.dataset_dirs and "dataset_dir" in named:
        raise UserError("give the datasets either as --dataset_dir (one) or as --dataset_dirs (several), not both")
    if args.output:  # now, not after the runs
        output, datasets = Path(args.output), args.dataset_dirs or [resolved["dataset_dir"]]
        if output.is_dir() or not output.absolute().parent.is_dir():
            raise UserError(f"--output {args.output}: expected a file in an existing directory")
        refuse_overwrite([("--output", output)], [Path(d) / f for d in datasets for f in DATASET_FILES])


def normalized(name: str, value: Any) -> Any:
    """./org/a is org/a."""
    return os.path.normpath(value) if name in ("model_name", "dataset_dir") and value else value


def key_of(config: dict) -> dict[str, Any]:
    """What a run computes: bertcls.experiment, normalized."""
    return {k: normalized(k, v) for k, v in bertcls.experiment(config).items()}


def ordered(value: Any) -> tuple:
    """Numbers as numbers (2 before 10), then the rest as text."""
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def cell(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def frozen(value: Any) -> str:
    """A hashable spelling: 3 and 3.0 (a default and a parsed flag) alike."""
    if isinstance(value, dict):
        return json.dumps({k: frozen(v) for k, v in value.items()}, sort_keys=True)
    return json.dumps(float(value) if type(value) in (int, float) else value)  # not bools


def grouped(items: Iterable[Any], key: Callable[[Any], Any]) -> dict[Any, list]:
    groups: dict[Any, list] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def computed_on(resolved: dict[str, Any]) -> tuple[str, str | None]:
    """Device type and dtype as bertcls.py resolves them (None: auto without CUDA)."""
    device = parse_device(resolved["device"])
    if device.type == "cuda" and not torch.cuda.is_available() and resolved["dtype"] == "auto":
        return device.type, None
    return device.type, dtype_name(resolve_dtype(resolved["dtype"], device))


class Run(NamedTuple):
    """A run directory as read; test is None until it is finished."""
    run_dir: Path
    config: dict
    key: dict[str, Any]
    fold: int | None  # of prepare.py --folds
    val: dict
    test: dict | None
    # what compare.py's statistics read
    seed = property(lambda self: self.key["seed"])
    val_f1 = property(lambda self: self.val["f1"])
    ids, n_labels, gold, predicted = (property(lambda self, i=i: predictions(self.run_dir)[i]) for i in range(4))


def load_run(run_dir: Path, defaults: dict[str, Any]) -> Run:
    """A setting newer than the run takes its default. A malformed finished run is a ValueError."""
    config = read_json(run_dir / "config.json")
    config["args"] = {**defaults, **config["args"]}
    key, fold = key_of(config), (config.get("fold") or {}).get("fold")
    if not (run_dir / "test-metrics.json").exists():
        return Run(run_dir, config, key, fold, {}, None)
    val, test = read_json(run_dir / "val-metrics.json"), read_json(run_dir / "test-metrics.json")
    for name, obj, fields in [("config.json", config, ["params"]), ("test-metrics.json", test, METRICS),
                              ("val-metrics.json", val, ["best_epoch", "f1", "train_seconds"])]:
        if missing := [f for f in fields if not isinstance(obj, dict) or not isinstance(obj.get(f), (int, float))]:
            raise ValueError(f"{name} has no number {missing[0]!r}")
    return Run(run_dir, config, key, fold, val, test)


def scan(output_dir: Path, warn: bool = False) -> list[Run]:
    """The runs in output_dir/<model>/<date>/<time>/, oldest first; malformed ones are skipped."""
    runs, defaults = [], resolve([])[0]
    for path in output_dir.glob("*/*/*/config.json"):
        try:
            runs.append(load_run(path.parent, defaults))
        except (UserError, OSError, ValueError, LookupError, TypeError, AttributeError) as e:  # not a bug here
            if warn:
                log(f"sweep.py: warning: skipped {path.parent}: {first_line(e)}")
    return sorted(runs, key=lambda r: (r.run_dir.parent.name, r.run_dir.name))


def newest(runs: Sequence[Run], key: dict[str, Any]) -> Run | None:
    """The newest finished run of `key`."""
    return next((r for r in reversed(runs) if r.key == key and r.test is not None), None)


# -------------------- the grid, and running it


class Combination(NamedTuple):
    values: dict[str, Any]  # on each axis
    flags: list[str]  # for bertcls.py
    key: dict[str, Any]
    name: str  # "model lr 3e-05 seed 42"
    lock: Path
    log: Path


def axes_of(args: argparse.Namespace, defaults: bool = True) -> dict[str, list | None]:
    """The grid's axes, the last varying fastest; without defaults (--no_run), None: any value."""
    models = args.model_names or (DEFAULT_MODELS if defaults else None)
    return {"model_name": models and models + (LONG_CONTEXT_MODELS if args.long_context else []),
            "truncation": args.truncations, "lr": args.lrs or ([1e-5, 3e-5, 5e-5] if defaults else None),
            "seed": args.seeds or ([42] if defaults else None), "dataset_dir": args.dataset_dirs}


def grid(args: argparse.Namespace) -> list[Combination]:
    """The combinations in their fixed order; one listed twice runs once."""
    axes = {axis: values for axis, values in axes_of(args).items() if values}
    device, dtype = computed_on(resolve(args.bertcls_flags)[0])  # the axes do not change where runs compute
    combos, out = {}, Path(args.output_dir)
    for values in itertools.product(*axes.values()):
        setting = dict(zip(axes, values))
        flags = [*args.bertcls_flags, *(t for axis, v in setting.items() for t in (f"--{axis}", str(v))),
                 "--output_dir", args.output_dir]
        key = key_of({"args": resolve(flags)[0], "device": device, "dtype": dtype, "world_size": 1})
        name = " ".join(f"{axis} {cell(v)}" for axis, v in setting.items()).removeprefix("model_name ")
        stem = re.sub(r"[^\w.-]+", "_", name)[-100:] + "__" + hashlib.sha1(frozen(key).encode()).hexdigest()[:8]
        combos.setdefault(frozen(key), Combination(setting, flags, key, name, out / ".locks" / f"{stem}.lock",
                                                   out / "sweep-logs" / f"{stem}.log"))
    return list(combos.values())


def visible_devices(devices: list[str]) -> list[str]:
    """--devices as CUDA_VISIBLE_DEVICES values: positions in an inherited one (a scheduler's)."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise UserError("--devices needs CUDA, which is not available here: drop --devices")
    if inherited is None:
        return devices
    visible = id_list(inherited)
    if bad := [d for d in devices if not (d.isdigit() and int(d) < len(visible))]:
        raise UserError(f"--devices {bad[0]}: CUDA_VISIBLE_DEVICES={inherited} leaves {len(visible)} GPU(s) visible, "
                        f"numbered 0..{len(visible) - 1} here: pass those numbers")
    return [visible[int(device)] for device in devices]


def run_combination(combo: Combination, position: str, output_dir: Path, device: str | None,
                    start: Callable[..., subprocess.Popen]) -> str:
    """Run one combination unless another sweep holds or finished it: done, failed or left (to it)."""
    with contextlib.ExitStack() as held:
        try:
            lock = held.enter_context(locked(combo.lock, f"lock {combo.lock}"))
        except UserError:
            log(f"{position} left to another sweep: {combo.name} (lock {combo.lock})")
            return "left"
        runs = scan(output_dir)  # again, under the lock: another sweep may have finished it
        if run := newest(runs, combo.key):
            log(f"{position} finished by another sweep: {combo.name} -> {run.run_dir}")
            return "left"
        interrupted = next((r for r in reversed(runs) if r.key == combo.key and bertcls.checkpoints(r.run_dir)), None)
        flags = ["--resume", str(interrupted.run_dir)] if interrupted else combo.flags
        with open(combo.log, "a" if interrupted else "w", encoding="utf-8") as out:
            # the run inherits the lock: held while it runs, even if this sweep is killed
            process = start([sys.executable, str(BERTCLS), *flags], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, pass_fds=(lock.fileno(),),
                            env=os.environ | ({"CUDA_VISIBLE_DEVICES": device} if device else {}))
        log(f"{position} running {combo.name}" + (f" on GPU {device}" if device else "")
            + (f" (resuming {interrupted.run_dir})" if interrupted else "") + f": log {combo.log}")
        rc = process.wait()
    if rc == 0 and (run := newest(scan(output_dir), combo.key)):
        log(f"done {combo.name}: test f1 {run.test['f1']:.4f} -> {run.run_dir}")
        return "done"
    why = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}" if rc else "no finished run of it"
    last = (combo.log.read_text(encoding="utf-8", errors="replace").strip().splitlines() or [""])[-1].strip()
    log(f"sweep.py: FAILED {combo.name} ({why}): {last}; log: {combo.log}")
    return "failed"


def run_grid(combos: Sequence[Combination], output_dir: Path, devices: Sequence[str] | None) -> Counter:
    """One run per device at once; stopped (Ctrl-C, SIGTERM), it terminates them, to be resumed."""
    free, running, worker = list(devices or [None]), [], threading.local()
    guard, stopped = threading.Lock(), threading.Event()
    for directory in (".locks", "sweep-logs"):
        (output_dir / directory).mkdir(parents=True, exist_ok=True)

    def start(*args, **kwargs):
        with guard:  # no run starts once the sweep is stopped
            if stopped.is_set():
                raise KeyboardInterrupt
            running.append(subprocess.Popen(*args, **kwargs))
            return running[-1]

    def task(i, combo):
        return run_combination(combo, f"[{i}/{len(combos)}]", output_dir, worker.device, start)

    # one worker thread per device, which it keeps
    with ThreadPoolExecutor(len(free), initializer=lambda: setattr(worker, "device", free.pop(0))) as pool:
        futures = [pool.submit(task, i, combo) for i, combo in enumerate(combos, 1)]
        try:
            return Counter(future.result() for future in futures)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            with guard:
                stopped.set()
            for process in running:
                process.terminate()  # leaving the pool waits for each to end
            raise


# -------------------- selection and experiments


def select(runs: Iterable[Run], flags: Sequence[str], values: dict[str, Sequence | None]) -> list[Run]:
    """The newest finished run of each experiment with these flags and one of `values` per setting (None: any)."""
    resolved, named = resolve(flags)
    device, dtype = computed_on(resolved) if named & {"device", "dtype"} else (None, None)
    wanted = key_of({"args": resolved, "device": device, "dtype": dtype})  # dtype None (auto, no CUDA): any
    values = {**{k: v and [normalized(k, x) for x in v] for k, v in values.items()},
              **{k: None if wanted[k] is None else [wanted[k]] for k in named & wanted.keys()}}
    chosen: dict[str, Run] = {}
    for run in runs:  # oldest first: the newest stays
        if run.test is not None and all(v is None or run.key.get(k) in v for k, v in values.items()):
            chosen[frozen({**run.key, **settings_of(run)})] = run
    return list(chosen.values())


def settings_of(run: Run) -> dict[str, Any]:
    """A run's experiment: its data by content (fold set or digest) and its key but lr, seed and dataset_dir."""
    fold = run.config.get("fold")
    data = f"folds {fold['set']}" if fold else run.config.get("dataset_digest") or f"path {run.key['dataset_dir']}"
    return {"dataset": data, **{k: v for k, v in run.key.items() if k not in ("lr", "seed", "dataset_dir")}}


def experiments(runs: Iterable[Run]) -> list[list[Run]]:
    return list(grouped(runs, lambda run: frozen(settings_of(run))).values())


def distinguishing(groups: Sequence[Sequence[Run]]) -> list[str]:
    """The settings that differ between experiments: the columns."""
    settings = [settings_of(g[0]) for g in groups]
    names = dict.fromkeys(k for s in settings for k in s)
    return [k for k in names if k != "model_name" and len({frozen(s.get(k)) for s in settings}) > 1]


def setting_cells(run: Run, columns: Sequence[str]) -> dict[str, Any]:
    """A row's values of the columns, its data as path@digest."""
    fold = run.config.get("fold")
    digest = fold["set"] if fold else run.config.get("dataset_digest") or ""
    label = f"{Path(run.key['dataset_dir']).parent if fold else run.key['dataset_dir']}" + (digest and f"@{digest[:8]}")
    return {c: label if c == "dataset" else run.key.get(c) for c in columns}


@functools.cache
def predictions(run_dir: Path) -> tuple[list[str], int, list[int], list[int]]:
    """(ids, number of labels, gold, predicted) of test-predictions.jsonl, labels in its probabilities' order."""
    try:
        rows = [row for *_, row in iter_jsonl(run_dir / "test-predictions.jsonl")]
        index = {name: i for i, name in enumerate(rows[0]["probabilities"])}
        return ([str(r.get("id")) for r in rows], len(index), [index[r["gold"]] for r in rows],
                [index[r["predicted"]] for r in rows])
    except (FileNotFoundError, IndexError, KeyError, TypeError):
        raise UserError(f"{run_dir} has no test-predictions.jsonl of bertcls.py, which intervals and tests need: move "
                        "that run directory away and run it again (sweep.py reruns a missing run)") from None


def best_lr_of(runs: Sequence[Run]) -> tuple[float, list[Run], str]:
    """compare.best_lr of an experiment: (lr, its runs, a note)."""
    try:
        return compare.best_lr(grouped(runs, lambda run: run.key["lr"]))
    except ValueError as e:
        raise UserError(f"{runs[0].key['model_name']}: {e}: run the missing ones, or select lrs with --lrs") from None


MARK_FOOTNOTE = ("† ref: the reference row of its test data (best mean validation macro-F1). †: not shown worse than "
                 "it in test macro-F1 (paired one-sided tests, Holm, 5%), nor shown as good. ?: not compared. "
                 "±: sample std over seeds and folds. 95% CI: over test examples (and seeds). README.md: 区間と印.")


# -------------------- tables


def run_rows(groups: Sequence[Sequence[Run]], columns: Sequence[str]) -> list[dict[str, Any]]:
    return [{"model_name": r.key["model_name"], **setting_cells(g[-1], columns), "lr": r.key["lr"], "seed": r.seed,
             "fold": r.fold, "best-val-epoch": r.val["best_epoch"], "best-val-f1": r.val["f1"], **r.test,
             "params": r.config["params"], "train_seconds": r.val["train_seconds"]} for g in groups for r in g]


def best_rows(groups: Sequence[Sequence[Run]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Per experiment, at its best lr: mean and std over seeds and folds, intervals and marks."""
    rows = []
    for group in groups:
        lr, runs, note = best_lr_of(group)
        row = {"model_name": runs[0].key["model_name"], **setting_cells(group[-1], columns), "lr": lr, "runs": runs,
               "seeds": len({r.seed for r in runs}), "folds": len({r.fold for r in runs}), "params":
               runs[-1].config["params"], "train_seconds": statistics.fmean(r.val["train_seconds"] for r in runs)}
        for name in ("best-val-f1", *METRICS):  # std: n - 1, none for one run
            values = [r.val["f1"] if name == "best-val-f1" else r.test[name] for r in runs]
            row[name], row[f"{name}-std"] = statistics.fmean(values), statistics.stdev(values) if runs[1:] else None
        try:
            for metric in compare.METRICS:
                row[f"{metric}-ci95-low"], row[f"{metric}-ci95-high"] = compare.row_interval(runs, metric)
        except ValueError as e:  # an incomplete seeds x folds grid, its holes named
            note = "; ".join(filter(None, [note, f"no interval: {e}"]))
        if note:
            log(f"sweep.py: warning: {row['model_name']} lr {lr:g}: {note}")
        rows.append(row)
    for same_data in grouped(rows, lambda row: settings_of(row["runs"][0])["dataset"]).values():  # across: none
        marks = compare.table_marks([r["runs"] for r in same_data])
        for i, (row, entry) in enumerate(zip(same_data, marks["rows"])):
            row["mark"] = "ref" if i == marks["reference"] else {True: "†", False: "", None: "?"}[entry["mark"]]
            row["f1-p-holm"] = entry["p_holm"]
            if entry["note"]:
                log(f"sweep.py: warning: {row['model_name']} is not compared with the reference row: {entry['note']}")
    return rows


def csv_text(rows: Sequence[dict[str, Any]], fields: Sequence[str], columns: Sequence[str]) -> str:
    """The rows as CSV, the setting columns after the first field."""
    out = io.StringIO()
    writer = csv.DictWriter(out, [fields[0], *columns, *fields[1:]], lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def pm(row, metric, scale=100, digits=2):
        return " ± ".join(f"{v * scale:.{digits}f}" for v in (row[metric], row[f"{metric}-std"]) if v is not None)

    def ci(row, metric):
        low, high = row.get(f"{metric}-ci95-low"), row.get(f"{metric}-ci95-high")
        return "" if low is None else f"{100 * low:.2f}–{100 * high:.2f}"

    lines = ["| model | " + "".join(f"{c} | " for c in columns) + "lr | seeds | folds | params (M) | val F1 (%) | "
             "accuracy (%) | accuracy 95% CI | precision (%) | recall (%) | F1 (%) | F1 95% CI | loss |",
             "|:--|" + ":--|" * len(columns) + "--:|" * 12]
    for r in rows:
        cells = [r["model_name"], *(cell(r[c]) for c in columns), cell(r["lr"]), str(r["seeds"]), str(r["folds"]),
                 f"{r['params'] / 1e6:.1f}", pm(r, "best-val-f1"), pm(r, "accuracy"), ci(r, "accuracy"),
                 pm(r, "precision"), pm(r, "recall"), pm(r, "f1") + {"ref": " † ref", "†": " †", "?": " ?"}.get(
                 r["mark"], ""), ci(r, "f1"), pm(r, "loss", 1, 4)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join([*lines, "", MARK_FOOTNOTE]) + "\n"


def table(runs: Sequence[Run], args: argparse.Namespace) -> str:
    columns, best = distinguishing(groups := experiments(runs)), args.best or args.markdown
    log(f"sweep.py: {len(runs)} runs in {len(groups)} experiments (model x settings x data)"
        + (f"; they differ in {', '.join(columns)}" if columns else ""))
    rows = (best_rows if best else run_rows)(groups, columns)
    rows.sort(key=lambda r: (-r["f1"], r["model_name"], [ordered(r.get(c)) for c in (*columns, "lr", "seed", "fold")]))
    if args.markdown:
        return markdown_table(rows, columns)
    return csv_text(rows, BEST_COLUMNS if best else RUN_COLUMNS, columns)


# -------------------- clusters


def grid_listing(combos: Sequence[Combination], output_dir: Path, form: str) -> str:
    """--list: per combination its index, values, state and run_dir."""
    runs, rows = scan(output_dir), []
    for index, combo in enumerate(combos):
        run = newest(runs, combo.key)
        state = "finished" if run else "running" if combo.lock.exists() else "to do"
        if state == "running":
            with contextlib.suppress(UserError), locked(combo.lock, str(combo.lock)):
                state = "to do"  # a stale lock file
        rows.append({"index": index, **combo.values, "state": state, "run_dir": run and str(run.run_dir)})
    if form == "json":
        return "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"  # one combination per line
    text = [list(rows[0]), *[[cell(v) for v in r.values()] for r in rows]]
    if form == "tsv":
        return "".join("\t".join(line) + "\n" for line in text)
    widths = [max(map(len, column)) for column in zip(*text)]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n" for line in text)


def slurm_script(args: argparse.Namespace, size: int) -> str:
    """An sbatch script: array task I runs combination I on one GPU."""
    passed, tokens, sweep_py = [], iter(args.argv), [sys.executable, str(Path(__file__).resolve())]
    for token in tokens:  # this command without --slurm, its options and --output
        name = token.split("=", 1)[0]
        if SLURM_ONLY.get(name) and "=" not in token:
            next(tokens, None)
        passed += [] if name in SLURM_ONLY else [token]
    logs = str(Path.cwd() / args.output_dir / "sweep-logs").replace("%", "%%") + "/slurm-%A_%a.log"  # %%: a %
    return "\n".join([
        "#!/bin/bash",
        f"# task I runs combination I of {size}; resubmitting is safe. Then: {shlex.join([*sweep_py, *passed])} "
        "--no_run",
        "#SBATCH --job-name=bertcls-sweep",
        f"#SBATCH --array=0-{size - 1}" + (f"%{args.max_running}" if args.max_running else ""),
        "#SBATCH --gres=gpu:1",
        "#SBATCH " + shlex.quote(f"--chdir={Path.cwd()}"),
        "#SBATCH " + shlex.quote(f"--output={logs}"),
        *(f"#SBATCH {' '.join(options.split())}" for options in args.sbatch if options.split()),  # last: they win
        "",
        "exec " + shlex.join([*sweep_py, "--task_index", "slurm", *passed]), ""])


# -------------------- main


def sweep(args: argparse.Namespace) -> int:
    check_flags(args)
    output_dir, outcome = Path(args.output_dir), Counter()
    if args.no_run:
        runs = scan(output_dir, warn=True)
        chosen = select(runs, args.bertcls_flags, axes_of(args, defaults=False))
        log(f"sweep.py: {len(chosen)} of the {sum(r.test is not None for r in runs)} finished runs in {output_dir}")
        text = table(chosen, args)
    elif args.list:
        text = grid_listing(grid(args), output_dir, args.list)
    elif args.slurm:
        (output_dir / "sweep-logs").mkdir(parents=True, exist_ok=True)  # Slurm does not make a log's directory
        text = slurm_script(args, len(grid(args)))
    else:  # run the unfinished combinations
        combos = grid(args)
        devices = args.devices and visible_devices(args.devices)
        if args.task_index is not None:
            index = os.environ.get("SLURM_ARRAY_TASK_ID", "unset") if args.task_index == "slurm" else args.task_index
            if not index.isdigit() or int(index) >= len(combos):
                raise UserError(f"--task_index {args.task_index} ({index}): the grid's combinations are "
                                f"0-{len(combos) - 1} (see --list)")
            combos = [combos[int(index)]]
        runs = scan(output_dir, warn=True)
        todo = [c for c in combos if not newest(runs, c.key)]
        log(f"sweep.py: {len(combos)} combinations, {len(combos) - len(todo)} already finished, {len(todo)} to run")
        for directory in map(Path, dict.fromkeys(c.key["dataset_dir"] for c in todo)):  # before any run
            if missing := [f for f in DATASET_FILES if not (directory / f).is_file()]:
                raise UserError(f"dataset {directory} has no {', '.join(missing)}: write it with prepare.py")
        outcome = run_grid(todo, output_dir, devices)
        runs = scan(output_dir)
        chosen = [run for c in combos if (run := newest(runs, c.key))]
        log(f"sweep.py: {outcome['done']} runs done, {outcome['failed']} failed, {outcome['left']} left to another "
            f"sweep; {len(chosen)} of {len(combos)} combinations have results")
        text = table(chosen, args)
    if not args.output:
        print(text, end="", flush=True)
    elif outcome["failed"]:
        raise UserError(f"{outcome['failed']} run(s) failed, so --output {args.output} was not written: run the same "
                        "command again to retry them")
    else:
        atomic_write(Path(args.output), text)
    return 1 if outcome["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("sweep.py", lambda: sweep(args), args.debug, stopped=lambda: "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
