"""The dataset on disk -> checked labels -> cached, memory-mapped token ids -> padded batches; no texts are kept."""

import array
import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from common import Progress, UserError, iter_jsonl, read_json, sha256

SPLITS = ("train", "val", "test")
TRUNCATIONS = ("head", "head_tail")
HEAD_SHARE = 128 / 510  # head_tail's share of the start: Sun et al. 2019 kept BERT's first 128 and last 382
CHARS_PER_TOKEN = 10  # texts are cut to max_len x this many characters before tokenizing: MeCab crashes on ~1M
CACHE_FORMAT = 3  # bump when the cache's layout or key changes
CHUNK = 1000  # examples per task of a tokenization worker
POOL_MIN_EXAMPLES = 2000  # fewer: starting worker processes costs more than it saves


class Split(NamedTuple):
    """Labels and each example's line offset (then the file's end)."""
    path: Path
    labels: torch.Tensor
    starts: array.array
    digest: str  # part of the tokenization cache key
    pairs: bool  # some example is a (title, body) pair


class InputSpec(NamedTuple):
    """How texts become model inputs: part of the cache key, saved with a model."""
    max_len: int
    token_type_ids: bool
    truncation: str = "head"


def example_text(row: dict) -> tuple[str, str | None]:
    if isinstance(row.get("title"), str) and isinstance(row.get("body"), str):
        return row["title"], row["body"]
    if isinstance(row.get("text"), str):
        return row["text"], None
    raise ValueError("needs a string 'text', or string 'title' and 'body'")


def read_split(path: Path, label2id: dict[str, int], texts: dict[int, set]) -> Split:
    """Labels (ids or names) and texts checked; text hashes go to texts[label] for the overlap check."""
    labels, starts, pairs, end = [], array.array("q"), False, 0
    for number, start, end, row in iter_jsonl(path):
        label = row.get("label")
        label = label2id.get(label, label) if isinstance(label, str) else label
        if type(label) is not int or not 0 <= label < len(label2id):
            raise UserError(f"{path}:{number}: label {row.get('label')!r} is not in label2id.json (ids 0.."
                            f"{len(label2id) - 1}): re-run prepare.py")
        try:
            first, second = example_text(row)
        except ValueError as e:
            raise UserError(f"{path}:{number}: {e}") from None
        texts.setdefault(label, set()).add(hash((first, second)))
        labels.append(label)
        starts.append(start)
        pairs = pairs or second is not None
    if not labels:
        raise UserError(f"{path} is empty: re-run prepare.py with more data")
    starts.append(end)
    return Split(path, torch.tensor(labels), starts, sha256(path), pairs)


def load_dataset(dataset_dir: Path, log: Callable[[str], None]) -> tuple[dict[str, int], dict[str, Split]]:
    """label2id and the splits, checked; warns of what silently skews the scores."""
    if not (path := dataset_dir / "label2id.json").is_file():
        raise UserError(f"no dataset in {dataset_dir} (no label2id.json): run prepare.py or pass --dataset_dir")
    label2id = read_json(path)
    if not (isinstance(label2id, dict) and label2id and all(type(i) is int for i in label2id.values())
            and sorted(label2id.values()) == list(range(len(label2id)))):
        raise UserError(f"{path}: expected names mapped to the ids 0..N-1; re-run prepare.py")
    names = {i: name for name, i in label2id.items()}
    texts = {s: {} for s in SPLITS}
    splits = {s: read_split(dataset_dir / f"{s}.jsonl", label2id, texts[s]) for s in SPLITS}
    train, evaluated = texts["train"].keys(), texts["val"].keys() | texts["test"].keys()
    if len(train) < 2:
        raise UserError(f"{splits['train'].path}: all labels are {names[min(train)]!r}: a classifier needs examples of "
                        "at least 2 labels")
    if unseen := sorted(names[i] for i in evaluated - train):
        log(f"warning: labels in val/test that train never shows: {unseen}")
    if absent := sorted(names[i] for i in names.keys() - train - evaluated):
        log(f"warning: labels of label2id.json that no split holds: {absent}; macro scores average over the labels "
            "present (test-metrics.json: macro_over)")
    all_texts = {s: set().union(*texts[s].values()) for s in SPLITS}
    shared = [f"{a} and {b} share {n}" for a, b in itertools.combinations(SPLITS, 2)
              if (n := len(all_texts[a] & all_texts[b]))]
    if shared:
        log(f"warning: splits share texts (identical content): {'; '.join(shared)}; prepare.py --dedupe removes them")
    return label2id, splits


