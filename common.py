"""Plumbing every bertcls script shares (errors, flags, metrics, files, progress, devices); no models or data."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

try:
    import fcntl
except ImportError:  # Windows: no locks
    fcntl = None


class UserError(Exception):
    """A problem the user can fix: one line, exit code 1."""


LOG_LOCK = threading.Lock()


def log(message: str) -> None:
    """To stderr (stdout is for results), in whole lines even from sweep.py's threads."""
    with LOG_LOCK:
        print(message, file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def run_cli(script: str, work: Callable[[], int], debug: bool = False, stopped: Callable[[], str] | None = None,
            oom_advice: str = "lower --batch_size or --max_seq_len", who: str = "") -> int:
    """UserError, OSError or OOM: one line, exit 1 (--debug or BERTCLS_DEBUG=1: raised); Ctrl-C 130, SIGTERM 143."""

    def terminate(*_: Any) -> None:
        raise KeyboardInterrupt("terminated")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return work()
    except KeyboardInterrupt as e:
        how = str(e) or "interrupted"
        log(f"{script}{who}: {how}" + (f"; {stopped()}" if stopped else ""))
        return 143 if how == "terminated" else 130
    except (UserError, torch.OutOfMemoryError, OSError) as e:
        if debug or os.environ.get("BERTCLS_DEBUG") == "1":
            raise
        message = f"out of memory: {oom_advice}" if isinstance(e, torch.OutOfMemoryError) else str(e)
        if isinstance(e, OSError):
            where = "" if e.filename is None else f"{e.filename}{f' -> {e.filename2}' if e.filename2 else ''}: "
            message = f"{where}{e.strerror or first_line(e)}: check the path, its permissions and the free space"
        log(f"{script}{who}: error: {message}")
        return 1
    except Exception as e:
        if who:
            log(f"{script}{who}: error: {type(e).__name__}: {first_line(e)} (traceback below)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def number(kind: type, what: str, ok: Callable[[float], bool] = lambda v: True) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` for which ok() holds."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_int = number(int, "a positive integer", lambda v: v > 0)
positive_float = number(float, "a positive number", lambda v: v > 0)
non_negative_float = number(float, "a number >= 0", lambda v: v >= 0)
finite_float = number(float, "a finite number")
seed_int = number(int, "a seed from 0 to 4294967295", lambda v: 0 <= v < 2**32)


def confusion_scores(matrix: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Rows are gold. Accuracy; P/R/F1 per label and macro over labels in gold or predictions (as scikit-learn)."""
    per_label = {}
    for c, row in enumerate(matrix):
        tp, support, predicted = row[c], sum(row), sum(r[c] for r in matrix)
        if support or predicted:  # f1 = 2PR / (P + R)
            per_label[c] = {"precision": tp / (predicted or 1), "recall": tp / (support or 1),
                            "f1": 2 * tp / (support + predicted), "support": support}
    macro = {k: sum(c[k] for c in per_label.values()) / len(per_label) for k in ("precision", "recall", "f1")}
    accuracy = sum(row[c] for c, row in enumerate(matrix)) / sum(map(sum, matrix))
    return {"accuracy": accuracy, **macro, "per_label": per_label}


def atomic_write(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # write(2)'s errors (a full disk) name no file
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def jsonl_line(row: dict) -> str:
    # json leaves these unescaped, and str.splitlines() would cut a line at them
    return json.dumps(row, ensure_ascii=False).translate({c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}) + "\n"


def parse_json(text: str, where: str) -> Any:
    """A JSON value; invalid JSON or a lone surrogate escape is a UserError at `where`."""
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); fix or remove it") from None
    except UnicodeEncodeError:
        raise UserError(f"{where}: holds a lone surrogate escape (such as \\ud800), not text; fix it") from None
    return value


def decode_utf8(data: bytes, path: Path, line: int = 1) -> str:
    try:
        return data.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        line += data.count(b"\n", 0, e.start)
        raise UserError(f"{path}:{line}: not UTF-8; convert it to UTF-8") from None


def read_json(path: Path) -> Any:
    return parse_json(decode_utf8(path.read_bytes(), path), str(path))


def iter_jsonl(path: Path) -> Iterator[tuple[int, int, int, dict]]:
    """(line number, start byte, end byte, object) of each non-empty line; lines end at "\\n" only."""
    with open(path, "rb") as f:
        start = 0
        for number, raw in enumerate(f, 1):
            text = decode_utf8(raw, path, number)
            if text.strip():
                row = parse_json(text, f"{path}:{number}")
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                yield number, start, start + len(raw), row
            start += len(raw)


def refuse_overwrite(outputs: Sequence[tuple[str, Path]], inputs: Sequence[Path]) -> None:
    """Refuse an output (flag, path) that is, is inside or holds an input, however it is spelled."""
    for flag, output in outputs:
        target = Path(output).resolve()
        for source in (Path(i).resolve() for i in inputs):
            if source.is_relative_to(target) or target.is_relative_to(source):
                raise UserError(f"{flag} {output} would overwrite the input {source}: write somewhere else")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_tensors(path: Path, tensors: dict[str, dict | None], state: dict) -> Path:
    """<name>.safetensors, state.pt and digests.json, in a directory that appears whole."""
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
    """What save_tensors wrote, checked against its digests."""
    from safetensors.torch import load_file
    try:
        digests = read_json(path / "digests.json")
        damaged = [name for name, digest in digests.items() if sha256(path / name) != digest]
        if not damaged:
            tensors = {f.name.removesuffix(".safetensors"): load_file(f) for f in path.glob("*.safetensors")}
            return tensors, torch.load(path / "state.pt", weights_only=True)
        why = f"{', '.join(damaged)}: not the bytes written"
    except Exception as e:  # only its type: torch's message advises unpickling it unchecked
        why = f"it does not read back: {type(e).__name__}"
    raise UserError(f"{path} is damaged ({why}): start the run again")


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[Any]:
    """An exclusive flock on `path` (it dies with its process: never stale), else a UserError naming the holder."""
    with open(path, "a+", encoding="utf-8") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise UserError(f"{what} is in use by another process (pid {f.read().strip() or '?'}): wait for it "
                                "or stop it") from None
        f.truncate(0)
        print(os.getpid(), file=f, flush=True)
        yield f


class Progress(contextlib.AbstractContextManager):
    """A tqdm bar on a terminal, else (nohup, CI) a line every `every` seconds, or per report() if None."""

    def __init__(self, total: float, desc: str, unit: str = "examples", enabled: bool = True,
                 every: float | None = 30.0):
        self.total, self.desc, self.unit, self.enabled, self.every = total, desc, unit, enabled, every
        self.done, self.fields, self.bar = 0.0, {}, None
        self.started = self.shown = time.monotonic()
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", dynamic_ncols=True, leave=False)

    def update(self, n: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.every is not None and time.monotonic() - self.shown >= self.every:
            self.report(**self.fields)

    def report(self, **fields: str) -> None:
        """Figures beside the count (a loss): the bar's postfix, else a line now."""
        self.fields, self.shown = fields, time.monotonic()
        if self.bar is not None:
            self.bar.set_postfix(fields)
        elif self.enabled:
            rate = self.done / max(self.shown - self.started, 1e-9)
            left = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?"
            log(f"{self.desc}: {self.done:.0f}/{self.total:.0f} {self.unit} ({self.done / (self.total or 1):.0%}), "
                f"{rate:.0f} {self.unit}/s, {left} left" + "".join(f", {k} {v}" for k, v in fields.items()))

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def dist_env() -> tuple[int, int, int, bool]:
    """(rank, local rank, world size, started by torchrun)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)), "LOCAL_RANK" in env


def parse_device(requested: str | None) -> torch.device:
    """--device (default: cuda if any, else cpu), unchecked."""
    requested = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"(cpu|cuda)(:\d+)?", requested):
        raise UserError(f"unknown --device {requested!r}: use cpu, cuda or cuda:N")
    return torch.device(requested)


def pick_device(requested: str | None, local_rank: int | None = None) -> torch.device:
    """--device, checked and made current; under torchrun cuda:LOCAL_RANK."""
    device = parse_device(requested)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"--device {requested}: CUDA is not available here; use --device cpu")
    if local_rank is not None and device.index is not None:
        raise UserError(f"--device {requested}: torchrun gives each process cuda:LOCAL_RANK; pass --device cuda "
                        "(pick GPUs with CUDA_VISIBLE_DEVICES)")
    index = device.index if local_rank is None else local_rank
    device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    if device.index >= torch.cuda.device_count():
        raise UserError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(device)  # else kernels and the caching allocator use GPU 0
    return device


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtype's values but auto


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the hardware has it (Ampere+ GPUs, AVX512-BF16/AMX CPUs), else fp16 (GPU) or fp32."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_properties(device).major >= 8 else torch.float16
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # not in older torch
    return torch.bfloat16 if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16") else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
