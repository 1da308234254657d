"""The dataset on disk -> labels and token ids: what a run reads, checks and tokenizes before it trains.

What this module is not about: models, batches, training or result files (bertcls.py), nor making datasets
(prepare.py writes them; nothing imports prepare.py). It imports common and torch; bertcls.py, predict.py,
bench.py and sweep.py import it.

- the dataset on disk: label2id.json and the {train,val,test}.jsonl splits, checked; a run keeps a split as its
  labels and where each example's line is in the file (`SplitData`), never its texts
- texts -> token ids: `InputSpec` (length, token types, truncation) and `encode_one`, which lays an example out
  exactly as the tokenizer does and cuts only text: the body's end (head) or its middle (head_tail)
- tokenization cache: each split tokenized once per (tokenizer, input spec, data) into flat tensors + offsets
  (`pack`), written whole or not at all, and memory-mapped by every run that follows
- tokenization worker processes: a large split is tokenized in chunks by several processes, token for token as
  one process would
"""

from __future__ import annotations

import argparse
import array
import collections
import contextlib
import hashlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch

from common import Progress, UserError, first_line, iter_jsonl, read_json, read_jsonl

SPLITS = ("train", "val", "test")
CACHE_FORMAT = 2  # bump when the layout or the key of the tokenization cache changes
MAX_DEFAULT_WORKERS = 16  # each tokenization worker holds its own tokenizer (a MeCab dictionary and a vocabulary)
PARALLEL_MIN_EXAMPLES = 2000  # fewer: starting worker processes would cost more than they save
TOKENIZE_CHUNK = 1000  # examples per task of a tokenization worker: the grain of load balancing and progress


# ------------------------------------------------------------------------------- the dataset on disk


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


# -------------------------------------------------------------------------------- texts -> token ids


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


def tokenize_rows(tokenizer: Any, rows: Sequence[dict], spec: InputSpec, log: Callable[[str], None] = print,
                  progress: str | None = None) -> dict[str, list[list[int]]]:
    """Token ids of every row (see encode_one), with progress on stderr under that description (None: silent);
    one line says how many titles had to be cut."""
    out: dict[str, Any] = {"input_ids": [], "token_type_ids": [], "titles_cut": 0}
    with Progress(len(rows), progress or "", enabled=progress is not None) as shown:
        for start in range(0, len(rows), TOKENIZE_CHUNK):
            part = encode_rows(tokenizer, rows[start:start + TOKENIZE_CHUNK], spec)
            out["input_ids"] += part["input_ids"]
            out["token_type_ids"] += part["token_type_ids"]
            out["titles_cut"] += part["titles_cut"]
            shown.update(len(part["input_ids"]))
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


# ------------------------------------------------------------------------------- tokenization cache


class TokenizingRun(Protocol):
    """What tokenizing a run's splits needs of it: bertcls.Run has all of it."""
    args: argparse.Namespace  # cache_dir, tokenize_workers
    log: Callable[[str], None]
    rank: int  # only rank 0 shows progress
    splits: dict[str, SplitData]
    spec: InputSpec
    tokenizer: Any


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


def load_or_tokenize(run: TokenizingRun, split: str, fingerprint: str) -> dict[str, torch.Tensor]:
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


def tokenize_and_load(run: TokenizingRun, split: str, path: Path) -> dict[str, torch.Tensor]:
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


def example_lengths(packed: dict[str, torch.Tensor]) -> list[int]:
    return (packed["offsets"][1:] - packed["offsets"][:-1]).tolist()


# --------------------------------------------------------------------- tokenization worker processes


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
