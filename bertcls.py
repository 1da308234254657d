"""Fine-tune and evaluate one BERT-style model for text classification.

    python bertcls.py --model_name cl-tohoku/bert-base-japanese-v3 --lr 3e-5   # one GPU, or the CPU
    torchrun --standalone --nproc_per_node 4 bertcls.py --model_name ...      # DDP on 4 GPUs
    python bertcls.py --resume outputs/<model>/<date>/<time>                  # continue a killed run

AdamW with linear warmup and decay; the epoch with the best val macro-F1 is evaluated on test. A run directory
gets test-metrics.json last: without it, the run is unfinished.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import os
import random
import shutil
import sys
import time
from argparse import Namespace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common import (DTYPES, Progress, UserError, atomic_write, confusion_scores, dist_env, dtype_name, finite_float,
                    gather_objects, jsonl_line, load_tensors, locked, non_negative_float, pick_device, positive_float,
                    positive_int, read_json, resolve_dtype, run_cli, save_tensors, seed_int, sha256, write_json)
from common import log as common_log
from data import (SPLITS, TRUNCATIONS, InputSpec, Inputs, check_sizes, compile_buckets, cut_batches, lengths_of,
                  load_dataset, split_ids, tokenized, tokenizer_fingerprint)
from models import (attention_implementation, compile_layers, load_model, load_tokenizer, max_length, quiet_loading,
                    uses_token_type_ids)

# Where and how a run works, not what it computes: --resume may change them, sweep.py ignores them.
RUN_ONLY = frozenset({"output_dir", "cache_dir", "tokenize_workers", "log_interval", "checkpoint_minutes", "debug",
                      "resume", "device", "dtype", "compile"})
LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
              "lr_at_epoch_end", "seconds", "examples_per_s", "stop_reason"]
OOM_ADVICE = ("lower --batch_size (with --grad_accum_steps to keep the effective batch), lower --max_seq_len, or add "
              "--gradient_checkpointing")


def parse_args(argv: Sequence[str] | None = None, unset: Any = None) -> Namespace:
    """With `unset`, flags not given get that value, not their defaults."""
    formatter = type("Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add = p.add_argument
    add("--model_name", default="cl-tohoku/bert-base-japanese-v3", help="hub name or local directory")
    add("--dataset_dir", default="datasets/livedoor", help="written by prepare.py")
    add("--batch_size", type=positive_int, default=16, help="examples per device and step")
    add("--eval_batch_size", type=positive_int, help="None: 2 x --batch_size")
    add("--epochs", type=positive_int, default=20, help="epochs the schedule spans")
    add("--lr", type=positive_float, default=3e-5, help="peak learning rate")
    add("--num_warmup_epochs", type=non_negative_float, default=2, help="linear warmup, in epochs")
    add("--max_seq_len", type=positive_int, default=512, help="tokens per example, capped by the model")
    add("--truncation", choices=TRUNCATIONS, default="head",
        help="a long text keeps its start (head), or its start and end (head_tail)")
    add("--max_batch_tokens", type=positive_int, help="batches of at most this many padded tokens")
    add("--weight_decay", type=non_negative_float, default=0.01, help="not on biases and norms")
    add("--max_grad_norm", type=non_negative_float, default=1.0, help="gradient clipping; 0: off")
    add("--grad_accum_steps", type=positive_int, default=1, help="micro-batches per optimizer step")
    add("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    add("--patience", type=positive_int, help="stop after this many epochs without a better val F1")
    add("--device", help="cpu, cuda or cuda:N; None: cuda if available")
    add("--dtype", choices=("auto", *DTYPES), default="auto",
        help="autocast; auto: bf16 if supported, fp16 on older GPUs, else fp32")
    add("--compile", action="store_true", help="torch.compile each encoder layer")
    add("--seed", type=seed_int, default=42, help="data order, dropout, new head")
    add("--output_dir", default="outputs", help="runs go to <output_dir>/<model>/<date>/<time>")
    add("--cache_dir", default=".cache/bertcls", help="tokenization cache; '' for none")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    add("--tokenize_workers", type=positive_int, default=min(16, cores), help="processes tokenizing a large split")
    add("--save_model", action="store_true", help="save the best model to <run dir>/model/")
    add("--trust_remote_code", action="store_true", help="let a hub model run its own code")
    add("--mecab_dic", choices=("auto", "ipadic", "unidic_lite", "unidic"), default="auto",
        help="MeCab dictionary; auto: IPAdic for cl-tohoku v1 models")
    add("--log_interval", type=positive_int, default=20, help="optimizer steps between progress lines")
    add("--checkpoint_minutes", type=finite_float, default=10,
        help="minutes between checkpoints (at an epoch's end); <0: never")
    add("--resume", metavar="RUN_DIR", help="continue a killed run")
    add("--debug", action="store_true", help="show tracebacks")
    if unset is not None:
        return p.parse_args(argv, Namespace(**{k: unset for k in vars(p.parse_args([]))}))
    args = p.parse_args(argv)
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    return args


# -------------------- batches, schedule, optimizer


def epoch_batches(lengths: Sequence[int], args: Namespace, epoch: int, world_size: int,
                  buckets: Sequence[int] | None = None) -> list[list[int]]:
    """All ranks' batches (rank r takes every world_size-th), sorted by length within random groups of 64 batches:
    little padding, yet random."""
    rng = random.Random(f"{args.seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = 64 * (args.max_batch_tokens // max(1, sum(lengths) // len(lengths)) if args.max_batch_tokens
                  else args.batch_size)
    groups = [sorted(order[s:s + group], key=lambda i: -lengths[i]) for s in range(0, len(order), group)]
    batches = [b for g in groups for b in cut_batches(g, lengths, args.batch_size, args.max_batch_tokens, buckets)]
    rng.shuffle(batches)
    return batches + batches[:(-len(batches)) % world_size]


def step_sizes(batches: Sequence[Sequence[int]], accumulation: int, world_size: int) -> list[int]:
    """Examples of each optimizer step over all ranks."""
    per_step = accumulation * world_size
    return [sum(map(len, batches[i:i + per_step])) for i in range(0, len(batches), per_step)]


def get_lr(step: int, total_steps: int, warmup_steps: int, max_lr: float) -> float:
    """Linear warmup reaching max_lr at the last warmup step, then linear decay to 0."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return max(0.0, max_lr * (total_steps - step) / max(1, total_steps - warmup_steps))


