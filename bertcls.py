"""Fine-tune and evaluate one BERT-style model for text classification.

    python bertcls.py --model_name cl-tohoku/bert-base-japanese-v3 --lr 3e-5          # one GPU, or the CPU
    torchrun --standalone --nproc_per_node 4 bertcls.py --model_name ...             # DDP on 4 GPUs
    python bertcls.py --resume outputs/<model>/<date>/<time>                         # continue a killed run

Reads datasets/livedoor/{train,val,test}.jsonl and label2id.json (prepare.py), trains with AdamW and a linear
warmup/decay schedule, keeps the weights of the epoch with the best validation macro-F1, evaluates val and test
once with them and writes outputs/<model>/<date>/<time>/. test-metrics.json is written last: a run directory
without it is not a finished run. Long runs write a checkpoint every --checkpoint_minutes, at the end of an epoch.

Reading order: settings (parse_args), batches, schedule and optimizer, the training loop (train_epoch),
evaluation and metrics, checkpoints, result files, set-up, and main: set-up, the epochs, the results.
data.py turns the dataset into token ids; models.py loads each model family; common.py is the plumbing.
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
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from common import (Progress, UserError, atomic_write, broadcast_object, dist_env, dtype_name, finite_float,
                    gather_objects, load_tensors, locked, non_negative_float, pick_device, positive_float, positive_int,
                    read_json, resolve_dtype, run_cli, save_tensors, seed_int, write_json)
from data import (SPLITS, TRUNCATIONS, InputSpec, Inputs, compile_buckets, cut_batches, file_digest, lengths_of,
                  load_dataset, padded_length, split_ids, tokenized, tokenizer_fingerprint)
from models import attention_implementation, compile_layers, load_model, load_tokenizer, max_length, uses_token_type_ids

# The settings that change where and how a run works, not what it computes: --resume may give them new values, and
# sweep.py matches runs without them. --device and --dtype count through what they resolve to (see experiment).
RUN_ONLY = frozenset({"output_dir", "cache_dir", "tokenize_workers", "log_interval", "checkpoint_minutes", "debug",
                      "resume", "device", "dtype", "compile"})
NO_DECAY = ("bias", "layernorm.weight", "layer_norm.weight", "norm.weight")
OOM_ADVICE = ("lower --batch_size (with --grad_accum_steps to keep the effective batch), lower --max_seq_len, or add "
              "--gradient_checkpointing")


def parse_args(argv: Sequence[str] | None = None, unset: Any = None) -> argparse.Namespace:
    """The settings; with `unset`, the flags not given are left at that value instead of their defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--model_name", default="cl-tohoku/bert-base-japanese-v3", help="hub name or local directory (default: %(default)s)")
    add("--dataset_dir", default="datasets/livedoor", help="written by prepare.py (default: %(default)s)")
    add("--batch_size", type=positive_int, default=16, help="examples per device and step (default: %(default)s)")
    add("--eval_batch_size", type=positive_int, default=None, help="(default: 2 x --batch_size)")
    add("--epochs", type=positive_int, default=20, help="(default: %(default)s)")
    add("--lr", type=positive_float, default=3e-5, help="peak learning rate (default: %(default)s)")
    add("--num_warmup_epochs", type=non_negative_float, default=2, help="linear warmup, in epochs (default: %(default)s)")
    add("--max_seq_len", type=positive_int, default=512, help="tokens per example, capped by the model (default: %(default)s)")
    add("--truncation", choices=TRUNCATIONS, default="head", help="what a long example keeps: the title and the start "
        "of the body (head), or the title, a quarter of the room from the body's start and the rest from its end "
        "(head_tail, Sun et al. 2019) (default: %(default)s)")
    add("--max_batch_tokens", type=positive_int, default=None, help="batches of at most this many padded tokens "
        "instead of --batch_size examples; evaluation uses twice as many (default: off)")
    add("--weight_decay", type=non_negative_float, default=0.01, help="not on biases and norms (default: %(default)s)")
    add("--max_grad_norm", type=non_negative_float, default=1.0, help="clipping; 0: off (default: %(default)s)")
    add("--grad_accum_steps", type=positive_int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    add("--gradient_checkpointing", action="store_true", help="recompute activations to save memory (default: off)")
    add("--patience", type=positive_int, default=None, help="stop after this many epochs without a better val F1; the "
        "schedule stays that of --epochs (default: off)")
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    add("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="autocast: auto = bf16 where the "
        "hardware has it (GPUs from Ampere, CPUs with AVX512-BF16/AMX), fp16 with a GradScaler on older GPUs, else "
        "fp32; fp32 on CUDA multiplies in TF32 (default: auto)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile each encoder layer "
        "(default: on with CUDA, off on the CPU)")
    add("--seed", type=seed_int, default=42, help="(default: %(default)s)")
    add("--output_dir", default="outputs", help="(default: %(default)s)")
    add("--cache_dir", default=".cache/bertcls", help="tokenization cache; '' for none (default: %(default)s)")
    add("--tokenize_workers", type=positive_int, default=min(16, len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1), help="processes that tokenize a split of "
        "2000+ examples (default: the CPU cores this process may use, at most 16)")
    add("--save_model", action="store_true", help="save the best weights and the tokenizer to <run dir>/model/ "
        "(default: off)")
    add("--trust_remote_code", action="store_true", help="let a hub model run its own code (default: off)")
    add("--mecab_dic", choices=("auto", "ipadic", "unidic_lite", "unidic"), default="auto", help="MeCab dictionary of "
        "BertJapaneseTokenizer; auto: IPAdic for cl-tohoku v1 models, whose configs name none (default: auto)")
    add("--log_interval", type=positive_int, default=20, help="optimizer steps between progress lines and NaN checks "
        "(default: %(default)s)")
    add("--checkpoint_minutes", type=finite_float, default=10, help="write a checkpoint at the end of an epoch when "
        "this many minutes have passed since the last; 0: every epoch; negative: never (default: %(default)s)")
    add("--resume", metavar="RUN_DIR", default=None, help="continue a killed run from its checkpoint, with its own "
        "settings (default: off)")
    add("--debug", action="store_true", help="show tracebacks (default: off)")
    if unset is not None:
        return p.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(p.parse_args([]))}))
    args = p.parse_args(argv)
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    return args


