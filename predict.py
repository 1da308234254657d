"""Classify texts with a model saved by `bertcls.py --save_model`.

    python predict.py --model_dir outputs/<model>/<date>/<time>/model --input datasets/livedoor/test.jsonl
    python predict.py --model_dir RUN_DIR/model --text "野球の日本代表が決勝に進出"
    cat articles.jsonl | python predict.py --model_dir RUN_DIR/model --top_k 1 --output outputs/predictions.jsonl

Input: JSONL, one object per line with `text`, or `title` + `body` (read as a pair, as bertcls.py does);
an `id` is copied to the output. Output: JSONL in input order,
{"id": ..., "label": name, "probability": p, "top_k": [{"label": name, "probability": p}, ...]}.
Texts are tokenized, truncated (head or head_tail, as bertcls.json records), batched and run exactly as
bertcls.py evaluates them, so the labels of a run's test split equal its test-predictions.jsonl. Only
safetensors weights are loaded, and no code from the model directory unless --trust_remote_code.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch

from bertcls import check_batch_budget, predict
from common import (UserError, atomic_write_text, autocast_context, check_writable, first_line, log, parse_json_object,
                    pick_device, positive_int, read_json, resolve_dtype, run_cli, use_tf32)
from data import TRUNCATIONS, InputSpec, check_room_for_text, example_text, pack, tokenize_rows
from families import (attention_implementation, load_tokenizer, position_limit, transformers_progress_bars,
                      uses_token_type_ids)

DEFAULT_LABEL = re.compile(r"LABEL_\d+")  # the names transformers makes up for a config without labels


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True,
                   help="<run dir>/model written by bertcls.py --save_model (required)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", default="-", help="JSONL file, '-' for stdin (default: stdin)")
    source.add_argument("--text", default=None,
                        help="classify this one text instead of reading --input (default: none)")
    p.add_argument("--output", default="-", help="JSONL file, written atomically; '-' for stdout (default: stdout)")
    p.add_argument("--top_k", type=positive_int, default=3, help="labels listed per text (default: %(default)s)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="(default: %(default)s)")
    p.add_argument("--max_batch_tokens", type=positive_int, default=None,
                   help="token budget per batch instead of --batch_size texts, for long inputs (default: off)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype, as bertcls.py's; auto = bf16 on GPUs with bf16 units, else fp16; on a "
                        "CPU bf16 where it has bf16 units, else fp32; fp32 on CUDA multiplies matrices in TF32 "
                        "(default: auto)")
    p.add_argument("--max_seq_len", type=positive_int, default=None,
                   help="tokens per text (default: the length used in training, from bertcls.json)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow the model directory to run its own Python code (default: off)")
    p.add_argument("--skip_bad_lines", action="store_true",
                   help="report a bad input line on stderr and go on (default: off, stop with an error)")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks for errors (default: off; env BERTCLS_DEBUG=1 does the same)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- input


def read_input(source: str, stdin: TextIO) -> tuple[str, str]:
    """(name for messages, text) of a file or of stdin; UTF-8, a leading BOM dropped."""
    if source == "-":
        if stdin.isatty():
            raise UserError("no input: pass --input FILE or --text TEXT, or pipe JSONL into stdin")
        buffer = getattr(stdin, "buffer", None)
        data = buffer.read() if buffer is not None else stdin.read().encode("utf-8")
        name = "<stdin>"
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read --input {source}: {e.strerror}") from None
        name = source
    try:
        return name, data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{name}:{line}: not UTF-8; convert the input to UTF-8") from None


def parse_line(line: str) -> dict:
    """One input object with a usable text; ValueError says what is wrong with it."""
    row = parse_json_object(line)
    example_text(row)
    return row


def parse_jsonl(name: str, text: str, skip_bad_lines: bool) -> list[dict]:
    """Objects of the non-empty lines; a bad line is a UserError naming it, or a warning when skipping."""
    rows = []
    # split on "\n" only: JSON strings may hold U+2028 and other characters str.splitlines() breaks at
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(parse_line(line))
        except ValueError as e:
            if not skip_bad_lines:
                raise UserError(f"{name}:{lineno}: {e} (fix the line, or pass --skip_bad_lines)") from None
            log(f"predict.py: warning: {name}:{lineno}: {e}; skipped")
    if not rows:
        raise UserError(f"{name}: no examples: expected JSONL lines with 'text', or 'title' and 'body'")
    return rows


# ----------------------------------------------------------------------------------------------- model


def read_saved_settings(model_dir: Path) -> dict | None:
    """bertcls.json: the max length, token types and truncation used in training; None for a model saved
    elsewhere. Files written before --truncation existed have none: they were trained with head."""
    path = model_dir / "bertcls.json"
    if not path.is_file():
        return None
    settings = read_json(path, hint="re-save the model with bertcls.py --save_model")
    if (not isinstance(settings, dict) or isinstance(settings.get("max_seq_len"), bool)
            or not isinstance(settings.get("max_seq_len"), int) or settings["max_seq_len"] <= 0
            or not isinstance(settings.get("token_type_ids"), bool)
            or settings.get("truncation", "head") not in TRUNCATIONS):
        raise UserError(f"{path}: expected a JSON object with a positive integer max_seq_len, a boolean "
                        f"token_type_ids and a truncation of {' or '.join(TRUNCATIONS)}; re-save the model with "
                        "bertcls.py --save_model")
    return {"truncation": "head", **settings}


def check_classifier_config(config: Any, model_dir: Path) -> None:
    """A sequence classifier with real label names, or a UserError saying which is missing."""
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{model_dir} holds no sequence classification model (architectures: "
                        f"{', '.join(architectures) or 'none'}): pass the model/ directory that "
                        "bertcls.py --save_model writes into a run directory")
    names = list((getattr(config, "id2label", None) or {}).values())
    if not names or all(DEFAULT_LABEL.fullmatch(str(n)) for n in names):
        raise UserError(f"{model_dir / 'config.json'} has no label names (id2label is missing or only "
                        "LABEL_0, LABEL_1, ...): save the model with bertcls.py --save_model")


def load_classifier(model_dir: Path, trust_remote_code: bool, attention: str = "sdpa") -> torch.nn.Module:
    """The saved classifier from safetensors only; a config or weights it cannot use are UserErrors."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    if not model_dir.is_dir():
        raise UserError(f"--model_dir {model_dir} is not a directory: pass <run dir>/model from "
                        "bertcls.py --save_model")
    if not any((model_dir / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"{model_dir} has no model.safetensors: only safetensors weights are loaded "
                        "(other formats can run code when unpickled); re-save with bertcls.py --save_model")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        check_classifier_config(config, model_dir)
        with transformers_progress_bars(show=sys.stderr.isatty()):  # no "Loading weights" bar in a log file
            model, info = AutoModelForSequenceClassification.from_pretrained(
                model_dir, config=config, use_safetensors=True, trust_remote_code=trust_remote_code,
                output_loading_info=True, attn_implementation=attention)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the model in {model_dir}: {first_line(e)}") from None
    if info.get("missing_keys"):  # e.g. no trained classification head: it would be random
        missing = sorted(info["missing_keys"])
        raise UserError(f"{model_dir / 'model.safetensors'} lacks weights the classifier needs "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
                        "save the model with bertcls.py --save_model")
    return model


def input_settings(settings: dict | None, requested: int | None, model: torch.nn.Module,
                   tokenizer: Any) -> InputSpec:
    """The inputs exactly as in training, unless --max_seq_len asks for another length."""
    if settings is None:
        log("note: no bertcls.json in the model directory: using the tokenizer's model_max_length and the "
            "model's token types, which may differ from training")
        tokenizer_limit = getattr(tokenizer, "model_max_length", None) or 512
        max_len = requested or (tokenizer_limit if tokenizer_limit < 10**6 else 512)
        with_types, truncation = uses_token_type_ids(model.config), "head"
    else:
        max_len, with_types = requested or settings["max_seq_len"], settings["token_type_ids"]
        truncation = settings["truncation"]
    limit = position_limit(model.config)
    if max_len > limit:
        log(f"note: max_seq_len capped at {limit} by the model's position embeddings")
    return InputSpec(min(max_len, limit), with_types, truncation)


# ---------------------------------------------------------------------------------------------- output


def prediction_record(row: dict, probs: Sequence[float], id2label: dict[int, str], top_k: int) -> dict:
    """One output line; ties go to the lower label id, as in bertcls.py's test-predictions.jsonl."""
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])
    record = {"id": row["id"]} if "id" in row else {}
    record.update(label=id2label[ranked[0]], probability=round(probs[ranked[0]], 6),
                  top_k=[{"label": id2label[i], "probability": round(probs[i], 6)} for i in ranked[:top_k]])
    return record


