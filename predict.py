"""Classify texts with a model saved by `bertcls.py --save_model`.

    python predict.py --model_dir outputs/<model>/<date>/<time>/model --input datasets/livedoor/test.jsonl
    python predict.py --model_dir RUN_DIR/model --text "野球の日本代表が決勝に進出"
    cat articles.jsonl | python predict.py --model_dir RUN_DIR/model --top_k 1 --output predictions.jsonl

Input: JSONL with `text`, or `title` + `body` (a pair, as in training); an `id` is copied to the output. Output:
JSONL in input order, {"id": ..., "label": name, "probability": p, "top_k": [{"label": ..., "probability": ...}]}.
Texts are tokenized, cut (as bertcls.json records) and batched by the code bertcls.py evaluates with, so a run's
test split gets the labels of its test-predictions.jsonl. Only safetensors weights are loaded, and code from the
model directory runs only with --trust_remote_code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from bertcls import predict
from common import (UserError, atomic_write, jsonl_line, log, parse_json, pick_device, positive_int, read_json, refuse_overwrite,
                    resolve_dtype, run_cli)
from data import TRUNCATIONS, InputSpec, Inputs, example_text, read_split, tokenized
from models import attention_implementation, load_tokenizer, max_length, quiet_loading, uses_token_type_ids


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="<run dir>/model, written by bertcls.py --save_model")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", default="-", help="JSONL file; '-' reads stdin (default: -)")
    source.add_argument("--text", default=None, help="classify this one text instead (default: none)")
    p.add_argument("--output", default="-", help="JSONL file, written whole at the end; '-' for stdout (default: -)")
    p.add_argument("--top_k", type=positive_int, default=3, help="labels listed per text (default: %(default)s)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="(default: %(default)s)")
    p.add_argument("--max_batch_tokens", type=positive_int, default=None,
                   help="batches of at most this many padded tokens, for long texts (default: off)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast, as bertcls.py's --dtype (default: auto)")
    p.add_argument("--max_seq_len", type=positive_int, default=None, help="(default: as in training, bertcls.json)")
    p.add_argument("--trust_remote_code", action="store_true", help="let the model directory run code (default: off)")
    p.add_argument("--skip_bad_lines", action="store_true", help="warn about a bad input line and go on (default: off)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: off)")
    return p.parse_args(argv)


def read_rows(args: argparse.Namespace) -> list[dict]:
    """The input objects, each with a usable text; a bad line is an error naming it (or a warning with
    --skip_bad_lines)."""
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
        where = f"{name}:{number}"
        try:
            if line.strip():
                row = parse_json(line.decode("utf-8-sig" if number == 1 else "utf-8"), where)
                example_text(row if isinstance(row, dict) else {})
                rows.append(row)
        except UnicodeDecodeError:
            problem = f"{where}: not UTF-8"
        except ValueError as e:
            problem = f"{where}: {e}"
        except UserError as e:
            problem = str(e)
        else:
            continue
        if not args.skip_bad_lines:
            raise UserError(f"{problem} (fix the line, or pass --skip_bad_lines)")
        log(f"predict.py: warning: {problem}; skipped")
    if not rows:
        raise UserError(f"{name}: no examples: expected JSONL lines with 'text', or 'title' and 'body'")
    return rows


def load_classifier(model_dir: Path, trust_remote_code: bool, attention: str) -> torch.nn.Module:
    """The saved classifier, from safetensors only, with its trained head and label names."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    if not (model_dir / "model.safetensors").is_file() and not (model_dir / "model.safetensors.index.json").is_file():
        raise UserError(f"{model_dir} has no model.safetensors: pass <run dir>/model written by bertcls.py "
                        "--save_model (only safetensors are loaded: other formats can run code)")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    names = list((config.id2label or {}).values())
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []) or all(
            re.fullmatch(r"LABEL_\d+", str(n)) for n in names):
        raise UserError(f"{model_dir} holds no classifier with label names (architectures "
                        f"{config.architectures}, labels {names[:3]}): save one with bertcls.py --save_model")
    with quiet_loading():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_dir, config=config, use_safetensors=True, trust_remote_code=trust_remote_code,
            output_loading_info=True, attn_implementation=attention)
    if info.get("missing_keys"):  # e.g. no trained head: it would be random
        raise UserError(f"{model_dir / 'model.safetensors'} lacks weights the classifier needs "
                        f"({', '.join(sorted(info['missing_keys'])[:3])}): save it with bertcls.py --save_model")
    return model


