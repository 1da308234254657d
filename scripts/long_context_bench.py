"""Training tokens/s and peak memory of a BERT-shaped and a ModernBERT-shaped model at long lengths.

    python scripts/long_context_bench.py                     # 512, 2048 and 8192 tokens, both shapes, on the CPU
    python scripts/long_context_bench.py --lengths 512 2048 --steps 3 --output results/long-context-bench.json
    python scripts/long_context_bench.py --device cuda --max_batch_tokens 65536

Builds under --work_dir two randomly initialised models of the same width and depth, sharing one WordPiece
tokenizer (make_tiny.py's, saved as tokenizer.json): a BERT (learned absolute positions, full attention in
every layer, a GELU MLP of 4 x hidden) and a ModernBERT (RoPE, attention within a window of --local_attention
tokens with full attention in every third layer, a GLU MLP with as many weights as BERT's), and a synthetic
corpus whose every example is longer than the longest length. For each shape and length, scripts/bench.py
trains in a process of its own (so the peak memory is that run's) with one --max_batch_tokens for all: by default
16384 tokens, i.e. 32 examples of 512 tokens per batch, 8 of 2048 and 2 of 8192. Prints a Markdown table; the last
line of stdout is the JSON of every run. A run that fails (out of memory, say) gets a row saying why.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(0, str(REPO / "scripts"))

from common import DTYPES, jsonl_line, positive_int  # noqa: E402
import make_tiny  # noqa: E402

SHAPES = ("bert", "modernbert")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[512, 2048, 8192],
                   help="--max_seq_len of each run (default: %(default)s)")
    p.add_argument("--max_batch_tokens", type=positive_int, default=16384,
                   help="token budget of every batch (default: %(default)s)")
    p.add_argument("--hidden", type=positive_int, default=256, help="(default: %(default)s)")
    p.add_argument("--layers", type=positive_int, default=6, help="(default: %(default)s)")
    p.add_argument("--heads", type=positive_int, default=4, help="(default: %(default)s)")
    p.add_argument("--local_attention", type=positive_int, default=128,
                   help="ModernBERT's attention window, as the Japanese ModernBERTs' (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed optimizer steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="bench.py's --dtype (default: %(default)s)")
    p.add_argument("--work_dir", default="models/long-context-bench",
                   help="models, corpus and tokenization cache (default: %(default)s)")
    p.add_argument("--output", default=None, help="also write the JSON results here (default: none)")
    args = p.parse_args(argv)
    if args.max_batch_tokens < max(args.lengths):
        p.error(f"--max_batch_tokens {args.max_batch_tokens} cannot hold one example of {max(args.lengths)} tokens")
    return args


def write_corpus(dataset_dir: Path, min_chars: int, n_train: int) -> list[dict]:
    """make_tiny's articles with bodies repeated past min_chars characters (its tokenizer reads one per token)."""
    rows = make_tiny.make_rows(-(-n_train // len(make_tiny.CATEGORY_WORDS)) + 2, 8, seed=0)
    for row in rows:
        row["body"] = row["body"] * (min_chars // len(row["body"]) + 1)
    label2id = {c: i for i, c in enumerate(sorted(make_tiny.CATEGORY_WORDS))}
    splits = {"train": rows[:n_train], "val": rows[n_train:n_train + 3], "test": rows[n_train + 3:n_train + 6]}
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / "label2id.json").write_text(json.dumps(label2id), encoding="utf-8")
    for split, split_rows in splits.items():
        (dataset_dir / f"{split}.jsonl").write_text(
            "".join(jsonl_line({**r, "label": label2id[r["category"]]}) for r in split_rows), encoding="utf-8")
    return rows


def build_models(work_dir: Path, texts: Sequence[str], args: argparse.Namespace) -> dict[str, Path]:
    """The two shapes, saved with the same tokenizer; their non-embedding weights nearly equal in number."""
    import torch
    from transformers import AutoModel, BertConfig, BertTokenizer, ModernBertConfig

    from models import quiet_loading
    vocab = make_tiny.wordpiece_vocab(texts, 0)
    (work_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(work_dir / "vocab.txt"), do_lower_case=False, model_max_length=max(args.lengths))
    common = dict(vocab_size=len(vocab), hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, max_position_embeddings=max(args.lengths),
                  pad_token_id=tokenizer.pad_token_id)
    configs = {"bert": BertConfig(intermediate_size=4 * args.hidden, **common),
               # GLU: its input projection is twice as wide, so 8/3 x hidden has BERT's 2 x 4 x hidden^2 weights
               "modernbert": ModernBertConfig(
                   intermediate_size=8 * args.hidden // 3, local_attention=args.local_attention,
                   global_attn_every_n_layers=3, cls_token_id=tokenizer.cls_token_id,
                   sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                   eos_token_id=tokenizer.sep_token_id, **common)}
    dirs = {}
    for shape, config in configs.items():
        dirs[shape] = work_dir / f"{shape}-shape"
        torch.manual_seed(0)
        with quiet_loading():  # no "Writing model shards" bar in a log
            AutoModel.from_config(config).save_pretrained(dirs[shape])
        tokenizer.save_pretrained(dirs[shape])
    return dirs


def bench_run(model_dir: Path, dataset_dir: Path, length: int, args: argparse.Namespace) -> dict:
    """bench.py's JSON for one model and length, or {"error": its last line} when it fails."""
    command = [sys.executable, str(REPO / "scripts" / "bench.py"), "--model_name", str(model_dir), "--dataset_dir",
               str(dataset_dir), "--max_seq_len", str(length), "--max_batch_tokens", str(args.max_batch_tokens),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--dtype",
               args.dtype, "--cache_dir", str(Path(args.work_dir) / "cache"), "--epochs", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode < 0:  # the kernel's OOM killer sends SIGKILL: the process could say nothing
        name = signal.Signals(-result.returncode).name
        return {"error": f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")}
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        lines = [line for line in output if line.startswith("bench.py:")]  # its one-line error, not a warning
        return {"error": lines[-1] if lines else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def table_row(shape: str, length: int, result: dict) -> str:
    if "error" in result:
        return f"| {shape} | {length} | | | | | {result['error']} |"
    per_batch = result["examples"] / result["steps"]
    return (f"| {shape} | {length} | {per_batch:g} | {result['tokens_per_s']:.0f} | {result['examples_per_s']:.2f} | "
            f"{result['peak_mem_mb']:.0f} | {result['params_non_embedding'] / 1e6:.2f}M, {result['dtype']} |")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    dataset_dir = work_dir / "data"
    n_train = (args.warmup + args.steps) * args.max_batch_tokens // min(args.lengths)  # the shortest fill most
    rows = write_corpus(dataset_dir, max(args.lengths) + 64, n_train)
    dirs = build_models(work_dir, [r[f] for r in rows for f in ("title", "body")], args)
    print("| shape | max_seq_len | examples per batch | tokens/s | examples/s | peak memory (MB) | notes |")
    print("| --- | --: | --: | --: | --: | --: | --- |", flush=True)
    results = []
    for length in args.lengths:
        for shape in SHAPES:
            result = bench_run(dirs[shape], dataset_dir, length, args)
            results.append({"shape": shape, "max_seq_len": length, "max_batch_tokens": args.max_batch_tokens, **result})
            print(table_row(shape, length, result), flush=True)
    text = json.dumps(results)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
