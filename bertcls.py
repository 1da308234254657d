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
    data                          label2id.json and the JSONL splits
    batching                      length-grouped batches (of --batch_size or a token budget), padding, collate
    schedule + optimizer          AdamW without decay on biases/norms, linear warmup then decay (get_lr)
    training loop                 train_epoch: one epoch of optimizer steps (AMP, accumulation, clipping)
    evaluation                    predict / evaluate: every example once, also under DDP
    metrics                       confusion matrix and macro precision / recall / F1 by hand
    tokenization cache            (title, body) -> ids, cut to length (head / head_tail), in worker
                                  processes; once per (tokenizer, input spec, data), memory-mapped and
                                  reused across runs
    distributed                   torchrun process group and the collectives used
    outputs                       log.csv, learning curve, predictions, --save_model
    checkpoints + --resume        epoch checkpoints written all or nothing, and continuing from one exactly
    Run, train_and_evaluate, main set-up, the epoch loop with best-epoch selection and early stopping, and
                                  the command line
Below it: common.py (errors, files, devices; nothing about BERT) and families.py (how each model family
is loaded and fed).
"""

from __future__ import annotations

import argparse
import array
import collections
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import (DistEnv, Progress, UserError, atomic_write_text, autocast_context, check_output_dir, dist_env,
                    dtype_name, finite_float, first_line, hold_run_dir, iter_jsonl, make_run_dir, non_negative_float,
                    pick_device, positive_float, positive_int, read_json, read_jsonl, resolve_dtype, run_cli, use_tf32,
                    write_json)
from families import (effective_max_len, freeze_unreachable, load_model, load_tokenizer, unknown_family_note,
                      uses_token_type_ids)

CACHE_FORMAT = 2  # bump when the layout or the key of the tokenization cache changes
MAX_DEFAULT_WORKERS = 16  # each tokenization worker holds its own tokenizer (a MeCab dictionary and a vocabulary)
PARALLEL_MIN_EXAMPLES = 2000  # fewer: starting worker processes would cost more than they save
TOKENIZE_CHUNK = 1000  # examples per task of a tokenization worker: the grain of load balancing and progress
NO_DECAY_SUFFIXES = ("bias", "layernorm.weight", "layer_norm.weight", "norm.weight", "ln.weight")
SPLITS = ("train", "val", "test")
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
                   help="optimizer steps between progress updates and NaN checks (default: %(default)s)")
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


# ---------------------------------------------------------------------------------------------- data


def load_label2id(dataset_dir: Path) -> dict[str, int]:
    path = dataset_dir / "label2id.json"
    label2id = read_json(path, hint="re-run prepare.py")
    if not isinstance(label2id, dict) or not label2id:
        raise UserError(f"{path}: expected a non-empty object mapping label names to ids; re-run prepare.py")
    for name, label in label2id.items():
        if isinstance(label, bool) or not isinstance(label, int):
            raise UserError(f"{path}: the id of {name!r} is {json.dumps(label, ensure_ascii=False)}, not an integer; "
                            f"ids must be 0..{len(label2id) - 1}, each once; re-run prepare.py")
    if sorted(label2id.values()) != list(range(len(label2id))):
        raise UserError(f"{path}: ids must be 0..{len(label2id) - 1}, each once; re-run prepare.py")
    return label2id


def load_fold(dataset_dir: Path) -> dict | None:
    """Which fold of which cross-validation set the dataset is (prepare.py --folds writes fold.json); None
    for a plain split. config.json records it, so that sweep.py puts the runs over all folds in one row."""
    path = dataset_dir / "fold.json"
    if not path.is_file():
        return None
    fold = read_json(path, hint="re-run prepare.py --folds")
    if not (isinstance(fold, dict) and isinstance(fold.get("set"), str)
            and all(isinstance(fold.get(k), int) and not isinstance(fold.get(k), bool) for k in ("fold", "folds"))):
        raise UserError(f"{path}: expected an object with integers 'fold', 'folds' and a string 'set'; "
                        f"re-run prepare.py --folds")
    return {k: fold[k] for k in ("fold", "folds", "set")}


def example_text(row: dict) -> tuple[str, str | None]:
    """The model input of one example: the (title, body) pair when both exist, else `text`."""
    if isinstance(row.get("title"), str) and isinstance(row.get("body"), str):
        return row["title"], row["body"]
    if isinstance(row.get("text"), str):
        return row["text"], None
    raise ValueError("needs a string 'text', or string 'title' and 'body'")


def split_path(dataset_dir: Path, split: str) -> Path:
    path = dataset_dir / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: create the dataset with `python prepare.py --output_dir {dataset_dir}`")
    return path


def example_label(row: dict, label2id: dict[str, int], where: str, label2id_path: Path) -> int:
    """A row's label as an id (label names are mapped through label2id), once the row is checked."""
    label = row.get("label")
    if isinstance(label, str) and label in label2id:
        label = label2id[label]
    elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(label2id):
        raise UserError(f"{where}: label {label!r} is not in {label2id_path} (ids 0..{len(label2id) - 1}); "
                        "the dataset and label2id.json disagree: re-run prepare.py")
    try:
        example_text(row)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    return label


