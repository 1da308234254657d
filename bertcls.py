"""Fine-tune and evaluate one BERT-style model for text classification.

One GPU (or the CPU):
    python bertcls.py --model_name cl-tohoku/bert-base-japanese-v3 --lr 3e-5
Several GPUs on one node (DistributedDataParallel under torchrun):
    torchrun --standalone --nproc_per_node 4 bertcls.py --model_name cl-tohoku/bert-base-japanese-v3
Two nodes (run on each, with its --node_rank):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 bertcls.py ...

Reads datasets/livedoor/{train,val,test}.jsonl + label2id.json (see prepare.py), trains with AdamW and a
linear warmup/decay schedule, picks the epoch with the best validation macro F1, evaluates val and test
once with its weights and writes everything under outputs/<model>/<date>/<time>/. test-metrics.json is
written last: a run directory without it is not a finished run.

Reading guide (this file is the training story, in the order it happens):
    parse_args                    every setting, with its default
    data                          label2id.json and the JSONL splits
    batching                      length-grouped batches, padding, collate
    schedule + optimizer          AdamW without decay on biases/norms, linear warmup then decay (get_lr)
    training loop                 train_epoch: one epoch of optimizer steps (AMP, accumulation, clipping)
    evaluation                    predict / evaluate: every example once, also under DDP
    metrics                       confusion matrix and macro precision / recall / F1 by hand
    tokenization cache            tokenize once per (tokenizer, length, data), reuse across runs
    distributed                   torchrun process group and the collectives used
    outputs                       log.csv, learning curve, predictions, --save_model
    Run, train_and_evaluate, main set-up, the epoch loop with best-epoch selection, and the command line
Below it: common.py (errors, files, devices; nothing about BERT) and families.py (how each model family
is loaded and fed).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from common import (DistEnv, UserError, atomic_write_text, autocast_context, check_output_dir, dist_env, dtype_name,
                    first_line, make_run_dir, non_negative_float, pick_device, positive_float, positive_int,
                    read_json, read_jsonl, resolve_dtype, run_cli, use_tf32, write_json)
from families import effective_max_len, freeze_unreachable, load_model, load_tokenizer, uses_token_type_ids

CACHE_FORMAT = 1  # bump when the layout of the tokenization cache changes
NO_DECAY_SUFFIXES = ("bias", "layernorm.weight", "layer_norm.weight", "norm.weight", "ln.weight")
SPLITS = ("train", "val", "test")
OOM_ADVICE = ("lower --batch_size (with --grad_accum_steps to keep the effective batch), lower --max_seq_len, "
              "or add --gradient_checkpointing")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--save_model", action="store_true",
                   help="also save the best weights + tokenizer to <run dir>/model/ (default: off)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow a hub model to run its own Python code (default: off)")
    p.add_argument("--mecab_dic", choices=("auto", "ipadic", "unidic_lite", "unidic"), default="auto",
                   help="MeCab dictionary for BertJapaneseTokenizer models; auto uses IPAdic for cl-tohoku v1 "
                        "configs that name none (default: auto)")
    p.add_argument("--log_interval", type=positive_int, default=20,
                   help="optimizer steps between progress updates and NaN checks (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors (default: off)")
    args = p.parse_args(argv)
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size
    return args


# ---------------------------------------------------------------------------------------------- data


def load_label2id(dataset_dir: Path) -> dict[str, int]:
    path = dataset_dir / "label2id.json"
    label2id = read_json(path, hint="re-run prepare.py")
    if not isinstance(label2id, dict) or not label2id:
        raise UserError(f"{path}: expected a non-empty object mapping label names to ids")
    if sorted(label2id.values()) != list(range(len(label2id))):
        raise UserError(f"{path}: ids must be 0..{len(label2id) - 1}, each once; re-run prepare.py")
    return label2id


def example_text(row: dict) -> tuple[str, str | None]:
    """The model input of one example: the (title, body) pair when both exist, else `text`."""
    if isinstance(row.get("title"), str) and isinstance(row.get("body"), str):
        return row["title"], row["body"]
    if isinstance(row.get("text"), str):
        return row["text"], None
    raise ValueError("needs a string 'text', or string 'title' and 'body'")


def load_split(dataset_dir: Path, split: str, label2id: dict[str, int]) -> list[dict]:
    """Rows of one split, each with an int `label` in range and a text; bad rows are UserErrors."""
    path = dataset_dir / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: create the dataset with `python prepare.py --output_dir {dataset_dir}`")
    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path} is empty: every split needs examples (re-run prepare.py with more data)")
    for lineno, row in enumerate(rows, 1):
        label = row.get("label")
        if isinstance(label, str) and label in label2id:
            row["label"] = label2id[label]
        elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(label2id):
            raise UserError(f"{path}: example {lineno}: label {label!r} is not in {dataset_dir / 'label2id.json'} "
                            f"(ids 0..{len(label2id) - 1}); the dataset and label2id.json disagree: re-run prepare.py")
        try:
            example_text(row)
        except ValueError as e:
            raise UserError(f"{path}: example {lineno}: {e}") from None
    return rows


def file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ batching


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                           group_batches: int = 64) -> list[list[int]]:
    """Shuffle, sort by length within chunks of many batches, then shuffle the batches.

    Randomness is kept (which examples meet in a batch and the batch order change every epoch) while
    examples of similar length share a batch, so little compute is spent on padding.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * group_batches
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches of examples sorted by length (longest first, so an OOM shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


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


# ------------------------------------------------------------------------------------- training loop


class NonFiniteLoss(UserError):
    pass


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                run: Run, batches: list[list[int]], step: int, epoch: int, progress: Any = None,
                collate_fn: Any = None) -> tuple[int, float]:
    """One pass over `batches` (this rank's); returns the next optimizer step and the mean train loss.

    `model` is what is called (DDP- or compile-wrapped), `run` holds the settings (run.args), the data and
    the schedule. The loss of each micro-batch is weighted by its share of the examples of its optimizer
    step, so K accumulated micro-batches give the gradient of one batch K times as large. `collate_fn`
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
    for group in groups:
        lr = get_lr(step, run.total_steps, run.warmup_steps, args.lr)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        group_examples = sum(len(b) for b in group)
        for micro, batch_indices in enumerate(group):
            batch = to_device(collate_fn(packed, batch_indices, labels, run.pad_id, run.buckets), device)
            if hasattr(model, "require_backward_grad_sync"):  # DDP: all-reduce only on the last micro-batch
                model.require_backward_grad_sync = micro == len(group) - 1
            with run.ctx:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss = F.cross_entropy(logits.float(), batch["labels"])
            scaler.scale(loss * (len(batch_indices) / group_examples)).backward()
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
            check_finite(first_bad_step, epoch)  # the only host sync: once per interval
            if progress is not None:
                progress.set_postfix(loss=f"{loss_sum.item() / n_examples:.4f}", lr=f"{lr:.2e}", refresh=False)
        if progress is not None:
            progress.update(group_examples)
    return step, loss_sum.item() / max(1, n_examples)


def check_finite(first_bad_step: torch.Tensor, epoch: int) -> None:
    bad = int(first_bad_step)
    if bad >= 0:
        raise NonFiniteLoss(f"the training loss became NaN/inf at epoch {epoch}, optimizer step {bad + 1}: "
                            "lower --lr, use --dtype fp32 or bf16, or check the data")


# ---------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: torch.nn.Module, packed: dict[str, torch.Tensor], batch_size: int, device: torch.device,
            ctx: contextlib.AbstractContextManager, pad_id: int, labels: torch.Tensor | None = None,
            rank: int = 0, world_size: int = 1, buckets: Sequence[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities (n, C) in the original example order, and per-example losses when labels are given.

    Examples are evaluated in length-sorted batches; under DDP each rank takes every world_size-th
    batch and the results are gathered by example index, so each example counts exactly once and the
    numbers equal a single-process evaluation.
    """
    model.eval()
    batches = sorted_batches(example_lengths(packed), batch_size)[rank::world_size]
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
    probs, losses = predict(model, run.packed[split], run.args.eval_batch_size, run.device, run.ctx, run.pad_id,
                            labels=labels, rank=run.rank, world_size=run.world_size, buckets=run.buckets)
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


