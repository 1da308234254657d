"""Epoch checkpoints and --resume: a killed run loses at most --checkpoint_minutes of work and continues exactly.

What this module is not about: how a run trains or what it writes as results (bertcls.py). It imports common (and
torch, safetensors), never bertcls.py: what it needs of a run is `TrainingRun`, which bertcls.Run has. bertcls.py
and sweep.py import it.

- the state: `TrainingState` (where the epoch loop stands), the random states, the identity of a run
- writing: <run dir>/checkpoint-epoch<N>/ all or nothing (a temporary directory, fsync, the manifest last, a rename)
- finding and reading: the checkpoints whose manifest and files agree, newest first; damaged ones are passed over
- --resume: the run's own settings against the flags given now; the data, model and set-up it started with; the
  model, optimizer, GradScaler and random states as they were
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import UserError, broadcast_object, dtype_name, first_line, gather_objects, write_json

CHECKPOINT_FORMAT = 1
CHECKPOINT_PREFIX = "checkpoint-epoch"  # <run dir>/checkpoint-epoch<N>/, written as .checkpoint-epoch<N>.tmp/
WEIGHTS, BEST_WEIGHTS, TRAINING_STATE, MANIFEST = ("model.safetensors", "best-model.safetensors",
                                                   "training-state.pt", "manifest.json")
# settings that change how a run works, not what it computes: --resume may give them new values
# (--device and --dtype only while they resolve to the device type and dtype the run started with)
RESUME_MAY_CHANGE = frozenset({"debug", "log_interval", "cache_dir", "checkpoint_minutes", "device", "dtype"})


class TrainingRun(Protocol):
    """What checkpoints and --resume need of a run: bertcls.Run has all of it."""
    args: argparse.Namespace
    log: Callable[[str], None]
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    raw_model: torch.nn.Module  # the module trained and saved: its weights are checkpointed
    spec: Any  # its InputSpec (data.py); a resumed run must have the same max_len
    params: int
    dataset_digest: str


@dataclasses.dataclass
class TrainingState:
    """Where training stands after `epoch` epochs: what the epoch loop carries on, and a checkpoint keeps
    (with the weights, the optimizer, the GradScaler and the random states)."""
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps taken: the position in the learning-rate schedule
    train_seconds: float = 0.0
    history: list[dict] = dataclasses.field(default_factory=list)  # the rows of log.csv
    best: dict | None = None  # the best epoch so far: {"epoch", "val" (its metrics), "state" (its weights)}


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights on the CPU (copying also unties shared tensors, which safetensors refuses)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states: Python's, and torch's generator that dropout draws from."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def run_identity(config: dict) -> str:
    """What makes a run this run: a checkpoint that another run wrote is never taken for its own."""
    key = json.dumps([config.get("args"), config.get("dataset_digest"), config.get("started_at")], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- writing


def checkpoint_due(minutes: float, since: float, world_size: int) -> bool:
    """Whether --checkpoint_minutes have passed since `since` (time.monotonic()). Rank 0's clock decides
    for every rank: they write a checkpoint together."""
    return broadcast_object(minutes >= 0 and time.monotonic() - since >= minutes * 60, world_size)


def save_checkpoint(run: TrainingRun, run_dir: Path | None, run_id: str, training: TrainingState,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Checkpoint the epoch just done: every rank's random states go to rank 0, which writes it."""
    rngs = gather_objects(rng_state(run.device), run.world_size)
    if run_dir is None:
        return
    start = time.perf_counter()
    best_is_current = training.best["epoch"] == training.epoch  # its weights are the ones in hand: store them once
    state = {"epoch": training.epoch, "step": training.step, "train_seconds": training.train_seconds,
             "history": training.history, "best_epoch": training.best["epoch"], "best_val": training.best["val"],
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rngs}
    weights = training.best["state"] if best_is_current else cpu_state(run.raw_model)
    path = write_checkpoint(run_dir, training.epoch, run_id, weights,
                            None if best_is_current else training.best["state"], state)
    size = sum(f.stat().st_size for f in path.iterdir())
    run.log(f"checkpoint of epoch {training.epoch}: {size / 2**20:.1f} MiB written in "
            f"{time.perf_counter() - start:.2f}s -> {path}")