def load_split(dataset_dir: Path, split: str, label2id: dict[str, int]) -> list[dict]:
    """Rows of one split, each with an int `label` in range and a text; bad rows are UserErrors."""
    path = split_path(dataset_dir, split)
    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path} is empty: every split needs examples (re-run prepare.py with more data)")
    for number, row in enumerate(rows, 1):
        row["label"] = example_label(row, label2id, f"{path}: example {number}", dataset_dir / "label2id.json")
    return rows


class SplitData(NamedTuple):
    """A split as a run keeps it: the labels, and where each example's line is; the texts stay in the file."""
    path: Path
    labels: torch.Tensor
    starts: array.array  # byte offset of each example's line in the file, then the end of the last one
    digest: str  # sha256 of the file's bytes: the tokenization cache key
    signature: tuple  # size and modification time, to notice the file changing under a run
    pairs: bool  # some example is a (title, body) pair (else every one is a single text)


def read_split(dataset_dir: Path, split: str, label2id: dict[str, int]) -> SplitData:
    """Check every example of a split as load_split does, keeping only labels and offsets: a run's memory does
    not grow with the texts of a large dataset (tokenization reads them again, chunk by chunk)."""
    path = split_path(dataset_dir, split)
    signature = file_signature(path)
    labels, starts, digest, end, pairs = [], array.array("q"), hashlib.sha256(), 0, False
    for line, row in iter_jsonl(path, digest):
        labels.append(example_label(row, label2id, f"{path}: example {len(labels) + 1}", dataset_dir / "label2id.json"))
        starts.append(line.start)
        end = line.end
        pairs = pairs or example_text(row)[1] is not None
    if not labels:
        raise UserError(f"{path} is empty: every split needs examples (re-run prepare.py with more data)")
    starts.append(end)
    return SplitData(path, torch.tensor(labels), starts, digest.hexdigest(), signature, pairs)