class InputSpec(NamedTuple):
    """How texts become model inputs: what the cache key, config.json and a saved model record."""
    max_len: int  # tokens per example, special tokens included
    token_type_ids: bool  # feed the body as segment B (BERT-style pre-training)


def tokenize_rows(tokenizer: Any, rows: Sequence[dict], spec: InputSpec,
                  chunk_size: int = 256) -> dict[str, list[list[int]]]:
    """Token ids of every row: a (title, body) pair truncates the body only, so the title is always seen."""
    out: dict[str, list[list[int]]] = {"input_ids": [], "token_type_ids": []}
    for start in range(0, len(rows), chunk_size):
        texts = [example_text(r) for r in rows[start:start + chunk_size]]
        for first, second in texts:
            enc = encode_one(tokenizer, first, second, spec)
            out["input_ids"].append(enc["input_ids"])
            out["token_type_ids"].append(enc.get("token_type_ids") or [])
    return out


def encode_one(tokenizer: Any, first: str, second: str | None, spec: InputSpec) -> dict:
    kwargs = dict(max_length=spec.max_len, return_token_type_ids=spec.token_type_ids, return_attention_mask=False)
    if second is None:
        return tokenizer(first, truncation=True, **kwargs)
    enc = tokenizer(first, second, truncation="only_second", **kwargs)
    if len(enc["input_ids"]) > spec.max_len:  # the title alone is too long: only_second cannot help
        enc = tokenizer(first, second, truncation="longest_first", **kwargs)
    return enc


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