def write_checkpoint(run_dir: Path, epoch: int, run_id: str, weights: dict[str, torch.Tensor],
                     best_weights: dict[str, torch.Tensor] | None, state: dict) -> Path:
    """<run dir>/checkpoint-epoch<N>/, all or nothing: the files go to a temporary directory, its manifest
    last, which is then renamed into place; only after that are the older checkpoints removed. A kill or
    a full disk at any moment leaves the previous checkpoint whole; a failed write is a UserError."""
    path = run_dir / f"{CHECKPOINT_PREFIX}{epoch}"
    tmp = run_dir / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
    try:
        tmp.mkdir()
        save_weights(tmp / WEIGHTS, weights)
        if best_weights is not None:
            save_weights(tmp / BEST_WEIGHTS, best_weights)
        with open(tmp / TRAINING_STATE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        files = {f.name: f.stat().st_size for f in tmp.iterdir()}
        write_json(tmp / MANIFEST, {"format": CHECKPOINT_FORMAT, "epoch": epoch, "run": run_id, "files": files})
        shutil.rmtree(path, ignore_errors=True)  # an unusable one of this epoch, from before a resume
        os.replace(tmp, path)
        fsync_dir(run_dir)
    except BaseException as e:  # a signal included: the half-written directory goes, the previous one stays
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, RuntimeError, SafetensorError)):  # torch.save reports I/O as RuntimeError
            raise
        raise failed_write(f"the checkpoint of epoch {epoch}", run_dir, e) from e
    remove_checkpoints(run_dir, keep=path)
    return path


def failed_write(what: str, run_dir: Path, error: BaseException) -> UserError:
    """One line for a write in run_dir that failed (a full disk, a file system gone read-only): why, the space
    left, and how to go on once that is fixed: from the newest whole checkpoint, or from the start."""
    denied = getattr(error, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM)
    remedy = f"make {run_dir} writable" if denied else "free space"
    kept = last_complete_epoch(run_dir)
    then = (f"the checkpoint of epoch {kept} is kept: {remedy}, then continue with "
            f"`python bertcls.py --resume {run_dir}`" if kept else f"{remedy} and start the run again")
    return UserError(f"could not write {what} ({first_line(error)}; "
                     f"{shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free on its disk); {then}")


@contextlib.contextmanager
def writing(what: str, run_dir: Path) -> Iterator[None]:
    """A failed write of `what` in run_dir as failed_write's one line."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise failed_write(what, run_dir, e) from e


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    save_file(weights, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # on the disk before the manifest says it is there


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` survive a crash of the machine (POSIX; elsewhere a no-op)."""
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------- finding and reading