def file_signature(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def read_rows(path: Path, start: int, end: int) -> list[dict]:
    """The rows whose lines fill bytes [start, end) of a JSONL file that read_split has checked."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8-sig" if start == 0 else "utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def split_ids(data: SplitData) -> list:
    """The `id` of each example of a split (None where it has none), read from its file."""
    ids = [row.get("id") for _, row in iter_jsonl(data.path)]
    if len(ids) != len(data.labels) or file_signature(data.path) != data.signature:
        raise UserError(f"{data.path} changed while bertcls.py was running; run again")
    return ids


def check_labels(labels: dict[str, torch.Tensor], id2label: dict[int, str], dataset_dir: Path) -> str | None:
    """Refuse a train split with fewer than 2 labels: there is nothing to classify, yet every score would come
    out perfect. Return a warning naming the val/test labels that train never shows (never learned)."""
    seen = Counter(labels["train"].tolist())
    if len(seen) < 2:
        raise UserError(f"{dataset_dir / 'train.jsonl'}: every example has the label "
                        f"{id2label[next(iter(seen))]!r}: a classifier needs examples of at least 2 labels in train")
    unseen: dict[str, Counter] = {}
    for split in ("val", "test"):
        for label in labels[split].tolist():
            if label not in seen:
                unseen.setdefault(id2label[label], Counter())[split] += 1
    if not unseen:
        return None
    listed = "; ".join(f"{name!r} ({', '.join(f'{n} in {split}' for split, n in counts.items())})"
                       for name, counts in sorted(unseen.items()))
    return f"warning: labels that train never shows, so the model cannot learn them: {listed}"


def load_dataset(dataset_dir: Path, log: Callable[[str], None]) -> tuple[dict[str, int], dict[str, SplitData]]:
    """label2id and every split (labels and line offsets), checked: a classification run can be made of them."""
    if not dataset_dir.is_dir():
        raise UserError(f"dataset directory {dataset_dir} not found: run `python prepare.py` first "
                        "(or pass --dataset_dir)")
    if not (dataset_dir / "label2id.json").is_file():
        raise UserError(f"{dataset_dir / 'label2id.json'} not found: run `python prepare.py` first")
    label2id = load_label2id(dataset_dir)
    splits = {split: read_split(dataset_dir, split, label2id) for split in SPLITS}
    warning = check_labels({s: d.labels for s, d in splits.items()}, {i: name for name, i in label2id.items()},
                           dataset_dir)
    if warning is not None:
        log(warning)
    return label2id, splits


def file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


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
    for i in order:
        if batches and (len(batches[-1]) + 1) * padded_length(lengths[batches[-1][0]], buckets=buckets) <= max_tokens:
            batches[-1].append(i)
        else:  # a first example wider than the budget gets a batch of its own (Run refuses such budgets)
            batches.append([i])
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


def example_lengths(packed: dict[str, torch.Tensor]) -> list[int]:
    return (packed["offsets"][1:] - packed["offsets"][:-1]).tolist()


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
                run: Run, batches: list[list[int]], step: int, epoch: int, progress: Any = None,
                collate_fn: Any = None, step_examples: Sequence[int] | None = None) -> tuple[int, float]:
    """One pass over `batches` (this rank's); returns the next optimizer step and the mean train loss.

    `model` is what is called (DDP- or compile-wrapped), `run` holds the settings (run.args), the data and
    the schedule. The loss of each micro-batch is weighted by its share of the examples of its optimizer
    step, so K accumulated micro-batches give the gradient of one batch K times as large. Batches of a
    token budget differ in size, also between ranks: `step_examples` (the examples of each optimizer step
    over all ranks, see examples_per_step) makes each example count the same there too. `collate_fn`
    (default `collate`) lets bench.py time another way of building batches through the same loop.
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
        if step % args.log_interval == 0 or group is groups[-1]:
            check_finite(first_bad_step, epoch, run)  # the only host sync: once per interval
            if progress is not None:
                progress.set_postfix(loss=f"{loss_sum.item() / n_examples:.4f}", lr=f"{lr:.2e}", refresh=False)
        if progress is not None:
            progress.update(group_examples)
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
            max_batch_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities (n, C) in the original example order, and per-example losses when labels are given.

    Examples are evaluated in length-sorted batches; under DDP each rank takes every world_size-th
    batch and the results are gathered by example index, so each example counts exactly once and the
    numbers equal a single-process evaluation. With max_batch_tokens a batch holds as many examples as fit
    in that many padded tokens instead of batch_size.
    """
    model.eval()
    batches = sorted_batches(example_lengths(packed), batch_size, max_batch_tokens, buckets)[rank::world_size]
    indices, probs, losses = [], [], []
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
                            max_batch_tokens=max_tokens)
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


# ------------------------------------------------------------------------------- tokenization cache


TRUNCATIONS = ("head", "head_tail")
# Sun et al. 2019 ("How to Fine-Tune BERT for Text Classification?") kept the first 128 and the last 382 of BERT's 510
# text tokens; head_tail keeps the same shares of whatever room the title leaves for the body.
HEAD_SHARE = 128 / 510


class InputSpec(NamedTuple):
    """How texts become model inputs: what the cache key, config.json and a saved model record."""
    max_len: int  # tokens per example, special tokens included
    token_type_ids: bool  # feed the body as segment B (BERT-style pre-training)
    truncation: str = "head"  # which part of an over-long body is kept: "head", or "head_tail" (its start and end)


def check_room_for_text(max_len: int, tokenizer: Any, pair: bool) -> None:
    """Refuse a length that the special tokens fill: every example would become [CLS][SEP], with no text."""
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    if max_len <= special:
        raise UserError(f"a length of {max_len} tokens leaves no room for text: the tokenizer adds {special} special "
                        f"tokens to each {'(title, body) pair' if pair else 'text'}; raise --max_seq_len")


def tokenize_rows(tokenizer: Any, rows: Sequence[dict], spec: InputSpec,
                  log: Callable[[str], None] = print) -> dict[str, list[list[int]]]:
    """Token ids of every row (see encode_one); one line says how many titles had to be cut."""
    out = encode_rows(tokenizer, rows, spec)
    if out["titles_cut"]:
        log(titles_cut_note(out["titles_cut"], len(rows), spec))
    return out


def encode_rows(tokenizer: Any, rows: Sequence[dict], spec: InputSpec) -> dict[str, Any]:
    """input_ids and token_type_ids of each row, and how many titles were cut (titles_cut)."""
    out: dict[str, Any] = {"input_ids": [], "token_type_ids": [], "titles_cut": 0}
    for row in rows:
        enc = encode_one(tokenizer, *example_text(row), spec)
        out["input_ids"].append(enc["input_ids"])
        out["token_type_ids"].append(enc.get("token_type_ids") or [])
        out["titles_cut"] += enc["title_cut"]
    return out


def titles_cut_note(titles_cut: int, n_rows: int, spec: InputSpec) -> str:
    return (f"note: {titles_cut} of {n_rows} titles were cut to fit: each alone is longer than {spec.max_len} "
            "tokens with the special tokens, so its example keeps the start of the title and none of its body")


def encode_one(tokenizer: Any, first: str, second: str | None, spec: InputSpec) -> dict:
    """One example of at most spec.max_len tokens, laid out exactly as tokenizer(first, second) lays it out.

    The family's own special tokens and segment ids are kept; only text is cut: the body's end (head) or its
    middle (head_tail); the title only when it alone leaves no room for the body ("title_cut"). A single text is
    cut like a body. The tokenizer itself is never asked to truncate: fast tokenizers refuse a pair whose first text
    alone is too long ("Sequence to truncate too short"), and slow ones warn once per example.
    """
    ids, types, sources = pair_layout(tokenizer, first, second)
    keep, title_cut = kept_positions(sources, second is not None, spec.max_len, spec.truncation)
    enc = {"input_ids": [ids[i] for i in keep], "title_cut": title_cut}
    if spec.token_type_ids:
        enc["token_type_ids"] = [types[i] for i in keep]
    return enc


def pair_layout(tokenizer: Any, first: str, second: str | None) -> tuple[list[int], list[int], list[int | None]]:
    """input_ids, token_type_ids and each token's source (0: first text, 1: second, None: special) of
    tokenizer(first, second), uncut."""
    texts = [first] if second is None else [first, second]
    quiet = dict(truncation=False, verbose=False)  # no truncation baked into a saved tokenizer, no length warning
    if getattr(tokenizer, "is_fast", False):  # tokenizers library: its post-processor marks where tokens came from
        enc = tokenizer(*texts, return_token_type_ids=True, return_attention_mask=False, **quiet)
        return enc["input_ids"], enc["token_type_ids"], enc.sequence_ids()
    # Python tokenizers (BertJapaneseTokenizer): tokenizer(first, second) tokenizes each text, then adds these
    parts = [tokenizer(text, add_special_tokens=False, **quiet)["input_ids"] for text in texts]
    special = tokenizer.get_special_tokens_mask(*parts)
    text_sources = iter([k for k, part in enumerate(parts) for _ in part])
    sources = [None if is_special else next(text_sources) for is_special in special]
    return (tokenizer.build_inputs_with_special_tokens(*parts), tokenizer.create_token_type_ids_from_sequences(*parts),
            sources)


def kept_positions(sources: Sequence[int | None], pair: bool, max_len: int, truncation: str) -> tuple[list[int], bool]:
    """Positions kept of an uncut layout, and whether the title was cut: every special token, the title (its start,
    when it alone leaves no room), and of the body (or the only text) as much as the room left allows: its first
    tokens (head), or its first HEAD_SHARE and its last tokens (head_tail)."""
    specials = [i for i, s in enumerate(sources) if s is None]
    title = [i for i, s in enumerate(sources) if pair and s == 0]
    body = [i for i, s in enumerate(sources) if s == (1 if pair else 0)]
    room = max(0, max_len - len(specials))
    kept_title = title[:room]
    room -= len(kept_title)
    if len(body) <= room:
        kept_body = body
    elif truncation == "head_tail":
        head = round(room * HEAD_SHARE)
        kept_body = body[:head] + body[len(body) - (room - head):]
    else:
        kept_body = body[:room]
    return sorted(specials + kept_title + kept_body), len(kept_title) < len(title)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Digest of everything that defines the tokenizer's output: its class and its saved files."""
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__name__}".encode())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def pack(encoded: dict[str, list[list[int]]]) -> dict[str, torch.Tensor]:
    """Ragged token lists as flat tensors + offsets: small on disk, loadable with weights_only."""
    lengths = torch.tensor([len(x) for x in encoded["input_ids"]], dtype=torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    packed = {"offsets": offsets,
              "input_ids": torch.tensor([t for x in encoded["input_ids"] for t in x], dtype=torch.int32)}
    if any(encoded["token_type_ids"]):
        packed["token_type_ids"] = torch.tensor([t for x in encoded["token_type_ids"] for t in x], dtype=torch.int8)
    return packed


def load_or_tokenize(run: Run, split: str, fingerprint: str) -> dict[str, torch.Tensor]:
    """A split's packed tokens, tokenized once per (tokenizer, input spec, data) and memory-mapped from the cache.

    Mapped, not read: the ranks of one node share the file's pages, and a run holds in memory only the batches
    it reads, however large the dataset. A sweep over learning rates and seeds tokenizes nothing after its first run.
    """
    data, log = run.splits[split], run.log
    if not run.args.cache_dir:
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:  # the mapping outlives the file
            return tokenize_and_load(run, split, Path(tmp) / f"{split}.pt")
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, fingerprint, *run.spec, data.digest]).encode()).hexdigest()[:32]
    path = Path(run.args.cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            return load_packed(path, len(data.labels))
        except ValueError as e:  # our own words: torch's advice for such files is to unpickle them unchecked
            log(f"warning: ignoring unreadable tokenization cache {path} ({e}); tokenizing again")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):  # a cache is an optimisation: never fail a run over it
        log(f"warning: cannot write the tokenization cache in {path.parent}; tokenizing without it")
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            return tokenize_and_load(run, split, Path(tmp) / f"{split}.pt")
    return tokenize_and_load(run, split, path)