# ---------------------------------------------------------------------------------------------------- batches


def epoch_batches(lengths: Sequence[int], args: argparse.Namespace, epoch: int, world_size: int,
                  buckets: Sequence[int] | None = None) -> list[list[int]]:
    """Every rank's batches of an epoch, in one global order that each rank computes alike (re-seeded per epoch).

    Shuffled, then sorted by length within groups of 64 batches, then the batches shuffled: random, yet with
    little padding. Rank r takes every world_size-th batch; a few are repeated so that every rank has as many.
    """
    rng = random.Random(f"{args.seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = 64 * (args.max_batch_tokens // max(1, sum(lengths) // len(lengths)) if args.max_batch_tokens
                  else args.batch_size)
    batches = [b for s in range(0, len(order), group) for b in cut_batches(
        sorted(order[s:s + group], key=lambda i: -lengths[i]), lengths, args.batch_size, args.max_batch_tokens, buckets)]
    rng.shuffle(batches)
    return batches + batches[:(-len(batches)) % world_size]


def step_sizes(batches: Sequence[Sequence[int]], accumulation: int, world_size: int) -> list[int]:
    """Examples of each optimizer step over all ranks (a step takes accumulation x world_size consecutive batches)."""
    per_step = accumulation * world_size
    return [sum(map(len, batches[i:i + per_step])) for i in range(0, len(batches), per_step)]


# ---------------------------------------------------------------------------------- schedule and optimizer


