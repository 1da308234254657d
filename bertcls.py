"""Fine-tune and evaluate one BERT-style model for text classification.

One GPU (or the CPU):
    python bertcls.py --model_name cl-tohoku/bert-base-japanese-v3 --lr 3e-5
Several GPUs on one node (DistributedDataParallel under torchrun):
    torchrun --standalone --nproc_per_node 4 bertcls.py --model_name cl-tohoku/bert-base-japanese-v3
Two nodes (run on each, with its --node_rank):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 bertcls.py ...
An interrupted run, from its last checkpoint (see --checkpoint_minutes), in its own directory:
    python bertcls.py --resume outputs/<model>/<date>/<time>

Reads datasets/livedoor/{train,val,test}.jsonl + label2id.json (see prepare.py), trains with AdamW and a
linear warmup/decay schedule, picks the epoch with the best validation macro F1, evaluates val and test
once with its weights and writes everything under outputs/<model>/<date>/<time>/. test-metrics.json is
written last: a run directory without it is not a finished run. A long run also writes a checkpoint at the
end of an epoch every --checkpoint_minutes, so that a killed run loses at most that much.

Reading guide (this file is the training story, in the order it happens):
    parse_args                    every setting, with its default
    batching                      length-grouped batches (of --batch_size or a token budget), padding, collate
    schedule + optimizer          AdamW without decay on biases/norms, linear warmup then decay (get_lr)
    training loop                 train_epoch: one epoch of optimizer steps (AMP, accumulation, clipping)
    evaluation                    predict / evaluate: every example once, also under DDP
    metrics                       confusion matrix and macro precision / recall / F1 by hand
    distributed                   the torchrun process group; wrap_model (DDP, torch.compile)
    outputs                       log.csv, learning curve, predictions, --save_model, the result files
    set-up + main                 Run (everything set up before the first step), the epoch loop with
                                  best-epoch selection and early stopping, --resume, the command line
The files it builds on (each imports only those above it; nothing imports prepare.py):
    common.py                     errors, files, progress, flags, devices and collectives, run directories;
                                  nothing about BERT
    families.py                   how each model family is loaded and fed
    data.py                       the dataset on disk -> labels and token ids: label2id.json and the JSONL
                                  splits, the cut to length (head / head_tail), the tokenization cache and
                                  its worker processes
    checkpoints.py                epoch checkpoints written all or nothing, and continuing from one exactly
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import inspect
import io
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from checkpoints import (TrainingState, check_resumable, checkpoint_due, cpu_state, failed_write, last_complete_epoch,
                         load_resume_checkpoint, remove_checkpoints, restore, resumed_settings, run_identity,
                         save_checkpoint, writing)
from common import (DistEnv, Progress, UserError, atomic_write_text, autocast_context, barrier, broadcast_object,
                    check_output_dir, check_writable, dist_env, dtype_name, finite_float, gather_objects, hold_run_dir,
                    make_run_dir, non_negative_float, pick_device, positive_float, positive_int, read_json,
                    resolve_dtype, run_cli, use_tf32, write_json)
from data import (MAX_DEFAULT_WORKERS, SPLITS, TRUNCATIONS, InputSpec, check_room_for_text, default_tokenize_workers,
                  example_lengths, file_digest, load_dataset, load_fold, load_or_tokenize, split_ids,
                  tokenizer_fingerprint)
from families import (attention_implementation, effective_max_len, freeze_unreachable, load_model, load_tokenizer,
                      transformers_progress_bars, unknown_family_note, uses_token_type_ids)

NO_DECAY_SUFFIXES = ("bias", "layernorm.weight", "layer_norm.weight", "norm.weight", "ln.weight")
OOM_ADVICE = ("lower --batch_size (with --grad_accum_steps to keep the effective batch), lower --max_seq_len, "
              "or add --gradient_checkpointing")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="cl-tohoku/bert-base-japanese-v3",
                   help="hub name or local directory (default: %(default)s)")
    p.add_argument("--dataset_dir", default="datasets/livedoor", help="output of prepare.py (default: %(default)s)")
    p.add_argument("--batch_size", type=positive_int, default=16, help="per-device batch (default: %(default)s)")
    p.add_argument("--eval_batch_size", type=positive_int, default=None,
                   help="per-device evaluation batch (default: 2 x --batch_size)")
    p.add_argument("--epochs", type=positive_int, default=20, help="(default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=3e-5, help="peak learning rate (default: %(default)s)")
    p.add_argument("--num_warmup_epochs", type=non_negative_float, default=2,
                   help="linear warmup length in epochs, may be fractional (default: %(default)s)")
    p.add_argument("--max_seq_len", type=positive_int, default=512,
                   help="tokens per example, capped by the model's limit (default: %(default)s)")
    p.add_argument("--truncation", choices=TRUNCATIONS, default="head",
                   help="what an over-long example keeps: head = the title and the start of the body; head_tail = "
                        "the title, then of the room left a quarter from the body's start and the rest from its end "
                        "(Sun et al. 2019's 128 + 382 of 512, scaled) (default: %(default)s)")
    p.add_argument("--max_batch_tokens", type=positive_int, default=None,
                   help="token budget per batch instead of --batch_size examples: as many examples as fit in this "
                        "many padded tokens (few long ones, many short ones); evaluation uses twice the budget "
                        "(default: off)")
    p.add_argument("--weight_decay", type=non_negative_float, default=0.01, help="(default: %(default)s)")
    p.add_argument("--max_grad_norm", type=non_negative_float, default=1.0,
                   help="gradient clipping norm, 0 disables (default: %(default)s)")
    p.add_argument("--grad_accum_steps", type=positive_int, default=1,
                   help="micro-batches per optimizer step (default: %(default)s)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory (default: off)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; under torchrun each process takes "
                   "cuda:LOCAL_RANK (choose GPUs with CUDA_VISIBLE_DEVICES) (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype; auto = bf16 on GPUs with bf16 units (Ampere and later), else fp16 with a "
                        "GradScaler; on the CPU bf16 where it has bf16 matrix units (AVX512-BF16, AMX), else fp32. "
                        "fp32 on CUDA multiplies matrices in TF32 (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    p.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    p.add_argument("--output_dir", default="outputs", help="(default: %(default)s)")
    p.add_argument("--cache_dir", default=".cache/bertcls",
                   help="tokenization cache; '' disables it (default: %(default)s)")
    p.add_argument("--tokenize_workers", type=positive_int, default=None,
                   help="processes that tokenize a split of 2000+ examples; 1 tokenizes in this process (default: "
                        f"the CPU cores this process may use, at most {MAX_DEFAULT_WORKERS})")
    p.add_argument("--save_model", action="store_true",
                   help="also save the best weights + tokenizer to <run dir>/model/ (default: off)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow a hub model to run its own Python code (default: off)")
    p.add_argument("--mecab_dic", choices=("auto", "ipadic", "unidic_lite", "unidic"), default="auto",
                   help="MeCab dictionary for BertJapaneseTokenizer models; auto uses IPAdic for cl-tohoku v1 "
                        "configs that name none (default: auto)")
    p.add_argument("--log_interval", type=positive_int, default=20,
                   help="optimizer steps between NaN checks and progress updates: on a terminal in the bar, "
                        "elsewhere (nohup, CI, sweep logs) a line with the step, examples/s, the mean loss so far, "
                        "the learning rate and the time left in the epoch (default: %(default)s)")
    p.add_argument("--patience", type=positive_int, default=None,
                   help="early stopping: stop when val F1 has not improved for this many epochs; the learning-rate "
                        "schedule stays the one planned for --epochs (default: off)")
    p.add_argument("--checkpoint_minutes", type=finite_float, default=10,
                   help="at the end of an epoch, write a checkpoint to resume from when at least this many minutes "
                        "have passed since the run started or since the last one; 0: after every epoch, negative: "
                        "never. A finished run deletes its checkpoint (default: %(default)s)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted run from its last checkpoint, with the settings of its config.json, "
                        "and finish it in RUN_DIR; other flags must agree with them (default: off)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors (default: off)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size
    if args.tokenize_workers is None:
        args.tokenize_workers = default_tokenize_workers()
    return args


# ------------------------------------------------------------------------------------------ batching


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, group_batches: int = 64,
                           max_tokens: int | None = None, buckets: Sequence[int] | None = None) -> list[list[int]]:
    """Shuffle, sort by length within chunks of many batches, then shuffle the batches.

    Randomness is kept (which examples meet in a batch and the batch order change every epoch) while
    examples of similar length share a batch, so little compute is spent on padding. With max_tokens, a
    batch holds as many examples as fit in that many padded tokens instead of batch_size, and a chunk is
    group_batches budgets' worth of tokens.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if max_tokens is None:
        chunks = [order[s:s + batch_size * group_batches] for s in range(0, len(order), batch_size * group_batches)]
    else:
        chunks = token_chunks(order, lengths, max_tokens * group_batches)
    batches = []
    for chunk in chunks:
        group = sorted(chunk, key=lambda i: lengths[i], reverse=True)
        batches += cut_batches(group, lengths, batch_size, max_tokens, buckets)
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None,
                   buckets: Sequence[int] | None = None) -> list[list[int]]:
    """Evaluation batches of examples sorted by length (longest first, so an OOM shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return cut_batches(order, lengths, batch_size, max_tokens, buckets)


def cut_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int, max_tokens: int | None,
                buckets: Sequence[int] | None = None) -> list[list[int]]:
    """Consecutive batches of `order` (longest first): batch_size examples each, or with max_tokens as many as
    fit in max_tokens padded tokens (examples x the padded length of the first, longest one)."""
    if max_tokens is None:
        return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    width = 0  # the padded length of the current batch's first, longest example
    for i in order:
        if batches and (len(batches[-1]) + 1) * width <= max_tokens:
            batches[-1].append(i)
        else:  # a first example wider than the budget gets a batch of its own (Run refuses such budgets)
            batches.append([i])
            width = padded_length(lengths[i], buckets=buckets)
    return batches


def token_chunks(order: Sequence[int], lengths: Sequence[int], chunk_tokens: int) -> list[list[int]]:
    """`order` split into consecutive chunks of about chunk_tokens tokens."""
    chunks: list[list[int]] = [[]]
    total = 0
    for i in order:
        if total >= chunk_tokens:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += lengths[i]
    return chunks if chunks[0] else []


def padded_length(longest: int, multiple: int = 8, buckets: Sequence[int] | None = None) -> int:
    """Pad to a multiple of 8 for tensor cores; with torch.compile, up to the next bucket to bound recompiles."""
    if buckets:
        return next((b for b in buckets if b >= longest), buckets[-1])
    return -(-longest // multiple) * multiple


def check_batch_budget(max_batch_tokens: int | None, max_len: int, buckets: Sequence[int] | None = None,
                       what: str = "example") -> None:
    """--max_batch_tokens must hold one input of max_len tokens, padded as batches are."""
    widest = padded_length(max_len, buckets=buckets)
    if max_batch_tokens is not None and max_batch_tokens < widest:
        raise UserError(f"--max_batch_tokens {max_batch_tokens} cannot hold one {what} of {max_len} tokens "
                        f"(padded to {widest}): raise it or lower --max_seq_len")


def compile_buckets(max_len: int) -> list[int]:
    buckets = [64]
    while buckets[-1] < max_len:
        buckets.append(buckets[-1] * 2 if buckets[-1] < 256 else buckets[-1] + 128)
    return buckets[:-1] + [max(max_len, buckets[-2] if len(buckets) > 1 else max_len)]


def collate(packed: dict[str, torch.Tensor], indices: Sequence[int], labels: torch.Tensor | None,
            pad_id: int, buckets: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """A padded batch built with a few tensor ops (one gather), not a Python loop over its rows."""
    rows = torch.as_tensor(indices, dtype=torch.long)
    starts = packed["offsets"][rows]
    lengths = packed["offsets"][rows + 1] - starts
    width = padded_length(int(lengths.max()), buckets=buckets)
    positions = torch.arange(width)
    attention_mask = (positions < lengths[:, None]).long()
    # positions past a row's end point at other rows' tokens (clamped at the end): masked out below
    flat = (starts[:, None] + positions).clamp_(max=max(len(packed["input_ids"]) - 1, 0))
    batch = {"input_ids": torch.where(attention_mask.bool(), packed["input_ids"][flat].long(), pad_id)}
    if int(lengths.min()) < width:
        # only a padded batch carries a mask: without one SDPA can take its flash kernel, and transformers need
        # not read the mask back to the host (padding_mask.all()) to find out it could have been dropped
        batch["attention_mask"] = attention_mask
    if "token_type_ids" in packed:
        batch["token_type_ids"] = packed["token_type_ids"][flat].long() * attention_mask
    if labels is not None:
        batch["labels"] = labels[rows]
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


# ------------------------------------------------------------------------------ schedule + optimizer


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay for weight matrices only: not biases, normalisation weights or other vectors."""
    return param.ndim >= 2 and not name.lower().endswith(NO_DECAY_SUFFIXES)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    # the fused kernel exists for CUDA and (since torch 2.4) the CPU: one kernel instead of a loop over tensors
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                             fused=device.type in ("cuda", "cpu"))