def tokenize_and_load(run: Run, split: str, path: Path) -> dict[str, torch.Tensor]:
    data = run.splits[split]
    started = time.perf_counter()
    try:
        with Progress(len(data.labels), f"tokenizing {split}", enabled=run.rank == 0) as progress:
            workers, titles_cut = tokenize_split(run.tokenizer, data, run.spec, run.args.tokenize_workers, path,
                                                 progress, run.log)
    except OSError as e:
        raise UserError(f"cannot tokenize {data.path} into {path.parent}: {e.strerror or e} (full disk? pass "
                        "--cache_dir elsewhere)") from None
    run.log(f"tokenized {split}: {len(data.labels)} examples in {time.perf_counter() - started:.1f}s "
            f"({workers} process{'es' if workers > 1 else ''})")
    if titles_cut:
        run.log(titles_cut_note(titles_cut, len(data.labels), run.spec))
    return load_packed(path, len(data.labels))


def default_tokenize_workers() -> int:
    """The CPU cores this process may run on (its affinity: taskset, a batch scheduler), at most MAX_DEFAULT_WORKERS."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+
        cores = os.process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count()
    return max(1, min(cores or 1, MAX_DEFAULT_WORKERS))


class Chunk(NamedTuple):
    """A task of a tokenization worker: examples [first, last) of a split, bytes [start, end) of its file."""
    first: int
    last: int
    start: int
    end: int


def chunks_of(data: SplitData, workers: int) -> list[Chunk]:
    """At most TOKENIZE_CHUNK examples each, and several per worker, so that none idles long at the end."""
    n = len(data.labels)
    size = max(1, min(TOKENIZE_CHUNK, math.ceil(n / (4 * workers))))
    return [Chunk(i, min(i + size, n), data.starts[i], data.starts[min(i + size, n)]) for i in range(0, n, size)]


class Encoded(NamedTuple):
    """A chunk's tokens as flat machine integers: cheap to send between processes and to append to a file."""
    lengths: bytes  # int64 per example
    input_ids: bytes  # int32 per token
    token_type_ids: bytes  # int8 per token; empty when the model takes none
    titles_cut: int  # examples whose title alone did not fit (see encode_one)


