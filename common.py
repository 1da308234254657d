"""Things every bertcls script keeps doing: errors, files, flags, devices, run directories, the command-line tail.

What this module is not about: BERT, tokenizers, models, datasets or training. It imports only the standard
library and torch (and tqdm, which transformers installs, for progress bars on a terminal), and every other file
of the project may import it (nothing here imports them back).

- errors: `UserError` (a problem the user can fix, printed as one line) and `run_cli`, the one place that turns
  a UserError, an out-of-memory error, Ctrl-C or SIGTERM into a one-line message and an exit code
- files: atomic writes, and JSON / JSONL reading whose errors name the file and line
- progress: bars on a terminal, plain lines in logs
- flags: argparse validators
- devices: torchrun's environment and the collectives of its processes, the device and the autocast dtype
- run directories: outputs/<model>/<date>/<time>/, and a lock that keeps two processes out of one
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch

try:
    import fcntl
except ImportError:  # Windows: run directories are then not guarded against two processes
    fcntl = None

EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM = 1, 130, 143
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape in U+D800..U+DFFF


# ------------------------------------------------------------------------------------------- errors


class UserError(Exception):
    """A problem the user can fix: run_cli prints it as one line and exits non-zero."""


class Terminated(Exception):
    """Raised by the SIGTERM handler so that a run unwinds like a Ctrl-C."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def log(message: str) -> None:
    """Progress and warnings go to stderr, so that stdout carries only a script's result (a table, JSON)."""
    print(message, file=sys.stderr, flush=True)


def debug_requested(flag: bool = False) -> bool:
    """--debug, or BERTCLS_DEBUG=1 in the environment (which also reaches sweep.py's child runs)."""
    return flag or os.environ.get("BERTCLS_DEBUG") == "1"


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def run_cli(script: str, work: Callable[[], int], debug: bool = False, stopped: Callable[[], str] | None = None,
            oom_advice: str = "lower --batch_size or --max_seq_len", who: str = "") -> int:
    """Run a script's work and turn the ways it can end into one line on stderr and an exit code.

    UserError -> its message, exit 1; out of memory -> oom_advice, exit 1; Ctrl-C -> 130 and SIGTERM -> 143,
    each with the line `stopped()` returns (what was kept). With debug (--debug or BERTCLS_DEBUG=1) errors
    are re-raised, so Python prints the traceback. `who` (e.g. " [rank 1]") is added after the script name;
    with it, any other exception (a bug, a failed collective) is also named in one line before its traceback.
    """
    debug = debug_requested(debug)

    def say(message: str) -> None:
        print(f"{script}{who}: {message}", file=sys.stderr, flush=True)

    previous_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return work()
    except (KeyboardInterrupt, Terminated) as e:
        name = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        say(f"{name}; {stopped()}" if stopped else name)
        return EXIT_SIGINT if isinstance(e, KeyboardInterrupt) else EXIT_SIGTERM
    except torch.OutOfMemoryError:
        if debug:
            raise
        say(f"error: out of memory: {oom_advice}")
        return EXIT_ERROR
    except UserError as e:
        if debug:
            raise
        say(f"error: {e}")
        return EXIT_ERROR
    except Exception as e:
        if who:  # under torchrun, name the rank that failed before its traceback mixes with the others'
            say(f"error: {type(e).__name__}: {first_line(e)} (traceback below)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


# -------------------------------------------------------------------------------------------- flags


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


# -------------------------------------------------------------------------------------------- files


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
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
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def not_utf8(where: str, line: int, byte: int, advice: str = "convert the file to UTF-8") -> UserError:
    return UserError(f"{where}:{line}: not UTF-8 (byte 0x{byte:02x}); {advice}")


def decode_utf8(data: bytes, where: str, advice: str = "convert the file to UTF-8") -> str:
    """Decode UTF-8 (a leading BOM is dropped); a bad byte is a UserError naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise not_utf8(where, data.count(b"\n", 0, e.start) + 1, data[e.start], advice) from None


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn the ways opening or reading a file fails into a UserError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; expected a file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def read_bytes(path: Path) -> bytes:
    with reading(path):
        return Path(path).read_bytes()


class Line(NamedTuple):
    number: int  # 1-based
    start: int  # byte offsets of the line in its file, its end of line included
    end: int
    text: str


def iter_lines(path: Path, digest: Any = None) -> Iterator[Line]:
    """The lines of a UTF-8 file, read as a stream (a file larger than memory is fine); a leading BOM is dropped.

    Lines end at "\n" only: JSON strings may hold U+2028 and other characters str.splitlines() breaks at.
    `digest` (a hashlib object), when given, is fed every byte of the file.
    """
    with reading(path), open(path, "rb") as f:
        start = 0
        for number, raw in enumerate(f, 1):
            if digest is not None:
                digest.update(raw)
            try:
                text = raw.decode("utf-8-sig" if start == 0 else "utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(str(path), number, raw[e.start]) from None
            yield Line(number, start, start + len(raw), text)
            start += len(raw)


def read_json(path: Path, hint: str = "") -> Any:
    """A JSON file's value; unreadable, non-UTF-8 or invalid JSON is a UserError naming file and line."""
    text = decode_utf8(read_bytes(path), str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}){'; ' + hint if hint else ''}") from None


