"""Classify texts with a model saved by `bertcls.py --save_model`.

    python predict.py --model_dir outputs/<model>/<date>/<time>/model --input datasets/livedoor/test.jsonl
    cat articles.jsonl | python predict.py --model_dir RUN_DIR/model --top_k 1 --output predictions.jsonl
    python predict.py --model_dir RUN_DIR/model --text "野球の日本代表が決勝に進出"

Input: JSONL with `text`, or `title` + `body`, and an optional `id`. Output: JSONL in input order, {"id", "label",
"probability", "top_k": [{"label", "probability"}, ...]}. Texts are cut and batched as in bertcls.py: a run's test
split gets its test-predictions.jsonl labels. Only safetensors are loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from bertcls import predict
from common import (DTYPES, UserError, atomic_write, decode_utf8, jsonl_line, log, parse_json, pick_device,
                    positive_int, read_json, refuse_overwrite, resolve_dtype, run_cli)
from data import TRUNCATIONS, InputSpec, Inputs, check_sizes, example_text, read_split, tokenized
from models import attention_implementation, load_tokenizer, max_length, quiet_loading, uses_token_type_ids


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add, source = p.add_argument, p.add_mutually_exclusive_group()
    add("--model_dir", required=True, help="<run dir>/model, written by bertcls.py --save_model")
    source.add_argument("--input", default="-", help="JSONL file; '-' reads stdin (default: -)")
    source.add_argument("--text", help="classify this one text instead")
    add("--output", default="-", help="JSONL file, written whole at the end (default: -, stdout)")
    add("--top_k", type=positive_int, default=3, help="labels listed per text (default: %(default)s)")
    add("--batch_size", type=positive_int, default=32, help="(default: %(default)s)")
    add("--max_batch_tokens", type=positive_int, help="at most this many padded tokens a batch (long texts)")
    add("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    add("--dtype", choices=("auto", *DTYPES), default="auto", help="as bertcls.py's (default: auto)")
    add("--max_seq_len", type=positive_int, help="(default: as in training)")
    add("--trust_remote_code", action="store_true", help="let the model directory run code")
    add("--skip_bad_lines", action="store_true", help="warn about a bad input line and go on")
    add("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def read_rows(args: argparse.Namespace) -> list[dict]:
    """The input objects; a bad line is an error naming it (a warning with --skip_bad_lines)."""
    if args.text is not None:
        try:
            return [{"text": args.text.encode("utf-8").decode("utf-8")}]
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as lone surrogates
            raise UserError("--text is not UTF-8 text: pass UTF-8, or the text as JSONL through --input") from None
    if args.input == "-" and sys.stdin.isatty():
        raise UserError("no input: pass --input FILE or --text TEXT, or pipe JSONL into stdin")
    name = "<stdin>" if args.input == "-" else args.input
    data = sys.stdin.buffer.read() if args.input == "-" else Path(args.input).read_bytes()
    rows = []
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            if line.strip():
                row = parse_json(decode_utf8(line, name, number), f"{name}:{number}")
                example_text(row if isinstance(row, dict) else {})
                rows.append(row)
        except (UserError, ValueError) as e:
            problem = str(e) if isinstance(e, UserError) else f"{name}:{number}: {e}"
            if not args.skip_bad_lines:
                raise UserError(f"{problem} (fix the line, or pass --skip_bad_lines)") from None
            log(f"predict.py: warning: {problem}; skipped")
    if not rows:
        raise UserError(f"{name}: no examples: expected JSONL lines with 'text', or 'title' and 'body'")
    return rows


def load_classifier(model_dir: Path, trust_remote_code: bool, attention: str) -> torch.nn.Module:
    """The saved classifier, from safetensors only, with its trained head and label names."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    if not any(model_dir.glob("model.safetensors*")):  # or its sharded index
        raise UserError(f"{model_dir} has no model.safetensors (other formats can run code): pass <run dir>/model "
                        "written by bertcls.py --save_model")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    names = config.id2label or {}
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []) or all(
            n == f"LABEL_{i}" for i, n in names.items()):
        raise UserError(f"{model_dir} holds no classifier with label names (architectures {config.architectures}, "
                        f"labels {list(names.values())[:3]}): save one with bertcls.py --save_model")
    with quiet_loading():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_dir, config=config, use_safetensors=True, trust_remote_code=trust_remote_code,
            output_loading_info=True, attn_implementation=attention)
    if info["missing_keys"]:  # such as the head: it would be random
        raise UserError(f"{model_dir / 'model.safetensors'} lacks weights the classifier needs "
                        f"({', '.join(sorted(info['missing_keys'])[:3])}): save it with bertcls.py --save_model")
    return model