def encode_chunk(tokenizer: Any, path: Path, chunk: Chunk, spec: InputSpec) -> Encoded:
    encoded = encode_rows(tokenizer, read_rows(path, chunk.start, chunk.end), spec)
    return Encoded(array.array("q", map(len, encoded["input_ids"])).tobytes(),
                   array.array("i", (t for ids in encoded["input_ids"] for t in ids)).tobytes(),
                   array.array("b", (t for types in encoded["token_type_ids"] for t in types)).tobytes(),
                   encoded["titles_cut"])


def tokenize_split(tokenizer: Any, data: SplitData, spec: InputSpec, workers: int, path: Path,
                   progress: Progress, log=print) -> tuple[int, int]:
    """Tokenize a split into the packed file `path` (written whole or not at all); returns the processes used and
    the number of titles cut.

    The chunks' tokens go to flat files beside `path` as they arrive, in order, and are saved from there: the
    tokens of a large dataset are never all in memory. The result is the same, token for token, whatever the
    number of workers.
    """
    chunks = chunks_of(data, workers)
    workers = min(workers, len(chunks)) if len(data.labels) >= PARALLEL_MIN_EXAMPLES else 1
    tokenizer_pickle = b""
    if workers > 1:
        try:
            tokenizer_pickle = pickle.dumps(tokenizer)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            log(f"note: this tokenizer cannot be sent to worker processes ({first_line(e)}); tokenizing in one")
            workers = 1
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        lengths, titles_cut = array.array("q"), 0
        ids_path, types_path = Path(tmp) / "input_ids.bin", Path(tmp) / "token_type_ids.bin"
        with open(ids_path, "wb") as ids_file, open(types_path, "wb") as types_file:
            def append(encoded: Encoded) -> None:
                nonlocal titles_cut
                titles_cut += encoded.titles_cut
                lengths.frombytes(encoded.lengths)
                ids_file.write(encoded.input_ids)
                types_file.write(encoded.token_type_ids)
                progress.update(len(encoded.lengths) // 8)

            if workers == 1:
                for chunk in chunks:
                    append(encode_chunk(tokenizer, data.path, chunk, spec))
            else:
                tokenize_in_workers(tokenizer_pickle, type(tokenizer).__module__, spec, data.path, chunks, workers,
                                    append)
        if file_signature(data.path) != data.signature:
            raise UserError(f"{data.path} changed while bertcls.py was tokenizing it; run again")
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.frombuffer(lengths, dtype=torch.int64), 0)
        n_tokens = int(offsets[-1])
        packed = {"offsets": offsets,  # the token files mapped, not read: torch.save copies them page by page
                  "input_ids": torch.from_file(str(ids_path), shared=False, size=n_tokens, dtype=torch.int32)}
        if types_path.stat().st_size:
            packed["token_type_ids"] = torch.from_file(str(types_path), shared=False, size=n_tokens, dtype=torch.int8)
        write_cache(path, packed)
    return workers, titles_cut


