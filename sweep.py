"""Run a grid of bertcls.py fine-tuning runs and print their results as CSV (or Markdown).

    python sweep.py > results/all.csv                      # 17 models x lr 1e-5 3e-5 5e-5 x seed 42
    python sweep.py --model_names cl-tohoku/bert-base-japanese-v3 xlm-roberta-base --lrs 2e-5 3e-5 \\
        --seeds 1 2 3 --epochs 3 --batch_size 32 > results/all.csv
    python sweep.py --devices 0,1,2,3 > results/all.csv    # four runs at once, one per GPU
    CUDA_VISIBLE_DEVICES=4,5 python sweep.py --devices 0,1  # GPUs 4 and 5: ids count within the visible ones
    python sweep.py --no_run --best > results/best.csv     # train nothing: best lr per model, mean +- std
    python sweep.py --no_run --markdown > results/best.md  # the same as a Markdown table

Every flag sweep.py does not know is passed to each bertcls.py run, which runs in its own process (so
GPU memory is freed in between) with its output in <output_dir>/sweep-logs/. The table goes to stdout,
progress to stderr.

Resuming: a combination (model, lr, seed and the passed-through flags) that already has a finished run
(test-metrics.json) under --output_dir is not run again; an interrupted or failed run is run again.
Combinations are matched on config.json "args": every bertcls.py setting except those that do not change
results (IGNORED_FIELDS), numbers compared numerically; and on where it computed: its device type and the dtype
--dtype resolved to there (config.json "device" and "dtype"), so a CPU fp32 run never stands for the same
combination on a GPU in bf16. Of several finished runs of one combination the
newest counts, once. A combination being run holds <output_dir>/.locks/<combination>.lock (the pids of
the sweep and its child), so two sweeps on one directory never run it twice; a lock whose processes are
all gone is stale and taken over.

--best: per model, the lr with the highest mean best-val-f1 over seeds (ties: the smaller lr), with the
mean and the sample standard deviation (n - 1) over seeds of each metric; the std is empty for one seed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import bertcls
from common import (UserError, atomic_write_text, dtype_name, first_line, log, positive_float, resolve_dtype, run_cli,
                    safe_name)

try:
    import fcntl
except ImportError:  # Windows: lock takeover is then not guarded against a simultaneous takeover
    fcntl = None

BERTCLS = Path(__file__).resolve().with_name("bertcls.py")
DEFAULT_MODELS = [
    "studio-ousia/luke-japanese-base-lite", "cl-tohoku/bert-base-japanese-v2", "cl-tohoku/bert-base-japanese-v3",
    "cl-tohoku/bert-base-japanese", "bert-base-multilingual-cased", "cl-tohoku/bert-base-japanese-char-v3",
    "cl-tohoku/bert-base-japanese-char-v2", "cl-tohoku/bert-base-japanese-whole-word-masking",
    "cl-tohoku/bert-base-japanese-char", "studio-ousia/luke-japanese-large-lite", "cl-tohoku/bert-large-japanese",
    "xlm-roberta-large", "studio-ousia/mluke-large-lite", "xlm-roberta-base", "studio-ousia/mluke-base-lite",
    "cl-tohoku/bert-large-japanese-v2", "cl-tohoku/bert-large-japanese-char-v2",
]
DEFAULT_LRS = [1e-5, 3e-5, 5e-5]
DEFAULT_SEEDS = [42]
# bertcls.py settings that change where or how verbosely a run works, not what it computes.
IGNORED_FIELDS = frozenset({"output_dir", "cache_dir", "debug", "log_interval", "device"})
GRID_FLAGS = {"model_name": "--model_names", "lr": "--lrs", "seed": "--seeds", "output_dir": "--output_dir"}
METRICS = ("loss", "accuracy", "precision", "recall", "f1")
RUN_COLUMNS = ["model_name", "lr", "seed", "best-val-epoch", "best-val-f1", *METRICS, "params", "train_seconds"]
BEST_COLUMNS = ["model_name", "lr", "seeds", "best-val-f1", "best-val-f1-std",
                *[c for m in METRICS for c in (m, f"{m}-std")], "params", "train_seconds"]
POLL_S = 0.2


def device_list(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",")]
    if not all(devices):
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids such as 0,1,2,3, got {text!r}")
    return devices


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
                   help="one row per model: its best lr, mean and std over seeds (default: one row per run)")
    p.add_argument("--markdown", action="store_true", help="print the --best table as Markdown (default: off)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors (default: off)")
    args, args.bertcls_flags = p.parse_known_args(argv)
    for field in sorted(named_fields(args.bertcls_flags, bertcls_fields()) & GRID_FLAGS.keys()):
        p.error(f"--{field} is set by the sweep: use {GRID_FLAGS[field]} (spelled in full)")
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


@dataclasses.dataclass(frozen=True)
class Combination:
    model_name: str
    lr: float
    seed: int
    flags: tuple[str, ...]  # the full bertcls.py command line
    wanted: dict[str, Any]  # experiment() of its resolved args
    computed: dict[str, str]  # computed_on() of its resolved args

    @property
    def stem(self) -> str:
        """File name for its lock and log: readable, and unique per experiment thanks to the hash."""
        digest = hashlib.sha1(json.dumps(self.wanted, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{safe_name(self.model_name)[-100:]}__lr{self.lr:g}__seed{self.seed}__{digest}"

    def describe(self) -> str:
        return f"{self.model_name} lr {self.lr:g} seed {self.seed}"


def combinations(models: Sequence[str], lrs: Sequence[float], seeds: Sequence[int], passed: Sequence[str],
                 output_dir: Path) -> list[Combination]:
    combos, seen = [], []
    for model in models:
        for lr in lrs:
            for seed in seeds:
                flags = (*passed, "--model_name", model, "--lr", repr(lr), "--seed", str(seed),
                         "--output_dir", str(output_dir))
                resolved = resolve_bertcls_args(flags)
                wanted = experiment(resolved)
                if not any(matches(w, wanted, {}) for w in seen):  # a model or lr listed twice runs once
                    seen.append(wanted)
                    combos.append(Combination(model, lr, seed, flags, wanted, computed_on(resolved)))
    return combos


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
    computed: dict[str, str] = dataclasses.field(default_factory=dict)  # recorded_on() its config.json

    @property
    def age_key(self) -> tuple[str, str]:
        """<date>/<time> of its directory: sorts oldest first."""
        return self.run_dir.parent.name, self.run_dir.name

    def row(self) -> dict[str, Any]:
        return {"model_name": self.args["model_name"], "lr": self.args["lr"], "seed": self.args["seed"],
                "best-val-epoch": self.best_epoch, "best-val-f1": self.val_f1, **self.test,
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
    return FinishedRun(run_dir, args, number(config, "params", "config.json", int),
                       number(val, "best_epoch", "val-metrics.json", int), number(val, "f1", "val-metrics.json"),
                       number(val, "train_seconds", "val-metrics.json"),
                       {m: number(test, m, "test-metrics.json") for m in METRICS}, recorded_on(config))


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


def newest_match(runs: Iterable[FinishedRun], combo: Combination, defaults: dict[str, Any]) -> FinishedRun | None:
    """The newest run made with the combination's settings on its device type and dtype."""
    found = [r for r in runs if matches(r.args, combo.wanted, defaults) and r.computed == combo.computed]
    return max(found, key=lambda r: r.age_key) if found else None


