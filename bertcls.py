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
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from prepare import UserError, atomic_write_text, read_jsonl

CACHE_FORMAT = 1  # bump when the layout of the tokenization cache changes
NO_DECAY_SUFFIXES = ("bias", "layernorm.weight", "layer_norm.weight", "norm.weight", "ln.weight")
SPLITS = ("train", "val", "test")
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class Terminated(Exception):
    """Raised by the SIGTERM handler so that the run unwinds like a Ctrl-C."""


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


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
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype; auto = bf16 on CUDA when supported, else fp16, fp32 on CPU (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    p.add_argument("--torch_dropout", action="store_true",
                   help="keep torch's own dropout on the CPU too; by default eager CPU training draws dropout masks "
                        "from 15-bit integers, about 1.2x faster (default: off)")
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
    try:
        label2id = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}); re-run prepare.py") from None
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


# ------------------------------------------------------------------------------------ model + tokenizer


def mecab_override(tokenizer_config: dict, mecab_dic: str) -> dict:
    """Tokenizer kwargs that make a BertJapaneseTokenizer segment with the dictionary it was trained with.

    cl-tohoku's v1 models were pre-trained with MeCab + IPAdic, but their tokenizer configs name no
    dictionary, and transformers now defaults MecabTokenizer to unidic-lite: without this they would be
    silently fed a different segmentation.
    """
    is_mecab = (tokenizer_config.get("tokenizer_class") == "BertJapaneseTokenizer"
                and tokenizer_config.get("word_tokenizer_type", "basic") == "mecab")
    if not is_mecab:
        return {}
    if mecab_dic != "auto":
        return {"mecab_kwargs": {**(tokenizer_config.get("mecab_kwargs") or {}), "mecab_dic": mecab_dic}}
    if not tokenizer_config.get("mecab_kwargs"):
        return {"mecab_kwargs": {"mecab_dic": "ipadic"}}
    return {}


def read_tokenizer_config(model_name: str) -> dict:
    """tokenizer_config.json of a local directory or hub model ({} when there is none), with `tokenizer_class`
    taken from config.json when the tokenizer config names none, as AutoTokenizer does: cl-tohoku's v1
    models declare BertJapaneseTokenizer only in config.json."""
    from transformers import PreTrainedConfig
    from transformers.models.auto.tokenization_auto import get_tokenizer_config
    tokenizer_config = dict(get_tokenizer_config(model_name))
    if not tokenizer_config.get("tokenizer_class"):
        try:
            model_config, _ = PreTrainedConfig.get_config_dict(model_name)
        except OSError:  # unreachable or absent: AutoTokenizer reports what is missing
            model_config = {}
        if model_config.get("tokenizer_class"):
            tokenizer_config["tokenizer_class"] = model_config["tokenizer_class"]
    return tokenizer_config


def looks_like_path(model_name: str) -> bool:
    """A name that can only be a directory: hub names are `name` or `owner/name`."""
    return model_name.startswith((".", "/")) or model_name.count("/") > 1 or "\\" in model_name


def fairseq_misnumbered(tokenizer: Any) -> bool:
    """True for transformers 5's MLukeTokenizer built from a sentencepiece.bpe.model (how the hub ships LUKE).

    LUKE/mLUKE were pre-trained with XLM-R's fairseq numbering (<s> 0, <pad> 1, </s> 2, <unk> 3, piece =
    sentencepiece id + 1); this MLukeTokenizer keeps the raw sentencepiece ids (every word id off by one) and
    drops sentencepiece's NFKC normalisation. Without entities its word tokenization is XLM-R's.
    """
    return (type(tokenizer).__name__ == "MLukeTokenizer"
            and tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) != [0, 1, 2, 3])