def tokenize_worker(conn: Any, tokenizer_pickle: bytes, spec: InputSpec) -> None:
    """A worker process: unpickles the parent's tokenizer once (the same object, so the same tokens), then
    encodes each chunk it is sent until the parent closes the connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent stops us
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core each: no Rust thread pool on top of the workers
    stage = "loading the tokenizer"
    try:
        tokenizer = pickle.loads(tokenizer_pickle)
        stage = "chunk"
        while True:
            path, chunk = conn.recv()
            conn.send(("done", encode_chunk(tokenizer, path, chunk, spec)))
    except (EOFError, BrokenPipeError):  # the parent closed the connection: finished or stopping
        return
    except Exception as e:  # reported to the parent, which names the chunk
        with contextlib.suppress(OSError):
            conn.send(("error", stage, f"{type(e).__name__}: {first_line(e)}", traceback.format_exc()))


def worker_context(tokenizer_module: str) -> Any:
    """The fork server where there is one: a fork of this process would copy torch's and the process group's
    threads in whatever state they are in, while spawning imports torch and transformers again in every worker.
    The fork server imports them once, in a process of its own; each worker then starts in a fraction of a second."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", tokenizer_module])  # no effect once the server runs: it is imported
    return context


def tokenize_in_workers(tokenizer_pickle: bytes, tokenizer_module: str, spec: InputSpec, path: Path,
                        chunks: Sequence[Chunk], workers: int, append: Callable[[Encoded], None]) -> None:
    """Encode chunks in worker processes, passing each result to `append` in chunk order.

    Each worker has two chunks in hand, so it never waits for the parent. A worker that dies (killed, out of
    memory) or fails ends the run with the chunk it was on; any exit, Ctrl-C included, stops every worker.
    """
    processes, conns, finished = [], [], False
    try:
        start_workers(worker_context(tokenizer_module), workers, tokenizer_pickle, spec, processes, conns)
        todo, held = collections.deque(range(len(chunks))), [collections.deque() for _ in range(workers)]
        results: dict[int, Encoded] = {}
        connected = set(range(workers))

        def hand_out(worker: int) -> None:
            if todo:
                held[worker].append(todo.popleft())
                try:
                    conns[worker].send((path.resolve(), chunks[held[worker][-1]]))
                except OSError:  # it died
                    raise worker_died(processes[worker], path, chunks, held[worker][0]) from None

        for worker in list(range(workers)) * 2:
            hand_out(worker)
        written = 0
        while written < len(chunks):
            if not connected:
                raise RuntimeError("every tokenization worker left before the last chunk")
            ready = multiprocessing.connection.wait([conns[w] for w in connected] +
                                                    [processes[w].sentinel for w in connected])
            for worker in [w for w in connected if conns[w] in ready or processes[w].sentinel in ready]:
                try:
                    message = conns[worker].recv()
                except (EOFError, OSError):  # it died, or it left with nothing in hand
                    if held[worker]:
                        raise worker_died(processes[worker], path, chunks, held[worker][0]) from None
                    connected.discard(worker)
                    continue
                if message[0] == "error":
                    raise worker_failed(message, path, chunks, held[worker][0])
                results[held[worker].popleft()] = message[1]
                hand_out(worker)
            while written in results:
                append(results.pop(written))
                written += 1
        finished = True
    finally:
        stop_workers(processes, conns, finished)


def start_workers(context: Any, workers: int, tokenizer_pickle: bytes, spec: InputSpec, processes: list,
                  conns: list) -> None:
    """Start worker processes, appending each (and the parent's end of its connection) as it starts."""
    for i in range(workers):
        conn, child_conn = context.Pipe()
        process = context.Process(target=tokenize_worker, args=(child_conn, tokenizer_pickle, spec),
                                  name=f"bertcls-tokenize-{i}", daemon=True)
        try:
            process.start()
        except OSError as e:  # it died at once, e.g. re-importing a main script that has no __main__ guard
            raise UserError(f"cannot start tokenization worker processes ({e}); a script that runs bertcls must "
                            "keep its top level under `if __name__ == \"__main__\":`, or pass --tokenize_workers 1"
                            ) from None
        child_conn.close()
        processes.append(process)
        conns.append(conn)


def stop_workers(processes: list, conns: list, finished: bool) -> None:
    """Finished: each worker sees its connection end and exits; otherwise (an error, Ctrl-C) they are stopped."""
    for conn in conns:
        conn.close()
    for process in processes:
        if not finished:
            process.terminate()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()


def chunk_description(path: Path, chunks: Sequence[Chunk], index: int) -> str:
    chunk = chunks[index]
    return f"examples {chunk.first + 1}-{chunk.last} of {path} (chunk {index + 1} of {len(chunks)})"