def get_lr(step: int, total_steps: int, warmup_steps: int, max_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based), in three phases:
    1) warmup: linear from max_lr / warmup_steps up to max_lr at the last warmup step;
    2) decay: linear from max_lr down towards 0 at total_steps;
    3) past total_steps (never reached by a run): 0.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    return max_lr * (total_steps - step) / max(1, total_steps - warmup_steps)


def optimizer_steps_per_epoch(n_batches: int, grad_accum_steps: int) -> int:
    return math.ceil(n_batches / grad_accum_steps)


def examples_per_step(all_batches: Sequence[Sequence[int]], grad_accum_steps: int, world_size: int) -> list[int]:
    """Examples of each optimizer step over all ranks, from every rank's batches of an epoch in global order
    (rank r trains on every world_size-th batch, so a step takes grad_accum_steps x world_size consecutive ones)."""
    per_step = grad_accum_steps * world_size
    return [sum(map(len, all_batches[i:i + per_step])) for i in range(0, len(all_batches), per_step)]


def schedule_warning(total_steps: int, warmup_steps: int, n_batches: int, args: argparse.Namespace) -> str | None:
    """One line when the schedule cannot train as asked, with the peak learning rate it does reach: a warmup
    longer than the run (the default 2 warmup epochs with --epochs 1), or more accumulation steps than the
    n_batches batches of an epoch."""
    peak = max(get_lr(step, total_steps, warmup_steps, args.lr) for step in range(total_steps))
    problems = []
    if args.grad_accum_steps > n_batches:
        problems.append(f"--grad_accum_steps {args.grad_accum_steps} is more than the {n_batches} batches of an "
                        f"epoch, so each optimizer step accumulates only {n_batches} (use at most {n_batches})")
    if peak < args.lr * (1 - 1e-9):
        problems.append(f"the warmup ({warmup_steps} optimizer steps, --num_warmup_epochs "
                        f"{args.num_warmup_epochs:g}) is longer than the run ({total_steps} steps, --epochs "
                        f"{args.epochs}), so the learning rate peaks at {peak:.3g}, {peak / args.lr:.0%} of --lr "
                        f"{args.lr:g} (lower --num_warmup_epochs, e.g. to {args.epochs / 10:g})")
    return f"warning: {'; '.join(problems)}" if problems else None


