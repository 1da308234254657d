"""The dataset on disk -> labels and token ids: what a run reads, checks and tokenizes before it trains.

    load_dataset(dir)       label2id.json and {train,val,test}.jsonl, checked; a split is kept as its labels and
                            where each example's line is in its file, never its texts (a run's memory does not grow
                            with them)
    encode(tokenizer, ...)  one example laid out exactly as tokenizer(title, body) lays it out, cut to length
                            (head: the body's end goes; head_tail: its middle)
    tokenized(...)          a split's token ids: tokenized once per (tokenizer, length, truncation, data) by a process
                            pool over chunks of its file, cached as flat binary files and memory-mapped
    Inputs.batch(...)       padded batches of those ids, built with a few tensor ops
"""

from __future__ import annotations

import array
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from common import Progress, UserError, iter_jsonl, read_json

SPLITS = ("train", "val", "test")
TRUNCATIONS = ("head", "head_tail")
HEAD_SHARE = 128 / 510  # Sun et al. 2019 kept BERT's first 128 and last 382 of 510 text tokens: head_tail's shares
CHARS_PER_TOKEN = 10  # a text is cut to max_len x this many characters before tokenizing: far more than max_len tokens
CACHE_FORMAT = 3  # bump when the cache's layout or key changes
CHUNK = 1000  # examples per task of a tokenization worker
POOL_MIN_EXAMPLES = 2000  # fewer: starting worker processes costs more than it saves


class Split(NamedTuple):
    """A split as a run keeps it: labels and the byte offset of each example's line (then the file's end)."""
    path: Path
    labels: torch.Tensor
    starts: array.array
    digest: str  # sha256 of the file: part of the tokenization cache key
    pairs: bool  # some example is a (title, body) pair


class InputSpec(NamedTuple):
    """How texts become model inputs; the cache key, config.json and a saved model record it."""
    max_len: int
    token_type_ids: bool
    truncation: str = "head"


def example_text(row: dict) -> tuple[str, str | None]:
    """(title, body) when both are strings, else (text, None)."""
    if isinstance(row.get("title"), str) and isinstance(row.get("body"), str):
        return row["title"], row["body"]
    if isinstance(row.get("text"), str):
        return row["text"], None
    raise ValueError("needs a string 'text', or string 'title' and 'body'")


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def read_label2id(path: Path) -> dict[str, int]:
    label2id = read_json(path)
    if not (isinstance(label2id, dict) and label2id and all(type(i) is int for i in label2id.values())
            and sorted(label2id.values()) == list(range(len(label2id)))):
        raise UserError(f"{path}: expected an object mapping label names to the ids 0..N-1, each once; re-run "
                        "prepare.py")
    return label2id


def read_split(path: Path, label2id: dict[str, int], texts: dict[int, set]) -> Split:
    """Check every example (a label of label2id, by id or name, and a text) keeping its label and offset; the hash
    of each text goes to texts[label] for the overlap check."""
    labels, starts, pairs, end = [], array.array("q"), False, 0
    for number, start, end, row in iter_jsonl(path):
        label = row.get("label")
        label = label2id.get(label, label) if isinstance(label, str) else label  # an id, or a name
        if type(label) is not int or not 0 <= label < len(label2id):
            raise UserError(f"{path}:{number}: label {row.get('label')!r} is not in label2id.json (ids 0.."
                            f"{len(label2id) - 1}); the dataset and label2id.json disagree: re-run prepare.py")
        try:
            first, second = example_text(row)
        except ValueError as e:
            raise UserError(f"{path}:{number}: {e}") from None
        texts.setdefault(label, set()).add(hash((first, second)))
        labels.append(label)
        starts.append(start)
        pairs = pairs or second is not None
    if not labels:
        raise UserError(f"{path} is empty: every split needs examples (re-run prepare.py with more data)")
    starts.append(end)
    return Split(path, torch.tensor(labels), starts, file_digest(path), pairs)