def select_runs(runs: Sequence[FinishedRun], models: Sequence[str] | None, lrs: Sequence[float] | None,
                seeds: Sequence[int] | None, wanted: dict[str, Any], defaults: dict[str, Any],
                log: Callable[[str], None]) -> list[FinishedRun]:
    """--no_run: the newest run per (model, lr, seed) among those made with the wanted settings."""
    models = None if models is None else {normalize("model_name", m) for m in models}
    groups: dict[tuple, list[FinishedRun]] = {}
    for run in runs:
        model, lr, seed = normalize("model_name", run.args["model_name"]), run.args["lr"], run.args["seed"]
        if ((models is None or model in models) and (lrs is None or any(same_value(lr, x) for x in lrs))
                and (seeds is None or seed in seeds) and matches(run.args, wanted, defaults)):
            groups.setdefault((model, float(lr), seed), []).append(run)
    chosen = []
    for (model, lr, seed), group in groups.items():
        group.sort(key=lambda r: r.age_key)
        if any(experiment(r.args) != experiment(group[-1].args) for r in group):
            log(f"sweep.py: warning: {model} lr {lr:g} seed {seed}: runs with different settings; using the "
                f"newest, {group[-1].run_dir} (pass bertcls.py flags to select others)")
        chosen.append(group[-1])
    return chosen