def check_output(destination: str) -> None:
    """Refuse an --output that cannot be written before the model is loaded, not after the inference."""
    if destination == "-":
        return
    path = Path(destination)
    if path.is_dir():
        raise UserError(f"--output {path} is a directory: pass a file name, e.g. {path / 'predictions.jsonl'}")
    if not path.parent.is_dir():
        problem = "is not a directory" if path.parent.exists() else "does not exist"
        raise UserError(f"--output {path}: {path.parent} {problem}: create the directory or pass another path")
    check_writable(path.parent, "--output")


def write_output(destination: str, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    if destination == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        atomic_write_text(Path(destination), text)
    except OSError as e:  # a full disk: atomic_write_text leaves nothing behind
        raise UserError(f"could not write --output {destination} ({e.strerror}): nothing was written; free space "
                        "and run again, or pass --output - for stdout") from None


# ------------------------------------------------------------------------------------------------ main


def classify(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    model_dir = Path(args.model_dir)
    settings = read_saved_settings(model_dir)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    use_tf32(device, dtype)
    model = load_classifier(model_dir, args.trust_remote_code, attention_implementation(device, dtype))
    tokenizer = load_tokenizer(str(model_dir), "auto", args.trust_remote_code, log)
    spec = input_settings(settings, args.max_seq_len, model, tokenizer)
    check_room_for_text(spec.max_len, tokenizer, pair=any(example_text(r)[1] is not None for r in rows))
    ctx = autocast_context(device, dtype)
    check_batch_budget(args.max_batch_tokens, spec.max_len, what="text")
    packed = pack(tokenize_rows(tokenizer, rows, spec, log=log, progress="tokenizing"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probs, _ = predict(model.to(device), packed, args.batch_size, device, ctx, pad_id,
                       max_batch_tokens=args.max_batch_tokens, progress="classifying")
    id2label = {int(i): name for i, name in model.config.id2label.items()}
    return [prediction_record(row, p, id2label, args.top_k) for row, p in zip(rows, probs.tolist())]


def run_predict(args: argparse.Namespace) -> int:
    check_output(args.output)
    if args.text is not None:
        try:
            args.text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as lone surrogates
            raise UserError("--text is not valid UTF-8 text; pass UTF-8 (or the text as JSONL via --input)") from None
        rows = [{"text": args.text}]
    else:
        rows = parse_jsonl(*read_input(args.input, sys.stdin), args.skip_bad_lines)
    records = classify(args, rows)
    write_output(args.output, [json.dumps(r, ensure_ascii=False) for r in records])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("predict.py", lambda: run_predict(args), args.debug, stopped=lambda: "no output was written",
                   oom_advice="lower --batch_size or --max_seq_len, or use --device cpu")


if __name__ == "__main__":
    sys.exit(main())