def split_ids(split: Split) -> list:
    ids = [row.get("id") for *_, row in iter_jsonl(split.path)]
    if len(ids) != len(split.labels):
        raise UserError(f"{split.path} changed while bertcls.py was running; run again")
    return ids


# ----- texts -> token ids


def layout(tokenizer: Any, texts: list[str]) -> tuple[list[int], list[int], list[int | None]]:
    """ids, segment ids and each token's text (0, 1, None: special) of tokenizer(*texts), uncut."""
    quiet = dict(truncation=False, verbose=False)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(*texts, return_token_type_ids=True, return_attention_mask=False, **quiet)
        return enc["input_ids"], enc["token_type_ids"], enc.sequence_ids()
    parts = [tokenizer(text, add_special_tokens=False, **quiet)["input_ids"] for text in texts]
    sources = (k for k, part in enumerate(parts) for _ in part)
    return (tokenizer.build_inputs_with_special_tokens(*parts), tokenizer.create_token_type_ids_from_sequences(*parts),
            [None if special else next(sources) for special in tokenizer.get_special_tokens_mask(*parts)])


def encode(tokenizer: Any, first: str, second: str | None, spec: InputSpec) -> tuple[list[int], list[int], Counter]:
    """ids, segment ids ([] if unused) and cut counts of tokenizer(first, second) in max_len tokens. Only text is cut,
    here (tokenizers refuse or warn): the body's end (head) or middle (head_tail), the title only if too long alone."""
    bound, counts, head_tail = CHARS_PER_TOKEN * spec.max_len, Counter(), spec.truncation == "head_tail"
    texts = [first] if second is None else [first, second]
    for k, text in enumerate(texts):
        if len(text) > 2 * bound:
            counts["chars_cut"] += 1
            texts[k] = text[:bound] + ("\n" + text[-bound:] if head_tail and k == len(texts) - 1 else "")
    ids, types, sources = layout(tokenizer, texts)
    specials = [i for i, s in enumerate(sources) if s is None]
    title = [i for i, s in enumerate(sources) if second is not None and s == 0]
    body = [i for i, s in enumerate(sources) if s == len(texts) - 1]
    room = max(0, spec.max_len - len(specials))
    counts["title_cut"] += len(title) > room
    counts["empty"] += not body and not title
    title = title[:room]
    room -= len(title)
    if len(body) > room:
        head = round(room * HEAD_SHARE) if head_tail else room
        body = body[:head] + body[len(body) - (room - head):]
    keep = sorted(specials + title + body)
    return [ids[i] for i in keep], [types[i] for i in keep] if spec.token_type_ids else [], counts


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__name__}".encode())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


WORKER: dict[str, Any] = {}  # the tokenizer and spec encode_chunk uses


def start_worker(tokenizer: Any, spec: InputSpec) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the parent stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    WORKER.update(tokenizer=tokenizer, spec=spec)