def get_lr(step: int, total_steps: int, warmup_steps: int, max_lr: float) -> float:
    """The learning rate of optimizer step `step` (from 0):
    1) warmup: linear from max_lr / warmup_steps up to max_lr at the last warmup step;
    2) decay: linear from max_lr down towards 0 at total_steps;
    3) past total_steps (a run never gets there): 0."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return max(0.0, max_lr * (total_steps - step) / max(1, total_steps - warmup_steps))


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms or any other vector."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and not n.lower().endswith(NO_DECAY)]
    rest = [p for n, p in named if not (p.ndim >= 2 and not n.lower().endswith(NO_DECAY))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=args.lr, fused=True)


# --------------------------------------------------------------------------------------------- training loop


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                data: Inputs, batches: list[list[int]], sizes: Sequence[int], args: argparse.Namespace,
                schedule: tuple[int, int], step: int, ctx: Any, device: torch.device,
                progress: Progress | None = None) -> tuple[int, float]:
    """One pass over this rank's batches; returns the next optimizer step and the mean training loss.

    Each micro-batch's loss is weighted by its share of its optimizer step's examples over all ranks (`sizes`),
    so accumulated micro-batches, batches of a token budget and ranks with fewer examples all give the gradient
    of the step's mean loss. The host waits for the device only every --log_interval steps.
    """
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    model.train()
    loss_sum, first_bad, seen = torch.zeros((), device=device), torch.full((), -1, device=device), 0
    groups = [batches[i:i + args.grad_accum_steps] for i in range(0, len(batches), args.grad_accum_steps)]
    for group, size in zip(groups, sizes):
        lr = get_lr(step, *schedule, args.lr)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for micro, indices in enumerate(group):
            if hasattr(model, "require_backward_grad_sync"):  # DDP: all-reduce on the last micro-batch only
                model.require_backward_grad_sync = micro == len(group) - 1
            batch = data.batch(indices, device)
            labels = batch.pop("labels")
            with ctx:
                loss = F.cross_entropy(model(**batch).logits.float(), labels)
            scaler.scale(loss * (len(indices) * world_size / size)).backward()
            loss_sum += loss.detach() * len(indices)
            seen += len(indices)
            first_bad = torch.where((first_bad < 0) & ~loss.detach().isfinite(), step, first_bad)
        if args.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if progress is not None:
            progress.update(size)
        if step % args.log_interval == 0 or group is groups[-1]:
            if (bad := int(first_bad)) >= 0:
                raise UserError(f"the training loss became NaN/inf at optimizer step {bad + 1}: lower --lr, clip "
                                "gradients (--max_grad_norm), try --dtype fp32, or check the data")
            if progress is not None and step % args.log_interval == 0:
                progress.report(step=f"{step}/{schedule[0]}", loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lr:.2e}")
    return step, loss_sum.item() / max(1, seen)


# ------------------------------------------------------------------------------------- evaluation and metrics


@torch.no_grad()
def predict(model: torch.nn.Module, data: Inputs, batch_size: int, max_tokens: int | None, ctx: Any,
            device: torch.device, rank: int = 0, world_size: int = 1, desc: str | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (n, C) and per-example losses (0 without labels), in example order.

    Length-sorted batches, longest first (an out-of-memory error shows at once); under DDP each rank takes every
    world_size-th batch and the results are gathered by example index: each example counts exactly once, and
    the numbers equal a single process's.
    """
    model.eval()
    lengths = lengths_of(data.packed)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = cut_batches(order, lengths, batch_size, max_tokens, data.buckets)[rank::world_size]
    indices, probs, losses = [], [], []
    with Progress(sum(map(len, batches)), desc or "", enabled=desc is not None) as progress:
        for batch_indices in batches:
            batch = data.batch(batch_indices, device)
            labels = batch.pop("labels")
            with ctx:
                logits = model(**batch).logits.float()
            indices += batch_indices
            probs.append(logits.softmax(-1))  # on the device: one copy to the host at the end
            losses.append(F.cross_entropy(logits, labels, reduction="none"))
            progress.update(len(batch_indices))
    all_probs, all_losses = torch.zeros(len(lengths), 0), torch.zeros(len(lengths), dtype=torch.float64)
    for part in gather_objects((indices, torch.cat(probs).cpu() if probs else None,
                                torch.cat(losses).cpu() if losses else None), world_size):
        if part[1] is not None:
            all_probs = all_probs if all_probs.shape[1] else torch.zeros(len(lengths), part[1].shape[1])
            all_probs[part[0]], all_losses[part[0]] = part[1], part[2].double()
    return all_probs, all_losses


def scores(gold: Sequence[int], pred: Sequence[int], losses: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
    """Loss (the true mean over examples), accuracy, and precision/recall/F1 per label and macro-averaged over the
    labels present in gold or predictions (scikit-learn's default), from the confusion matrix."""
    matrix = [[0] * len(names) for _ in names]
    for g, p in zip(gold, pred, strict=True):
        matrix[g][p] += 1
    present = sorted(set(gold) | set(pred))
    per_class = {}
    for c in present:
        tp, predicted, support = matrix[c][c], sum(row[c] for row in matrix), sum(matrix[c])
        precision, recall = tp / predicted if predicted else 0.0, tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[names[c]] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    macro = {k: sum(c[k] for c in per_class.values()) / len(per_class) for k in ("precision", "recall", "f1")}
    return {"loss": float(losses.mean()), "accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold), **macro,
            "macro_over": [names[c] for c in present], "per_class": per_class,
            "confusion_matrix": {"rows": "gold label", "columns": "predicted label", "labels": list(names),
                                 "matrix": matrix}}


def evaluate(model: torch.nn.Module, run: Run, split: str) -> tuple[dict[str, Any], torch.Tensor]:
    """Scores of one split (each example once, also under DDP) and its class probabilities."""
    args, data = run.args, run.data[split]
    probs, losses = predict(model, data, args.eval_batch_size, args.max_batch_tokens and 2 * args.max_batch_tokens,
                            run.ctx, run.device, run.rank, run.world_size, f"evaluating {split}" if run.rank == 0 else None)
    return scores(data.labels.tolist(), probs.argmax(-1).tolist(), losses, run.names), probs


# ------------------------------------------------------------------------------------------------- checkpoints


def cpu_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights on the CPU (a copy also unties shared tensors, which safetensors refuses)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ result files

LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
              "lr_at_epoch_end", "seconds", "examples_per_s", "stop_reason"]