def worker_died(process: Any, path: Path, chunks: Sequence[Chunk], index: int) -> UserError:
    process.join(timeout=10)
    code = process.exitcode
    if code is not None and code < 0:
        how = f"killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            how += ", as the out-of-memory killer does"
    else:
        how = f"exit code {code}"
    return UserError(f"a tokenization worker died ({how}) while tokenizing {chunk_description(path, chunks, index)}; "
                     "no cache was written (short of memory? lower --tokenize_workers)")


def worker_failed(message: tuple, path: Path, chunks: Sequence[Chunk], index: int) -> UserError:
    _, stage, error, worker_traceback = message
    where = chunk_description(path, chunks, index) if stage == "chunk" else stage
    e = UserError(f"a tokenization worker failed on {where}: {error} (--tokenize_workers 1 --debug shows where)")
    e.add_note(f"in the worker:\n{worker_traceback}")
    return e


def load_packed(path: Path, n_examples: int) -> dict[str, torch.Tensor]:
    """The packed tensors of a cache file, memory-mapped; ValueError says, in our words, why it cannot be used."""
    try:
        packed = torch.load(path, mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError("it holds objects other than tensors") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError):
        raise ValueError("truncated, or not a file bertcls.py wrote") from None
    if not is_packed(packed, n_examples):
        raise ValueError("its contents do not match the dataset")
    return packed


def is_packed(obj: Any, n_examples: int) -> bool:
    """Whether obj has the layout pack() writes, for n_examples examples."""
    if not (isinstance(obj, dict) and isinstance(obj.get("offsets"), torch.Tensor)
            and isinstance(obj.get("input_ids"), torch.Tensor)):
        return False
    offsets, n_tokens = obj["offsets"], len(obj["input_ids"])
    types = obj.get("token_type_ids", torch.zeros(n_tokens, dtype=torch.int8))
    return (offsets.dtype == torch.int64 and obj["input_ids"].dtype == torch.int32 and len(offsets) == n_examples + 1
            and int(offsets[0]) == 0 and int(offsets[-1]) == n_tokens and bool((offsets[1:] >= offsets[:-1]).all())
            and isinstance(types, torch.Tensor) and types.dtype == torch.int8 and len(types) == n_tokens)


