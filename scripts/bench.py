"""Training throughput of bertcls.py's own loop: examples/s, tokens/s, padding, peak memory, MFU, GPU idle time.

    python scripts/bench.py --model_name DIR --dataset_dir DIR --max_seq_len 256 --batch_size 16 --steps 50
    python scripts/bench.py ... --compile --bucket_lengths 128 512   # + compile seconds of one step per length
    python scripts/bench.py ... --profile_steps 5     # then 5 steps under torch.profiler: GPU idle, syncs, attention
    python scripts/bench.py ... --tutorial_style      # the tutorial's batches: random, tokenized in every step
    python scripts/bench.py ... --always_mask         # an attention mask on unpadded batches too (no flash kernel)

It sets up the run as bertcls.py does (set_up, plan, wrap_model, build_optimizer) and calls the same train_epoch on
the first --warmup + --steps optimizer steps of its length-grouped epochs; only the last --steps are timed. Every
bertcls.py flag is accepted. MFU = training FLOPs per token (6 x non-embedding parameters + 12 x layers x hidden x
padded length) x tokens/s over the peak measured here (the best large matmul in the run's dtype, or --peak_flops).
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import bertcls  # noqa: E402
from common import dtype_name, iter_jsonl, log, number, positive_float, positive_int, run_cli  # noqa: E402
from data import example_text  # noqa: E402

non_negative_int = number(int, "an integer >= 0", lambda v: v >= 0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="All other flags are bertcls.py's.")
    p.add_argument("--steps", type=positive_int, default=20, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--tutorial_style", action="store_true", help="random batches tokenized in every step")
    p.add_argument("--always_mask", action="store_true", help="a mask of ones on unpadded batches too")
    p.add_argument("--peak_flops", type=positive_float, default=None, help="(default: measured)")
    p.add_argument("--profile_steps", type=non_negative_int, default=0,
                   help="steps under torch.profiler after the timed ones (default: %(default)s)")
    p.add_argument("--bucket_lengths", type=int, nargs="*", default=[],
                   help="time a first and a second training step on a batch of each padded length: the difference "
                        "is the compile time of that shape (default: none)")
    own, rest = p.parse_known_args(argv)
    args = bertcls.parse_args(rest)
    vars(args).update(vars(own))
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The best FLOP/s of a large square matmul in the run's dtype."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for rep in range(12):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        if rep >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"{dtype_name(dtype)} matmul {n}x{n}"


class Counted:
    """A split's Inputs that also count the examples, tokens and padded slots of its batches and the host's time
    building them (pinning included on CUDA). With rows, batches are tokenized as the tutorial did: as (title, body)
    pairs when the split has pairs, else as single texts."""

    def __init__(self, data: Any, args: argparse.Namespace, tokenizer: Any, spec: Any, rows: list[dict] | None,
                 pairs: bool):
        self.data, self.labels, self.args, self.tokenizer, self.spec = data, data.labels, args, tokenizer, spec
        self.rows, self.pairs = rows, pairs
        self.counts = dict.fromkeys(("examples", "tokens", "slots", "host_s"), 0)

    def batch(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        if self.rows is not None:  # the tutorial: tokenize the batch's texts now, pad to its longest
            texts = [example_text(self.rows[i]) for i in indices]
            seconds = [b for _, b in texts] if self.pairs else None  # single texts: no second segment at all
            batch = dict(self.tokenizer([a for a, _ in texts], seconds, max_length=self.spec.max_len,
                                        truncation="only_second" if self.pairs else True, padding=True,
                                        return_tensors="pt", return_token_type_ids=self.spec.token_type_ids))
            batch = {**{k: v.to(device) for k, v in batch.items()}, "labels": self.labels[indices].to(device)}
        else:
            batch = self.data.batch(indices, device)
        if self.args.always_mask and "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        ids = batch["input_ids"]
        self.counts["host_s"] += time.perf_counter() - start
        self.counts["examples"] += len(indices)
        self.counts["slots"] += ids.numel()
        lengths = self.data.packed["offsets"][torch.as_tensor(indices) + 1] - self.data.packed["offsets"][
            torch.as_tensor(indices)]
        self.counts["tokens"] += int(lengths.sum())  # from the host's offsets: no device sync
        return batch


def attention_share(prof: Any) -> dict[str, float]:
    """Shares of the GPU's kernel time in fused attention kernels and in softmax kernels (a decomposed attention)."""
    kernels = [(e.name.lower(), e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(t for _, t in kernels) or 1
    fused = sum(t for n, t in kernels if any(k in n for k in ("flash", "fmha", "cudnn_attention", "sdpa", "attention"))
                and "softmax" not in n)
    softmax = sum(t for n, t in kernels if "softmax" in n)
    return {"fused_attention_share": round(fused / total, 4), "softmax_share": round(softmax / total, 4)}


def profile(train: Any, device: torch.device, steps: int) -> dict[str, Any]:
    """train() under torch.profiler and CUDA's sync debug mode: the GPU's idle share between its first and last
    kernel, the host syncs, and the attention kernels' share."""
    from torch.profiler import ProfilerActivity
    if device.type != "cuda":
        train()
        return {"profile_steps": steps}
    synchronize(device)
    profiler = torch.profiler.profile(activities=[ProfilerActivity.CUDA])
    with warnings.catch_warnings(record=True) as caught, profiler as prof:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        synchronize(device)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, reached = 0.0, float("-inf")
    for start, end in spans:
        if end > reached:
            busy, reached = busy + end - max(start, reached), end
    span = spans[-1][1] - spans[0][0] if spans else 0
    return {"profile_steps": steps, "gpu_idle_fraction": round(1 - busy / span, 4) if span else None,
            "host_syncs": sum("called a synchronizing CUDA operation" in str(w.message) for w in caught),
            **attention_share(prof)}


def bucket_times(model: Any, optimizer: Any, run: Any, lengths: Sequence[int]) -> dict[str, float]:
    """Seconds of a first and a second training step on a batch padded to each length: their difference is what
    compiling that shape costs (warm when the compiler's cache on disk already holds it)."""
    times = {}
    for length in lengths:
        ids = torch.randint(5, 100, (run.args.batch_size, length), device=run.device)
        labels = torch.zeros(run.args.batch_size, dtype=torch.long, device=run.device)
        seconds = []
        for _ in range(2):
            synchronize(run.device)
            start = time.perf_counter()
            with run.ctx:
                loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.float(), labels)
            loss.backward()
            optimizer.zero_grad(set_to_none=True)
            synchronize(run.device)
            seconds.append(time.perf_counter() - start)
        times[str(length)] = round(seconds[0] - seconds[1], 2)
    return times


def bench(args: argparse.Namespace) -> int:
    run = bertcls.set_up(args, 0, 1, False, log)
    epochs, _ = bertcls.plan(run)
    model, optimizer = bertcls.wrap_model(run), bertcls.build_optimizer(run.model, args)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.config["dtype"] == "float16")
    n = args.warmup + args.steps + args.profile_steps
    batches = [b for e in epochs * (1 + n * args.grad_accum_steps // len(epochs[0])) for b in e]
    rows = None
    if args.tutorial_style:
        rows = [row for *_, row in iter_jsonl(run.splits["train"].path)]
        rng, order = random.Random(args.seed), list(range(len(rows)))
        rng.shuffle(order)
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)] * (1 + n)
    data = Counted(run.data["train"], args, run.tokenizer, run.spec, rows, run.splits["train"].pairs)
    compile_s = bucket_times(model, optimizer, run, args.bucket_lengths) if args.bucket_lengths else {}
    schedule, per_step = (n, 0), args.grad_accum_steps

    def train(first: int, count: int) -> float:
        chunk = batches[first * per_step:(first + count) * per_step]
        sizes = bertcls.step_sizes(chunk, per_step, 1)
        return bertcls.train_epoch(model, optimizer, scaler, data, chunk, sizes, args, schedule, first, run.ctx,
                                   run.device)[1]

    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    start = time.perf_counter()
    if args.warmup:
        train(0, args.warmup)
    synchronize(run.device)
    warmup_s = time.perf_counter() - start
    data.counts = dict.fromkeys(data.counts, 0)
    start = time.perf_counter()
    loss = train(args.warmup, args.steps)
    synchronize(run.device)
    seconds, counts = time.perf_counter() - start, dict(data.counts)
    profiled = profile(lambda: train(args.warmup + args.steps, args.profile_steps), run.device,
                       args.profile_steps) if args.profile_steps else {}
    peak, peak_source = (args.peak_flops, "--peak_flops") if args.peak_flops else measure_peak_flops(
        run.device, getattr(torch, run.config["dtype"]))
    config = run.model.config
    non_embedding = run.config["params"] - sum(m.weight.numel() for m in run.model.modules()
                                               if isinstance(m, torch.nn.Embedding))
    padded = counts["slots"] / counts["examples"]
    per_token = 6 * non_embedding + 12 * config.num_hidden_layers * config.hidden_size * padded
    mem = (torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    result = {"mode": "tutorial_style" if args.tutorial_style else "bertcls", "model_name": args.model_name,
              "device": str(run.device), "device_name": torch.cuda.get_device_name(run.device)
              if run.device.type == "cuda" else "cpu", "dtype": run.config["dtype"], "compile": args.compile,
              "always_mask": args.always_mask, "batch_size": args.batch_size, "max_seq_len": run.spec.max_len,
              "steps": args.steps, "examples": counts["examples"], "seconds": round(seconds, 3),
              "warmup_s": round(warmup_s, 2), "examples_per_s": round(counts["examples"] / seconds, 2),
              "tokens_per_s": round(counts["tokens"] / seconds, 1),
              "padding_fraction": round(1 - counts["tokens"] / counts["slots"], 5), "mean_padded_len": round(padded, 2),
              "params_non_embedding": non_embedding, "flops_per_token": round(per_token),
              "peak_flops": round(peak), "peak_flops_source": peak_source,
              "mfu": round(per_token * counts["tokens"] / seconds / peak, 5), "peak_mem_mb": round(mem, 1),
              "train_loss": round(loss, 5), "step_ms": round(1000 * seconds / args.steps, 2),
              "host_data_ms_per_step": round(1000 * counts["host_s"] / args.steps, 2),
              **({"compile_s_by_length": compile_s} if compile_s else {}), **profiled}
    print(f"{result['mode']} on {result['device_name']}, {result['dtype']}{', compiled' if args.compile else ''}: "
          f"{result['examples_per_s']:.1f} examples/s, {result['tokens_per_s']:.0f} tokens/s, "
          f"MFU {100 * result['mfu']:.1f}% of {peak / 1e12:.1f} TFLOP/s, peak memory {mem:.0f} MB, "
          f"{result['step_ms']:.1f} ms/step")
    print(json.dumps(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("bench.py", lambda: bench(args), args.debug, oom_advice=bertcls.OOM_ADVICE)


if __name__ == "__main__":
    sys.exit(main())