# ------------------------------------------------------------------------------------- training loop


class NonFiniteLoss(UserError):
    pass


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                run: Run, batches: list[list[int]], step: int, epoch: int, progress: Progress | None = None,
                collate_fn: Any = None, step_examples: Sequence[int] | None = None) -> tuple[int, float]:
    """One pass over `batches` (this rank's); returns the next optimizer step and the mean train loss.

    `model` is what is called (DDP- or compile-wrapped), `run` holds the settings (run.args), the data and
    the schedule. The loss of each micro-batch is weighted by its share of the examples of its optimizer
    step, so K accumulated micro-batches give the gradient of one batch K times as large. Batches of a
    token budget differ in size, also between ranks: `step_examples` (the examples of each optimizer step
    over all ranks, see examples_per_step) makes each example count the same there too. `progress` counts the
    examples of every step (of all ranks, with step_examples) and, every --log_interval steps, is given the step,
    the mean loss of the epoch so far and the learning rate. `collate_fn` (default `collate`) lets bench.py time
    another way of building batches through the same loop.
    """
    args, device = run.args, run.device
    packed, labels = run.packed["train"], run.labels["train"]
    collate_fn = collate_fn or collate
    model.train()
    loss_sum = torch.zeros((), device=device)  # accumulated on device: no host sync per step
    first_bad_step = torch.full((), -1, device=device)
    n_examples = 0
    groups = [batches[i:i + args.grad_accum_steps] for i in range(0, len(batches), args.grad_accum_steps)]
    for group_index, group in enumerate(groups):
        lr = get_lr(step, run.total_steps, run.warmup_steps, args.lr)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        group_examples = sum(len(b) for b in group)
        # DDP averages the ranks' gradients: a rank's examples weigh len/(all examples of the step / world size)
        weight_base = step_examples[group_index] / run.world_size if step_examples else group_examples
        for micro, batch_indices in enumerate(group):
            batch = to_device(collate_fn(packed, batch_indices, labels, run.pad_id, run.buckets), device)
            if hasattr(model, "require_backward_grad_sync"):  # DDP: all-reduce only on the last micro-batch
                model.require_backward_grad_sync = micro == len(group) - 1
            with run.ctx:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss = F.cross_entropy(logits.float(), batch["labels"])
            scaler.scale(loss * (len(batch_indices) / weight_base)).backward()
            loss_sum += loss.detach() * len(batch_indices)
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()),
                                         torch.full_like(first_bad_step, step), first_bad_step)
        n_examples += group_examples
        if args.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        at_interval = step % args.log_interval == 0
        if at_interval or group is groups[-1]:
            check_finite(first_bad_step, epoch, run)  # the host waits for the GPU only here: once per interval
        if progress is not None:
            progress.update(step_examples[group_index] if step_examples else group_examples)
            if at_interval:  # off a terminal a line: step, examples/s, loss, time left
                progress.report(step=f"{step}/{run.total_steps}", loss=f"{loss_sum.item() / n_examples:.4f}",
                                lr=f"{lr:.2e}")
    return step, loss_sum.item() / max(1, n_examples)