def parse_json_object(line: str) -> dict:
    """One JSONL line as an object; ValueError says what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg}); fix or remove that line") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    # json accepts an escaped lone surrogate ("\ud800"), which is no text: tokenizers and UTF-8 writers fail on it
    if SURROGATE_ESCAPE.search(line):
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("holds a lone surrogate escape such as \\ud800, which is not text; fix or remove "
                             "that line") from None
    return row


def iter_jsonl(path: Path, digest: Any = None) -> Iterator[tuple[Line, dict]]:
    """Yield (line, object) for each non-empty line, reading the file as a stream (see iter_lines)."""
    for line in iter_lines(path, digest):
        if not line.text.strip():
            continue
        try:
            yield line, parse_json_object(line.text)
        except ValueError as e:
            raise UserError(f"{path}:{line.number}: {e}") from None


def read_jsonl(path: Path) -> list[dict]:
    """Read one JSON object per non-empty line; a bad line is a UserError naming file:line."""
    return [row for _, row in iter_jsonl(path)]


def jsonl_line(row: dict) -> str:
    # these three survive ensure_ascii=False unescaped, and str.splitlines() would break a line at them
    line = json.dumps(row, ensure_ascii=False)
    return line.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


# ----------------------------------------------------------------------------------------- progress

PROGRESS_EVERY_S = 30.0  # off a terminal: seconds between plain progress lines


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Progress of a long step on stderr: a tqdm bar on a terminal; elsewhere (nohup, CI, the logs of a sweep's
    runs) plain lines, since a bar's carriage returns make a log unreadable: one every PROGRESS_EVERY_S seconds,
    or with timed=False one at each report() (training reports every --log_interval optimizer steps)."""

    def __init__(self, total: float, desc: str, unit: str = "examples", enabled: bool = True, timed: bool = True):
        self.total, self.desc, self.unit, self.enabled, self.timed = total, desc, unit, enabled, timed
        self.done, self.started = 0, time.monotonic()
        self.shown = self.started
        self.fields: dict[str, str] = {}
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm  # installed with transformers
            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", dynamic_ncols=True, leave=False)

    def update(self, n: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.timed and time.monotonic() - self.shown >= PROGRESS_EVERY_S:
            self.shown = time.monotonic()
            log(self.line())

    def report(self, **fields: str) -> None:
        """Figures that go with the progress (a step, a loss): the bar's postfix on a terminal, else a line now."""
        self.fields = fields
        if self.bar is not None:
            self.bar.set_postfix(fields)
        elif self.enabled:
            self.shown = time.monotonic()
            log(self.line())

    def line(self) -> str:
        seconds = time.monotonic() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        percent = 100 * self.done / (self.total or 1)
        return (f"{self.desc}: {self.done:.0f}/{self.total:.0f} {self.unit} ({percent:.0f}%), "
                f"{rate:.0f} {self.unit}/s, {format_duration(left)} left"
                + "".join(f", {name} {value}" for name, value in self.fields.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ devices


class DistEnv(NamedTuple):
    """What torchrun tells a process about itself (rank 0 of 1, torchrun False, when not under torchrun)."""
    rank: int
    local_rank: int
    world_size: int
    torchrun: bool = False  # started by torchrun (even with one process): the run is a DDP job


def dist_env() -> DistEnv:
    return DistEnv(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("WORLD_SIZE", "1")), "LOCAL_RANK" in os.environ)


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's obj, in rank order (the process group's collectives; nothing to do for one process)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, world_size: int) -> Any:
    if world_size == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()