RESULT_FILES = ("val-metrics.json", "test-predictions.jsonl", "learning-curve.svg")  # and test-metrics.json, last


def write_log_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def learning_curve_svg(rows: list[dict], width: int = 640, height: int = 400) -> str:
    """Validation F1 (left axis, 0-1) and train/val loss (right axis) per epoch, each epoch a marker."""
    left, right, top, bottom = 60, width - 60, 40, height - 50
    top_loss = max([r["train_loss"] for r in rows] + [r["val_loss"] for r in rows] + [1e-9]) * 1.05
    x = (lambda e: (left + right) / 2) if len(rows) == 1 else (
        lambda e: left + 10 + (e - 1) / (len(rows) - 1) * (right - left - 20))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#444"/>',
           f'<text x="{(left + right) / 2}" y="{height - 15}" text-anchor="middle">epoch</text>']
    for i in range(6):
        y = bottom - i / 5 * (bottom - top)
        out += [f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e0e0e0"/>',
                f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{i / 5:.1f}</text>',
                f'<text x="{right + 5}" y="{y + 4:.1f}">{top_loss * i / 5:.3g}</text>']
    for r in rows[::max(1, len(rows) // 10)]:
        out.append(f'<text x="{x(r["epoch"]):.1f}" y="{bottom + 16}" text-anchor="middle">{r["epoch"]}</text>')
    for i, (key, name, color, scale) in enumerate([("val_f1", "val F1 (left axis)", "#1f77b4", 1.0),
                                                   ("train_loss", "train loss (right axis)", "#ff7f0e", top_loss),
                                                   ("val_loss", "val loss (right axis)", "#2ca02c", top_loss)]):
        points = [(x(r["epoch"]), bottom - r[key] / scale * (bottom - top)) for r in rows]
        out += [f'<g class="series" data-name="{name}"><polyline fill="none" stroke="{color}" stroke-width="2" '
                f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in points)}"/>',
                *(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{color}"><title>epoch {r["epoch"]}: {name} '
                  f'{r[key]:.4f}</title></circle>' for (a, b), r in zip(points, rows)),
                f'<line x1="{left + 190 * i}" y1="16" x2="{left + 190 * i + 20}" y2="16" stroke="{color}" '
                f'stroke-width="2"/><text x="{left + 190 * i + 26}" y="20">{name}</text></g>']
    return "\n".join(out + ["</svg>\n"])