def build_optimizer(model: nn.Module, args: Namespace) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=args.lr, fused=True)


# -------------------- training loop


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                data: Inputs, batches: list[list[int]], sizes: Sequence[int], args: Namespace,
                schedule: tuple[int, int], step: int, ctx: Any, device: torch.device,
                progress: Progress | None = None) -> tuple[int, float]:
    """One pass over this rank's batches: (next optimizer step, mean loss). A micro-batch's loss is weighted by its
    share of the step's examples over all ranks (`sizes`): the gradient is that of the step's mean loss."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    model.train()
    loss_sum, seen = torch.zeros((), device=device), 0
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
        if args.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        step += 1
        if progress is not None:
            progress.update(size)
        if step % args.log_interval == 0 or group is groups[-1]:  # a NaN/inf loss makes the sum NaN/inf
            if not loss_sum.isfinite():
                raise UserError(f"the training loss became NaN/inf by optimizer step {step}: lower --lr, clip "
                                "gradients (--max_grad_norm), try --dtype fp32, or check the data")
            if progress is not None and step % args.log_interval == 0:
                progress.report(step=f"{step}/{schedule[0]}", loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lr:.2e}")
    return step, loss_sum.item() / max(1, seen)


# -------------------- evaluation and result files


@torch.no_grad()
def predict(model: nn.Module, data: Inputs, batch_size: int, max_tokens: int | None, ctx: Any,
            device: torch.device, rank: int = 0, world_size: int = 1, desc: str | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (n, C) and per-example losses, in example order. Longest batch first: an out-of-memory
    error shows at once. Under DDP, ranks share the batches and each example counts once."""
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
    mine = (indices, torch.cat(probs).cpu(), torch.cat(losses).cpu().double()) if indices else None
    ids, probs, losses = zip(*(part for part in gather_objects(mine, world_size) if part))  # a rank may have no batch
    order = torch.tensor(sum(ids, [])).argsort()
    return torch.cat(probs)[order], torch.cat(losses)[order]