def load_dataset(dataset_dir: Path, log: Callable[[str], None]) -> tuple[dict[str, int], dict[str, Split]]:
    """label2id and the three splits, checked; warns about what would make the scores silently wrong."""
    if not (dataset_dir / "label2id.json").is_file():
        raise UserError(f"no dataset in {dataset_dir} (no label2id.json): run `python prepare.py` first, or pass "
                        "--dataset_dir")
    label2id = read_label2id(dataset_dir / "label2id.json")
    names = {i: name for name, i in label2id.items()}
    texts: dict[str, dict[int, set]] = {s: {} for s in SPLITS}
    splits = {}
    for s in SPLITS:
        if not (dataset_dir / f"{s}.jsonl").is_file():
            raise UserError(f"{dataset_dir / f'{s}.jsonl'} not found: write the dataset with prepare.py")
        splits[s] = read_split(dataset_dir / f"{s}.jsonl", label2id, texts[s])
    seen = Counter(splits["train"].labels.tolist())
    if len(seen) < 2:
        raise UserError(f"{splits['train'].path}: every example has the label {names[next(iter(seen))]!r}: a "
                        "classifier needs examples of at least 2 labels in train")
    if unseen := sorted({names[i] for s in ("val", "test") for i in texts[s]} - {names[i] for i in seen}):
        log(f"warning: labels in val/test that train never shows, so the model cannot learn them: {unseen}")
    if absent := sorted(set(label2id) - {names[i] for s in SPLITS for i in texts[s]}):
        log(f"warning: labels of label2id.json that no split holds: {absent}; macro scores are averaged over the "
            "labels in each split's gold labels and predictions only (test-metrics.json: macro_over)")
    all_texts = {s: set().union(*texts[s].values()) for s in SPLITS}
    shared = [f"{a} and {b} share {n}" for a, b in (("train", "val"), ("train", "test"), ("val", "test"))
              if (n := len(all_texts[a] & all_texts[b]))]
    if shared:
        log(f"warning: splits share texts (identical content): {'; '.join(shared)}; their scores are not measured "
            "on unseen texts (prepare.py --dedupe removes duplicates)")
    return label2id, splits


def split_ids(split: Split) -> list:
    """The `id` of each example (None where it has none), read again from its file."""
    ids = [row.get("id") for *_, row in iter_jsonl(split.path)]
    if len(ids) != len(split.labels):
        raise UserError(f"{split.path} changed while bertcls.py was running; run again")
    return ids


# ------------------------------------------------------------------------------------------ texts -> token ids


def layout(tokenizer: Any, texts: list[str]) -> tuple[list[int], list[int], list[int | None]]:
    """input_ids, token_type_ids and each token's source (0: first text, 1: second, None: special token) of
    tokenizer(*texts), uncut."""
    quiet = dict(truncation=False, verbose=False)
    if getattr(tokenizer, "is_fast", False):  # the tokenizers library marks where each token came from
        enc = tokenizer(*texts, return_token_type_ids=True, return_attention_mask=False, **quiet)
        return enc["input_ids"], enc["token_type_ids"], enc.sequence_ids()
    parts = [tokenizer(text, add_special_tokens=False, **quiet)["input_ids"] for text in texts]
    sources = iter([k for k, part in enumerate(parts) for _ in part])
    return (tokenizer.build_inputs_with_special_tokens(*parts), tokenizer.create_token_type_ids_from_sequences(*parts),
            [None if special else next(sources) for special in tokenizer.get_special_tokens_mask(*parts)])


def encode(tokenizer: Any, first: str, second: str | None, spec: InputSpec) -> tuple[list[int], list[int], Counter]:
    """One example of at most spec.max_len tokens, laid out exactly as tokenizer(first, second) lays it out.

    Only text is cut, never special tokens: the body's end (head) or its middle (head_tail); the title only when
    it alone leaves no room. The tokenizer is not asked to truncate: fast ones refuse a pair whose title alone is
    too long, slow ones warn per example. Texts are first cut to CHARS_PER_TOKEN x max_len characters (start, or
    start and end): that holds more tokens than are kept, and MeCab crashes on texts of about a million.
    Returns input_ids, token_type_ids ([] when the model takes none) and counts of what was cut.
    """
    bound, counts = CHARS_PER_TOKEN * spec.max_len, Counter()
    texts = [first] if second is None else [first, second]
    for k, text in enumerate(texts):
        if len(text) > 2 * bound:
            counts["chars_cut"] += 1
            keep_tail = spec.truncation == "head_tail" and k == len(texts) - 1
            texts[k] = text[:bound] + "\n" + text[-bound:] if keep_tail else text[:bound]
    ids, types, sources = layout(tokenizer, texts)
    title = [i for i, s in enumerate(sources) if second is not None and s == 0]
    body = [i for i, s in enumerate(sources) if s == len(texts) - 1]
    specials = [i for i, s in enumerate(sources) if s is None]
    room = max(0, spec.max_len - len(specials))
    counts["title_cut"] += len(title) > room
    counts["empty"] += not body and not title
    room -= len(title[:room])
    if len(body) > room:
        head = round(room * HEAD_SHARE) if spec.truncation == "head_tail" else room
        body = body[:head] + body[len(body) - (room - head):]
    keep = sorted(specials + title[:spec.max_len - len(specials)] + body)
    return [ids[i] for i in keep], [types[i] for i in keep] if spec.token_type_ids else [], counts


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Digest of what defines the tokenizer's output: its class and the files it saves."""
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__name__}".encode())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