def save_model(run: Run, model_dir: Path) -> None:
    """The best weights (safetensors), the tokenizer and label names, loadable by transformers alone; bertcls.json
    records the length, segment ids and truncation, for predict.py."""
    tmp = model_dir.with_name(".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run.model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    config = read_json(tmp / "tokenizer_config.json") if (tmp / "tokenizer_config.json").exists() else {}
    config["model_max_length"] = run.spec.max_len  # transformers truncates to it when asked to truncate
    names = list(config.get("model_input_names") or run.tokenizer.model_input_names)
    if run.spec.token_type_ids and "token_type_ids" not in names:  # transformers 5 leaves them out by default
        config["model_input_names"] = [names[0], "token_type_ids", *names[1:]]
    write_json(tmp / "tokenizer_config.json", config)
    write_json(tmp / "bertcls.json", {"format": 1, "base_model": run.args.model_name, "max_seq_len": run.spec.max_len,
                                      "token_type_ids": run.spec.token_type_ids, "truncation": run.spec.truncation})
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # colleagues on a shared cluster can read it (some writers make files 0600)
        f.chmod(0o666 & ~umask)
    os.replace(tmp, model_dir)


def write_results(run: Run, run_dir: Path, result: dict) -> None:
    """The result files, test-metrics.json last: it marks a finished run. A failed write (a full disk) removes
    those written so far, leaving an unfinished run to resume; the error line then gives the test scores."""
    test = result["test"]
    try:
        update_config(run_dir, training_end=result["training_end"])
        write_json(run_dir / "val-metrics.json", {"best_epoch": result["best_epoch"],
                                                  "train_seconds": round(result["train_seconds"], 3), **result["val"]})
        atomic_write(run_dir / "test-predictions.jsonl", "".join(
            json.dumps({"id": i, "gold": run.names[g], "predicted": run.names[max(range(len(p)), key=p.__getitem__)],
                        "probabilities": {n: round(x, 6) for n, x in zip(run.names, p)}}, ensure_ascii=False) + "\n"
            for i, g, p in zip(split_ids(run.splits["test"]), run.data["test"].labels.tolist(),
                               result["test_probs"].tolist())))
        atomic_write(run_dir / "learning-curve.svg", learning_curve_svg(result["history"]))
        if run.args.save_model:
            save_model(run, run_dir / "model")
        write_json(run_dir / "test-metrics.json", test)
    except BaseException as e:
        for name in RESULT_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for name in (".model.tmp", "model"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write the results in {run_dir} ({e.strerror}); the test scores, which no file "
                            f"holds: accuracy {test['accuracy']:.4f}, f1 {test['f1']:.4f}; free space, then continue "
                            f"with `python bertcls.py --resume {run_dir}` if it has a checkpoint") from None
        raise
    for path in run_dir.glob("checkpoint-epoch*"):  # only now: a kill before test-metrics.json can still resume
        shutil.rmtree(path, ignore_errors=True)


def update_config(run_dir: Path, **fields: Any) -> None:
    write_json(run_dir / "config.json", {**read_json(run_dir / "config.json"), **fields})


def experiment(config: dict) -> dict[str, Any]:
    """What a run computes, from its config.json: every setting but RUN_ONLY, and the device type, dtype and number
    of processes (the effective batch) it ran with. --resume and sweep.py's matching both use this one definition."""
    kept = {k: v for k, v in config["args"].items() if k not in RUN_ONLY}
    return {**kept, "device": str(config.get("device", "")).split(":")[0], "dtype": config.get("dtype"),
            "world_size": config.get("world_size", 1)}


# ------------------------------------------------------------------------------------------------------ set-up


class Run(NamedTuple):
    """What a run sets up once: settings, data, tokenizer, model and where it computes."""
    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    ctx: Any  # the one autocast context, around forward + loss only
    splits: dict
    names: list[str]  # label names by id
    tokenizer: Any
    model: torch.nn.Module  # trained and saved; wrap_model gives what is called
    spec: InputSpec
    data: dict[str, Inputs]
    config: dict  # what config.json records


def set_up(args: argparse.Namespace, rank: int, world_size: int, torchrun: bool, log: Callable[[str], None]) -> Run:
    device = pick_device(args.device, int(os.environ["LOCAL_RANK"]) if torchrun else None)
    if torchrun:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             device_id=device if device.type == "cuda" else None)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda" and dtype == torch.float32:
        torch.set_float32_matmul_precision("high")  # TF32
    label2id, splits = load_dataset(Path(args.dataset_dir), log)
    random.seed(args.seed)
    torch.manual_seed(args.seed + rank)  # each rank its own dropout masks; rank 0 as one process
    tokenizer = load_tokenizer(args.model_name, args.mecab_dic, args.trust_remote_code, log)
    model = load_model(args.model_name, label2id, args.trust_remote_code, log, attention_implementation(device, dtype))
    spec = InputSpec(max_length(args.max_seq_len, tokenizer, model.config, log), uses_token_type_ids(model.config),
                     args.truncation)
    if spec.max_len <= (special := tokenizer.num_special_tokens_to_add(pair=splits["train"].pairs)):
        raise UserError(f"a length of {spec.max_len} tokens leaves no room for text after the {special} special "
                        "tokens: raise --max_seq_len")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    buckets = compile_buckets(spec.max_len) if args.compile else None
    if args.max_batch_tokens and args.max_batch_tokens < padded_length(spec.max_len, buckets):
        raise UserError(f"--max_batch_tokens {args.max_batch_tokens} cannot hold one example of {spec.max_len} tokens "
                        "(padded): raise it or lower --max_seq_len")
    fingerprint = tokenizer_fingerprint(tokenizer) if args.cache_dir else ""
    if rank != 0:  # rank 0 fills the cache first, then the others map it
        torch.distributed.barrier()
    data = {s: Inputs(tokenized(s, splits[s], tokenizer, spec, args.cache_dir, args.tokenize_workers, log, rank == 0,
                                fingerprint), splits[s].labels, tokenizer.pad_token_id or 0, buckets) for s in SPLITS}
    if rank == 0 and world_size > 1:
        torch.distributed.barrier()
    names = [n for n, _ in sorted(label2id.items(), key=lambda item: item[1])]
    import transformers
    fold, digests = Path(args.dataset_dir) / "fold.json", [file_digest(Path(args.dataset_dir) / "label2id.json")]
    config = {"args": vars(args), "device": str(device), "dtype": dtype_name(dtype), "world_size": world_size,
              "max_seq_len_used": spec.max_len, "params": sum(p.numel() for p in model.parameters()),
              "dataset_digest": hashlib.sha256("".join(digests + [s.digest for s in splits.values()]).encode()).hexdigest(),
              "fold": read_json(fold) if fold.exists() else None, "examples": {s: len(splits[s].labels) for s in SPLITS},
              "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "transformers": transformers.__version__}}
    ctx = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    return Run(args, rank, world_size, device, ctx, splits, names, tokenizer, model, spec, data, config)


def wrap_model(run: Run) -> torch.nn.Module:
    """run.model on its device with checkpointing, compiled layers and DDP as asked: what training calls."""
    model = run.model.to(run.device)
    if run.args.gradient_checkpointing:  # non-reentrant: works under DDP and compile
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if run.args.compile:
        compile_layers(model)
    if torch.distributed.is_initialized():
        from torch.nn.parallel import DistributedDataParallel
        # no buffer broadcast in forward: BERT's buffers are constants, and evaluation gives ranks different
        # numbers of batches, where a collective inside forward would hang
        return DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                                       broadcast_buffers=False)
    return model


