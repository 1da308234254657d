"""Training throughput of bertcls.py's own loop: examples/s, tokens/s, padding, peak memory and MFU.

    python bench.py --model_name cl-tohoku/bert-base-japanese-v3 --steps 20 --warmup 3
    python bench.py --model_name DIR --dataset_dir DIR --max_seq_len 256 --batch_size 16 --device cpu
    python bench.py ... --compile            # torch.compile with length buckets, as bertcls.py --compile
    python bench.py ... --tutorial_style     # random batches, tokenizer called in every collate step
    python bench.py ... --dtype fp32         # full precision (auto: bf16 on CUDA and on CPUs with bf16 units)
    python bench.py ... --profile_steps 5    # then 5 more steps under torch.profiler: GPU idle, host syncs
    python bench.py ... --always_mask        # unpadded batches with a mask of ones too (no flash attention)

Builds the same `bertcls.Run` (tokenization cache included) and calls the same `train_epoch` that
bertcls.py trains with, on the first --warmup + --steps optimizer steps of its length-grouped epochs;
only the last --steps are timed. Every flag of bertcls.py is accepted (--dtype, --compile,
--grad_accum_steps, ...). MFU = training FLOPs per non-pad token (6 x non-embedding parameters +
12 x layers x hidden x sequence length) x non-pad tokens/s, over this device's peak, measured here: the
best of a large matmul in the run's autocast dtype (bf16 on CUDA and on CPUs with bf16 units, float32
otherwise; or --peak_flops). The last line of stdout is one JSON object.

Is the GPU kept fed? `host_data_ms_per_step` is the host's time spent building batches (collate, and pinning
on CUDA) per optimizer step, next to `step_ms`. With --profile_steps N, N more steps run under torch.profiler
with CUDA's sync debug mode on: `gpu_idle_fraction` is the share of that window in which no kernel or copy
ran on the GPU (the host did not keep up; the profiler's own overhead on the host makes it an upper bound),
and `host_syncs` counts the operations that made the host wait for the GPU (train_epoch makes 2 at its end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import bertcls
import data
from common import dtype_name, first_line, log, pick_device, positive_float, positive_int, run_cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="All other flags are bertcls.py's (see python bertcls.py -h).")
    p.add_argument("--steps", type=positive_int, default=20,
                   help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed optimizer steps first: compilation, allocator, caches (default: %(default)s)")
    p.add_argument("--tutorial_style", action="store_true",
                   help="the tutorial's loop for comparison: random batches, tokenized in every collate step "
                        "(default: off)")
    p.add_argument("--always_mask", action="store_true",
                   help="for comparison: give unpadded batches an attention mask of ones too, which keeps SDPA "
                        "off its flash kernel (default: off)")
    p.add_argument("--peak_flops", type=positive_float, default=None,
                   help="the device's peak FLOP/s for MFU (default: measured with a large matmul)")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="optimizer steps to run after the timed ones under torch.profiler, for the GPU's idle "
                        "time and the host syncs (default: %(default)s, none)")
    own, rest = p.parse_known_args(argv)
    for name in ("warmup", "profile_steps"):
        if getattr(own, name) < 0:
            p.error(f"argument --{name}: must be >= 0, got {getattr(own, name)}")
    args = bertcls.parse_args(rest)
    for name, value in vars(own).items():
        setattr(args, name, value)
    return args


def flops_per_token(params_non_embedding: int, layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) + 12 L H T for attention scores."""
    return 6 * params_non_embedding + 12 * layers * hidden * seq_len