def nonfinite_advice(dtype: torch.dtype, max_grad_norm: float) -> str:
    """What to try after a NaN/inf loss: only settings that differ from the ones that produced it."""
    remedies = ["lower --lr"]
    if max_grad_norm == 0:
        remedies.append("clip gradients (--max_grad_norm 1)")
    if dtype == torch.float16:
        remedies.append("use --dtype bf16 (where supported) or fp32")
    elif dtype == torch.bfloat16:
        remedies.append("use --dtype fp32")
    return ", ".join(remedies) + ", or check the data"


def check_finite(first_bad_step: torch.Tensor, epoch: int, run: Run) -> None:
    bad = int(first_bad_step)
    if bad >= 0:
        raise NonFiniteLoss(f"the training loss became NaN/inf at epoch {epoch}, optimizer step {bad + 1}: "
                            f"{nonfinite_advice(run.dtype, run.args.max_grad_norm)}")


# ---------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: torch.nn.Module, packed: dict[str, torch.Tensor], batch_size: int, device: torch.device,
            ctx: contextlib.AbstractContextManager, pad_id: int, labels: torch.Tensor | None = None,
            rank: int = 0, world_size: int = 1, buckets: Sequence[int] | None = None,
            max_batch_tokens: int | None = None, progress: str | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities (n, C) in the original example order, and per-example losses when labels are given.

    Examples are evaluated in length-sorted batches; under DDP each rank takes every world_size-th
    batch and the results are gathered by example index, so each example counts exactly once and the
    numbers equal a single-process evaluation. With max_batch_tokens a batch holds as many examples as fit
    in that many padded tokens instead of batch_size. Progress of this process's examples is shown on stderr
    under the description progress (None: silent).
    """
    model.eval()
    batches = sorted_batches(example_lengths(packed), batch_size, max_batch_tokens, buckets)[rank::world_size]
    indices, probs, losses = [], [], []
    with Progress(sum(map(len, batches)), progress or "", enabled=progress is not None) as shown:
        for batch_indices in batches:
            batch = to_device(collate(packed, batch_indices, None, pad_id, buckets), device)
            with ctx:
                logits = model(**batch).logits
            logits = logits.float()
            indices += batch_indices
            probs.append(logits.softmax(-1))  # kept on the device: one copy to the host at the end, not one per batch
            if labels is not None:
                gold = labels[batch_indices].to(device, non_blocking=True)
                losses.append(F.cross_entropy(logits, gold, reduction="none"))
            shown.update(len(batch_indices))
    local = (indices, torch.cat(probs).cpu() if probs else None, torch.cat(losses).cpu() if losses else None)
    n = len(example_lengths(packed))
    all_probs, all_losses = None, torch.zeros(n, dtype=torch.float64)
    for part_indices, part_probs, part_losses in gather_objects(local, world_size):
        if part_probs is None:
            continue
        if all_probs is None:
            all_probs = torch.zeros(n, part_probs.shape[1])
        all_probs[part_indices] = part_probs
        if part_losses is not None:
            all_losses[part_indices] = part_losses.double()
    return all_probs, (all_losses if labels is not None else None)


def evaluate(model: torch.nn.Module, run: Run, split: str) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics of one split (each example once, also under DDP) and its class probabilities."""
    labels = run.labels[split]
    max_tokens = 2 * run.args.max_batch_tokens if run.args.max_batch_tokens else None  # no activations kept
    probs, losses = predict(model, run.packed[split], run.args.eval_batch_size, run.device, run.ctx, run.pad_id,
                            labels=labels, rank=run.rank, world_size=run.world_size, buckets=run.buckets,
                            max_batch_tokens=max_tokens, progress=f"evaluating {split}" if run.rank == 0 else None)
    pred = probs.argmax(-1).tolist()
    return classification_metrics(labels.tolist(), pred, float(losses.sum()), run.id2label), probs


# ------------------------------------------------------------------------------------------ metrics


def confusion_matrix(gold: Sequence[int], pred: Sequence[int], n_labels: int) -> list[list[int]]:
    """matrix[g][p]: examples of gold label g predicted as p."""
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for g, p in zip(gold, pred, strict=True):
        matrix[g][p] += 1
    return matrix


def safe_div(a: float, b: float) -> float:
    return a / b if b else 0.0


def per_class_prf(matrix: list[list[int]]) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of each class; 0 where undefined (no gold or no prediction)."""
    n = len(matrix)
    rows = []
    for c in range(n):
        tp = matrix[c][c]
        predicted = sum(matrix[g][c] for g in range(n))
        support = sum(matrix[c])
        precision, recall = safe_div(tp, predicted), safe_div(tp, support)
        rows.append({"precision": precision, "recall": recall,
                     "f1": safe_div(2 * precision * recall, precision + recall), "support": support})
    return rows


def macro_prf(matrix: list[list[int]]) -> dict[str, float]:
    """Macro precision/recall/F1 over every label (a class absent from gold and predictions counts 0)."""
    classes = per_class_prf(matrix)
    return {k: sum(c[k] for c in classes) / len(classes) for k in ("precision", "recall", "f1")}


def classification_metrics(gold: Sequence[int], pred: Sequence[int], loss_sum: float,
                           id2label: dict[int, str]) -> dict[str, Any]:
    matrix = confusion_matrix(gold, pred, len(id2label))
    names = [id2label[i] for i in range(len(id2label))]
    return {
        "loss": loss_sum / len(gold),
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold),
        **macro_prf(matrix),
        "per_class": dict(zip(names, per_class_prf(matrix))),
        "confusion_matrix": {"labels": names, "matrix": matrix},
    }


# -------------------------------------------------------------------------------------- distributed


def init_distributed(requested_device: str | None, env: DistEnv) -> torch.device:
    """This process's device; under torchrun (even with one process) also the process group."""
    device = pick_device(requested_device, env.local_rank if env.torchrun else None)
    if env.torchrun:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def destroy_distributed() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(run: Run) -> torch.nn.Module:
    """run.raw_model on its device, with checkpointing, DDP and compile as asked: returns what to call."""
    model = run.raw_model.to(run.device)
    if run.args.gradient_checkpointing:
        # renamed from gradient_checkpointing_enable in transformers 5.x; non-reentrant works under DDP and compile
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # under torchrun
        from torch.nn.parallel import DistributedDataParallel
        # No buffer broadcast in forward: BERT-style models have only constant buffers, and evaluation gives
        # ranks different numbers of batches, where a collective inside forward would deadlock. torch 2.13
        # renamed the switch (the old name warns); its sync at start-up is harmless for constant buffers.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                                        **no_buffer_sync)
    if run.args.compile:
        torch._dynamo.config.recompile_limit = 64  # a few length buckets x (train, eval, last batch)
        # static shapes, one graph per bucket: left dynamic, the second length seen would turn the
        # graph into a slower dynamic-shape one and the buckets would buy nothing
        model = torch.compile(model, dynamic=False)
    return model