def encode_chunk(path: Path, start: int, end: int) -> tuple[bytes, bytes, bytes, Counter]:
    """The examples in bytes [start, end) of a checked split, as flat machine integers."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = f.read(end - start).decode("utf-8-sig" if start == 0 else "utf-8").split("\n")
    try:
        rows = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError:  # read_split checked every line
        raise UserError(f"{path} changed while it was being read: run again") from None
    lengths, ids, types, counts = array.array("q"), array.array("i"), array.array("b"), Counter()
    for row in rows:
        example_ids, example_types, cut = encode(WORKER["tokenizer"], *example_text(row), WORKER["spec"])
        lengths.append(len(example_ids))
        ids.extend(example_ids)
        types.extend(example_types)
        counts += cut
    return lengths.tobytes(), ids.tobytes(), types.tobytes(), counts


def tokenize_split(split: Split, tokenizer: Any, spec: InputSpec, workers: int, directory: Path,
                   progress: Progress) -> Counter:
    """offsets.bin (int64), input_ids.bin (int32), token_type_ids.bin (int8, if used), chunk by chunk: never all in
    memory."""
    n = len(split.labels)
    chunks = [(split.path, split.starts[i], split.starts[min(i + CHUNK, n)]) for i in range(0, n, CHUNK)]
    lengths, counts, pool = array.array("q"), Counter(), None
    with open(directory / "input_ids.bin", "wb") as ids, open(directory / "token_type_ids.bin", "wb") as types:
        if workers == 1 or n < POOL_MIN_EXAMPLES:
            WORKER.update(tokenizer=tokenizer, spec=spec)
            results = itertools.starmap(encode_chunk, chunks)
        else:  # never fork torch's threads: the fork server imports torch once, then forks
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            pool = concurrent.futures.ProcessPoolExecutor(workers, context, start_worker, (tokenizer, spec))
            results = pool.map(encode_chunk, *zip(*chunks))
        try:
            for chunk_lengths, chunk_ids, chunk_types, chunk_counts in results:
                lengths.frombytes(chunk_lengths)
                ids.write(chunk_ids)
                types.write(chunk_types)
                counts += chunk_counts
                progress.update(len(chunk_lengths) // 8)
        except concurrent.futures.BrokenExecutor:
            raise UserError(f"a tokenization worker died while tokenizing {split.path} (out of memory?): nothing was "
                            "cached; lower --tokenize_workers") from None
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    (directory / "offsets.bin").write_bytes(array.array("q", itertools.accumulate(lengths, initial=0)).tobytes())
    if not spec.token_type_ids:
        (directory / "token_type_ids.bin").unlink()
    return counts


def load_tokens(directory: Path, n_examples: int, token_types: bool) -> dict[str, torch.Tensor]:
    """A split's tokens, memory-mapped (a node's ranks share the pages); ValueError unless a whole cache entry."""
    def mapped(name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_file(str(directory / f"{name}.bin"), size=size, dtype=dtype)

    try:
        offsets = mapped("offsets", n_examples + 1, torch.int64)
        n_tokens = int(offsets[-1])
        if not (offsets[0] == 0 and (offsets.diff() >= 0).all()
                and (directory / "input_ids.bin").stat().st_size == 4 * n_tokens):
            raise ValueError("its files do not agree")
        packed = {"offsets": offsets, "input_ids": mapped("input_ids", n_tokens, torch.int32)}
        if token_types:
            packed["token_type_ids"] = mapped("token_type_ids", n_tokens, torch.int8)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"unreadable ({e})") from None
    return packed


def tokenized(split_name: str, split: Split, tokenizer: Any, spec: InputSpec, cache_dir: str, workers: int,
              log: Callable[[str], None], show: bool = True, fingerprint: str = "") -> dict[str, torch.Tensor]:
    """A split's tokens from the cache, else tokenized into it (renamed into place whole) or, if it is unwritable, into
    a temporary directory."""
    n, bound = len(split.labels), CHARS_PER_TOKEN * spec.max_len
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, fingerprint, *spec, split.digest]).encode()).hexdigest()[:32]
    entry = Path(cache_dir) / key if cache_dir else None
    if entry and entry.is_dir():
        try:
            return load_tokens(entry, n, spec.token_type_ids)
        except ValueError as e:
            log(f"warning: ignoring the tokenization cache {entry}: {e}; tokenizing again")
    started = time.perf_counter()
    with Progress(n, f"tokenizing {split_name}", enabled=show) as progress:
        if entry:
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{key}.",
                                                 ignore_cleanup_errors=True) as tmp:
                    counts = tokenize_split(split, tokenizer, spec, workers, Path(tmp), progress)
                    shutil.rmtree(entry, ignore_errors=True)  # an unusable entry of the same key
                    os.rename(tmp, entry)
            except OSError as e:
                log(f"warning: cannot use the tokenization cache in {cache_dir} ({e.strerror}); tokenizing without it")
                progress.done, entry = 0, None
        if entry:
            packed = load_tokens(entry, n, spec.token_type_ids)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                counts = tokenize_split(split, tokenizer, spec, workers, Path(tmp), progress)
                packed = load_tokens(Path(tmp), n, spec.token_type_ids)
    notes = {"chars_cut": f"{counts['chars_cut']} of {n} texts were longer than {2 * bound} characters and only their "
                          f"first (head_tail: first and last) {bound} were tokenized, far more than the tokens kept",
             "title_cut": f"{counts['title_cut']} of {n} titles alone are longer than {spec.max_len} tokens: those "
                          "examples keep the start of the title and none of the body",
             "empty": f"warning: {counts['empty']} of {n} examples have no text"}
    log(f"tokenized {split_name}: {n} examples in {time.perf_counter() - started:.1f}s"
        + "".join(f"; {note}" for kind, note in notes.items() if counts[kind]))
    return packed


def check_sizes(tokenizer: Any, spec: InputSpec, pairs: bool, max_batch_tokens: int | None,
                buckets: Sequence[int] | None = None) -> None:
    if spec.max_len <= (special := tokenizer.num_special_tokens_to_add(pair=pairs)):
        raise UserError(f"a length of {spec.max_len} tokens leaves no room for text after the {special} special "
                        "tokens: raise --max_seq_len")
    if max_batch_tokens and max_batch_tokens < padded_length(spec.max_len, buckets):
        raise UserError(f"--max_batch_tokens {max_batch_tokens} cannot hold one example of {spec.max_len} tokens "
                        "(padded): raise it or lower --max_seq_len")


def lengths_of(packed: dict[str, torch.Tensor]) -> list[int]:
    return packed["offsets"].diff().tolist()


# ----- token ids -> batches


def padded_length(longest: int, buckets: Sequence[int] | None = None) -> int:
    """A multiple of 8 (tensor cores); compiled, the next bucket up."""
    return next((b for b in buckets if b >= longest), buckets[-1]) if buckets else -(-longest // 8) * 8


def compile_buckets(max_len: int) -> list[int]:
    """Few shapes to compile, little padding."""
    return [b for b in (64, 128, *range(256, max_len, 128)) if b < max_len] + [max_len]


def cut_batches(order: Sequence[int], lengths: Sequence[int], size: int, max_tokens: int | None,
                buckets: Sequence[int] | None) -> list[list[int]]:
    """Consecutive batches of `order`: `size` examples, or what fits in max_tokens padded to the first (longest)."""
    if max_tokens is None:
        return [list(order[i:i + size]) for i in range(0, len(order), size)]
    batches, width = [], 0
    for i in order:
        if batches and (len(batches[-1]) + 1) * width <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
            width = padded_length(lengths[i], buckets)
    return batches


class Inputs(NamedTuple):
    packed: dict[str, torch.Tensor]
    labels: torch.Tensor
    pad_id: int
    buckets: list[int] | None = None

    def batch(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """Padded, on the device; unpadded, no attention mask, so SDPA may take its flash kernels."""
        rows = torch.as_tensor(indices)
        starts = self.packed["offsets"][rows]
        lengths = self.packed["offsets"][rows + 1] - starts
        positions = torch.arange(padded_length(int(lengths.max()), self.buckets))
        mask = positions < lengths[:, None]
        flat = (starts[:, None] + positions).clamp_(max=len(self.packed["input_ids"]) - 1)
        batch = {"input_ids": torch.where(mask, self.packed["input_ids"][flat].long(), self.pad_id)}
        if "token_type_ids" in self.packed:
            batch["token_type_ids"] = self.packed["token_type_ids"][flat].long() * mask
        if not mask.all():
            batch["attention_mask"] = mask.long()
        batch["labels"] = self.labels[rows]
        if device.type == "cuda":
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
        return batch