def model_shape(config: Any) -> tuple[int, int]:
    """(layers, hidden size) of a transformers config, whatever the model family calls them."""
    layers = next(getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k))
    hidden = next(getattr(config, k) for k in ("hidden_size", "n_embd", "d_model", "dim") if hasattr(config, k))
    return layers, hidden


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, reps: int = 10) -> tuple[float, str]:
    """Best FLOP/s of a large square matmul in the dtype the run computes in (bf16 for bf16 autocast)."""
    dtype = torch.float32 if dtype == torch.float32 else dtype
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for rep in range(reps + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        synchronize(device)
        if rep >= 2:  # the first two warm up the kernel choice and the caches
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best, f"{dtype_name(dtype)} matmul {n}x{n}"


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: most memory allocated by tensors; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def grouped_batches(run: bertcls.Run, n_batches: int) -> list[list[int]]:
    """The first n_batches of bertcls.py's own epochs (length-grouped), continuing into later epochs."""
    batches: list[list[int]] = []
    epoch = 1
    while len(batches) < n_batches:
        batches += bertcls.train_batches(run, epoch)
        epoch += 1
    return batches[:n_batches]


def random_batches(n_examples: int, batch_size: int, n_batches: int, rng: random.Random) -> list[list[int]]:
    """The tutorial's DataLoader(shuffle=True): a fresh permutation per epoch, cut into batches."""
    batches: list[list[int]] = []
    while len(batches) < n_batches:
        order = list(range(n_examples))
        rng.shuffle(order)
        batches += [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]
    return batches[:n_batches]


def tutorial_collate(tokenizer: Any, rows: Sequence[dict], spec: data.InputSpec) -> Callable:
    """A collate step that tokenizes its batch's texts, as the tutorial's collate_fn does every epoch.

    It makes the tutorial's one batched tokenizer call (padding=True, return_tensors="pt") rather than reuse
    data.tokenize_rows: that call is the cost being measured (bertcls.py's per-row path ran 9-16% faster here).
    """

    def collate(packed: Any, indices: Sequence[int], labels: torch.Tensor | None, pad_id: int,
                buckets: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        texts = [data.example_text(rows[i]) for i in indices]
        kwargs = dict(max_length=spec.max_len, padding=True, return_tensors="pt",
                      return_token_type_ids=spec.token_type_ids)
        if all(second is not None for _, second in texts):
            enc = tokenizer([f for f, _ in texts], [s for _, s in texts], truncation="only_second", **kwargs)
        else:
            enc = tokenizer([f if s is None else f + "\n" + s for f, s in texts], truncation=True, **kwargs)
        batch = dict(enc)
        if labels is not None:
            batch["labels"] = labels[list(indices)]
        return batch

    return collate


def counting(collate_fn: Callable, counts: dict[str, float], device: torch.device, always_mask: bool = False
             ) -> Callable:
    """collate_fn that also adds its batches' examples, non-pad tokens and padded slots to `counts`, and the host
    time spent building them (pinning included on CUDA, which bertcls.to_device then finds done)."""

    def collate(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        batch = collate_fn(*args, **kwargs)
        if always_mask and "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        counts["host_data_s"] += time.perf_counter() - start
        ids = batch["input_ids"]  # still on the host: counting costs no device sync
        counts["examples"] += ids.shape[0]
        counts["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        counts["slots"] += ids.numel()
        return batch

    return collate


def covered_time(intervals: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(span from the first start to the last end, time inside at least one interval) of (start, end) pairs."""
    if not intervals:
        return 0.0, 0.0
    covered, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            covered += end - max(start, reached)
            reached = end
    return max(end for _, end in intervals) - min(start for start, _ in intervals), covered


def device_activity(prof: Any, device_type: Any) -> list[tuple[float, float]]:
    """(start, end) in microseconds of what ran on the device (kernels, copies, memsets) in a torch.profiler run."""
    return [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == device_type]


# what CUDA's sync debug mode warns at each host sync (it also warns once that it is a prototype: not a sync)
SYNC_WARNING = "called a synchronizing CUDA operation"


def profile_steps(run: bertcls.Run, train: Callable[[], Any], n_steps: int) -> dict[str, Any]:
    """Run train() (n_steps optimizer steps) under torch.profiler and CUDA's sync debug mode: how long the GPU sat
    idle between its first and last kernel, and how often the host waited for it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = run.device.type == "cuda"
    # on CUDA only the device's activity is recorded: recording every CPU op too would slow the host it judges
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    synchronize(run.device)
    with warnings.catch_warnings(record=True) as caught, profile(activities=activities) as prof:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        synchronize(run.device)
    if not cuda:
        return {"profile_steps": n_steps}
    span, busy = covered_time(device_activity(prof, DeviceType.CUDA))
    return {"profile_steps": n_steps, "gpu_idle_fraction": round(1 - busy / span, 5) if span else None,
            "gpu_idle_ms_per_step": round((span - busy) / 1000 / n_steps, 3),
            "host_syncs": sum(SYNC_WARNING in str(w.message) for w in caught)}


def measure(run: bertcls.Run, steps: int, warmup: int, tutorial_style: bool, profiled: int = 0) -> dict[str, Any]:
    """Train warmup + steps optimizer steps with bertcls.train_epoch; time and count the last `steps`; then
    `profiled` more steps under the profiler (profile_steps)."""
    args, device = run.args, run.device
    n_batches = (warmup + steps + profiled) * args.grad_accum_steps
    if tutorial_style:
        rows = data.load_split(Path(args.dataset_dir), "train", run.label2id)  # the tutorial holds every text
        batches = random_batches(len(rows), args.batch_size, n_batches, random.Random(args.seed))
        collate_fn = tutorial_collate(run.tokenizer, rows, run.spec)
    else:
        batches = grouped_batches(run, n_batches)
        collate_fn = bertcls.collate
    counts = {"examples": 0, "tokens": 0, "slots": 0, "host_data_s": 0.0}
    collate_fn = counting(collate_fn, counts, device, args.always_mask)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = bertcls.wrap_model(run)
    optimizer = bertcls.build_optimizer(run.raw_model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=run.dtype == torch.float16)
    run.total_steps, run.warmup_steps = warmup + steps + profiled, 0  # decay over the measured steps, no warmup
    split, end = warmup * args.grad_accum_steps, (warmup + steps) * args.grad_accum_steps
    step = 0
    if split:
        step, _ = bertcls.train_epoch(model, optimizer, scaler, run, batches[:split], step, 1, collate_fn=collate_fn)
    for key in counts:
        counts[key] = 0
    synchronize(device)
    start = time.perf_counter()
    step, loss = bertcls.train_epoch(model, optimizer, scaler, run, batches[split:end], step, 1, collate_fn=collate_fn)
    synchronize(device)
    measured = {"seconds": time.perf_counter() - start, "loss": loss, "peak_mem_mb": peak_memory_mb(device), **counts}
    if profiled:
        try:
            measured |= profile_steps(run, lambda: bertcls.train_epoch(model, optimizer, scaler, run, batches[end:],
                                                                       step, 1, collate_fn=collate_fn), profiled)
        except (RuntimeError, AttributeError, ValueError) as e:  # a diagnostic: never lose the figures above
            measured["profile_error"] = first_line(e)
    return measured


def report(run: bertcls.Run, measured: dict[str, Any], peak_flops: float, peak_source: str) -> dict[str, Any]:
    args, seconds = run.args, measured["seconds"]
    layers, hidden = model_shape(run.raw_model.config)
    mean_len = measured["slots"] / measured["examples"]
    per_token = flops_per_token(run.params_non_embedding, layers, hidden, mean_len)
    tokens_per_s = measured["tokens"] / seconds
    return {
        "mode": "tutorial_style" if args.tutorial_style else "bertcls", "always_mask": args.always_mask,
        "model_name": args.model_name, "device": str(run.device), "device_name": device_name(run.device),
        "dtype": dtype_name(run.dtype), "compile": args.compile,
        "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "grad_accum_steps": args.grad_accum_steps, "max_batch_tokens": args.max_batch_tokens,
        "max_seq_len": run.spec.max_len, "truncation": run.spec.truncation, "steps": args.steps,
        "warmup": args.warmup, "examples": measured["examples"], "seconds": round(seconds, 3),
        "examples_per_s": round(measured["examples"] / seconds, 3), "tokens_per_s": round(tokens_per_s, 1),
        "padding_fraction": round(1 - measured["tokens"] / measured["slots"], 5),
        "mean_padded_len": round(mean_len, 2), "params_non_embedding": run.params_non_embedding,
        "flops_per_token": round(per_token), "achieved_flops": round(per_token * tokens_per_s),
        "peak_flops": round(peak_flops), "peak_flops_source": peak_source,
        "mfu": round(per_token * tokens_per_s / peak_flops, 6),
        "peak_mem_mb": round(measured["peak_mem_mb"], 1), "train_loss": round(measured["loss"], 5),
        "step_ms": round(1000 * seconds / args.steps, 3),
        "host_data_ms_per_step": round(1000 * measured["host_data_s"] / args.steps, 3),
        **{k: measured[k] for k in PROFILE_KEYS if k in measured},
    }


PROFILE_KEYS = ("profile_steps", "gpu_idle_fraction", "gpu_idle_ms_per_step", "host_syncs", "profile_error")


def profile_summary(result: dict[str, Any]) -> str:
    if "profile_error" in result:
        return f" | profiling failed: {result['profile_error']}"
    if result.get("gpu_idle_fraction") is None:
        return ""
    return (f" | GPU idle {100 * result['gpu_idle_fraction']:.1f}% ({result['gpu_idle_ms_per_step']:.2f} ms/step), "
            f"{result['host_syncs']} host syncs in {result['profile_steps']} profiled steps")


def bench(args: argparse.Namespace) -> int:
    run = bertcls.Run(args, log, device=pick_device(args.device))
    measured = measure(run, args.steps, args.warmup, args.tutorial_style, args.profile_steps)
    if args.peak_flops:
        peak_flops, peak_source = args.peak_flops, "--peak_flops"
    else:
        peak_flops, peak_source = measure_peak_flops(run.device, run.dtype)
    result = report(run, measured, peak_flops, peak_source)
    print(f"{result['mode']} on {result['device']} ({result['device_name']}), {result['dtype']}"
          f"{', compiled' if result['compile'] else ''}, {result['threads']} threads: {result['steps']} steps, "
          f"{result['examples']} examples in {result['seconds']:.1f} s | {result['examples_per_s']:.2f} examples/s | "
          f"{result['tokens_per_s']:.0f} non-pad tokens/s | padding {100 * result['padding_fraction']:.1f}% | "
          f"peak memory {result['peak_mem_mb']:.0f} MB | MFU {100 * result['mfu']:.1f}% of "
          f"{result['peak_flops'] / 1e9:.0f} GFLOP/s ({peak_source}) | host data {result['host_data_ms_per_step']:.2f} "
          f"ms/step of {result['step_ms']:.1f}{profile_summary(result)}")
    print(json.dumps(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("bench.py", lambda: bench(args), args.debug, oom_advice=bertcls.OOM_ADVICE)


if __name__ == "__main__":
    sys.exit(main())