def plan(run: Run) -> tuple[list[list[list[int]]], tuple[int, int]]:
    """Every epoch's batches (with a token budget their number varies) and the schedule: (total, warmup) steps.
    config.json gets the effective batch as used: the mean examples of an optimizer step (not the batch asked for)."""
    lengths, args = lengths_of(run.data["train"].packed), run.args
    epochs = [epoch_batches(lengths, args, e, run.world_size, run.data["train"].buckets) for e in range(1, args.epochs + 1)]
    steps = [math.ceil(len(b) / run.world_size / args.grad_accum_steps) for b in epochs]
    total, warmup = sum(steps), round(steps[0] * args.num_warmup_epochs)
    run.config.update(effective_batch_size=sum(map(len, epochs[0])) / steps[0], total_optimizer_steps=total,
                      warmup_steps=warmup, started_at=datetime.datetime.now().isoformat(timespec="seconds"))
    if (peak := max(get_lr(s, total, warmup, args.lr) for s in range(total))) < args.lr * (1 - 1e-9):
        run.config["warning"] = (f"warning: the warmup ({warmup} steps, --num_warmup_epochs {args.num_warmup_epochs:g}) "
                                 f"is longer than the run ({total} steps): the learning rate peaks at {peak:.3g}")
    return epochs, (total, warmup)


def run_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, run: Run,
              batches: list[list[int]], schedule: tuple[int, int], training: dict, epoch: int) -> dict:
    """Train one epoch and validate it: its log.csv row; its weights are kept when its val F1 is the best yet."""
    args, sizes = run.args, step_sizes(batches, run.args.grad_accum_steps, run.world_size)
    start = time.perf_counter()
    with Progress(sum(sizes), f"epoch {epoch}/{args.epochs}", enabled=run.rank == 0, every=None) as progress:
        training["step"], loss = train_epoch(model, optimizer, scaler, run.data["train"], batches[run.rank::run.world_size],
                                             sizes, args, schedule, training["step"], run.ctx, run.device, progress)
    seconds = time.perf_counter() - start
    training["train_seconds"] += seconds
    val, _ = evaluate(model, run, "val")
    if training["best"] is None or val["f1"] > training["best"]["val"]["f1"]:  # the first epoch counts too
        training["best"] = {"epoch": epoch, "val": val, "weights": cpu_weights(run.model)}
    waited = epoch - training["best"]["epoch"]
    stop = args.patience is not None and waited >= args.patience and epoch < args.epochs
    training["history"].append({
        "epoch": epoch, "train_loss": sum(gather_objects(loss, run.world_size)) / run.world_size,
        **{f"val_{k}": val[k] for k in ("loss", "accuracy", "precision", "recall", "f1")},
        "lr_at_epoch_end": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
        "examples_per_s": round(sum(sizes) / seconds, 2), "stop_reason": stop and f"early stop: no better val F1 in "
        f"the {waited} epochs after epoch {training['best']['epoch']} (--patience {args.patience})" or None})
    training["epoch"] = epoch
    return training["history"][-1]