def pick_device(requested: str | None, local_rank: int | None = None) -> torch.device:
    """The device to use, made the current CUDA device: --device, else cuda when available; under torchrun
    (local_rank given), cuda:LOCAL_RANK."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown --device {requested!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available here: use --device cpu")
        if local_rank is not None:
            if device.index is not None:
                raise UserError(f"--device {requested} cannot be used under torchrun, where each process takes "
                                "cuda:LOCAL_RANK: pass --device cuda and choose GPUs with CUDA_VISIBLE_DEVICES")
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        # kernels, the caching allocator and the dtype check below then all use the chosen GPU, not GPU 0
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"--device {requested!r} is not supported: use cpu or cuda")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # absent before torch 2.5: assume none
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 in hardware (compute capability 8.0, Ampere, and later).

    Asked of `device`, not of the current GPU. Emulation does not count: a T4 or V100 runs bf16 emulated,
    slower than fp16 with a GradScaler.
    """
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 on a GPU with bf16 units (else fp16); bf16 on a CPU with bf16 units; else fp32."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]


def use_tf32(device: torch.device, dtype: torch.dtype) -> None:
    """fp32 on CUDA: let float32 matrix products use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation),
    several times faster on Ampere and later GPUs. bf16/fp16 runs and the CPU are left as they are."""
    if device.type == "cuda" and dtype == torch.float32:
        torch.set_float32_matmul_precision("high")


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The one autocast context of a run, to wrap forward + loss only; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------- run directories


def safe_name(model_name: str) -> str:
    """A model's directory name under the output directory: '/' becomes '__'."""
    return model_name.strip("/").removeprefix("./").replace("/", "__")


def check_output_dir(output_dir: Path, flag: str = "--output_dir") -> None:
    """Fail before any expensive work when output_dir cannot be a directory."""
    for path in (output_dir, *output_dir.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == output_dir else f"is under {path}, which is a file"
            raise UserError(f"{flag} {output_dir} {where}: pass a directory")


def check_writable(directory: Path, flag: str = "--output_dir") -> None:
    """Fail before any expensive work when nothing can be created in directory, or in the part of its path that
    exists (a read-only file system, no permission): a temporary file is made there and removed at once.
    A full disk passes (an empty file takes no space): writing the results says so when it comes to that."""
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"cannot write in {existing} ({e.strerror}): {flag} needs a directory you can write to") \
            from None


def make_run_dir(output_dir: Path, model_name: str, now: datetime.datetime | None = None) -> Path:
    """A new outputs/<model>/<YYYY-MM-DD>/<HH-MM-SS.ffffff>/ directory."""
    now = now or datetime.datetime.now()
    check_output_dir(output_dir)
    run_dir = output_dir / safe_name(model_name) / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S.%f")
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except OSError as e:
        raise UserError(f"cannot create the run directory {run_dir} ({e.strerror})") from None
    return run_dir


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Keep every other process out of run_dir while this one works in it, so two never write one run.

    The lock is an flock on <run_dir>/.lock, which the OS drops when the process ends, even by SIGKILL:
    a killed run never leaves its directory locked.
    """
    if fcntl is None:
        yield
        return
    try:
        lock = open(run_dir / ".lock", "a+", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write in {run_dir} ({e.strerror}): a run writes in its directory") from None
    with lock as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise UserError(f"{run_dir} is in use by another process (pid {holder}): wait for it to end "
                            "or stop it first") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