# ------------------------------------------------------------------------------------------ outputs


RESULT_FILES = ("val-metrics.json", "test-predictions.jsonl", "learning-curve.svg")  # test-metrics.json: last
LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
              "lr", "seconds", "examples_per_s", "stop_reason"]


def write_log_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """About `count` evenly spaced round values from 0 up to at least `high` (steps of 1, 2, 2.5 or 5 x 10^k)."""
    raw = max(high, 1e-9) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    return [round(i * step, 12) for i in range(math.ceil(max(high, 1e-9) / step - 1e-9) + 1)]


def learning_curve_svg(rows: list[dict], width: int = 640, height: int = 400) -> str:
    """Validation F1 (left axis) and train/val loss (right axis) per epoch as a standalone SVG, drawn by hand.

    Every epoch is a marker on its line, so one epoch still shows; the legend sits above the plot area, clear
    of the data; both axes have ticks and grid lines.
    """
    left, right, top, bottom = 64, width - 64, 44, height - 52  # the plot area
    epochs = [r["epoch"] for r in rows]
    loss_ticks = nice_ticks(max([r["train_loss"] for r in rows] + [r["val_loss"] for r in rows]))
    x_step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 10**9) if len(epochs) / s <= 10)

    def x_of(epoch: int) -> float:
        if len(epochs) == 1:
            return (left + right) / 2
        return left + 12 + (epoch - epochs[0]) / (epochs[-1] - epochs[0]) * (right - left - 24)

    def y_of(fraction: float) -> float:
        return bottom - fraction * (bottom - top)

    series = [("val F1", "#1f77b4", "left", [r["val_f1"] for r in rows], 1.0),
              ("train loss", "#ff7f0e", "right", [r["train_loss"] for r in rows], loss_ticks[-1]),
              ("val loss", "#2ca02c", "right", [r["val_loss"] for r in rows], loss_ticks[-1])]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12">', '<rect width="100%" height="100%" fill="white"/>', '<g class="legend">']
    for i, (name, color, axis, _, _) in enumerate(series):
        x = left + 180 * i
        parts += [f'<line x1="{x}" y1="16" x2="{x + 24}" y2="16" stroke="{color}" stroke-width="2"/>',
                  f'<circle cx="{x + 12}" cy="16" r="3.5" fill="{color}"/>',
                  f'<text x="{x + 30}" y="20">{name} ({axis} axis)</text>']
    parts += ["</g>", '<g class="ticks-left">']
    for tick in nice_ticks(1.0):
        y = y_of(tick)
        parts += [f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e0e0e0"/>',
                  f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>']
    parts += ["</g>", '<g class="ticks-right">']
    for tick in loss_ticks:
        parts.append(f'<text x="{right + 6}" y="{y_of(tick / loss_ticks[-1]) + 4:.1f}">{tick:g}</text>')
    parts += ["</g>", '<g class="ticks-x">']
    for epoch in epochs[::x_step]:
        x = x_of(epoch)
        parts += [f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="#444"/>',
                  f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{epoch}</text>']
    parts += ["</g>",
              f'<rect class="plot-area" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
              f'fill="none" stroke="#444"/>',
              f'<text x="{(left + right) / 2}" y="{height - 12}" text-anchor="middle">epoch</text>',
              f'<text transform="translate(18 {(top + bottom) / 2}) rotate(-90)" text-anchor="middle">val F1</text>',
              f'<text transform="translate({width - 14} {(top + bottom) / 2}) rotate(90)" '
              f'text-anchor="middle">loss</text>']
    for name, color, _, values, scale in series:
        points = [(x_of(e), y_of(v / scale)) for e, v in zip(epochs, values)]
        parts.append(f'<g class="series" data-name="{name}">')
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"><title>epoch {e}: {name} {v:.4f}'
                  f'</title></circle>' for (x, y), e, v in zip(points, epochs, values)]
        parts.append("</g>")
    parts.append("</svg>\n")
    return "\n".join(parts)


def write_predictions(path: Path, ids: Sequence, labels: torch.Tensor, probs: torch.Tensor,
                      id2label: dict[int, str]) -> None:
    lines = []
    for row_id, gold, p in zip(ids, labels.tolist(), probs.tolist()):
        predicted = max(range(len(p)), key=p.__getitem__)
        lines.append(json.dumps({"id": row_id, "gold": id2label[gold], "predicted": id2label[predicted],
                                 "probabilities": {id2label[i]: round(x, 6) for i, x in enumerate(p)}},
                                ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding tables)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return total, total - embedding


def save_model(run: Run, model_dir: Path) -> None:
    """Best weights (safetensors), tokenizer and label names, loadable by transformers alone.

    The saved tokenizer's model_max_length is the length used in training, and it returns token_type_ids when
    the model was trained with them. transformers truncates only when asked (an init setting cannot change
    that), so pipeline("text-classification") must be called with truncation="only_second" (title + body) or
    truncation=True (one text): it then feeds the model what training did with --truncation head (the pipeline
    cannot keep a body's tail; the README's snippet, tested). bertcls.json records the length, token types and
    truncation for predict.py, which reproduces test-predictions.jsonl exactly.
    """
    tmp = model_dir.with_name(".model.tmp")
    if tmp.exists():  # left by an interrupted save: save_pretrained would mix old and new files
        shutil.rmtree(tmp)
    try:
        with transformers_progress_bars(show=False):  # a "Writing model shards" bar of one shard says nothing
            run.raw_model.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        config_path = tmp / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        tokenizer_config["model_max_length"] = run.spec.max_len
        input_names = list(tokenizer_config.get("model_input_names") or run.tokenizer.model_input_names)
        if run.spec.token_type_ids and "token_type_ids" not in input_names:
            input_names.insert(1, "token_type_ids")  # transformers 5 tokenizers leave them out by default
            tokenizer_config["model_input_names"] = input_names
        write_json(config_path, tokenizer_config)
        write_json(tmp / "bertcls.json", {"format": 1, "base_model": run.args.model_name,
                                          "max_seq_len": run.spec.max_len, "token_type_ids": run.spec.token_type_ids,
                                          "truncation": run.spec.truncation})
        os.replace(tmp, model_dir)
    except BaseException:  # a full disk, Ctrl-C: no partial model directory is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def update_config(run_dir: Path, **fields: Any) -> None:
    """Add fields to config.json (when the run was resumed, how its training ended), keeping the rest."""
    write_json(run_dir / "config.json", {**read_json(run_dir / "config.json"), **fields})


def write_results(run: Run, run_dir: Path, result: dict) -> None:
    """Metric files, test-metrics.json last: its presence is what marks a finished run.

    When a write fails (a full disk) or the run is stopped meanwhile, the result files written so far go again:
    the run directory is that of an unfinished run, which can be resumed; the error line gives the test scores."""
    try:
        update_config(run_dir, training_end=result["training_end"])
        write_json(run_dir / "val-metrics.json", {"best_epoch": result["best_epoch"],
                                                  "train_seconds": round(result["train_seconds"], 3), **result["val"]})
        write_predictions(run_dir / "test-predictions.jsonl", split_ids(run.splits["test"]), run.labels["test"],
                          result["test_probs"], run.id2label)
        atomic_write_text(run_dir / "learning-curve.svg", learning_curve_svg(result["history"]))
        if run.args.save_model:
            save_model(run, run_dir / "model")
        write_json(run_dir / "test-metrics.json", result["test"])
    except BaseException as e:
        if (run_dir / "test-metrics.json").exists():  # a Ctrl-C just after it was written: the run is finished
            raise
        for name in RESULT_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        if not isinstance(e, (OSError, SafetensorError)):
            raise
        test = result["test"]
        raise UserError(f"{failed_write(f'the results in {run_dir}', run_dir, e)}; the test scores, which no file "
                        f"holds: accuracy {test['accuracy']:.4f}, f1 {test['f1']:.4f} (best epoch "
                        f"{result['best_epoch']})") from e
    remove_checkpoints(run_dir)  # only now: a kill before test-metrics.json can still resume


# ------------------------------------------------------------------------------------- set-up + main


class Run:
    """Everything a run sets up before its first step: settings, data, tokenizer, model, dtype, schedule.

    `raw_model` is the module that is trained and saved; wrap_model(run) gives the one that is called.
    The data are `splits` (labels and where each example is in its file; no texts) and `packed` (the tokens,
    memory-mapped from the cache). bench.py builds the same object to time the same code path.
    """

    def __init__(self, args: argparse.Namespace, log=print, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None):
        self.args, self.log, self.rank, self.world_size = args, log, rank, world_size
        self.device = device or pick_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        use_tf32(self.device, self.dtype)
        self.ctx = autocast_context(self.device, self.dtype)
        dataset_dir = Path(args.dataset_dir)
        self.label2id, self.splits = load_dataset(dataset_dir, log)
        self.id2label = {i: name for name, i in self.label2id.items()}
        self.labels = {split: self.splits[split].labels for split in SPLITS}
        self.dataset_digest = file_digest([dataset_dir / "label2id.json"] +
                                          [dataset_dir / f"{s}.jsonl" for s in SPLITS])
        self.fold = load_fold(dataset_dir)
        # Each rank its own dropout masks (rank 0 keeps the seed, so one process runs as before); the data order
        # has its own generator (train_batches), and DDP copies rank 0's new classifier head to every rank.
        torch.manual_seed(args.seed + rank)
        self.tokenizer = load_tokenizer(args.model_name, args.mecab_dic, args.trust_remote_code, log)
        self.raw_model = load_model(args.model_name, self.label2id, args.trust_remote_code, log,
                                    attention_implementation(self.device, self.dtype))
        if note := unknown_family_note(args.model_name, self.raw_model.config):
            log(note)
        freeze_unreachable(self.raw_model, log)
        self.params, self.params_non_embedding = count_parameters(self.raw_model)
        self.spec = InputSpec(effective_max_len(args.max_seq_len, self.tokenizer, self.raw_model.config, log),
                              uses_token_type_ids(self.raw_model.config), args.truncation)
        check_room_for_text(self.spec.max_len, self.tokenizer, pair=any(d.pairs for d in self.splits.values()))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.buckets = compile_buckets(self.spec.max_len) if args.compile else None
        check_batch_budget(args.max_batch_tokens, self.spec.max_len, self.buckets)
        self.packed = self.tokenize_all()
        # batches of a token budget vary in number from epoch to epoch: count every epoch's
        steps = [optimizer_steps_per_epoch(len(train_batches(self, epoch)), args.grad_accum_steps)
                 for epoch in range(1, args.epochs + 1)]
        self.total_steps = sum(steps)
        self.warmup_steps = round(steps[0] * args.num_warmup_epochs)
        self.effective_batch_size = (args.batch_size * args.grad_accum_steps * world_size if not args.max_batch_tokens
                                     else round(sum(map(len, all_train_batches(self, 1))) / steps[0], 1))  # a mean
        warning = schedule_warning(self.total_steps, self.warmup_steps, len(train_batches(self, 1)), args)
        if warning is not None:
            log(warning)

    def tokenize_all(self) -> dict[str, dict[str, torch.Tensor]]:
        fingerprint = tokenizer_fingerprint(self.tokenizer) if self.args.cache_dir else ""
        packed = {}
        for rank_turn in ([0, 1] if self.world_size > 1 else [self.rank]):
            # rank 0 tokenizes (with its worker processes) and fills the cache first; the other ranks then map it
            if (rank_turn == 0) == (self.rank == 0):
                for split in SPLITS:
                    packed[split] = load_or_tokenize(self, split, fingerprint)
            if self.world_size > 1 and rank_turn == 0:
                barrier(self.world_size)
        return packed

    def config_record(self) -> dict:
        import transformers
        return {"args": vars(self.args), "device": str(self.device), "dtype": dtype_name(self.dtype),
                "world_size": self.world_size,
                "effective_batch_size": self.effective_batch_size,
                "total_optimizer_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "max_seq_len_used": self.spec.max_len, "params": self.params,
                "params_non_embedding": self.params_non_embedding, "dataset_digest": self.dataset_digest,
                "fold": self.fold, "examples": {s: len(self.labels[s]) for s in SPLITS},
                "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                             "transformers": transformers.__version__},
                "started_at": datetime.datetime.now().isoformat(timespec="seconds")}


def train_batches(run: Run, epoch: int) -> list[list[int]]:
    """This rank's batches for an epoch: the same global order on every rank, re-seeded each epoch."""
    return all_train_batches(run, epoch)[run.rank::run.world_size]


def all_train_batches(run: Run, epoch: int) -> list[list[int]]:
    """Every rank's batches of an epoch, in global order."""
    rng = random.Random(f"{run.args.seed}-{epoch}")
    batches = length_grouped_batches(example_lengths(run.packed["train"]), run.args.batch_size, rng,
                                     max_tokens=run.args.max_batch_tokens, buckets=run.buckets)
    if run.world_size > 1:  # every rank needs the same number of steps: repeat a few batches to even out
        batches += batches[: (-len(batches)) % run.world_size]
    return batches


def run_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, run: Run,
              training: TrainingState) -> dict:
    """Train the next epoch and validate it; record its log.csv row, and its weights if its val F1 is the best."""
    epoch = training.epoch + 1
    all_batches = all_train_batches(run, epoch)
    batches = all_batches[run.rank::run.world_size]
    start = time.perf_counter()
    with Progress(sum(map(len, all_batches)), f"epoch {epoch}/{run.args.epochs}", enabled=run.rank == 0,
                  timed=False) as progress:
        training.step, train_loss = train_epoch(model, optimizer, scaler, run, batches, step=training.step,
                                                epoch=epoch, progress=progress, step_examples=examples_per_step(
                                                    all_batches, run.args.grad_accum_steps, run.world_size))
    seconds = time.perf_counter() - start
    training.train_seconds += seconds
    train_loss = sum(gather_objects(train_loss, run.world_size)) / run.world_size
    val, _ = evaluate(model, run, "val")
    row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
           "val_precision": val["precision"], "val_recall": val["recall"], "val_f1": val["f1"],
           "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
           "examples_per_s": round(sum(map(len, batches)) * run.world_size / seconds, 2)}
    training.history.append(row)
    training.epoch = epoch
    if training.best is None or val["f1"] > training.best["val"]["f1"]:  # the first epoch always counts
        training.best = {"epoch": epoch, "val": val, "state": cpu_state(run.raw_model)}
    return row