def load_or_tokenize(tokenizer: Any, rows: Sequence[dict], spec: InputSpec, cache_dir: str, fingerprint: str,
                     data_digest: str, log=print) -> dict[str, torch.Tensor]:
    """Tokenize once per (tokenizer, input spec, data); a sweep over learning rates and seeds reuses it."""
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, fingerprint, *spec, data_digest]).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if not is_packed(cached, len(rows)):
                raise ValueError("unexpected contents")
            return cached
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
            log(f"warning: ignoring unreadable tokenization cache {path} ({first_line(e)})")
    start = time.perf_counter()
    packed = pack(tokenize_rows(tokenizer, rows, spec))
    log(f"tokenized {len(rows)} examples in {time.perf_counter() - start:.1f}s")
    if path is not None:
        try:
            write_cache(path, packed)
        except OSError as e:  # a cache is an optimisation: never fail a run over it
            log(f"warning: could not write the tokenization cache {path} ({first_line(e)})")
    return packed


def is_packed(obj: Any, n_examples: int) -> bool:
    """Whether obj has the layout pack() writes, for n_examples examples."""
    return (isinstance(obj, dict) and isinstance(obj.get("offsets"), torch.Tensor)
            and isinstance(obj.get("input_ids"), torch.Tensor) and len(obj["offsets"]) == n_examples + 1
            and int(obj["offsets"][-1]) == len(obj["input_ids"]))