def scores(gold: Sequence[int], pred: Sequence[int], losses: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
    matrix = [[0] * len(names) for _ in names]
    for g, p in zip(gold, pred, strict=True):
        matrix[g][p] += 1
    result = confusion_scores(matrix)
    per_label = result.pop("per_label")
    return {"loss": float(losses.mean()), **result, "macro_over": [names[c] for c in per_label],
            "per_class": {names[c]: v for c, v in per_label.items()},
            "confusion_matrix": {"rows": "gold label", "columns": "predicted label", "labels": list(names),
                                 "matrix": matrix}}


def evaluate(model, run, split):
    args, data, desc = run.args, run.data[split], f"evaluating {split}" if run.rank == 0 else None
    probs, losses = predict(model, data, args.eval_batch_size, args.max_batch_tokens and 2 * args.max_batch_tokens,
                            run.ctx, run.device, run.rank, run.world_size, desc)
    return scores(data.labels.tolist(), probs.argmax(-1).tolist(), losses, run.names), probs


def write_log_csv(path, rows):
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([LOG_FIELDS, *([row[k] for k in LOG_FIELDS] for row in rows)])
    atomic_write(path, buffer.getvalue())


def learning_curve_svg(rows):
    """Val F1 (left axis, 0 to 1) and train/val loss (right axis, 0 to top) per epoch; the plot spans y 350 to 40."""
    top = max(max(r["train_loss"], r["val_loss"]) for r in rows) * 1.05 or 1.0
    x = {r["epoch"]: 320 if len(rows) == 1 else 70 + 500 * i / (len(rows) - 1) for i, r in enumerate(rows)}
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="640" height="400" font-family="sans-serif" font-size="12">'
           '<rect width="100%" height="100%" fill="white"/><text x="320" y="385" text-anchor="middle">epoch</text>']
    out += [f'<line x1="60" y1="{350 - 62 * i}" x2="580" y2="{350 - 62 * i}" stroke="#e0e0e0"/><text x="55" '
            f'y="{354 - 62 * i}" text-anchor="end">{i / 5:.1f}</text><text x="585" y="{354 - 62 * i}">{top * i / 5:.3g}'
            '</text>' for i in range(6)]
    out += [f'<text x="{x[r["epoch"]]:.1f}" y="366" text-anchor="middle">{r["epoch"]}</text>'
            for r in rows[::max(1, len(rows) // 10)]]
    for i, (key, name, color, scale) in enumerate([("val_f1", "val F1 (left axis)", "#1f77b4", 1.0),
                                                   ("train_loss", "train loss (right axis)", "#ff7f0e", top),
                                                   ("val_loss", "val loss (right axis)", "#2ca02c", top)]):
        points = [(x[r["epoch"]], 350 - r[key] / scale * 310) for r in rows]
        out += [f'<g class="series" fill="{color}"><text x="{60 + 190 * i}" y="20">{name}</text><polyline fill="none" '
                f'stroke="{color}" stroke-width="2" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in points)}"/>',
                *(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5"/>' for a, b in points), "</g>"]
    return "\n".join(out + ["</svg>\n"])


def save_model(run: Run, model_dir: Path) -> None:
    """Loadable by transformers alone; bertcls.json adds what predict.py needs."""
    tmp = model_dir.with_name(".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_loading():  # no "Writing model shards" bar in a log file
        run.model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    spec, path = run.spec, tmp / "tokenizer_config.json"
    config = read_json(path) if path.exists() else {}
    config["model_max_length"] = spec.max_len  # where transformers truncates
    names = list(config.get("model_input_names") or run.tokenizer.model_input_names)
    if spec.token_type_ids and "token_type_ids" not in names:  # transformers 5 leaves them out by default
        config["model_input_names"] = [names[0], "token_type_ids", *names[1:]]
    write_json(path, config)
    write_json(tmp / "bertcls.json", {"format": 1, "base_model": run.args.model_name, "max_seq_len": spec.max_len,
                                      "token_type_ids": spec.token_type_ids, "truncation": spec.truncation})
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # some writers make files 0600: colleagues could not read them
        f.chmod(0o666 & ~umask)
    os.replace(tmp, model_dir)


def write_results(run, run_dir, training, test, test_probs):
    """test-metrics.json last. A failed write (a full disk) removes what it wrote: the run stays resumable."""
    best, history = training["best"], training["history"]
    end = {"epochs_trained": len(history), "reason": history[-1]["stop_reason"] or f"--epochs {run.args.epochs} done"}
    try:
        write_json(run_dir / "config.json", {**read_json(run_dir / "config.json"), "training_end": end})
        seconds = round(sum(row["seconds"] for row in history), 3)
        write_json(run_dir / "val-metrics.json", {"best_epoch": best["epoch"], "train_seconds": seconds, **best["val"]})
        atomic_write(run_dir / "test-predictions.jsonl", "".join(
            jsonl_line({"id": i, "gold": run.names[g], "predicted": run.names[p.index(max(p))],
                        "probabilities": {n: round(x, 6) for n, x in zip(run.names, p)}})
            for i, g, p in zip(split_ids(run.splits["test"]), run.data["test"].labels.tolist(), test_probs.tolist())))
        atomic_write(run_dir / "learning-curve.svg", learning_curve_svg(history))
        if run.args.save_model:
            save_model(run, run_dir / "model")
        write_json(run_dir / "test-metrics.json", test)
    except BaseException as e:
        for name in ("val-metrics.json", "test-predictions.jsonl", "learning-curve.svg"):
            (run_dir / name).unlink(missing_ok=True)
        for name in (".model.tmp", "model"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write the results in {run_dir} ({e.strerror}); the test scores, which no file "
                            f"holds: accuracy {test['accuracy']:.4f}, f1 {test['f1']:.4f}; free space, then continue "
                            f"with `python bertcls.py --resume {run_dir}` if it has a checkpoint") from None
        raise
    for path in checkpoints(run_dir):  # only now: a kill before test-metrics.json can still resume
        shutil.rmtree(path, ignore_errors=True)


def experiment(config: dict) -> dict[str, Any]:
    """What a run computes (for --resume and sweep.py): the settings but RUN_ONLY, device type, dtype, processes."""
    kept = {k: v for k, v in config["args"].items() if k not in RUN_ONLY}
    return {**kept, "device": str(config.get("device", "")).split(":")[0], "dtype": config.get("dtype"),
            "world_size": config.get("world_size", 1)}


# -------------------- set-up, epochs, checkpoints


class Run(NamedTuple):
    args: Namespace
    rank: int
    world_size: int
    device: torch.device
    ctx: Any  # autocast, around forward + loss only
    splits: dict
    names: list[str]
    tokenizer: Any
    model: nn.Module  # saved; wrap_model gives what is called
    spec: InputSpec
    data: dict[str, Inputs]
    config: dict  # config.json


def set_up(args: Namespace, rank: int, world_size: int, torchrun: bool, log: Callable[[str], None]) -> Run:
    device = pick_device(args.device, int(os.environ["LOCAL_RANK"]) if torchrun else None)
    dtype, cuda = resolve_dtype(args.dtype, device), device.type == "cuda"
    if torchrun:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if cuda and dtype == torch.float32:
        torch.set_float32_matmul_precision("high")  # TF32
    dataset = Path(args.dataset_dir)
    label2id, splits = load_dataset(dataset, log)
    torch.manual_seed(args.seed + rank)  # each rank its own dropout masks; rank 0 as one process
    tokenizer = load_tokenizer(args.model_name, args.mecab_dic, args.trust_remote_code, log)
    model = load_model(args.model_name, label2id, args.trust_remote_code, log, attention_implementation(device, dtype))
    spec = InputSpec(max_length(args.max_seq_len, tokenizer, model.config, log), uses_token_type_ids(model.config),
                     args.truncation)
    buckets = compile_buckets(spec.max_len) if args.compile else None
    check_sizes(tokenizer, spec, splits["train"].pairs, args.max_batch_tokens, buckets)
    fingerprint = tokenizer_fingerprint(tokenizer) if args.cache_dir else ""
    if rank != 0:  # rank 0 fills the cache first, then the others map it
        dist.barrier()
    data = {s: Inputs(tokenized(s, splits[s], tokenizer, spec, args.cache_dir, args.tokenize_workers, log, rank == 0,
                                fingerprint), splits[s].labels, tokenizer.pad_token_id or 0, buckets) for s in SPLITS}
    if rank == 0 and world_size > 1:
        dist.barrier()
    import transformers
    digests = [sha256(dataset / "label2id.json"), *(s.digest for s in splits.values())]
    config = {"args": vars(args), "device": str(device), "dtype": dtype_name(dtype), "world_size": world_size,
              "max_seq_len_used": spec.max_len, "params": sum(p.numel() for p in model.parameters()),
              "dataset_digest": hashlib.sha256("".join(digests).encode()).hexdigest(),
              "fold": read_json(dataset / "fold.json") if (dataset / "fold.json").exists() else None,
              "examples": {s: len(splits[s].labels) for s in SPLITS},
              "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                           "transformers": transformers.__version__}}
    ctx = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    names = sorted(label2id, key=label2id.get)
    return Run(args, rank, world_size, device, ctx, splits, names, tokenizer, model, spec, data, config)


def wrap_model(run: Run) -> nn.Module:
    """run.model on its device, with checkpointing, compile and DDP as asked: what training calls."""
    model = run.model.to(run.device)
    if run.args.gradient_checkpointing:  # non-reentrant: works under DDP and compile
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if run.args.compile:
        compile_layers(model)
    if dist.is_initialized():
        # no buffer broadcast in forward: the buffers are constants, and evaluation gives ranks unequal batch counts
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    return model


def plan(run: Run) -> tuple[list[list[list[int]]], tuple[int, int]]:
    """Every epoch's batches (a token budget varies their number) and the schedule: (total, warmup) steps."""
    lengths, args, buckets = lengths_of(run.data["train"].packed), run.args, run.data["train"].buckets
    epochs = [epoch_batches(lengths, args, e, run.world_size, buckets) for e in range(1, args.epochs + 1)]
    steps = [len(step_sizes(b, args.grad_accum_steps, run.world_size)) for b in epochs]
    total, warmup = sum(steps), round(steps[0] * args.num_warmup_epochs)
    run.config.update(effective_batch_size=sum(map(len, epochs[0])) / steps[0], total_optimizer_steps=total,
                      warmup_steps=warmup, started_at=datetime.now().isoformat(timespec="seconds"))
    if warmup > total:
        run.config["warning"] = (f"warning: the warmup ({warmup} steps, --num_warmup_epochs "
                                 f"{args.num_warmup_epochs:g}) is longer than the run ({total} steps): the learning "
                                 f"rate peaks at {get_lr(total - 1, total, warmup, args.lr):.3g}")
    return epochs, (total, warmup)


def run_epoch(model, optimizer, scaler, run, batches, schedule, training, epoch):
    """Train and validate one epoch: its log.csv row."""
    args, sizes = run.args, step_sizes(batches, run.args.grad_accum_steps, run.world_size)
    start, mine = time.perf_counter(), batches[run.rank::run.world_size]
    with Progress(sum(sizes), f"epoch {epoch}/{args.epochs}", enabled=run.rank == 0, every=None) as progress:
        training["step"], loss = train_epoch(model, optimizer, scaler, run.data["train"], mine, sizes, args, schedule,
                                             training["step"], run.ctx, run.device, progress)
    seconds = time.perf_counter() - start
    val, _ = evaluate(model, run, "val")
    if training["best"] is None or val["f1"] > training["best"]["val"]["f1"]:
        training["best"] = {"epoch": epoch, "val": val, "weights": cpu_weights(run.model)}
    best, stop = training["best"]["epoch"], None
    if args.patience is not None and epoch - best >= args.patience and epoch < args.epochs:
        stop = (f"early stop: no better val F1 in the {epoch - best} epochs after epoch {best} "
                f"(--patience {args.patience})")
    training["history"].append({
        "epoch": epoch, "train_loss": sum(gather_objects(loss, run.world_size)) / run.world_size,
        **{f"val_{k}": val[k] for k in ("loss", "accuracy", "precision", "recall", "f1")},
        "lr_at_epoch_end": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
        "examples_per_s": round(sum(sizes) / seconds, 2), "stop_reason": stop})
    training["epoch"] = epoch
    return training["history"][-1]


def checkpoints(run_dir):
    return sorted(run_dir.glob("checkpoint-epoch*"), key=lambda p: int(p.name.removeprefix("checkpoint-epoch")))


def cpu_weights(model):
    """A copy: it unties shared tensors, as safetensors requires."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def checkpoint(run, run_dir, training, optimizer, scaler, log):
    """With every rank's random states: a resumed run goes on exactly as if never stopped."""
    rngs = gather_objects({"torch": torch.get_rng_state(),
                           "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None},
                          run.world_size)
    if run.rank == 0:
        best, epoch = training["best"], training["epoch"]
        state = {"training": {**training, "best": {**best, "weights": None}}, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rngs}
        weights = {"model": best["weights"]}  # the best epoch's weights are the model's: stored once, not copied
        if best["epoch"] != epoch:
            weights = {"model": cpu_weights(run.model), "best": best["weights"]}
        path = save_tensors(run_dir / f"checkpoint-epoch{epoch}", weights, state)
        for old in checkpoints(run_dir)[:-1]:  # the newest is the one just written
            shutil.rmtree(old, ignore_errors=True)
        log(f"checkpoint of epoch {epoch} -> {path}")


def resume(run, run_dir, optimizer, scaler):
    """The newest checkpoint, if the run still computes what it started computing."""
    old = read_json(run_dir / "config.json")
    then, now = ({**experiment(c), "dataset": c.get("dataset_digest"), "parameters": c.get("params")}
                 for c in (old, run.config))
    if changed := next((k for k in then if then[k] != now.get(k)), None):
        raise UserError(f"--resume {run_dir}: the run started with {changed} {then[changed]}, here it would be "
                        f"{now.get(changed)}")
    weights, state = load_tensors(checkpoints(run_dir)[-1])
    run.model.load_state_dict(weights["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"][run.rank]
    torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    training = state["training"]
    training["best"]["weights"] = weights.get("best", weights["model"])
    if run.rank == 0:
        given = {k: v for k, v in vars(run.args).items() if k != "resume" and v != old["args"].get(k, v)}
        resumed = {"at": run.config["started_at"], "from_epoch": training["epoch"], "changed": given}
        write_json(run_dir / "config.json", {**old, "resumed": [*old.get("resumed", []), resumed]})
    return training


def resumed_args(args, argv):
    """The run's own settings; a flag given now must agree with them, unless it is RUN_ONLY."""
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.json); pass outputs/<model>/<date>/<time>")
    if (run_dir / "test-metrics.json").exists():
        raise UserError(f"--resume {run_dir}: this run is already finished (it has test-metrics.json)")
    if not checkpoints(run_dir):
        raise UserError(f"{run_dir} has no checkpoint to resume from (it stopped before writing one, see "
                        "--checkpoint_minutes): start the run again")
    saved, defaults = read_json(run_dir / "config.json").get("args", {}), vars(parse_args([]))
    if unknown := sorted(saved.keys() - defaults.keys()):
        raise UserError(f"--resume {run_dir}: the run has settings this bertcls.py does not know "
                        f"({', '.join(unknown)}): resume it with the version that started it")
    saved, unset = {**defaults, **saved}, object()
    given = {k: v for k, v in vars(parse_args(argv, unset)).items() if v is not unset}
    if clash := next((k for k in given if k not in RUN_ONLY and given[k] != saved[k]), None):
        raise UserError(f"--{clash} {given[clash]} contradicts the run's --{clash} {saved[clash]} (in "
                        f"{run_dir / 'config.json'}): leave it out to resume, or start a new run")
    return Namespace(**{**saved, **given})


def new_run_dir(args):
    name = args.model_name.strip("/").removeprefix("./").replace("/", "__")
    stem = Path(args.output_dir, name, f"{datetime.now():%Y-%m-%d/%H-%M-%S.%f}")
    for n in itertools.count():  # runs started in the same microsecond (a sweep on several GPUs)
        with contextlib.suppress(FileExistsError):
            (run_dir := stem.with_name(f"{stem.name}-{n}" if n else stem.name)).mkdir(parents=True)
            return run_dir


def banner(run, run_dir, training, log):
    args, c = run.args, run.config
    per_device = f"<= {args.max_batch_tokens} tokens" if args.max_batch_tokens else args.batch_size
    log("\n".join([
        "***** bertcls *****",
        f"  model            {args.model_name}: {c['params'] / 1e6:.2f}M parameters, max_seq_len {run.spec.max_len}, "
        f"truncation {args.truncation}",
        f"  examples         {', '.join(f'{s} {n}' for s, n in c['examples'].items())}",
        f"  epochs           {args.epochs}, peak lr {args.lr:g}, {c['total_optimizer_steps']} optimizer steps (warmup "
        f"{c['warmup_steps']})",
        f"  batch            {c['effective_batch_size']:g} examples per optimizer step (mean, as used) = {per_device} "
        f"per device x {run.world_size} process(es) x {args.grad_accum_steps} accumulation",
        f"  device           {run.device}, {c['dtype']}{', compiled layers' if args.compile else ''}",
        f"  run directory    {run_dir}" + (f" (resumed after epoch {training['epoch']})" if args.resume else ""),
        *([c["warning"]] if "warning" in c else [])]))


# -------------------- main


def fine_tune(args, log, outcome):
    rank, _, world_size, torchrun = dist_env()
    with contextlib.ExitStack() as held:
        # Set-up. The run directory comes first: one that cannot be written fails before any work.
        if rank == 0:
            run_dir = outcome["run_dir"] = Path(args.resume) if args.resume else new_run_dir(args)
            held.callback(lambda: (run_dir / "config.json").exists() or shutil.rmtree(run_dir, ignore_errors=True))
            held.enter_context(locked(run_dir / ".lock", str(run_dir)))
        run = set_up(args, rank, world_size, torchrun, log)
        run_dir = gather_objects(outcome.get("run_dir"), world_size)[0]
        epochs, schedule = plan(run)
        model, optimizer = wrap_model(run), build_optimizer(run.model, args)
        scaler = torch.amp.GradScaler(run.device.type, enabled=run.config["dtype"] == "float16")
        training = {"epoch": 0, "step": 0, "history": [], "best": None}
        if args.resume:
            training = resume(run, run_dir, optimizer, scaler)
        elif rank == 0:
            write_json(run_dir / "config.json", run.config)
        banner(run, run_dir, training, log)

        # Epochs.
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
            due = 0 <= 60 * args.checkpoint_minutes <= time.monotonic() - last_checkpoint  # < 0: never
            if epoch < args.epochs and gather_objects(due, world_size)[0]:  # rank 0's clock decides for all
                checkpoint(run, run_dir, training, optimizer, scaler, log)
                last_checkpoint = time.monotonic()

        # Results.
        best = training["best"]
        run.model.load_state_dict(best["weights"])
        test, test_probs = evaluate(model, run, "test")
        if rank == 0:
            write_results(run, run_dir, training, test, test_probs)
            log(f"test: accuracy {test['accuracy']:.4f} f1 {test['f1']:.4f} (best epoch {best['epoch']}) -> {run_dir}")
        if world_size > 1:
            dist.barrier()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank, _, _, torchrun = dist_env()
    outcome: dict[str, Path] = {}
    log = common_log if rank == 0 else lambda message: None

    def stopped():
        run_dir = outcome.get("run_dir")
        if run_dir is None or not (run_dir / "config.json").exists():
            return "no run was started"
        kept = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))  # a failed write removes results
        how = f": continue with `python bertcls.py --resume {run_dir}`" if checkpoints(run_dir) else ""
        return f"{run_dir} keeps {', '.join(kept)}, no metrics{how}"

    try:
        return run_cli("bertcls.py", lambda: fine_tune(resumed_args(args, argv) if args.resume else args, log, outcome),
                       args.debug, stopped, OOM_ADVICE, who=f" [rank {rank}]" if torchrun else "")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