def checkpoint(run: Run, run_dir: Path, training: dict, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, log: Callable[[str], None]) -> None:
    """Rank 0 writes <run dir>/checkpoint-epoch<N>/ whole or not at all (common.save_tensors), with every rank's
    random states, then removes the older one."""
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
    rngs = gather_objects(rng, run.world_size)
    if run.rank == 0:
        start, best, epoch = time.perf_counter(), training["best"], training["epoch"]
        state = {**{k: training[k] for k in ("epoch", "step", "train_seconds", "history")}, "best_epoch": best["epoch"],
                 "best_val": best["val"], "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rngs}
        current = best["epoch"] == epoch  # the weights in hand are the best ones: stored once
        path = save_tensors(run_dir / f"checkpoint-epoch{epoch}", {
            "model": best["weights"] if current else cpu_weights(run.model), "best": None if current else best["weights"]},
            state)
        for old in run_dir.glob("checkpoint-epoch*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        log(f"checkpoint of epoch {epoch} written in {time.perf_counter() - start:.1f}s -> {path}")


def resume(run: Run, run_dir: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict:
    """Model, optimizer, GradScaler and random states as they were at the newest checkpoint, once the run is found
    to compute what it started computing (settings, data, model, device type, dtype, processes)."""
    old = read_json(run_dir / "config.json")
    then = {**experiment(old), "dataset": old.get("dataset_digest"), "parameters": old.get("params")}
    now = {**experiment(run.config), "dataset": run.config["dataset_digest"], "parameters": run.config["params"]}
    if changed := next((k for k in then if then[k] != now.get(k)), None):
        raise UserError(f"--resume {run_dir}: the run started with {changed} {then[changed]}, here it would be "
                        f"{now.get(changed)}: resume with the same data, model, device type, dtype and processes")
    newest = max(run_dir.glob("checkpoint-epoch*"), key=lambda p: int(p.name.removeprefix("checkpoint-epoch")))
    weights, state = load_tensors(newest)
    run.model.load_state_dict(weights["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"][run.rank]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    if run.rank == 0:
        given = {k: v for k, v in vars(run.args).items() if k != "resume" and v != old["args"].get(k, v)}
        update_config(run_dir, resumed=[*old.get("resumed", []), {"at": run.config["started_at"],
                                                                  "from_epoch": state["epoch"], "changed": given}])
    return {**{k: state[k] for k in ("epoch", "step", "train_seconds", "history")},
            "best": {"epoch": state["best_epoch"], "val": state["best_val"], "weights": weights.get("best", weights["model"])}}


def resumed_args(args: argparse.Namespace, argv: Sequence[str] | None) -> argparse.Namespace:
    """--resume RUN_DIR: the run's own settings; a flag given now must agree with them, unless it is RUN_ONLY."""
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.json); pass outputs/<model>/<date>/<time>")
    if (run_dir / "test-metrics.json").exists():
        raise UserError(f"--resume {run_dir}: this run is already finished (it has test-metrics.json)")
    if not any(run_dir.glob("checkpoint-epoch*")):
        raise UserError(f"{run_dir} has no checkpoint to resume from (it stopped before writing one, see "
                        "--checkpoint_minutes): start the run again")
    saved, defaults = read_json(run_dir / "config.json").get("args", {}), vars(parse_args([]))
    if unknown := sorted(saved.keys() - defaults.keys()):
        raise UserError(f"--resume {run_dir}: the run has settings this bertcls.py does not know ({', '.join(unknown)}):"
                        " resume it with the version that started it")
    unset = object()
    given = {k: v for k, v in vars(parse_args(argv, unset)).items() if v is not unset}
    for name, value in given.items():
        if name not in RUN_ONLY and value != saved.get(name, defaults[name]):
            raise UserError(f"--{name} {value} contradicts the run's --{name} {saved.get(name, defaults[name])} (in "
                            f"{run_dir / 'config.json'}): leave it out to resume, or start a new run")
    return argparse.Namespace(**{**defaults, **saved, **{k: v for k, v in given.items() if k in RUN_ONLY}})


def new_run_dir(args: argparse.Namespace) -> Path:
    now, name = datetime.datetime.now(), args.model_name.strip("/").removeprefix("./").replace("/", "__")
    run_dir = Path(args.output_dir) / name / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S.%f")
    run_dir.mkdir(parents=True)
    return run_dir


def banner(run: Run, run_dir: Path, training: dict, log: Callable[[str], None]) -> None:
    args, c = run.args, run.config
    per_device = f"<= {args.max_batch_tokens} tokens" if args.max_batch_tokens else args.batch_size
    log(f"***** bertcls *****\n  model            {args.model_name}: {c['params'] / 1e6:.2f}M parameters, max_seq_len "
        f"{run.spec.max_len}, truncation {run.spec.truncation}\n  examples         "
        f"{', '.join(f'{s} {n}' for s, n in c['examples'].items())}\n  epochs           {args.epochs}, peak lr "
        f"{args.lr:g}, {c['total_optimizer_steps']} optimizer steps (warmup {c['warmup_steps']})\n  batch            "
        f"{c['effective_batch_size']:g} examples per optimizer step (mean, as used) = {per_device} per device x "
        f"{run.world_size} process(es) x {args.grad_accum_steps} accumulation\n  device           {run.device}, "
        f"{c['dtype']}{', compiled layers' if args.compile else ''}\n  run directory    {run_dir}"
        + (f" (resumed after epoch {training['epoch']})" if args.resume else "") + f"\n{c.get('warning', '')}".rstrip())


# ---------------------------------------------------------------------------------------------------------- main


def fine_tune(args: argparse.Namespace, log: Callable[[str], None], outcome: dict) -> int:
    """The whole run: set up, train epoch after epoch, then evaluate the best epoch and write the results."""
    rank, _, world_size, torchrun = dist_env()
    with contextlib.ExitStack() as held:
        # ------------------------------------------------------------------------------------------ set-up
        if rank == 0:  # the run directory first: one that cannot be written fails before any work
            run_dir = outcome["run_dir"] = Path(args.resume) if args.resume else new_run_dir(args)
            held.callback(lambda: (run_dir / "config.json").exists() or shutil.rmtree(run_dir, ignore_errors=True))
            held.enter_context(locked(run_dir / ".lock", str(run_dir)))
        run = set_up(args, rank, world_size, torchrun, log)
        run_dir = broadcast_object(outcome.get("run_dir"), world_size)
        epochs, schedule = plan(run)
        model, optimizer = wrap_model(run), build_optimizer(run.model, args, run.device)
        scaler = torch.amp.GradScaler(run.device.type, enabled=run.config["dtype"] == "float16")
        training = {"epoch": 0, "step": 0, "train_seconds": 0.0, "history": [], "best": None}
        if args.resume:
            training = resume(run, run_dir, optimizer, scaler)
        elif rank == 0:
            write_json(run_dir / "config.json", run.config)
        banner(run, run_dir, training, log)
        # ------------------------------------------------------------------------------------------ epochs
        last_checkpoint = time.monotonic()
        for epoch in range(training["epoch"] + 1, args.epochs + 1):
            row = run_epoch(model, optimizer, scaler, run, epochs[epoch - 1], schedule, training, epoch)
            log(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} acc "
                f"{row['val_accuracy']:.4f} f1 {row['val_f1']:.4f} | {row['examples_per_s']:.1f} ex/s"
                + (f" | {row['stop_reason']}" if row["stop_reason"] else ""))
            if rank == 0:
                write_log_csv(run_dir / "log.csv", training["history"])
            if row["stop_reason"]:
                break
            due = args.checkpoint_minutes >= 0 and time.monotonic() - last_checkpoint >= 60 * args.checkpoint_minutes
            if epoch < args.epochs and broadcast_object(due, world_size):  # rank 0's clock decides for all
                checkpoint(run, run_dir, training, optimizer, scaler, log)
                last_checkpoint = time.monotonic()
        # ------------------------------------------------------------------------------------------ results
        best = training["best"]
        if best["epoch"] != training["epoch"]:
            run.model.load_state_dict(best["weights"])
        val = best["val"] if best["epoch"] == training["epoch"] else evaluate(model, run, "val")[0]
        test, test_probs = evaluate(model, run, "test")
        if rank == 0:
            end = {"epochs_trained": training["epoch"], "reason": row["stop_reason"] or f"--epochs {args.epochs} done"}
            write_results(run, run_dir, {"best_epoch": best["epoch"], "val": val, "test": test, "test_probs": test_probs,
                                         "history": training["history"], "train_seconds": training["train_seconds"],
                                         "training_end": end})
            log(f"test: accuracy {test['accuracy']:.4f} f1 {test['f1']:.4f} (best epoch {best['epoch']}) -> {run_dir}")
        if world_size > 1:
            torch.distributed.barrier()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank, _, _, torchrun = dist_env()
    outcome: dict[str, Path] = {}

    def log(message: str) -> None:
        if rank == 0:
            print(message, file=sys.stderr, flush=True)

    def stopped() -> str:
        run_dir = outcome.get("run_dir")
        if run_dir is None or not (run_dir / "config.json").exists():
            return "no run was started"
        kept = [p.name for p in sorted(run_dir.iterdir()) if p.name in ("config.json", "log.csv")
                or p.name.startswith("checkpoint-epoch")]
        more = f": continue with `python bertcls.py --resume {run_dir}`" if any(run_dir.glob("checkpoint-epoch*")) else ""
        return f"{run_dir} keeps {', '.join(kept)}, no metrics{more}"

    try:
        return run_cli("bertcls.py", lambda: fine_tune(resumed_args(args, argv) if args.resume else args, log, outcome),
                       args.debug, stopped, OOM_ADVICE, who=f" [rank {rank}]" if torchrun else "")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