def write_cache(path: Path, packed: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(packed, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rows_digest(rows: Sequence[dict]) -> str:
    texts = json.dumps([example_text(r) for r in rows], ensure_ascii=False)
    return hashlib.sha256(texts.encode()).hexdigest()


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
              "lr", "seconds", "examples_per_s"]


def write_log_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def learning_curve_svg(rows: list[dict], width: int = 640, height: int = 360) -> str:
    """Validation F1 and train/val loss per epoch as a standalone SVG (no plotting library needed)."""
    left, right, top, bottom = 50, 60, 20, 40
    epochs = [r["epoch"] for r in rows]
    max_loss = max([r["train_loss"] for r in rows] + [r["val_loss"] for r in rows] + [1e-9])
    x_span = max(1, max(epochs) - min(epochs))

    def xy(epoch: float, fraction: float) -> str:
        x = left + (epoch - min(epochs)) / x_span * (width - left - right)
        y = top + (1 - fraction) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    series = [("val F1", "#1f77b4", [r["val_f1"] for r in rows], 1.0),
              ("train loss", "#ff7f0e", [r["train_loss"] for r in rows], max_loss),
              ("val loss", "#2ca02c", [r["val_loss"] for r in rows], max_loss)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif"'
             f' font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">epoch</text>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">1.0</text>',
             f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end">0</text>',
             f'<text x="{width - right + 6}" y="{top + 4}">{max_loss:.3g}</text>']
    for epoch in epochs:
        parts.append(f'<text x="{xy(epoch, 0).split(",")[0]}" y="{height - bottom + 14}" '
                     f'text-anchor="middle">{epoch}</text>')
    for i, (name, color, values, scale) in enumerate(series):
        points = " ".join(xy(e, v / scale) for e, v in zip(epochs, values))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{left + 10 + 110 * i}" y="{top + 12}" fill="{color}">{name}</text>')
    parts.append("</svg>\n")
    return "\n".join(parts)


def write_predictions(path: Path, rows: Sequence[dict], probs: torch.Tensor, id2label: dict[int, str]) -> None:
    lines = []
    for row, p in zip(rows, probs.tolist()):
        predicted = max(range(len(p)), key=p.__getitem__)
        lines.append(json.dumps({"id": row.get("id"), "gold": id2label[row["label"]],
                                 "predicted": id2label[predicted],
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
    truncation=True (one text): it then feeds the model what training did (the README's snippet, tested).
    bertcls.json records the same for predict.py, which reproduces test-predictions.jsonl exactly.
    """
    tmp = model_dir.with_name(".model.tmp")
    if tmp.exists():  # left by an interrupted save: save_pretrained would mix old and new files
        shutil.rmtree(tmp)
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
                                      "max_seq_len": run.spec.max_len, "token_type_ids": run.spec.token_type_ids})
    os.replace(tmp, model_dir)


def write_results(run: Run, run_dir: Path, result: dict) -> None:
    """Metric files, test-metrics.json last: its presence is what marks a finished run."""
    write_json(run_dir / "val-metrics.json", {"best_epoch": result["best_epoch"],
                                              "train_seconds": round(result["train_seconds"], 3), **result["val"]})
    write_predictions(run_dir / "test-predictions.jsonl", run.rows["test"], result["test_probs"], run.id2label)
    atomic_write_text(run_dir / "learning-curve.svg", learning_curve_svg(result["history"]))
    if run.args.save_model:
        save_model(run, run_dir / "model")
    write_json(run_dir / "test-metrics.json", result["test"])


# ------------------------------------------------------------------------------------- set-up + main


class Run:
    """Everything a run sets up before its first step: settings, data, tokenizer, model, dtype, schedule.

    `raw_model` is the module that is trained and saved; wrap_model(run) gives the one that is called.
    bench.py builds the same object to time the same code path.
    """

    def __init__(self, args: argparse.Namespace, log=print, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None):
        self.args, self.log, self.rank, self.world_size = args, log, rank, world_size
        self.device = device or pick_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        use_tf32(self.device, self.dtype)
        self.ctx = autocast_context(self.device, self.dtype)
        dataset_dir = Path(args.dataset_dir)
        if not dataset_dir.is_dir():
            raise UserError(f"dataset directory {dataset_dir} not found: run `python prepare.py` first "
                            "(or pass --dataset_dir)")
        if not (dataset_dir / "label2id.json").is_file():
            raise UserError(f"{dataset_dir / 'label2id.json'} not found: run `python prepare.py` first")
        self.label2id = load_label2id(dataset_dir)
        self.id2label = {i: name for name, i in self.label2id.items()}
        self.rows = {split: load_split(dataset_dir, split, self.label2id) for split in SPLITS}
        self.dataset_digest = file_digest([dataset_dir / "label2id.json"] +
                                          [dataset_dir / f"{s}.jsonl" for s in SPLITS])
        # Each rank its own dropout masks (rank 0 keeps the seed, so one process runs as before); the data order
        # has its own generator (train_batches), and DDP copies rank 0's new classifier head to every rank.
        torch.manual_seed(args.seed + rank)
        self.tokenizer = load_tokenizer(args.model_name, args.mecab_dic, args.trust_remote_code, log)
        self.raw_model = load_model(args.model_name, self.label2id, args.trust_remote_code)
        freeze_unreachable(self.raw_model, log)
        self.params, self.params_non_embedding = count_parameters(self.raw_model)
        self.spec = InputSpec(effective_max_len(args.max_seq_len, self.tokenizer, self.raw_model.config, log),
                              uses_token_type_ids(self.raw_model.config))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.buckets = compile_buckets(self.spec.max_len) if args.compile else None
        self.packed = self.tokenize_all()
        self.labels = {s: torch.tensor([r["label"] for r in self.rows[s]]) for s in SPLITS}
        steps_per_epoch = optimizer_steps_per_epoch(len(train_batches(self, 1)), args.grad_accum_steps)
        self.total_steps = steps_per_epoch * args.epochs
        self.warmup_steps = round(steps_per_epoch * args.num_warmup_epochs)

    def tokenize_all(self) -> dict[str, dict[str, torch.Tensor]]:
        fingerprint = tokenizer_fingerprint(self.tokenizer) if self.args.cache_dir else ""
        packed = {}
        for rank_turn in ([0, 1] if self.world_size > 1 else [self.rank]):
            # rank 0 tokenizes and fills the cache first; the other ranks then read it
            if (rank_turn == 0) == (self.rank == 0):
                for split in SPLITS:
                    packed[split] = load_or_tokenize(self.tokenizer, self.rows[split], self.spec,
                                                     self.args.cache_dir, fingerprint,
                                                     rows_digest(self.rows[split]), self.log)
            if self.world_size > 1 and rank_turn == 0:
                barrier(self.world_size)
        return packed

    def config_record(self) -> dict:
        import transformers
        return {"args": vars(self.args), "device": str(self.device), "dtype": dtype_name(self.dtype),
                "world_size": self.world_size,
                "effective_batch_size": self.args.batch_size * self.args.grad_accum_steps * self.world_size,
                "total_optimizer_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "max_seq_len_used": self.spec.max_len, "params": self.params,
                "params_non_embedding": self.params_non_embedding, "dataset_digest": self.dataset_digest,
                "examples": {s: len(self.rows[s]) for s in SPLITS},
                "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                             "transformers": transformers.__version__},
                "started_at": datetime.datetime.now().isoformat(timespec="seconds")}


def train_batches(run: Run, epoch: int) -> list[list[int]]:
    """This rank's batches for an epoch: the same global order on every rank, re-seeded each epoch."""
    rng = random.Random(f"{run.args.seed}-{epoch}")
    batches = length_grouped_batches(example_lengths(run.packed["train"]), run.args.batch_size, rng)
    if run.world_size > 1:  # every rank needs the same number of steps: repeat a few batches to even out
        batches += batches[: (-len(batches)) % run.world_size]
    return batches[run.rank::run.world_size]


def train_and_evaluate(run: Run, run_dir: Path | None) -> dict:
    """Train every epoch, keep the weights of the best val F1, then evaluate val and test once with them."""
    args, log = run.args, run.log
    model = wrap_model(run)
    optimizer = build_optimizer(run.raw_model, args, run.device)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    if run_dir is not None:
        write_json(run_dir / "config.json", run.config_record())
    log(f"examples: train {len(run.rows['train'])}, val {len(run.rows['val'])}, test {len(run.rows['test'])} | "
        f"epochs {args.epochs} | per-device batch {args.batch_size} x world size {run.world_size} x accumulation "
        f"{args.grad_accum_steps} = effective batch {args.batch_size * run.world_size * args.grad_accum_steps} | "
        f"optimizer steps {run.total_steps} (warmup {run.warmup_steps}) | device {run.device} {run.dtype} | "
        f"params {run.params / 1e6:.2f}M | max_seq_len {run.spec.max_len}")
    from tqdm.auto import tqdm
    quiet = run.rank != 0 or not sys.stderr.isatty()
    step, best, history, train_seconds = 0, None, [], 0.0
    # ------------------------------------------------------------------------------- the epoch loop
    for epoch in tqdm(range(1, args.epochs + 1), desc="epochs", disable=quiet, dynamic_ncols=True):
        batches = train_batches(run, epoch)
        start = time.perf_counter()
        with tqdm(total=sum(map(len, batches)), desc=f"epoch {epoch}", unit="ex", disable=quiet, leave=False,
                  dynamic_ncols=True) as progress:
            step, train_loss = train_epoch(model, optimizer, scaler, run, batches, step=step, epoch=epoch,
                                           progress=progress)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        train_loss = sum(gather_objects(train_loss, run.world_size)) / run.world_size
        val, _ = evaluate(model, run, "val")
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "val_precision": val["precision"], "val_recall": val["recall"], "val_f1": val["f1"],
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
               "examples_per_s": round(sum(map(len, batches)) * run.world_size / seconds, 2)}
        history.append(row)
        if best is None or val["f1"] > best["val"]["f1"]:  # the first epoch always counts
            best = {"epoch": epoch, "val": val,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in run.raw_model.state_dict().items()}}
        log(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f} | val loss {val['loss']:.4f} "
            f"acc {val['accuracy']:.4f} f1 {val['f1']:.4f} | {row['examples_per_s']:.1f} ex/s")
        if run_dir is not None:
            write_log_csv(run_dir / "log.csv", history)
    if best["epoch"] == args.epochs:  # the weights in hand are the best ones: their val metrics are known
        val = best["val"]
    else:
        run.raw_model.load_state_dict(best["state"])
        val, _ = evaluate(model, run, "val")
    test, test_probs = evaluate(model, run, "test")
    return {"best_epoch": best["epoch"], "val": val, "test": test, "test_probs": test_probs, "history": history,
            "train_seconds": train_seconds}


def fine_tune(args: argparse.Namespace, env: DistEnv, log: Callable[[str], None], outcome: dict) -> int:
    """The whole run: set up, train, evaluate, write the results (rank 0); outcome['run_dir'] once made."""
    check_output_dir(Path(args.output_dir))
    device = init_distributed(args.device, env)
    random.seed(args.seed)
    run = Run(args, log, env.rank, env.world_size, device)
    run_dir = make_run_dir(Path(args.output_dir), args.model_name) if env.rank == 0 else None
    outcome["run_dir"] = run_dir = broadcast_object(run_dir, env.world_size)
    result = train_and_evaluate(run, run_dir if env.rank == 0 else None)
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

    def stopped() -> str:
        run_dir = outcome.get("run_dir")
        return f"{run_dir} keeps config.json and log.csv, no metrics" if run_dir else "no run directory was made"

    try:
        return run_cli("bertcls.py", lambda: fine_tune(args, env, log, outcome), args.debug, stopped, OOM_ADVICE,
                       who=f" [rank {env.rank}]" if env.torchrun else "")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