WORKER: dict[str, Any] = {}  # a pool worker's tokenizer and spec, set once by start_worker


def start_worker(tokenizer_pickle: bytes, spec: InputSpec) -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    WORKER.update(tokenizer=pickle.loads(tokenizer_pickle), spec=spec)  # the parent's tokenizer: the same tokens


def encode_chunk(path: Path, start: int, end: int) -> tuple[bytes, bytes, bytes, Counter]:
    """The examples whose lines fill bytes [start, end) of a checked split, as flat machine integers."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = f.read(end - start).decode("utf-8-sig" if start == 0 else "utf-8").split("\n")
    lengths, ids, types, counts = array.array("q"), array.array("i"), array.array("b"), Counter()
    for line in filter(str.strip, lines):
        example_ids, example_types, cut = encode(WORKER["tokenizer"], *example_text(json.loads(line)), WORKER["spec"])
        lengths.append(len(example_ids))
        ids.extend(example_ids)
        types.extend(example_types)
        counts += cut
    return lengths.tobytes(), ids.tobytes(), types.tobytes(), counts


def tokenize_split(split: Split, tokenizer: Any, spec: InputSpec, workers: int, directory: Path,
                   progress: Progress) -> Counter:
    """Write a split's tokens into directory as offsets.bin (int64), input_ids.bin (int32) and, for models with
    segment ids, token_type_ids.bin (int8); chunk results are appended in order as they come, so that the tokens
    of a large dataset are never all in memory. Any number of workers gives the same tokens."""
    n = len(split.labels)
    chunks = [(split.path, split.starts[i], split.starts[min(i + CHUNK, n)]) for i in range(0, n, CHUNK)]
    lengths, counts, pool = array.array("q", [0]), Counter(), None
    with open(directory / "input_ids.bin", "wb") as ids, open(directory / "token_type_ids.bin", "wb") as types:
        if workers == 1 or n < POOL_MIN_EXAMPLES:
            WORKER.update(tokenizer=tokenizer, spec=spec)
            results = (encode_chunk(*chunk) for chunk in chunks)
        else:  # no fork of a process holding torch's threads: the fork server imports torch once, then forks
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), context, start_worker,
                                                          (pickle.dumps(tokenizer), spec))
            results = pool.map(encode_chunk, *zip(*chunks))
        try:
            for chunk_lengths, chunk_ids, chunk_types, chunk_counts in results:
                for length in array.array("q", chunk_lengths):
                    lengths.append(lengths[-1] + length)
                ids.write(chunk_ids)
                types.write(chunk_types)
                counts += chunk_counts
                progress.update(len(chunk_lengths) // 8)
        except concurrent.futures.process.BrokenProcessPool:
            raise UserError(f"a tokenization worker died while tokenizing {split.path} (out of memory?): nothing was "
                            "cached; lower --tokenize_workers") from None
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    (directory / "offsets.bin").write_bytes(lengths.tobytes())
    if not (directory / "token_type_ids.bin").stat().st_size:
        (directory / "token_type_ids.bin").unlink()
    return counts


def load_tokens(directory: Path, n_examples: int) -> dict[str, torch.Tensor]:
    """A split's tokens, memory-mapped: the ranks of a node share the pages, and a run holds only what it reads.
    ValueError when the files are not a whole cache entry for n_examples examples."""
    try:
        offsets = torch.from_file(str(directory / "offsets.bin"), size=n_examples + 1, dtype=torch.int64)
        n_tokens = int(offsets[-1])
        if not (offsets[0] == 0 and bool((offsets[1:] >= offsets[:-1]).all())
                and (directory / "input_ids.bin").stat().st_size == 4 * n_tokens):
            raise ValueError("its files do not agree")
        packed = {"offsets": offsets, "input_ids": torch.from_file(str(directory / "input_ids.bin"), size=n_tokens,
                                                                   dtype=torch.int32)}
        if (directory / "token_type_ids.bin").exists():
            packed["token_type_ids"] = torch.from_file(str(directory / "token_type_ids.bin"), size=n_tokens,
                                                       dtype=torch.int8)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"unreadable ({e})") from None
    return packed


def tokenized(split_name: str, split: Split, tokenizer: Any, spec: InputSpec, cache_dir: str, workers: int,
              log: Callable[[str], None], show: bool = True, fingerprint: str = "") -> dict[str, torch.Tensor]:
    """A split's tokens from the cache, else tokenized into it (whole or not at all: a temporary directory renamed).

    A cache that cannot be written (a file in its place, a full disk) is a warning, and the run tokenizes into a
    temporary directory instead; the mapping outlives the directory.
    """
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, fingerprint, *spec, split.digest]).encode()).hexdigest()[:32]
    entry = Path(cache_dir) / key if cache_dir else None
    if entry is not None and entry.is_dir():
        try:
            return load_tokens(entry, len(split.labels))
        except ValueError as e:
            log(f"warning: ignoring the tokenization cache {entry}: {e}; tokenizing again")
    started = time.perf_counter()
    with Progress(len(split.labels), f"tokenizing {split_name}", enabled=show) as progress:
        packed = None
        if entry is not None:
            tmp = None
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
                counts = tokenize_split(split, tokenizer, spec, workers, tmp, progress)
                shutil.rmtree(entry, ignore_errors=True)  # an unusable entry of the same key
                os.rename(tmp, entry)
                packed = load_tokens(entry, len(split.labels))
            except OSError as e:
                log(f"warning: cannot use the tokenization cache in {cache_dir} ({e.strerror}); tokenizing without it")
                progress.done = 0
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        if packed is None:
            with tempfile.TemporaryDirectory() as tmp:
                counts = tokenize_split(split, tokenizer, spec, workers, Path(tmp), progress)
                packed = load_tokens(Path(tmp), len(split.labels))
    log(f"tokenized {split_name}: {len(split.labels)} examples in {time.perf_counter() - started:.1f}s"
        + "".join(f"; {note}" for note in cut_notes(counts, len(split.labels), spec)))
    return packed


def cut_notes(counts: Counter, n: int, spec: InputSpec) -> list[str]:
    notes = {"chars_cut": f"{counts['chars_cut']} of {n} texts were longer than {2 * CHARS_PER_TOKEN * spec.max_len} "
                          f"characters and only their first (head_tail: first and last) {CHARS_PER_TOKEN * spec.max_len} "
                          "were tokenized, far more than the tokens kept",
             "title_cut": f"{counts['title_cut']} of {n} titles alone are longer than {spec.max_len} tokens: those "
                          "examples keep the start of the title and none of the body",
             "empty": f"warning: {counts['empty']} of {n} examples have no text"}
    return [note for key, note in notes.items() if counts[key]]


def lengths_of(packed: dict[str, torch.Tensor]) -> list[int]:
    return (packed["offsets"][1:] - packed["offsets"][:-1]).tolist()


# -------------------------------------------------------------------------------------------- token ids -> batches


def padded_length(longest: int, buckets: Sequence[int] | None = None) -> int:
    """A multiple of 8 (tensor cores); compiled, the next bucket up (a compiled graph per length)."""
    return next((b for b in buckets if b >= longest), buckets[-1]) if buckets else -(-longest // 8) * 8


def compile_buckets(max_len: int) -> list[int]:
    """64, 128, 256, then steps of 128 up to max_len: few shapes to compile, little padding."""
    buckets = [64]
    while buckets[-1] < max_len:
        buckets.append(buckets[-1] * 2 if buckets[-1] < 256 else buckets[-1] + 128)
    return [b for b in buckets if b < max_len] + [max_len]


def cut_batches(order: Sequence[int], lengths: Sequence[int], size: int, max_tokens: int | None,
                buckets: Sequence[int] | None) -> list[list[int]]:
    """Consecutive batches of `order` (longest first within a group): `size` examples each, or as many as fit in
    max_tokens padded tokens (the first example's padded length decides the width)."""
    if max_tokens is None:
        return [list(order[i:i + size]) for i in range(0, len(order), size)]
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * width <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
            width = padded_length(lengths[i], buckets)
    return batches


class Inputs(NamedTuple):
    """A split ready to batch: its token ids (memory-mapped), labels, pad id and compile buckets."""
    packed: dict[str, torch.Tensor]
    labels: torch.Tensor
    pad_id: int
    buckets: list[int] | None = None

    def batch(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """A padded batch with its labels, on the device, built with a few tensor ops. An unpadded batch has no
        attention mask: SDPA can then take its flash kernels, and transformers need not read a mask back."""
        rows = torch.as_tensor(indices)
        starts = self.packed["offsets"][rows]
        lengths = self.packed["offsets"][rows + 1] - starts
        positions = torch.arange(padded_length(int(lengths.max()), self.buckets))
        mask = positions < lengths[:, None]
        flat = (starts[:, None] + positions).clamp_(max=max(len(self.packed["input_ids"]) - 1, 0))
        batch = {"input_ids": torch.where(mask, self.packed["input_ids"][flat].long(), self.pad_id)}
        if "token_type_ids" in self.packed:
            batch["token_type_ids"] = self.packed["token_type_ids"][flat].long() * mask
        if not mask.all():
            batch["attention_mask"] = mask.long()
        batch["labels"] = self.labels[rows]
        if device.type == "cuda":
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
        return batch