def input_spec(model_dir: Path, requested: int | None, model: torch.nn.Module, tokenizer) -> InputSpec:
    """The inputs exactly as in training (bertcls.json), unless --max_seq_len asks for another length."""
    path = model_dir / "bertcls.json"
    if not path.is_file():
        log("note: no bertcls.json: using the tokenizer's model_max_length and the model's segment ids, which may "
            "differ from training")
        saved = {"max_seq_len": 512, "token_type_ids": uses_token_type_ids(model.config), "truncation": "head"}
    else:
        saved = read_json(path)
        saved = {"truncation": "head", **saved} if isinstance(saved, dict) else {}  # files before truncation existed
        if not (type(saved.get("max_seq_len")) is int and saved["max_seq_len"] > 0
                and isinstance(saved.get("token_type_ids"), bool) and saved.get("truncation") in TRUNCATIONS):
            raise UserError(f"{path}: expected max_seq_len (a positive integer), token_type_ids (true/false) and "
                            f"truncation ({' or '.join(TRUNCATIONS)}): re-save the model with bertcls.py --save_model")
    max_len = max_length(requested or saved["max_seq_len"], tokenizer, model.config, log)
    return InputSpec(max_len, saved["token_type_ids"], saved["truncation"])


def classify(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    model_dir = Path(args.model_dir)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_classifier(model_dir, args.trust_remote_code, attention_implementation(device, dtype)).to(device)
    tokenizer = load_tokenizer(str(model_dir), "auto", args.trust_remote_code, log)
    spec = input_spec(model_dir, args.max_seq_len, model, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:  # the rows as a split: tokenized exactly as training's are
        path = Path(tmp) / "input.jsonl"
        path.write_text("".join(jsonl_line({**dict(zip(("title", "body") if b is not None else ("text",), (a, b))),
                                            "label": 0}) for a, b in map(example_text, rows)), encoding="utf-8")
        split = read_split(path, {"": 0}, {})
        packed = tokenized("input", split, tokenizer, spec, "", 1, log, show=len(rows) > 1000)
    ctx = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    probs, _ = predict(model, Inputs(packed, split.labels, tokenizer.pad_token_id or 0), args.batch_size,
                       args.max_batch_tokens, ctx, device, desc="classifying" if len(rows) > 1000 else None)
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    out = []
    for row, p in zip(rows, probs.tolist()):
        ranked = sorted(range(len(p)), key=lambda i: -p[i])  # ties: the lower id, as test-predictions.jsonl
        top = [{"label": names[i], "probability": round(p[i], 6)} for i in ranked[:args.top_k]]
        out.append(json.dumps({**({"id": row["id"]} if "id" in row else {}), **top[0], "top_k": top},
                              ensure_ascii=False))
    return out


def run_predict(args: argparse.Namespace) -> int:
    if args.output != "-":
        refuse_overwrite([("--output", Path(args.output))], [Path(args.model_dir)] + (
            [Path(args.input)] if args.text is None and args.input != "-" else []))
        if Path(args.output).is_dir():
            raise UserError(f"--output {args.output} is a directory: pass a file name")
        Path(args.output).parent.resolve(strict=True)  # a missing directory fails now, not after the inference
    lines = classify(args, read_rows(args))
    if args.output == "-":
        sys.stdout.write("".join(line + "\n" for line in lines))
    else:
        atomic_write(Path(args.output), "".join(line + "\n" for line in lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("predict.py", lambda: run_predict(args), args.debug, stopped=lambda: "no output was written",
                   oom_advice="lower --batch_size or --max_seq_len, or use --device cpu")


if __name__ == "__main__":
    sys.exit(main())