def input_spec(model_dir: Path, requested: int | None, model: torch.nn.Module, tokenizer) -> InputSpec:
    """The inputs as in training (bertcls.json), unless --max_seq_len asks for another length."""
    path = model_dir / "bertcls.json"
    if path.is_file():
        saved = read_json(path)
    else:
        log("note: no bertcls.json: the inputs may differ from training")
        saved = {"max_seq_len": 512, "token_type_ids": uses_token_type_ids(model.config)}
    saved = {"truncation": "head", **saved} if isinstance(saved, dict) else {}  # files before truncation existed
    if not (type(saved.get("max_seq_len")) is int and saved["max_seq_len"] > 0
            and isinstance(saved.get("token_type_ids"), bool) and saved.get("truncation") in TRUNCATIONS):
        raise UserError(f"{path}: expected max_seq_len (a positive integer), token_type_ids (true/false) and "
                        f"truncation ({' or '.join(TRUNCATIONS)}): re-save the model with bertcls.py --save_model")
    max_len = max_length(requested or saved["max_seq_len"], tokenizer, model.config, log)
    return InputSpec(max_len, saved["token_type_ids"], saved["truncation"])


def classify(args: argparse.Namespace, rows: list[dict]) -> str:
    """The output JSONL."""
    model_dir = Path(args.model_dir)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_classifier(model_dir, args.trust_remote_code, attention_implementation(device, dtype)).to(device)
    tokenizer = load_tokenizer(str(model_dir), "auto", args.trust_remote_code, log)
    spec = input_spec(model_dir, args.max_seq_len, model, tokenizer)
    many = len(rows) > 1000  # worth progress bars
    with tempfile.TemporaryDirectory() as tmp:  # the rows as a split, tokenized as training's are
        path = Path(tmp) / "input.jsonl"
        path.write_text("".join(jsonl_line({**row, "label": 0}) for row in rows), encoding="utf-8")
        split = read_split(path, {"": 0}, {})
        check_sizes(tokenizer, spec, split.pairs, args.max_batch_tokens)
        packed = tokenized("input", split, tokenizer, spec, "", 1, log, show=many)
    ctx = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
    probs, _ = predict(model, Inputs(packed, split.labels, tokenizer.pad_token_id or 0), args.batch_size,
                       args.max_batch_tokens, ctx, device, desc="classifying" if many else None)
    names = model.config.id2label
    lines = []
    for row, p in zip(rows, probs.tolist()):
        ranked = sorted(range(len(p)), key=lambda i: -p[i])  # ties: the lower id, as test-predictions.jsonl
        top = [{"label": names[i], "probability": round(p[i], 6)} for i in ranked[:args.top_k]]
        lines.append(jsonl_line({**({"id": row["id"]} if "id" in row else {}), **top[0], "top_k": top}))
    return "".join(lines)


def run_predict(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.output != "-":  # checked before the model is loaded
        refuse_overwrite([("--output", output)], [Path(p) for p in (args.model_dir, args.input) if p != "-"])
        if output.is_dir():
            raise UserError(f"--output {args.output} is a directory: pass a file name")
        os.scandir(output.parent).close()  # a missing directory (or a file) fails now
    text = classify(args, read_rows(args))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        atomic_write(output, text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("predict.py", lambda: run_predict(args), args.debug, stopped=lambda: "no output was written",
                   oom_advice="lower --batch_size or --max_seq_len, or use --device cpu")


if __name__ == "__main__":
    sys.exit(main())