def early_stop_reason(training: TrainingState, args: argparse.Namespace) -> str | None:
    """Why training stops before --epochs (--patience epochs without a better val F1), or None."""
    waited = training.epoch - training.best["epoch"]
    if args.patience is None or waited < args.patience or training.epoch == args.epochs:
        return None
    return (f"early stop: no better val F1 in the {waited} epoch(s) after epoch {training.best['epoch']} "
            f"(--patience {args.patience})")


def record_resume(run: Run, run_dir: Path, epoch: int) -> None:
    """config.json keeps its settings; each resume is added, with the settings it changed (RESUME_MAY_CHANGE)."""
    config = read_json(run_dir / "config.json")
    changed = {k: v for k, v in vars(run.args).items() if k != "resume" and config["args"].get(k, v) != v}
    entry = {"at": datetime.datetime.now().isoformat(timespec="seconds"), "from_epoch": epoch, "changed": changed}
    update_config(run_dir, resumed=[*config.get("resumed", []), entry])


def start_record(run: Run, run_dir: Path, resumed_from: int | None) -> str:
    """config.json for a new run, or a note of the resume in the run's own; returns the run's identity."""
    with writing(f"{run_dir / 'config.json'}", run_dir):
        if resumed_from is None:
            write_json(run_dir / "config.json", run.config_record())
        else:
            record_resume(run, run_dir, resumed_from)
    return run_identity(read_json(run_dir / "config.json"))