def write_cache(path: Path, packed: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(packed, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------- distributed


def init_distributed(requested_device: str | None, env: DistEnv) -> torch.device:
    """This process's device; under torchrun (even with one process) also the process group."""
    device = pick_device(requested_device, env.local_rank if env.torchrun else None)
    if env.torchrun:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def gather_objects(obj: Any, world_size: int) -> list[Any]:
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
        # ranks different numbers of batches, where a collective inside forward would deadlock.
        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                                        broadcast_buffers=False)
    if run.args.compile:
        torch._dynamo.config.recompile_limit = 64  # a few length buckets x (train, eval, last batch)
        # static shapes, one graph per bucket: left dynamic, the second length seen would turn the
        # graph into a slower dynamic-shape one and the buckets would buy nothing
        model = torch.compile(model, dynamic=False)
    return model


# ------------------------------------------------------------------------------------------ outputs


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
    from transformers.utils import logging as transformers_logging
    tmp = model_dir.with_name(".model.tmp")
    if tmp.exists():  # left by an interrupted save: save_pretrained would mix old and new files
        shutil.rmtree(tmp)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a "Writing model shards" bar of one shard says nothing
    try:
        run.raw_model.save_pretrained(tmp, safe_serialization=True)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
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


def update_config(run_dir: Path, **fields: Any) -> None:
    """Add fields to config.json (when the run was resumed, how its training ended), keeping the rest."""
    write_json(run_dir / "config.json", {**read_json(run_dir / "config.json"), **fields})


def write_results(run: Run, run_dir: Path, result: dict) -> None:
    """Metric files, test-metrics.json last: its presence is what marks a finished run."""
    update_config(run_dir, training_end=result["training_end"])
    write_json(run_dir / "val-metrics.json", {"best_epoch": result["best_epoch"],
                                              "train_seconds": round(result["train_seconds"], 3), **result["val"]})
    write_predictions(run_dir / "test-predictions.jsonl", split_ids(run.splits["test"]), run.labels["test"],
                      result["test_probs"], run.id2label)
    atomic_write_text(run_dir / "learning-curve.svg", learning_curve_svg(result["history"]))
    if run.args.save_model:
        save_model(run, run_dir / "model")
    write_json(run_dir / "test-metrics.json", result["test"])
    remove_checkpoints(run_dir)  # only now: a kill before test-metrics.json can still resume


# ------------------------------------------------------------------------------ checkpoints + --resume


CHECKPOINT_FORMAT = 1
CHECKPOINT_PREFIX = "checkpoint-epoch"  # <run dir>/checkpoint-epoch<N>/, written as .checkpoint-epoch<N>.tmp/
WEIGHTS, BEST_WEIGHTS, TRAINING_STATE, MANIFEST = ("model.safetensors", "best-model.safetensors",
                                                   "training-state.pt", "manifest.json")
# settings that change how a run works, not what it computes: --resume may give them new values
# (--device and --dtype only while they resolve to the device type and dtype the run started with)
RESUME_MAY_CHANGE = frozenset({"debug", "log_interval", "cache_dir", "checkpoint_minutes", "device", "dtype"})


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


def checkpoint_due(minutes: float, since: float, world_size: int) -> bool:
    """Whether --checkpoint_minutes have passed since `since` (time.monotonic()). Rank 0's clock decides
    for every rank: they write a checkpoint together."""
    return broadcast_object(minutes >= 0 and time.monotonic() - since >= minutes * 60, world_size)


def save_checkpoint(run: Run, run_dir: Path | None, run_id: str, training: TrainingState,
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
        kept = last_complete_epoch(run_dir)
        then = (f"the checkpoint of epoch {kept} is kept: free space, then continue with "
                f"`python bertcls.py --resume {run_dir}`" if kept else "free space and start the run again")
        raise UserError(f"could not write the checkpoint of epoch {epoch} ({first_line(e)}; "
                        f"{shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free on its disk); {then}") from e
    remove_checkpoints(run_dir, keep=path)
    return path


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


def load_resume_checkpoint(run: Run, run_dir: Path, run_id: str) -> dict:
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


def restore(checkpoint: dict, run: Run, optimizer: torch.optim.Optimizer,
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
    config = read_json(run_dir / "config.json")
    saved = config.get("args") if isinstance(config, dict) else None
    if not isinstance(saved, dict):
        raise UserError(f"--resume {run_dir}: not a run directory (its config.json has no \"args\")")
    defaults = vars(parse_args([]))
    if unknown := sorted(saved.keys() - defaults.keys()):
        raise UserError(f"--resume {run_dir}: the run has settings this bertcls.py does not know "
                        f"({', '.join(unknown)}); resume it with the version that started it")
    settings = {**defaults, **saved, "resume": str(run_dir)}
    for name, value in command_line_settings(argv).items():
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


def check_resumable(run: Run, config: dict) -> None:
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


def record_resume(run: Run, run_dir: Path, epoch: int) -> None:
    """config.json keeps its settings; each resume is added, with the settings it changed (RESUME_MAY_CHANGE)."""
    config = read_json(run_dir / "config.json")
    changed = {k: v for k, v in vars(run.args).items() if k != "resume" and config["args"].get(k, v) != v}
    entry = {"at": datetime.datetime.now().isoformat(timespec="seconds"), "from_epoch": epoch, "changed": changed}
    update_config(run_dir, resumed=[*config.get("resumed", []), entry])


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
        self.raw_model = load_model(args.model_name, self.label2id, args.trust_remote_code, log)
        if note := unknown_family_note(args.model_name, self.raw_model.config):
            log(note)
        freeze_unreachable(self.raw_model, log)
        self.params, self.params_non_embedding = count_parameters(self.raw_model)
        self.spec = InputSpec(effective_max_len(args.max_seq_len, self.tokenizer, self.raw_model.config, log),
                              uses_token_type_ids(self.raw_model.config), args.truncation)
        check_room_for_text(self.spec.max_len, self.tokenizer, pair=any(d.pairs for d in self.splits.values()))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.buckets = compile_buckets(self.spec.max_len) if args.compile else None
        widest = padded_length(self.spec.max_len, buckets=self.buckets)
        if args.max_batch_tokens is not None and args.max_batch_tokens < widest:
            raise UserError(f"--max_batch_tokens {args.max_batch_tokens} cannot hold one example of "
                            f"{self.spec.max_len} tokens (padded to {widest}): raise it or lower --max_seq_len")
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
              training: TrainingState, quiet: bool) -> dict:
    """Train the next epoch and validate it; record its log.csv row, and its weights if its val F1 is the best."""
    from tqdm.auto import tqdm
    epoch = training.epoch + 1
    all_batches = all_train_batches(run, epoch)
    batches = all_batches[run.rank::run.world_size]
    start = time.perf_counter()
    with tqdm(total=sum(map(len, batches)), desc=f"epoch {epoch}", unit="ex", disable=quiet, leave=False,
              dynamic_ncols=True) as progress:
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


def start_record(run: Run, run_dir: Path, resumed_from: int | None) -> str:
    """config.json for a new run, or a note of the resume in the run's own; returns the run's identity."""
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
        row = run_epoch(model, optimizer, scaler, run, training, quiet)
        stop_reason = row["stop_reason"] = early_stop_reason(training, args)
        log(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} "
            f"acc {row['val_accuracy']:.4f} f1 {row['val_f1']:.4f} | {row['examples_per_s']:.1f} ex/s"
            + (f" | {stop_reason}" if stop_reason else ""))
        if run_dir is not None:
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