def xlm_roberta_tokenizer(model_name: str) -> Any:
    """XLMRobertaTokenizer from the model's sentencepiece.bpe.model alone: loaded with LUKE's tokenizer config
    it would register the entity tokens ([MASK], [UNK]...) as words, with ids past the word embeddings."""
    from transformers import XLMRobertaTokenizer
    from transformers.utils import cached_file
    with tempfile.TemporaryDirectory() as tmp:
        spm_model = Path(cached_file(model_name, "sentencepiece.bpe.model")).read_bytes()
        (Path(tmp) / "sentencepiece.bpe.model").write_bytes(spm_model)
        return XLMRobertaTokenizer.from_pretrained(tmp)


def load_tokenizer(model_name: str, mecab_dic: str = "auto", trust_remote_code: bool = False,
                   log=print) -> Any:
    from transformers import AutoTokenizer
    if looks_like_path(model_name) and not Path(model_name).is_dir():
        raise UserError(f"model directory {model_name} not found: pass an existing directory or a hub name "
                        "such as cl-tohoku/bert-base-japanese-v3")
    try:
        kwargs = mecab_override(read_tokenizer_config(model_name), mecab_dic)
        if kwargs:
            log(f"note: {model_name}: BertJapaneseTokenizer with MeCab dictionary "
                f"{kwargs['mecab_kwargs']['mecab_dic']} (--mecab_dic to change)")
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code, **kwargs)
        if fairseq_misnumbered(tokenizer):
            log(f"note: {model_name}: transformers' MLukeTokenizer misnumbers its sentencepiece model; using "
                "XLMRobertaTokenizer on the same model (LUKE's pre-training ids; bertcls passes no entities)")
            tokenizer = xlm_roberta_tokenizer(model_name)
        return tokenizer
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {model_name!r}: {first_line(e)} "
                        "(check the name, your network or HF_HUB_OFFLINE, or pass a local directory)") from None


def load_model(model_name: str, label2id: dict[str, int], trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    id2label = {i: name for name, i in label2id.items()}
    common = dict(num_labels=len(label2id), id2label=id2label, label2id=label2id,
                  trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True)
    try:
        try:
            return AutoModelForSequenceClassification.from_pretrained(model_name, attn_implementation="sdpa", **common)
        except ValueError as e:
            if "sdpa" not in str(e).lower() and "attention" not in str(e).lower():
                raise
            return AutoModelForSequenceClassification.from_pretrained(model_name, **common)
    except pickle.UnpicklingError as e:  # transformers loads *.bin with torch.load(weights_only=True)
        raise UserError(f"refusing to load model {model_name!r}: its pickled weights hold objects other than "
                        "tensors, which could run code; use a checkpoint with model.safetensors") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {model_name!r}: {first_line(e)} "
                        "(check the name, the directory's weights, your network or HF_HUB_OFFLINE)") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


ROBERTA_STYLE_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "luke", "xmod",
                           "roberta-prelayernorm", "data2vec-text")


