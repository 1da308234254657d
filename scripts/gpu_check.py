"""One check of bertcls on a CUDA machine, in one call: the CUDA tests, then bench.py on a model of BERT-base's shape.

    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py                # full logs to $OUT (else ./gpu-check/)
    python scripts/gpu_check.py --budget_s 300 --max_s 420 --out_dir /tmp/check

1. the machine: Python, torch, transformers, GPU, compute capability
2. python -m pytest tests/test_cuda.py: bf16 end to end, fp16 with the GradScaler, --compile, gradient
   checkpointing, a 1-process torchrun over nccl, unpadded batches without a mask, no host sync per step
3. a random model of BERT-base's shape (scripts/make_tiny.py: 12 layers, hidden 768, 12 heads, vocab 32000) and a
   synthetic corpus whose articles all fill 512 tokens, made ready by prepare.py: nothing is downloaded
4. bench.py at --max_seq_len 512 --batch_size 32 --dtype bf16, eager then --compile, each followed by profiled
   steps; then, while --budget_s lasts, eager at batch 64 and 128, eager with a mask on every batch (as before
   unpadded batches went without one) and compiled at batch 64. Every part is cut short so that the summary is
   printed within --max_s
5. a summary table, printed last: examples/s, MFU against the measured bf16 matmul peak, peak memory, step time,
   host time building batches per step, GPU idle and host syncs in the profiled steps, and the 45% MFU target

Without CUDA the tests are skipped and step 4 trains a 2-layer model on the CPU for a few steps, to check the
pieces; the summary says what was skipped. Every part's full output is written to --out_dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
MFU_TARGET = 0.45
TESTS_MAX_S = 180
BERT_BASE = ["--layers", "12", "--hidden", "768", "--heads", "12", "--vocab_size", "32000"]
# (name, bench.py flags, seconds it may need, essential): an essential setting always runs (for at most its
# seconds); another starts only if the budget still holds its seconds
GPU_SETTINGS = [
    ("eager b32", [], 120, True),
    ("compile b32", ["--compile"], 240, True),
    # on an H100 (2026-11-27) eager b64 and b128 gave 31% and 35% MFU, compiled b32/b64 23-24%: eager first
    ("eager b64", ["--batch_size", "64"], 60, False),
    ("eager b128", ["--batch_size", "128"], 90, False),
    ("eager b32 masked", ["--always_mask"], 60, False),  # as before unpadded batches lost their mask: no flash
    ("compile b64", ["--compile", "--batch_size", "64"], 150, False),
]
GPU_BENCH = ["--device", "cuda", "--dtype", "bf16", "--max_seq_len", "512", "--batch_size", "32",
             "--steps", "20", "--warmup", "5", "--profile_steps", "5"]
CPU_BENCH = ["--device", "cpu", "--max_seq_len", "64", "--batch_size", "8", "--steps", "3", "--warmup", "1",
             "--profile_steps", "2"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.environ.get("OUT") or "gpu-check",
                   help="where the logs and summary.json go (default: $OUT, else gpu-check)")
    p.add_argument("--work_dir", default=None, help="where the model and data are made (default: a temporary dir)")
    p.add_argument("--budget_s", type=float, default=420,
                   help="seconds after the start past which optional bench settings are left out "
                        "(default: %(default)s)")
    p.add_argument("--max_s", type=float, default=540,
                   help="seconds within which the summary is printed: parts still running are stopped "
                        "(default: %(default)s)")
    return p.parse_args(argv)


@dataclasses.dataclass
class Budget:
    soft: float  # time.monotonic() past which optional parts do not start
    hard: float  # time.monotonic() by which everything must have ended

    def left(self) -> float:
        return self.soft - time.monotonic()

    def timeout(self, cap: float) -> float:
        """A part's time limit: its own cap, cut to end before the hard deadline (the summary needs a moment)."""
        return max(1.0, min(cap, self.hard - time.monotonic() - 10))


def say(message: str) -> None:
    print(message, flush=True)


def environment() -> dict[str, Any]:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": metadata.version("transformers"), "cuda": torch.version.cuda,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if info["gpus"]:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                 "gpu_memory_gb": round(props.total_memory / 2**30, 1)}
    return info


