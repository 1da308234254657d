"""What every bertcls script keeps doing: errors, flags, files, progress, devices and processes.

Nothing here is about BERT, models, datasets or training; every other file may import it, it imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

try:
    import fcntl
except ImportError:  # Windows: locks are not taken
    fcntl = None

EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM = 1, 130, 143


# ------------------------------------------------------------------------------------------------------ errors


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit code 1."""


class Terminated(Exception):
    """SIGTERM, raised so that a run unwinds like a Ctrl-C."""


def log(message: str) -> None:
    """Messages go to stderr: stdout carries only a script's result (a table, JSON lines)."""
    print(message, file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def explain_os_error(e: OSError) -> str:
    """Any OSError (a path too long, a full disk, no permission) in one line naming the path: worded only here."""
    where = "" if e.filename is None else f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") + ": "
    return f"{where}{e.strerror or first_line(e)}: check the path, its permissions and the free space"


def run_cli(script: str, work: Callable[[], int], debug: bool = False, stopped: Callable[[], str] | None = None,
            oom_advice: str = "lower --batch_size or --max_seq_len", who: str = "") -> int:
    """Run a script's work; every way it can fail that a user can act on ends as one line on stderr.

    UserError, an OSError (named by explain_os_error), out of memory: the line and exit 1. Ctrl-C: 130, SIGTERM: 143, each with
    `stopped()` (what was kept). --debug or BERTCLS_DEBUG=1 re-raises, so Python prints the traceback. `who` (such as
    " [rank 1]") follows the script's name; with it, a bug is named in one line before its traceback.
    """
    debug = debug or os.environ.get("BERTCLS_DEBUG") == "1"

    def say(message: str) -> None:
        print(f"{script}{who}: {message}", file=sys.stderr, flush=True)

    def raise_terminated(*_: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return work()
    except (KeyboardInterrupt, Terminated) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        say(("interrupted" if interrupted else "terminated") + (f"; {stopped()}" if stopped else ""))
        return EXIT_SIGINT if interrupted else EXIT_SIGTERM
    except (UserError, torch.OutOfMemoryError, OSError) as e:
        if debug:
            raise
        message = (f"out of memory: {oom_advice}" if isinstance(e, torch.OutOfMemoryError)
                   else explain_os_error(e) if isinstance(e, OSError) else str(e))
        say(f"error: {message}")
        return EXIT_ERROR
    except Exception as e:
        if who:  # under torchrun, name the failing rank before its traceback mixes with the others'
            say(f"error: {type(e).__name__}: {first_line(e)} (traceback below)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------------- flags


def number(kind: type, what: str, ok: Callable[[float], bool] = lambda value: True) -> Callable[[str], Any]:
    """An argparse type: a finite int or float for which ok() holds, checked where the flag is parsed."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_int = number(int, "a positive integer", lambda v: v > 0)
positive_float = number(float, "a positive number", lambda v: v > 0)
non_negative_float = number(float, "a number >= 0", lambda v: v >= 0)
finite_float = number(float, "a finite number")
seed_int = number(int, "a seed from 0 to 4294967295", lambda v: 0 <= v < 2**32)


# ------------------------------------------------------------------------------------------------------- files


def atomic_write(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one; the new one gets the usual permissions (umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def jsonl_line(row: dict) -> str:
    # json leaves these unescaped, and str.splitlines() would cut a line at them
    line = json.dumps(row, ensure_ascii=False)
    return line.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def parse_json(text: str, where: str) -> Any:
    """A JSON value; invalid JSON, or text that is no text (an escaped lone surrogate), is a UserError at `where`."""
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); fix or remove it") from None
    except UnicodeEncodeError:
        raise UserError(f"{where}: holds a lone surrogate escape such as \\ud800, which is not text; fix it") from None
    return value


def read_json(path: Path) -> Any:
    """A JSON file's value; a file that is not UTF-8 JSON is a UserError naming it."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8; convert it to UTF-8") from None
    return parse_json(text, str(path))


def iter_jsonl(path: Path) -> Iterator[tuple[int, int, int, dict]]:
    """(line number, start byte, end byte, object) of each non-empty line, read as a stream.

    Lines end at "\\n" only (JSON strings may hold U+2028); a bad line is a UserError naming file:line.
    """
    with open(path, "rb") as f:
        start = 0
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if start == 0 else "utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{number}: not UTF-8; convert the file to UTF-8") from None
            if text.strip():
                row = parse_json(text, f"{path}:{number}")
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield number, start, start + len(raw), row
            start += len(raw)


def refuse_overwrite(outputs: Sequence[tuple[str, Path]], inputs: Sequence[Path]) -> None:
    """Refuse to write an output that is an input, or a directory holding one, however the path is spelled.

    `outputs` are (flag, path) pairs; `inputs` every file or directory the command reads.
    """
    for flag, output in outputs:
        target = Path(os.path.realpath(output))
        for source in map(Path, inputs):
            source = Path(os.path.realpath(source))
            if source == target or target in source.parents:
                raise UserError(f"{flag} {output} would overwrite the input {source}: write somewhere else")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_tensors(path: Path, tensors: dict[str, dict | None], state: dict) -> Path:
    """A directory of <name>.safetensors files and a state.pt, then digests.json: a digest of each file. Written
    under a temporary name and renamed, so that it exists whole or not at all."""
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, weights in tensors.items():
            if weights is not None:
                save_file(weights, tmp / f"{name}.safetensors")
        torch.save(state, tmp / "state.pt")
        write_json(tmp / "digests.json", {f.name: sha256(f) for f in sorted(tmp.iterdir())})
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_tensors(path: Path) -> tuple[dict[str, dict], dict]:
    """What save_tensors wrote, once every file matches its digest; damage of any kind is a one-line UserError
    (never torch's advice to unpickle the file unchecked)."""
    from safetensors.torch import load_file
    try:
        digests = json.loads((path / "digests.json").read_text())
        damaged = [name for name, digest in digests.items() if sha256(path / name) != digest]
        if not damaged:
            tensors = {f.name.removesuffix(".safetensors"): load_file(f) for f in path.glob("*.safetensors")}
            return tensors, torch.load(path / "state.pt", weights_only=True)
        why = f"{', '.join(damaged)} no longer match their digests"
    except Exception as e:  # only its type: torch's message would advise unpickling the file unchecked
        why = f"it does not read back: {type(e).__name__}"
    raise UserError(f"{path} is damaged ({why}): start again without it")


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[Any]:
    """Hold an exclusive lock on `path` (made if need be) or fail at once naming the holder's pid.

    flock: the OS drops it when the process ends, SIGKILL included, so a lock is never left stale. The open file is
    yielded, so that a child process can inherit the lock (subprocess pass_fds).
    """
    with open(path, "a+", encoding="utf-8") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise UserError(f"{what} is in use by another process (pid {f.read().strip() or '?'}): wait for it "
                                "to end or stop it first") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield f


# ---------------------------------------------------------------------------------------------------- progress


class Progress:
    """Progress on stderr: a tqdm bar on a terminal; elsewhere (nohup, CI, a sweep's logs) plain lines, one every
    `every` seconds, or one per report() when every is None."""

    def __init__(self, total: float, desc: str, unit: str = "examples", enabled: bool = True,
                 every: float | None = 30.0):
        self.total, self.desc, self.unit, self.enabled, self.every = total, desc, unit, enabled, every
        self.done, self.started = 0.0, time.monotonic()
        self.shown, self.fields = self.started, {}
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm  # installed with transformers
            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", dynamic_ncols=True, leave=False)

    def update(self, n: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.every is not None and time.monotonic() - self.shown >= self.every:
            self.report(**self.fields)

    def report(self, **fields: str) -> None:
        """Figures beside the count (a step, a loss): the bar's postfix on a terminal, else a line now."""
        self.fields, self.shown = fields, time.monotonic()
        if self.bar is not None:
            self.bar.set_postfix(fields)
        elif self.enabled:
            seconds = time.monotonic() - self.started
            rate = self.done / seconds if seconds > 0 else 0.0
            left = f"{(self.total - self.done) / rate:.0f}s left" if rate > 0 else "? left"
            log(f"{self.desc}: {self.done:.0f}/{self.total:.0f} {self.unit} ({100 * self.done / (self.total or 1):.0f}%)"
                f", {rate:.0f} {self.unit}/s, {left}" + "".join(f", {k} {v}" for k, v in fields.items()))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------- devices and processes


def dist_env() -> tuple[int, int, int, bool]:
    """(rank, local rank, world size, started by torchrun) from torchrun's environment."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)), "LOCAL_RANK" in env


def pick_device(requested: str | None, local_rank: int | None = None) -> torch.device:
    """--device (default cuda when there is one, else cpu), made current; under torchrun cuda:LOCAL_RANK."""
    requested = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown --device {requested!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {requested!r} is not supported: use cpu or cuda")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here: use --device cpu")
    if local_rank is not None:
        if device.index is not None:
            raise UserError(f"--device {requested} cannot be used under torchrun, where each process takes "
                            "cuda:LOCAL_RANK: pass --device cuda and choose GPUs with CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local_rank)
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device.index >= torch.cuda.device_count():
        raise UserError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(device)  # kernels and the caching allocator use this GPU, not GPU 0
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 where the hardware multiplies it natively (GPUs from Ampere, CPUs with AVX512-BF16 or
    AMX), fp16 with a GradScaler on older GPUs (bf16 is emulated there, slowly), fp32 on other CPUs."""
    if requested != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return torch.bfloat16 if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16") else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's obj, in rank order (one process: [obj])."""
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, world_size: int) -> Any:
    """Rank 0's obj on every rank."""
    if world_size == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