def position_limit(config: Any) -> int:
    """Tokens the position embeddings can take; RoBERTa-style models reserve padding_idx + 1 positions."""
    limit = getattr(config, "max_position_embeddings", None) or 10**9
    if config.model_type in ROBERTA_STYLE_POSITIONS:  # positions start at padding_idx + 1 (create_position_ids)
        limit -= (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    return limit


def effective_max_len(requested: int, tokenizer: Any, config: Any, log=print) -> int:
    limits = {"--max_seq_len": requested, "the model's position embeddings": position_limit(config)}
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 10**6:  # transformers uses a huge sentinel for "no limit"
        limits["the tokenizer's model_max_length"] = tokenizer_limit
    source = min(limits, key=limits.get)
    if limits[source] < requested:
        log(f"note: max_seq_len capped at {limits[source]} by {source}")
    return limits[source]


def uses_token_type_ids(config: Any) -> bool:
    # BERT was pre-trained with segment B = 1; transformers 5 tokenizers no longer return these by default.
    return getattr(config, "type_vocab_size", 0) > 1


# ------------------------------------------------------------------------------------- tokenization


def tokenize_rows(tokenizer: Any, rows: Sequence[dict], max_len: int, with_token_types: bool,
                  chunk_size: int = 256) -> dict[str, list[list[int]]]:
    """Token ids of every row: a (title, body) pair truncates the body only, so the title is always seen."""
    out: dict[str, list[list[int]]] = {"input_ids": [], "token_type_ids": []}
    for start in range(0, len(rows), chunk_size):
        texts = [example_text(r) for r in rows[start:start + chunk_size]]
        for first, second in texts:
            enc = encode_one(tokenizer, first, second, max_len, with_token_types)
            out["input_ids"].append(enc["input_ids"])
            out["token_type_ids"].append(enc.get("token_type_ids") or [])
    return out


def encode_one(tokenizer: Any, first: str, second: str | None, max_len: int, with_token_types: bool) -> dict:
    kwargs = dict(max_length=max_len, return_token_type_ids=with_token_types, return_attention_mask=False)
    if second is None:
        return tokenizer(first, truncation=True, **kwargs)
    enc = tokenizer(first, second, truncation="only_second", **kwargs)
    if len(enc["input_ids"]) > max_len:  # the title alone is too long: only_second cannot help
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


def load_or_tokenize(tokenizer: Any, rows: Sequence[dict], max_len: int, with_token_types: bool,
                     cache_dir: str, fingerprint: str, data_digest: str, log=print) -> dict[str, torch.Tensor]:
    """Tokenize once per (tokenizer, max_len, data); a sweep over learning rates and seeds reuses it."""
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, fingerprint, max_len, with_token_types, data_digest])
                         .encode()).hexdigest()[:32]
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
    packed = pack(tokenize_rows(tokenizer, rows, max_len, with_token_types))
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
    batch = {"input_ids": torch.where(attention_mask.bool(), packed["input_ids"][flat].long(), pad_id),
             "attention_mask": attention_mask}
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