def train_and_evaluate(run: Run, run_dir: Path | None, checkpoint: dict | None = None) -> dict:
    """Train epoch after epoch (after the checkpoint's epoch when resuming), keep the weights of the best
    val F1, stop early with --patience, then evaluate val and test once with the best weights.

    `run_dir` is None on ranks other than 0, which write nothing."""
    args, log = run.args, run.log
    model = wrap_model(run)
    optimizer = build_optimizer(run.raw_model, args, run.device)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    training = TrainingState() if checkpoint is None else restore(checkpoint, run, optimizer, scaler)
    resumed_from = None if checkpoint is None else training.epoch
    run_id = start_record(run, run_dir, resumed_from) if run_dir is not None else ""
    log(f"examples: train {len(run.labels['train'])}, val {len(run.labels['val'])}, test {len(run.labels['test'])} | "
        f"epochs {args.epochs} | per-device batch "
        f"{args.batch_size if not args.max_batch_tokens else f'of <= {args.max_batch_tokens} tokens'} x world size "
        f"{run.world_size} x accumulation {args.grad_accum_steps} = effective batch "
        f"{run.effective_batch_size}{' (mean examples)' if args.max_batch_tokens else ''} | "
        f"optimizer steps {run.total_steps} (warmup {run.warmup_steps}) | device {run.device} {run.dtype} | "
        f"params {run.params / 1e6:.2f}M | max_seq_len {run.spec.max_len}")
    if checkpoint is not None:
        log(f"resuming {args.resume} after epoch {training.epoch} (optimizer step {training.step}) "
            f"from {checkpoint['path']}")
    from tqdm.auto import tqdm
    quiet = run.rank != 0 or not sys.stderr.isatty()
    stop_reason, last_checkpoint = None, time.monotonic()
    # ------------------------------------------------------------------------------- the epoch loop
    for epoch in tqdm(range(training.epoch + 1, args.epochs + 1), desc="epochs", initial=training.epoch,
                      total=args.epochs, disable=quiet, dynamic_ncols=True):
        row = run_epoch(model, optimizer, scaler, run, training)
        stop_reason = row["stop_reason"] = early_stop_reason(training, args)
        log(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} "
            f"acc {row['val_accuracy']:.4f} f1 {row['val_f1']:.4f} | {row['examples_per_s']:.1f} ex/s"
            + (f" | {stop_reason}" if stop_reason else ""))
        if run_dir is not None:
            with writing(f"{run_dir / 'log.csv'}", run_dir):
                write_log_csv(run_dir / "log.csv", training.history)
        if stop_reason:
            break
        # none after the last epoch: evaluating val and test is all that is left
        if epoch < args.epochs and checkpoint_due(args.checkpoint_minutes, last_checkpoint, run.world_size):
            save_checkpoint(run, run_dir, run_id, training, optimizer, scaler)
            last_checkpoint = time.monotonic()
    best = training.best
    if best["epoch"] == training.epoch:  # the weights in hand are the best ones: their val metrics are known
        val = best["val"]
    else:
        run.raw_model.load_state_dict(best["state"])
        val, _ = evaluate(model, run, "val")
    test, test_probs = evaluate(model, run, "test")
    training_end = {"epochs_trained": training.epoch, "reason": stop_reason or f"--epochs {args.epochs} done"}
    return {"best_epoch": best["epoch"], "val": val, "test": test, "test_probs": test_probs,
            "history": training.history, "train_seconds": training.train_seconds, "training_end": training_end}