# ---------------------------------------------------------------------------------------- locks


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
    return json.dumps({"pids": list(pids), "host": socket.gethostname()}) + "\n"


def lock_holder(path: Path) -> str | None:
    """Who holds a lock file, or None when it is stale (unreadable, or all its processes are gone)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        pids, host = [int(p) for p in record["pids"]], str(record["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():  # another machine's pids cannot be checked from here
        return f"pid {', '.join(map(str, pids))} on {host}"
    alive = [p for p in pids if pid_alive(p)]
    return f"pid {', '.join(map(str, alive))}" if alive else None


@contextlib.contextmanager
def locks_mutex(locks_dir: Path) -> Iterator[None]:
    """Serializes taking locks, so that two sweeps cannot both take over one stale lock."""
    if fcntl is None:
        yield
        return
    with open(locks_dir / ".mutex", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def create_lock(path: Path) -> bool:
    """Create path only if it does not exist (O_EXCL), holding our pid."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(lock_record(os.getpid()))
    return True


def acquire_lock(path: Path, log: Callable[[str], None]) -> str | None:
    """Take the lock at path; returns None on success, else who holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locks_mutex(path.parent):
        if create_lock(path):
            return None
        holder = lock_holder(path)
        if holder is not None:
            return holder
        log(f"sweep.py: taking over stale lock {path}")
        path.unlink(missing_ok=True)
        return None if create_lock(path) else "a process that took it just now"


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
                 log: Callable[[str], None]):
        self.output_dir, self.defaults, self.log = output_dir, defaults, log
        self.free_devices: list[str | None] = list(devices) if devices else [None]
        self.running: list[Running] = []
        self.failed = self.locked = self.done = 0

    def finished(self, combo: Combination) -> FinishedRun | None:
        runs, _ = scan_runs(self.output_dir / safe_name(combo.model_name))
        return newest_match(runs, combo, self.defaults)

    def start(self, combo: Combination, position: str) -> None:
        lock = self.output_dir / ".locks" / f"{combo.stem}.lock"
        holder = acquire_lock(lock, self.log)
        if holder is not None:
            self.locked += 1
            self.log(f"{position} skipped {combo.describe()}: another sweep ({holder}) is running it "
                     f"(lock {lock})")
            return
        try:
            # another sweep may have finished it since we looked
            if (run := self.finished(combo)) is not None:
                self.log(f"{position} already finished: {combo.describe()} -> {run.run_dir}")
                lock.unlink(missing_ok=True)
                return
            device = self.free_devices.pop(0)
            log_path = self.output_dir / "sweep-logs" / f"{combo.stem}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w", encoding="utf-8") as out:
                process = subprocess.Popen([sys.executable, str(BERTCLS), *combo.flags], stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=child_env(dict(os.environ), device))
        except BaseException:
            lock.unlink(missing_ok=True)
            raise
        atomic_write_text(lock, lock_record(os.getpid(), process.pid))
        self.running.append(Running(combo, process, lock, log_path, device, time.monotonic()))
        on = "" if device is None else f" on GPU {device}"
        self.log(f"{position} running {combo.describe()}{on}: log {log_path}")

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
            item.lock.unlink(missing_ok=True)

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
            item.lock.unlink(missing_ok=True)
        self.running.clear()

    def run(self, combos: Sequence[Combination]) -> None:
        pending = list(enumerate(combos, 1))
        try:
            while pending or self.running:
                while pending and self.free_devices:
                    i, combo = pending.pop(0)
                    self.start(combo, f"[{i}/{len(combos)}]")
                if self.running:
                    time.sleep(POLL_S)
                    self.reap()
        except BaseException:
            self.stop()
            raise


# ------------------------------------------------------------------------------------- tables


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); None for a single value, whose spread is unknown."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def run_rows(runs: Iterable[FinishedRun]) -> list[dict[str, Any]]:
    rows = [r.row() for r in runs]
    rows.sort(key=lambda r: (r["model_name"], r["lr"], r["seed"]))
    rows.sort(key=lambda r: r["f1"], reverse=True)
    return rows


def best_rows(runs: Iterable[FinishedRun]) -> list[dict[str, Any]]:
    """Per model, the lr with the highest mean best-val-f1 over seeds, with mean and std of each metric."""
    by_model: dict[str, dict[float, list[FinishedRun]]] = {}
    for run in runs:
        by_model.setdefault(run.args["model_name"], {}).setdefault(float(run.args["lr"]), []).append(run)
    rows = []
    for model, by_lr in by_model.items():
        lr = max(sorted(by_lr), key=lambda x: statistics.fmean(r.val_f1 for r in by_lr[x]))  # ties: smaller lr
        group = by_lr[lr]
        row = {"model_name": model, "lr": lr, "seeds": len(group)}
        row["best-val-f1"], row["best-val-f1-std"] = mean_std([r.val_f1 for r in group])
        for metric in METRICS:
            row[metric], row[f"{metric}-std"] = mean_std([r.test[metric] for r in group])
        row["params"] = max(group, key=lambda r: r.age_key).params
        row["train_seconds"] = statistics.fmean(r.train_seconds for r in group)
        rows.append(row)
    rows.sort(key=lambda r: r["model_name"])
    rows.sort(key=lambda r: r["f1"], reverse=True)
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


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | lr | seeds | params (M) | val F1 (%) | accuracy (%) | precision (%) | recall (%) | "
             "F1 (%) | loss |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        cells = [r["model_name"].replace("|", "\\|"), f"{r['lr']:g}", str(r["seeds"]), f"{r['params'] / 1e6:.1f}",
                 mean_pm_std(r["best-val-f1"], r["best-val-f1-std"], 100, 2),
                 *[mean_pm_std(r[m], r[f"{m}-std"], 100, 2) for m in ("accuracy", "precision", "recall", "f1")],
                 mean_pm_std(r["loss"], r["loss-std"], 1, 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(runs: Sequence[FinishedRun], best: bool, markdown: bool) -> str:
    if markdown:
        return markdown_table(best_rows(runs))
    if best:
        return csv_text(best_rows(runs), BEST_COLUMNS)
    return csv_text(run_rows(runs), RUN_COLUMNS)


# ---------------------------------------------------------------------------------------- main


def sweep(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file: pass a directory")
    defaults = resolve_bertcls_args([])
    passed = resolve_bertcls_args(args.bertcls_flags)  # also rejects bad flags before anything runs
    failed = 0
    if args.no_run:
        if not output_dir.is_dir():
            raise UserError(f"--output_dir {output_dir} does not exist: nothing to aggregate "
                            "(run the sweep without --no_run first)")
        runs, problems = scan_runs(output_dir)
        wanted = experiment({k: passed[k] for k in named_fields(args.bertcls_flags, passed)})
        for problem in problems:
            log(f"sweep.py: warning: {problem}")
        chosen = select_runs(runs, args.model_names, args.lrs, args.seeds, wanted, defaults, log)
        log(f"sweep.py: {len(chosen)} finished runs selected of {len(runs)} in {output_dir}")
    else:
        devices = args.devices and visible_devices(args.devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
        combos = combinations(args.model_names or DEFAULT_MODELS, args.lrs or DEFAULT_LRS,
                              args.seeds or DEFAULT_SEEDS, args.bertcls_flags, output_dir)
        runs, _ = scan_runs(output_dir)
        todo = [c for c in combos if newest_match(runs, c, defaults) is None]
        log(f"sweep.py: {len(combos)} combinations, {len(combos) - len(todo)} already finished, {len(todo)} to run "
            f"(logs in {output_dir / 'sweep-logs'})")
        output_dir.mkdir(parents=True, exist_ok=True)
        runner = Sweep(output_dir, devices, defaults, log)
        runner.run(todo)
        failed = runner.failed
        runs, problems = scan_runs(output_dir)
        for problem in problems:
            log(f"sweep.py: warning: {problem}")
        chosen = [run for c in combos if (run := newest_match(runs, c, defaults)) is not None]
        log(f"sweep.py: {runner.done} runs done, {runner.failed} failed, {runner.locked} left to another sweep; "
            f"{len(chosen)} of {len(combos)} combinations have results")
    sys.stdout.write(render(chosen, args.best, args.markdown))
    sys.stdout.flush()
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("sweep.py", lambda: sweep(args, log), args.debug,
                   stopped=lambda: "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