# ------------------------------------------------------------------------------------ optimisation


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay for weight matrices only: not biases, normalisation weights or other vectors."""
    return param.ndim >= 2 and not name.lower().endswith(NO_DECAY_SUFFIXES)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


def get_lr(step: int, total_steps: int, warmup_steps: int, max_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to max_lr, then linear decay to 0."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    return max_lr * (total_steps - step) / max(1, total_steps - warmup_steps)


def optimizer_steps_per_epoch(n_batches: int, grad_accum_steps: int) -> int:
    return math.ceil(n_batches / grad_accum_steps)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[requested]


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


# ------------------------------------------------------------------------------------- distributed


def init_distributed(requested_device: str | None) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device); a process group only under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank if world_size > 1 else None)
    if world_size > 1:
        import torch.distributed as dist
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def pick_device(requested: str | None, local_rank: int | None) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown --device {requested!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available here: use --device cpu")
        if local_rank is not None:
            device = torch.device("cuda", local_rank)
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"--device {requested!r} is not supported: use cpu or cuda")
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


# ---------------------------------------------------------------------------------- train + evaluate


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


def evaluate(model: torch.nn.Module, packed: dict[str, torch.Tensor], labels: torch.Tensor,
             id2label: dict[int, str], **kwargs: Any) -> tuple[dict[str, Any], torch.Tensor]:
    probs, losses = predict(model, packed, labels=labels, **kwargs)
    pred = probs.argmax(-1).tolist()
    return classification_metrics(labels.tolist(), pred, float(losses.sum()), id2label), probs


class NonFiniteLoss(UserError):
    pass


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                packed: dict[str, torch.Tensor], labels: torch.Tensor, batches: list[list[int]], *,
                ctx: contextlib.AbstractContextManager, device: torch.device, pad_id: int, step: int,
                total_steps: int, warmup_steps: int, max_lr: float, grad_accum_steps: int,
                max_grad_norm: float, log_interval: int, epoch: int, progress: Any = None,
                buckets: Sequence[int] | None = None, collate_fn: Any = None) -> tuple[int, float]:
    """One pass over `batches` (this rank's); returns the next optimizer step and the mean train loss.

    The loss of each micro-batch is weighted by its share of the examples of its optimizer step, so K
    accumulated micro-batches give the gradient of one batch K times as large. `collate_fn` (default
    `collate`) lets bench.py time another way of building batches through the same loop.
    """
    collate_fn = collate_fn or collate
    model.train()
    loss_sum = torch.zeros((), device=device)  # accumulated on device: no host sync per step
    first_bad_step = torch.full((), -1, device=device)
    n_examples = 0
    groups = [batches[i:i + grad_accum_steps] for i in range(0, len(batches), grad_accum_steps)]
    for group in groups:
        lr = get_lr(step, total_steps, warmup_steps, max_lr)
        for group_param in optimizer.param_groups:
            group_param["lr"] = lr
        group_examples = sum(len(b) for b in group)
        for micro, batch_indices in enumerate(group):
            batch = to_device(collate_fn(packed, batch_indices, labels, pad_id, buckets), device)
            if hasattr(model, "require_backward_grad_sync"):  # DDP: all-reduce only on the last micro-batch
                model.require_backward_grad_sync = micro == len(group) - 1
            with ctx:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss = F.cross_entropy(logits.float(), batch["labels"])
            scaler.scale(loss * (len(batch_indices) / group_examples)).backward()
            loss_sum += loss.detach() * len(batch_indices)
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()),
                                         torch.full_like(first_bad_step, step), first_bad_step)
        n_examples += group_examples
        if max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % log_interval == 0 or group is groups[-1]:
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


# ------------------------------------------------------------------------------------------ outputs


def make_run_dir(output_dir: Path, model_name: str, now: datetime.datetime | None = None) -> Path:
    now = now or datetime.datetime.now()
    safe_name = model_name.strip("/").removeprefix("./").replace("/", "__")
    run_dir = output_dir / safe_name / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S.%f")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file: pass a directory")
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


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


# --------------------------------------------------------------------------------------------- main


class Run:
    """What main() sets up before training; bench.py builds the same to measure the same code path."""

    def __init__(self, args: argparse.Namespace, log=print, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None):
        self.args, self.log, self.rank, self.world_size = args, log, rank, world_size
        self.device = device or pick_device(args.device, None)
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
        torch.manual_seed(args.seed)
        self.tokenizer = load_tokenizer(args.model_name, args.mecab_dic, args.trust_remote_code, log)
        self.model = load_model(args.model_name, self.label2id, args.trust_remote_code)
        self.params, self.params_non_embedding = count_parameters(self.model)
        self.max_len = effective_max_len(args.max_seq_len, self.tokenizer, self.model.config, log)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.buckets = compile_buckets(self.max_len) if args.compile else None
        self.packed = self.tokenize_all()
        self.labels = {s: torch.tensor([r["label"] for r in self.rows[s]]) for s in SPLITS}

    def tokenize_all(self) -> dict[str, dict[str, torch.Tensor]]:
        with_types = uses_token_type_ids(self.model.config)
        fingerprint = tokenizer_fingerprint(self.tokenizer) if self.args.cache_dir else ""
        packed = {}
        for rank_turn in ([0, 1] if self.world_size > 1 else [self.rank]):
            # rank 0 tokenizes and fills the cache first; the other ranks then read it
            if (rank_turn == 0) == (self.rank == 0):
                for split in SPLITS:
                    packed[split] = load_or_tokenize(self.tokenizer, self.rows[split], self.max_len, with_types,
                                                     self.args.cache_dir, fingerprint,
                                                     rows_digest(self.rows[split]), self.log)
            if self.world_size > 1 and rank_turn == 0:
                barrier(self.world_size)
        return packed

    def config_record(self, dtype: torch.dtype, total_steps: int, warmup_steps: int) -> dict:
        import transformers
        return {"args": vars(self.args), "device": str(self.device), "dtype": str(dtype).removeprefix("torch."),
                "world_size": self.world_size,
                "effective_batch_size": self.args.batch_size * self.args.grad_accum_steps * self.world_size,
                "total_optimizer_steps": total_steps, "warmup_steps": warmup_steps,
                "max_seq_len_used": self.max_len, "params": self.params,
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


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    # the fused kernel exists for CUDA and (since torch 2.4) the CPU; the per-tensor loop it replaces
    # cost ~10% of a CPU training step on a 5M-parameter model
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                             fused=device.type in ("cuda", "cpu"))


def keep_freed_memory() -> None:
    """Keep freed blocks in the heap instead of returning them to the OS.

    glibc gives blocks of more than a few MB back at once (mmap/trim), so every CPU training step would
    page-fault its activations and gradients in again: ~30,000 faults, 9% of a step on a 4-layer BERT.
    """
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 2**31 - 1)


DROPOUT_MASK_LEVELS = 1 << 15


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with its keep mask drawn from 15-bit random integers, for the CPU.

    torch's CPU dropout draws one random float per element, which made it 18% of a training step of a
    4-layer BERT; one 64-bit random word gives four 15-bit draws, at about a quarter of the cost. The drop
    probability is rounded to a multiple of 1/32768 (0.1 -> 0.100006) and kept values are scaled by the
    exact inverse of the keep probability used, so the expected output is still x.
    """
    if not training or p == 0.0:
        return x
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # uniform in [0, 2**63)
    draws = words.view(torch.int16)[:n].view(x.shape) & (DROPOUT_MASK_LEVELS - 1)
    threshold = round(p * DROPOUT_MASK_LEVELS)
    mask = (draws >= threshold).to(x.dtype).mul_(DROPOUT_MASK_LEVELS / (DROPOUT_MASK_LEVELS - threshold))
    return x * mask  # autograd keeps only the mask for the backward pass


class FastDropout(torch.nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


FAST_DROPOUT_ATTENTION = "bertcls_sdpa_fast_dropout"


def attention_with_fast_dropout(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that dropout on the attention probabilities is fast_dropout."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    plain = (kwargs.get("is_causal") or getattr(module, "is_causal", False) or kwargs.get("position_bias") is not None
             or getattr(module, "num_key_value_groups", 1) > 1 or query.shape[-1] != value.shape[-1])
    if dropout == 0.0 or plain:  # evaluation, or a variant this short path does not cover
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scaling, key.transpose(-2, -1))  # scaling q is 1/L of the work of scaling q k^T
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
                  if attention_mask.dtype == torch.bool else scores + attention_mask)
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_fast_dropout(model: torch.nn.Module) -> None:
    """Swap every torch dropout of the model, attention probabilities included, for fast_dropout.

    Only for eager CPU training: CUDA fuses dropout into its kernels, and torch.compile generates its own.
    The weights and the saved config are unchanged.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace).train(child.training))
    config = getattr(model, "config", None)
    if getattr(model, "_supports_attention_backend", False) and getattr(config, "_attn_implementation", "") == "sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(FAST_DROPOUT_ATTENTION, attention_with_fast_dropout)
        AttentionMaskInterface.register(FAST_DROPOUT_ATTENTION, sdpa_mask)
        model.set_attn_implementation(FAST_DROPOUT_ATTENTION)


def prepare_model(run: Run) -> torch.nn.Module:
    """The model on its device, with checkpointing, DDP and compile as asked; returns what to call."""
    model = run.model.to(run.device)
    if run.device.type == "cpu":
        keep_freed_memory()
        if not run.args.compile and not run.args.torch_dropout:
            use_fast_dropout(model)
    if run.args.gradient_checkpointing:
        # non-reentrant checkpointing works under DDP and torch.compile
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if run.world_size > 1:
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


def train_and_evaluate(run: Run, run_dir: Path | None) -> dict:
    args, log = run.args, run.log
    dtype = resolve_dtype(args.dtype, run.device)
    ctx = autocast_context(run.device, dtype)
    model = prepare_model(run)
    optimizer = build_optimizer(run.model, args, run.device)
    scaler = torch.amp.GradScaler(run.device.type, enabled=dtype == torch.float16)
    steps_per_epoch = optimizer_steps_per_epoch(len(train_batches(run, 1)), args.grad_accum_steps)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = round(steps_per_epoch * args.num_warmup_epochs)
    if run_dir is not None:
        write_json(run_dir / "config.json", run.config_record(dtype, total_steps, warmup_steps))
    log(f"examples: train {len(run.rows['train'])}, val {len(run.rows['val'])}, test {len(run.rows['test'])} | "
        f"epochs {args.epochs} | per-device batch {args.batch_size} x world size {run.world_size} x accumulation "
        f"{args.grad_accum_steps} = effective batch {args.batch_size * run.world_size * args.grad_accum_steps} | "
        f"optimizer steps {total_steps} (warmup {warmup_steps}) | device {run.device} {dtype} | "
        f"params {run.params / 1e6:.2f}M | max_seq_len {run.max_len}")
    eval_kwargs = dict(batch_size=args.eval_batch_size, device=run.device, ctx=ctx, pad_id=run.pad_id,
                       rank=run.rank, world_size=run.world_size, buckets=run.buckets)
    from tqdm.auto import tqdm
    quiet = run.rank != 0 or not sys.stderr.isatty()
    step, best, history, train_seconds = 0, None, [], 0.0
    for epoch in tqdm(range(1, args.epochs + 1), desc="epochs", disable=quiet, dynamic_ncols=True):
        batches = train_batches(run, epoch)
        start = time.perf_counter()
        with tqdm(total=sum(map(len, batches)), desc=f"epoch {epoch}", unit="ex", disable=quiet, leave=False,
                  dynamic_ncols=True) as progress:
            step, train_loss = train_epoch(model, optimizer, scaler, run.packed["train"], run.labels["train"],
                                           batches, ctx=ctx, device=run.device, pad_id=run.pad_id, step=step,
                                           total_steps=total_steps, warmup_steps=warmup_steps, max_lr=args.lr,
                                           grad_accum_steps=args.grad_accum_steps,
                                           max_grad_norm=args.max_grad_norm, log_interval=args.log_interval,
                                           epoch=epoch, progress=progress, buckets=run.buckets)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        train_loss = sum(gather_objects(train_loss, run.world_size)) / run.world_size
        val, _ = evaluate(model, run.packed["val"], run.labels["val"], run.id2label, **eval_kwargs)
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "val_precision": val["precision"], "val_recall": val["recall"], "val_f1": val["f1"],
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
               "examples_per_s": round(sum(map(len, batches)) * run.world_size / seconds, 2)}
        history.append(row)
        if best is None or val["f1"] > best["val"]["f1"]:  # the first epoch always counts
            best = {"epoch": epoch, "val": val,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}}
        log(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f} | val loss {val['loss']:.4f} "
            f"acc {val['accuracy']:.4f} f1 {val['f1']:.4f} | {row['examples_per_s']:.1f} ex/s")
        if run_dir is not None:
            write_log_csv(run_dir / "log.csv", history)
    if best["epoch"] == args.epochs:  # the weights in hand are the best ones: their val metrics are known
        val = best["val"]
    else:
        run.model.load_state_dict(best["state"])
        val, _ = evaluate(model, run.packed["val"], run.labels["val"], run.id2label, **eval_kwargs)
    test, test_probs = evaluate(model, run.packed["test"], run.labels["test"], run.id2label, **eval_kwargs)
    return {"best_epoch": best["epoch"], "val": val, "test": test, "test_probs": test_probs, "history": history,
            "train_seconds": train_seconds}


def write_results(run: Run, run_dir: Path, result: dict) -> None:
    """Metric files, test-metrics.json last: its presence is what marks a finished run."""
    write_json(run_dir / "val-metrics.json", {"best_epoch": result["best_epoch"],
                                              "train_seconds": round(result["train_seconds"], 3), **result["val"]})
    write_predictions(run_dir / "test-predictions.jsonl", run.rows["test"], result["test_probs"], run.id2label)
    atomic_write_text(run_dir / "learning-curve.svg", learning_curve_svg(result["history"]))
    if run.args.save_model:
        save_model(run, run_dir / "model")
    write_json(run_dir / "test-metrics.json", result["test"])


def save_model(run: Run, model_dir: Path) -> None:
    """Best weights (safetensors), tokenizer and label names, loadable by transformers alone.

    The saved tokenizer truncates at the length used in training and returns token_type_ids when the
    model was trained with them, so pipeline("text-classification") feeds the model what training did;
    bertcls.json records the same for predict.py, which reproduces test-predictions.jsonl exactly.
    """
    tmp = model_dir.with_name(".model.tmp")
    if tmp.exists():  # left by an interrupted save: save_pretrained would mix old and new files
        shutil.rmtree(tmp)
    run.model.save_pretrained(tmp, safe_serialization=True)
    run.tokenizer.save_pretrained(tmp)
    with_types = uses_token_type_ids(run.model.config)
    config_path = tmp / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    tokenizer_config["model_max_length"] = run.max_len
    input_names = list(tokenizer_config.get("model_input_names") or run.tokenizer.model_input_names)
    if with_types and "token_type_ids" not in input_names:
        input_names.insert(1, "token_type_ids")  # transformers 5 tokenizers leave them out by default
        tokenizer_config["model_input_names"] = input_names
    write_json(config_path, tokenizer_config)
    write_json(tmp / "bertcls.json", {"format": 1, "base_model": run.args.model_name,
                                      "max_seq_len": run.max_len, "token_type_ids": with_types})
    os.replace(tmp, model_dir)


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    debug = args.debug or os.environ.get("BERTCLS_DEBUG") == "1"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    def log(message: str) -> None:
        if rank == 0:
            print(message, file=sys.stderr, flush=True)

    previous_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    run_dir = None
    try:
        if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
            raise UserError(f"--output_dir {args.output_dir} is a file: pass a directory")
        rank, _, world_size, device = init_distributed(args.device)
        random.seed(args.seed)
        run = Run(args, log, rank, world_size, device)
        run_dir = make_run_dir(Path(args.output_dir), args.model_name) if rank == 0 else None
        run_dir = broadcast_object(run_dir, world_size)
        result = train_and_evaluate(run, run_dir if rank == 0 else None)
        if rank == 0:
            write_results(run, run_dir, result)
            log(f"test: accuracy {result['test']['accuracy']:.4f} f1 {result['test']['f1']:.4f} "
                f"(best epoch {result['best_epoch']}) -> {run_dir}")
        barrier(world_size)
        return 0
    except KeyboardInterrupt:
        log(f"bertcls.py: interrupted; {run_dir or 'no run directory'} keeps config.json and log.csv, no metrics")
        return EXIT_SIGINT
    except Terminated:
        log(f"bertcls.py: terminated; {run_dir or 'no run directory'} keeps config.json and log.csv, no metrics")
        return EXIT_SIGTERM
    except torch.OutOfMemoryError:
        if debug:
            raise
        log("bertcls.py: error: out of GPU memory: lower --batch_size (with --grad_accum_steps to keep the "
            "effective batch), lower --max_seq_len, or add --gradient_checkpointing")
        return 1
    except UserError as e:
        if debug:
            raise
        print(f"bertcls.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if world_size > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