def fine_tune(args: argparse.Namespace, env: DistEnv, log: Callable[[str], None], outcome: dict) -> int:
    """The whole run: set up, train, evaluate, write the results (rank 0); outcome['run_dir'] once made.

    With args.resume (settings from resume_settings), the run continues in its own directory from its
    newest usable checkpoint."""
    resuming = args.resume is not None
    with contextlib.ExitStack() as held:
        if resuming:
            outcome["run_dir"] = run_dir = Path(args.resume)
            if env.rank == 0:  # before reading it: from now on no other process may write it
                held.enter_context(hold_run_dir(run_dir))
        else:
            check_output_dir(Path(args.output_dir))
            if env.rank == 0:  # the one that writes, before the model is loaded and the data tokenized
                check_writable(Path(args.output_dir))
        device = init_distributed(args.device, env)
        random.seed(args.seed)
        run = Run(args, log, env.rank, env.world_size, device)
        checkpoint = None
        if resuming:
            config = read_json(run_dir / "config.json")
            check_resumable(run, config)
            checkpoint = load_resume_checkpoint(run, run_dir, run_identity(config))
        else:
            run_dir = make_run_dir(Path(args.output_dir), args.model_name) if env.rank == 0 else None
            outcome["run_dir"] = run_dir = broadcast_object(run_dir, env.world_size)
            if env.rank == 0:
                held.enter_context(hold_run_dir(run_dir))
        result = train_and_evaluate(run, run_dir if env.rank == 0 else None, checkpoint)
        if env.rank == 0:
            write_results(run, run_dir, result)
            log(f"test: accuracy {result['test']['accuracy']:.4f} f1 {result['test']['f1']:.4f} "
                f"(best epoch {result['best_epoch']}) -> {run_dir}")
        barrier(env.world_size)
    return 0


def command_line_settings(argv: Sequence[str] | None) -> dict[str, Any]:
    """The settings given on the command line, without the defaults of the others."""
    parser, unset = build_parser(), object()
    blank = argparse.Namespace(**{name: unset for name in vars(parser.parse_args([]))})
    return {k: v for k, v in vars(parser.parse_args(argv, blank)).items() if v is not unset}


def resume_settings(args: argparse.Namespace, argv: Sequence[str] | None) -> argparse.Namespace:
    """--resume RUN_DIR: the settings of the run's config.json; a flag that contradicts one is refused."""
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.json); pass one such as "
                        "outputs/<model>/<date>/<time>")
    if (run_dir / "test-metrics.json").exists():
        raise UserError(f"--resume {run_dir}: this run is already finished (it has test-metrics.json)")
    return resumed_settings(run_dir, read_json(run_dir / "config.json"), vars(parse_args([])),
                            command_line_settings(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = dist_env()  # RANK / LOCAL_RANK / WORLD_SIZE, read once

    def log(message: str) -> None:
        if env.rank == 0:
            print(message, file=sys.stderr, flush=True)

    outcome: dict[str, Path | None] = {}

    def work() -> int:
        return fine_tune(resume_settings(args, argv) if args.resume else args, env, log, outcome)

    def stopped() -> str:
        run_dir = outcome.get("run_dir")
        if not run_dir:
            return "no run directory was made"
        kept = [name for name in ("config.json", "log.csv") if (run_dir / name).is_file()]
        epoch = last_complete_epoch(run_dir)
        if epoch is None:
            return f"{run_dir} keeps {' and '.join(kept) or 'nothing'}, no metrics"
        return (f"{run_dir} keeps {', '.join(kept)} and the checkpoint of epoch {epoch}, no metrics: continue "
                f"with `python bertcls.py --resume {run_dir}`")

    try:
        return run_cli("bertcls.py", work, args.debug, stopped, OOM_ADVICE,
                       who=f" [rank {env.rank}]" if env.torchrun else "")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