def checkpoint_epoch(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest epoch first, usable or not (read_checkpoint tells)."""
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_epoch, reverse=True)


def last_complete_epoch(run_dir: Path) -> int | None:
    """The epoch of the newest checkpoint written to the end (its manifest is there), for messages."""
    return next((checkpoint_epoch(p) for p in checkpoint_dirs(run_dir) if (p / MANIFEST).is_file()), None)


def remove_checkpoints(run_dir: Path, keep: Path | None = None) -> None:
    for path in [*checkpoint_dirs(run_dir), *run_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp")]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def read_manifest(path: Path, run_id: str) -> dict:
    """A checkpoint's manifest, checked against its files; ValueError says why the checkpoint is unusable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("half-written (no manifest)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable manifest ({first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a checkpoint of this bertcls.py's format")
    if manifest.get("run") != run_id or manifest.get("epoch") != checkpoint_epoch(path):
        raise ValueError("written by another run, or moved from another directory")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {WEIGHTS, TRAINING_STATE} <= files.keys() <= {
            WEIGHTS, BEST_WEIGHTS, TRAINING_STATE}:
        raise ValueError("its manifest lists the wrong files")
    for name, size in files.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise ValueError(f"{name} is damaged ({actual} bytes instead of {size})")
    return manifest


def usable_checkpoints(run_dir: Path, run_id: str) -> tuple[list[Path], list[str]]:
    """Checkpoints whose manifest and file sizes are right, newest first, and why each other one is not."""
    usable, problems = [], []
    for path in checkpoint_dirs(run_dir):
        try:
            read_manifest(path, run_id)
            usable.append(path)
        except ValueError as e:
            problems.append(f"{path.name}: {e}")
    return usable, problems


def read_checkpoint(path: Path, run_id: str) -> dict:
    """A checkpoint's weights and training state; ValueError says why it cannot be used."""
    manifest = read_manifest(path, run_id)
    try:
        weights = load_file(path / WEIGHTS)
        best_weights = load_file(path / BEST_WEIGHTS) if BEST_WEIGHTS in manifest["files"] else weights
        # weights_only: never runs code from the file; on the CPU first, or every rank would fill cuda:0
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot be read ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("epoch") != manifest["epoch"]:
        raise ValueError("its training state is not that of its epoch")
    return {"path": path, "weights": weights, "best_weights": best_weights, "state": state}


def no_checkpoint_error(run_dir: Path, problems: Sequence[str]) -> UserError:
    why = "; ".join(problems) or "it stopped before its first one (see --checkpoint_minutes)"
    return UserError(f"{run_dir} has no usable checkpoint to resume from ({why}): start the run again")


def load_resume_checkpoint(run: TrainingRun, run_dir: Path, run_id: str) -> dict:
    """The newest checkpoint that reads back whole (older ones when newer ones are damaged). Rank 0 picks
    it, so every rank resumes from the same one."""
    path, checkpoint, problems = None, None, []
    if run.rank == 0:
        for candidate in checkpoint_dirs(run_dir):
            try:
                path, checkpoint = candidate, read_checkpoint(candidate, run_id)
                break
            except ValueError as e:
                run.log(f"warning: not resuming from {candidate}: {e}")
                problems.append(f"{candidate.name}: {e}")
        if checkpoint is None:
            raise no_checkpoint_error(run_dir, problems)
    path = broadcast_object(path, run.world_size)
    if checkpoint is None:
        try:
            checkpoint = read_checkpoint(path, run_id)
        except ValueError as e:
            raise UserError(f"rank {run.rank} cannot read {path}: {e}") from None
    return checkpoint


# ------------------------------------------------------------------------------------------ --resume


def resumed_settings(run_dir: Path, config: Any, defaults: dict[str, Any],
                     given: dict[str, Any]) -> argparse.Namespace:
    """The settings a run resumes with: its own (config.json's "args"; `defaults` for settings newer than the run),
    and of the flags `given` on the command line those in RESUME_MAY_CHANGE; any other given flag must agree."""
    saved = config.get("args") if isinstance(config, dict) else None
    if not isinstance(saved, dict):
        raise UserError(f"--resume {run_dir}: not a run directory (its config.json has no \"args\")")
    if unknown := sorted(saved.keys() - defaults.keys()):
        raise UserError(f"--resume {run_dir}: the run has settings this bertcls.py does not know "
                        f"({', '.join(unknown)}); resume it with the version that started it")
    settings = {**defaults, **saved, "resume": str(run_dir)}
    for name, value in given.items():
        run_value = saved.get(name, defaults[name])
        if name in RESUME_MAY_CHANGE:
            settings[name] = value
        elif name != "resume" and value != run_value:
            raise UserError(f"--{name} {value} contradicts the run's --{name} {run_value} "
                            f"(in {run_dir / 'config.json'}): leave it out to resume, or start a new run")
    usable, problems = usable_checkpoints(run_dir, run_identity(config))
    if not usable:
        raise no_checkpoint_error(run_dir, problems)
    return argparse.Namespace(**settings)


def check_resumable(run: TrainingRun, config: dict) -> None:
    """Refuse to continue a run with data, a model or a set-up that would change what it computes."""
    if run.dataset_digest != config.get("dataset_digest"):
        raise UserError(f"the dataset in {run.args.dataset_dir} changed since the run started (its digest differs "
                        "from the one in config.json): restore it, or start a new run")
    if (run.params, run.spec.max_len) != (config.get("params"), config.get("max_seq_len_used")):
        raise UserError(f"{run.args.model_name} is not the model the run started with ({run.params} parameters, "
                        f"max_seq_len {run.spec.max_len}; config.json: {config.get('params')}, "
                        f"{config.get('max_seq_len_used')}): restore it, or start a new run")
    here = {"device": run.device.type, "dtype": dtype_name(run.dtype), "world size": run.world_size}
    there = {"device": torch.device(config.get("device", "cpu")).type, "dtype": config.get("dtype"),
             "world size": config.get("world_size")}
    for what in here:
        if here[what] != there[what]:
            raise UserError(f"the run started with {what} {there[what]}, here it would be {here[what]}: resume it "
                            "on the same kind of device, dtype and number of processes (--device, --dtype, torchrun)")


def restore(checkpoint: dict, run: TrainingRun, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler) -> TrainingState:
    """Model, optimizer, GradScaler and this rank's random states as they were after the checkpoint's epoch."""
    state = checkpoint["state"]
    try:
        run.raw_model.load_state_dict(checkpoint["weights"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{checkpoint['path']} does not fit {run.args.model_name} ({first_line(e)}): the model "
                        "changed since the run started; start a new run") from None
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][run.rank], run.device)
    best = {"epoch": state["best_epoch"], "val": state["best_val"], "state": checkpoint["best_weights"]}
    return TrainingState(state["epoch"], state["step"], state["train_seconds"], state["history"], best)
