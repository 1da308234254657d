"""scripts/gpu_check.py on the CPU: its command lines are valid, its CPU path runs, its summary reads right."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import bench
import gpu_check
import make_tiny


def test_every_gpu_setting_is_a_valid_bench_command_line():
    """A typo here would only show on the GPU machine, where time is short."""
    common = ["--model_name", "m", "--dataset_dir", "d"]
    for name, flags, _, _ in gpu_check.GPU_SETTINGS:
        args = bench.parse_args([*common, *gpu_check.GPU_BENCH, *flags])
        assert (args.max_seq_len, args.dtype, args.device, args.profile_steps) == (512, "bf16", "cuda", 5)
        assert args.batch_size == int(name.split(" b")[1].split()[0]) and args.compile == ("compile" in name)
        assert args.always_mask == ("masked" in name)
    shape = make_tiny.parse_args(gpu_check.BERT_BASE)
    assert (shape.layers, shape.hidden, shape.heads, shape.vocab_size) == (12, 768, 12, 32000)


def test_cpu_path_builds_a_model_and_runs_bench(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    budget = gpu_check.Budget(soft=float("inf"), hard=float("inf"))
    model, dataset, note = gpu_check.make_model_and_data(work, out, cuda=False, budget=budget)
    rows = gpu_check.run_benches(model, dataset, work, out, cuda=False, budget=budget)
    assert [r["name"] for r in rows] == ["eager cpu smoke"] + [name for name, *_ in gpu_check.GPU_SETTINGS]
    assert rows[0]["status"] == "OK" and rows[0]["examples"] == 3 * 8 and rows[0]["profile_steps"] == 2
    assert all(r["status"] == "SKIPPED: no CUDA" for r in rows[1:])
    assert (out / "bench-eager-cpu-smoke.log").is_file()
    summary = gpu_check.summary_table({"torch": "t", "cuda": None, "transformers": "x", "python": "p"},
                                      "SKIPPED (no CUDA): 9 skipped", note, rows, cuda=False)
    assert summary.splitlines()[-1].startswith("SKIPPED without CUDA: the CUDA tests, bench.py on BERT-base's shape")


def gpu_row(name: str, mfu: float, idle: float) -> dict:
    return {"name": name, "status": "OK", "examples_per_s": 1000.0, "mfu": mfu, "peak_mem_mb": 10240.0,
            "step_ms": 30.0, "host_data_ms_per_step": 0.4, "gpu_idle_fraction": idle, "host_syncs": 2,
            "profile_steps": 5, "peak_flops": 8e14, "peak_flops_source": "bfloat16 matmul 8192x8192"}


@pytest.mark.parametrize("best, verdict", [(0.47, "MET"), (0.44, "NOT MET")])
def test_summary_names_the_best_setting_against_the_target(best, verdict):
    env = {"gpu": "H100", "capability": "9.0", "torch": "2.11", "cuda": "13.0", "transformers": "5.17",
           "python": "3.12"}
    rows = [gpu_row("eager b32", 0.40, 0.003), gpu_row("compile b32", best, 0.001),
            {"name": "compile b64", "status": "SKIPPED: 10 s left of the budget, needs ~150 s"}]
    lines = gpu_check.summary_table(env, "PASS: 9 passed", "BERT-base shape", rows, cuda=True).splitlines()
    assert lines[-2] == (f"MFU target 45% at 512 bf16: {verdict}, best {100 * best:.1f}% with 'compile b32' "
                         "(measured peak 800 TFLOP/s (bfloat16 matmul 8192x8192))")
    assert "eager b32 0.30%, compile b32 0.10%" in lines[-1]
    [eager] = [line for line in lines if line.startswith("eager b32")]
    assert eager.split() == ["eager", "b32", "OK", "1,000.0", "40.0%", "10.00", "30.0", "0.40", "0.30%", "2/5"]
    assert gpu_check.bench_row("x", None, "partial", 9.0)["status"] == "FAIL: timed out"
    assert gpu_check.bench_row("x", 1, "a\nbench.py: error: out of memory", 9.0)["status"] == \
        "FAIL: exit 1: bench.py: error: out of memory"


def test_a_part_past_its_time_is_stopped_with_what_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = (f"import subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              f"print('started', flush=True)\n"
              f"time.sleep(60)\n")
    rc, output, seconds = gpu_check.run_part("slow part", [sys.executable, "-c", script], tmp_path, timeout=3)
    assert rc is None and "started" in output and seconds < 30
    assert (tmp_path / "slow-part.log").read_text(encoding="utf-8") == output
    grandchild = int(pid_file.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