def run_part(name: str, command: list[str], out_dir: Path, timeout: float) -> tuple[int | None, str, float]:
    """Run one part as a subprocess with its output in out_dir/<name>.log: (exit code or None on timeout,
    output, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    # its own process group, so that a timeout also stops what it started (torchrun's workers, compile workers)
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
            rc = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            rc = None
    seconds = time.monotonic() - start
    (out_dir / f"{name.replace(' ', '-')}.log").write_text(output, encoding="utf-8")
    return rc, output, seconds


def tail(output: str, lines: int) -> str:
    return "\n".join("    " + line for line in output.strip().splitlines()[-lines:])


def pytest_status(rc: int | None, output: str, cuda: bool) -> str:
    last = output.strip().splitlines()[-1] if output.strip() else ""
    if rc is None:
        return "FAIL: timed out"
    if not cuda:
        return f"SKIPPED (no CUDA): {last}"
    return ("PASS: " if rc == 0 else "FAIL: ") + last


def make_model_and_data(work: Path, out_dir: Path, cuda: bool, budget: Budget) -> tuple[Path, Path, str]:
    """A random model and a prepared synthetic corpus: BERT-base's shape with 512-token articles on CUDA,
    the 2-layer default with short ones on the CPU."""
    model, data, dataset = work / "model", work / "long.jsonl", work / "dataset"
    shape = BERT_BASE if cuda else []
    corpus = ["--per_category", "300", "--min_sentences", "24", "--max_sentences", "32"] if cuda else \
        ["--per_category", "40", "--min_sentences", "3", "--max_sentences", "6"]
    for name, command in [
        ("make-model", [sys.executable, "scripts/make_tiny.py", "--model_dir", str(model), "--data", str(data),
                        *shape, *corpus]),
        ("prepare", [sys.executable, "prepare.py", "--input", str(data), "--text_fields", "title,body",
                     "--label_field", "category", "--output_dir", str(dataset)]),
    ]:
        rc, output, _ = run_part(name, command, out_dir, budget.timeout(120))
        if rc != 0:
            raise RuntimeError(f"{name} failed (exit {rc}):\n{tail(output, 10)}")
    return model, dataset, "BERT-base shape (12 x 768, vocab 32000)" if cuda else "2-layer tiny BERT"


def bench_row(name: str, rc: int | None, output: str, seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "seconds": round(seconds, 1)}
    lines = output.strip().splitlines()
    if rc == 0 and lines:
        try:
            row |= {"status": "OK", **json.loads(lines[-1])}
            return row
        except json.JSONDecodeError:
            pass
    row["status"] = "FAIL: timed out" if rc is None else f"FAIL: exit {rc}: {lines[-1] if lines else ''}"[:200]
    return row


def run_benches(model: Path, dataset: Path, work: Path, out_dir: Path, cuda: bool, budget: Budget) -> list[dict]:
    common = ["--model_name", str(model), "--dataset_dir", str(dataset), "--cache_dir", str(work / "cache"),
              "--output_dir", str(work / "outputs")]
    settings = GPU_SETTINGS if cuda else [("eager cpu smoke", [], 300, True)]
    rows = []
    for name, flags, needs_s, essential in settings:
        left = budget.left()
        if not essential and left < needs_s:
            rows.append({"name": name, "status": f"SKIPPED: {max(left, 0):.0f} s left of the budget, "
                                                 f"needs ~{needs_s} s"})
            say(f"== bench {name}: skipped (time budget)")
            continue
        command = [sys.executable, "bench.py", *common, *(GPU_BENCH if cuda else CPU_BENCH), *flags]
        say(f"== bench {name}: {' '.join(command[1:])}")
        # an essential setting keeps to its seconds, leaving the next its share; an optional one may run to the end
        limit = budget.timeout(needs_s if essential else float("inf"))
        rc, output, seconds = run_part(f"bench {name}", command, out_dir, limit)
        row = bench_row(name, rc, output, seconds)
        rows.append(row)
        human = [line for line in output.splitlines() if line.startswith("bertcls on ")]
        say(f"   {human[-1] if human else row['status']} ({seconds:.0f} s)")
        if row["status"] != "OK":
            say(tail(output, 8))
    if not cuda:
        rows += [{"name": name, "status": "SKIPPED: no CUDA"} for name, *_ in GPU_SETTINGS]
    return rows


def percent(value: Any, digits: int = 1) -> str:
    return "" if value is None else f"{100 * value:.{digits}f}%"


def number(value: Any, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def summary_table(env: dict, tests: str, model_note: str, rows: list[dict], cuda: bool, seconds: float = 0.0) -> str:
    header = (f"GPU check: {env.get('gpu', 'no GPU')} (capability {env.get('capability', '-')}), torch {env['torch']} "
              f"(CUDA {env['cuda']}), transformers {env['transformers']}, Python {env['python']}; {seconds:.0f} s")
    columns = ["bench setting", "status", "ex/s", "MFU", "peak GB", "step ms", "host data ms/step", "GPU idle",
               "syncs/profiled steps"]
    table = [columns]
    for r in rows:
        ok = r["status"] == "OK"
        table.append([r["name"], "OK" if ok else r["status"],
                      number(r.get("examples_per_s")) if ok else "", percent(r.get("mfu")) if ok else "",
                      number(r["peak_mem_mb"] / 1024, 2) if ok else "", number(r.get("step_ms")) if ok else "",
                      number(r.get("host_data_ms_per_step"), 2) if ok else "",
                      percent(r.get("gpu_idle_fraction"), 2) if ok else "",
                      f"{r['host_syncs']}/{r['profile_steps']}" if ok and r.get("host_syncs") is not None else ""])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(columns))]
    lines = ["", "=" * 100, header, f"CUDA tests (tests/test_cuda.py): {tests}",
             f"bench.py: {model_note}, " + ("512 tokens, bf16, 20 timed steps after 5, then 5 profiled"
                                            if cuda else "64 tokens, 3 timed steps: a check of the pieces only")]
    lines += ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    measured = [r for r in rows if r["status"] == "OK" and r.get("mfu") is not None]
    if cuda and measured:
        best = max(measured, key=lambda r: r["mfu"])
        peak = f"{best['peak_flops'] / 1e12:.0f} TFLOP/s ({best['peak_flops_source']})"
        verdict = "MET" if best["mfu"] >= MFU_TARGET else "NOT MET"
        lines.append(f"MFU target {percent(MFU_TARGET, 0)} at 512 bf16: {verdict}, best {percent(best['mfu'])} with "
                     f"'{best['name']}' (measured peak {peak})")
        idle = ", ".join(f"{r['name']} {percent(r.get('gpu_idle_fraction'), 2)}" for r in measured
                         if r.get("gpu_idle_fraction") is not None)
        lines.append(f"GPU idle in the profiled steps (no kernel or copy running; the profiler's host overhead "
                     f"included): {idle or 'not measured'}; syncs: train_epoch waits twice at its end, by design")
    elif not cuda:
        lines.append("SKIPPED without CUDA: the CUDA tests, bench.py on BERT-base's shape at 512 tokens (eager and "
                     "--compile, batch 32 and 64), the MFU target and the GPU idle measurement")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    budget = Budget(start + args.budget_s, start + args.max_s)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    cuda = env["gpus"] > 0
    say(f"== machine: {json.dumps(env)}")
    if not cuda:
        say("== no CUDA here: the CUDA tests will be skipped and bench.py runs a CPU smoke test only")

    say("== tests/test_cuda.py")
    rc, output, seconds = run_part("pytest-cuda", [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p",
                                                   "no:cacheprovider", "tests/test_cuda.py"], out_dir,
                                   budget.timeout(TESTS_MAX_S))
    tests = pytest_status(rc, output, cuda)
    say(f"   {tests} ({seconds:.0f} s)")
    if rc != 0:
        say(tail(output, 25))

    with tempfile.TemporaryDirectory(prefix="bertcls-gpu-check-") as tmp:
        work = Path(args.work_dir or tmp)
        say("== model and data: scripts/make_tiny.py + prepare.py")
        try:
            model, dataset, model_note = make_model_and_data(work, out_dir, cuda, budget)
            rows = run_benches(model, dataset, work, out_dir, cuda, budget)
        except RuntimeError as e:
            model_note, rows = f"not built: {e}", []
            say(str(e))
    summary = summary_table(env, tests, model_note, rows, cuda, time.monotonic() - start)
    (out_dir / "summary.json").write_text(json.dumps({"environment": env, "tests": tests, "bench": rows}, indent=2),
                                          encoding="utf-8")
    (out_dir / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    say(summary)
    ok = tests.startswith(("PASS", "SKIPPED")) and rows and all(not r["status"].startswith("FAIL") for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
