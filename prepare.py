"""Prepare the livedoor news corpus (or your own data) as JSONL splits for bertcls.py.

    python prepare.py                                     # download into data/, write datasets/livedoor/
    python prepare.py --input data/ldcc-20140209.tar.gz   # a tarball you already have (or its extracted dir)
    python prepare.py --input ../shared/data/livedoor/ldcc-20140209.tar.gz --output_dir /tmp/livedoor
    python prepare.py --input reviews.csv --text_fields text --label_field label
    python prepare.py --input news.jsonl --text_fields title,body --label_field category

Writes all.jsonl, train.jsonl, val.jsonl, test.jsonl and label2id.json into --output_dir.
Articles are sorted by path, shuffled with random.Random(seed) and cut into 10 near-equal parts:
train = parts 1-8, val = part 9, test = part 10 (5895 / 736 / 736 for livedoor).

    python prepare.py --folds 10                          # datasets/livedoor/fold-0/ ... fold-9/ as well

--folds K cuts the same shuffle into K parts and writes K datasets <output_dir>/fold-<i>/ (train/val/test.jsonl,
label2id.json and fold.json): fold i tests on part K-i, validates on the part before it (part K before
part 1) and trains on the other K-2 parts in order. Every example is in the test set of exactly one fold and
the val set of exactly one; fold-0 of --folds 10 is byte for byte the default split. The default split and
the folds live side by side: writing one leaves the other in place.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import http.client
import json
import os
import random
import re
import secrets
import shutil
import sys
import tarfile
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple, Sequence

from common import (Line, Progress, UserError, atomic_write_text, check_output_dir, check_writable, decode_utf8,
                    iter_jsonl, iter_lines, jsonl_line, run_cli)

CORPUS_URL = "https://www.rondhuit.com/download/ldcc-20140209.tar.gz"
N_CATEGORIES = 9
N_ARTICLES = 7367
# sha256 over the sorted lines "<category>/<file>.txt\t<sha256 of the file>\n" of the 7367 article
# files (LICENSE/README/CHANGES left out), computed once from ../shared/data/livedoor/MANIFEST.sha256.
# It depends on the articles' bytes only, so a re-packed tarball passes and an altered one does not.
CORPUS_DIGEST = "de91044071ce73c1e0904388e678ec5b001968e50159046baaa80c6e2bf2d31d"
NON_ARTICLES = {"LICENSE.txt", "README.txt", "CHANGES.txt"}
# The largest livedoor article is 32 KB; anything this big is a mistake or a decompression bomb.
MAX_ARTICLE_BYTES = 10 * 2**20
# NFKC already turns U+3000 into a space; it is listed for text that skips normalisation.
LINE_END_SPACES = " \t\r\n\f\v\u3000"
OWN_DATA_SUFFIXES = {".jsonl", ".csv", ".tsv"}
SPLIT_NAMES = ("train", "val", "test")
OUTPUT_FILES = {"all.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"}
FOLD_DIR = re.compile(r"fold-\d+")  # the datasets --folds writes next to the default split's files
DOWNLOAD_TIMEOUT_S = 60.0
DOWNLOAD_ATTEMPTS = 4
RETRY_BACKOFF_S = 2.0
PROGRESS_EVERY_S = 10.0  # when stderr is not a terminal (CI logs), one line this often


class DownloadInterrupted(Exception):
    """A transient download failure worth retrying (the .part file is kept for resuming)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None,
                   help="livedoor tarball, its extracted directory (holding text/ or the category folders), "
                        "or your own .jsonl/.csv/.tsv (default: download --url into --download_dir)")
    p.add_argument("--output_dir", default=None,
                   help="dataset directory to write (default: datasets/livedoor, or datasets/<input stem> "
                        "for your own data)")
    p.add_argument("--seed", type=int, default=42, help="seed of the shuffle before the split (default: 42)")
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="write K cross-validation datasets <output_dir>/fold-0 ... fold-<K-1>, (K-2):1:1 each, "
                        "instead of the one 8:1:1 split; at least 3 (default: off)")
    p.add_argument("--url", default=CORPUS_URL, help=f"where to download the corpus (default: {CORPUS_URL})")
    p.add_argument("--download_dir", default="data", help="where the downloaded tarball is kept (default: data)")
    p.add_argument("--no_verify", action="store_true",
                   help="accept a livedoor corpus other than ldcc-20140209 (default: off, counts and content "
                        "digest are checked)")
    p.add_argument("--dedupe", action="store_true",
                   help="keep one article of each group with an identical body before splitting (default: off, "
                        "to stay comparable with published results)")
    p.add_argument("--text_fields", default=None,
                   help="own data only: one field (written as text) or two comma-separated fields (written as "
                        "title and body) (default: text)")
    p.add_argument("--label_field", default=None, help="own data only: field holding the label (default: label)")
    p.add_argument("--debug", action="store_true",
                   help="show a traceback on errors (default: off; env BERTCLS_DEBUG=1 does the same)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- livedoor articles

def normalize_text(line: str) -> str:
    """NFKC, then strip ASCII and full-width spaces at both ends of the line."""
    return unicodedata.normalize("NFKC", line).strip(LINE_END_SPACES)


def parse_article(raw: bytes, where: str) -> dict:
    """Line 1 URL, line 2 date, line 3 title, lines 4+ body (empty lines dropped, joined with \\n)."""
    text = decode_utf8(raw, where, advice="convert it to UTF-8 or remove it")
    if not text.strip():
        raise UserError(f"{where}: the article is empty; remove it or re-download the corpus")
    # str.splitlines() as the tutorial did: one article (peachy-4490543) has a U+2028 that breaks a line
    lines = text.splitlines()
    if len(lines) < 3:
        raise UserError(f"{where}: {len(lines)} line(s); an article needs URL, date and title lines "
                        f"before its body; fix or remove it")
    url, date, title = (normalize_text(line) for line in lines[:3])
    body = "\n".join(line for line in map(normalize_text, lines[3:]) if line)
    return {"url": url, "date": date, "title": title, "body": body}


def article_path(name: str) -> str | None:
    """'<category>/<file>.txt' for an article member or file name, None for anything else."""
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if parts and parts[0] == "text":
        parts = parts[1:]
    if len(parts) != 2 or not parts[1].endswith(".txt") or parts[1] in NON_ARTICLES:
        return None
    if parts[0].startswith(".") or parts[1].startswith("."):
        return None
    return "/".join(parts)


def check_name_is_utf8(name: str, where: str) -> None:
    """Names are read with surrogateescape, so bytes that are not UTF-8 would only fail when the dataset is written."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UserError(f"{where}: the name '{shown}' is not UTF-8; rename it in UTF-8 (or remove it)") from None


def check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that could land outside a target directory, or that are not plain files/dirs."""
    name = member.name
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        why = "has an absolute path"
    elif ".." in parts:
        why = "climbs out with '..'"
    elif member.issym() or member.islnk():
        why = f"is a {'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}"
    elif member.ischr() or member.isblk() or member.isfifo():
        why = "is a device or fifo"
    elif not (member.isfile() or member.isdir()):
        why = "has an unsupported type"
    elif member.isfile() and member.size > MAX_ARTICLE_BYTES:
        why = f"is {member.size} bytes, over the {MAX_ARTICLE_BYTES // 2**20} MiB limit (a decompression bomb?)"
    else:
        return
    raise UserError(f"refusing unsafe archive member {name!r} in {archive}: it {why}; "
                    f"use the original ldcc-20140209.tar.gz")


def read_limited(stream: BinaryIO, where: str) -> bytes:
    """Read at most MAX_ARTICLE_BYTES, whatever the header or stat promised."""
    data = stream.read(MAX_ARTICLE_BYTES + 1)
    if len(data) > MAX_ARTICLE_BYTES:
        raise UserError(f"refusing {where}: over the {MAX_ARTICLE_BYTES // 2**20} MiB limit for an article "
                        f"(a decompression bomb?)")
    return data


def read_tarball(archive: Path) -> dict[str, bytes]:
    """Article bytes by '<category>/<file>.txt', streamed from the archive without extracting anything."""
    articles: dict[str, bytes] = {}
    try:
        tar = tarfile.open(archive, "r:*")
    except PermissionError as e:
        raise UserError(f"cannot read {archive}: {e.strerror}") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        raise UserError(f"{archive} is not a tar or tar.gz archive; pass the livedoor tarball "
                        f"(ldcc-20140209.tar.gz), its extracted directory, or a .jsonl/.csv file") from None
    try:
        with tar:
            for member in tar:
                check_member(member, archive)
                path = article_path(member.name) if member.isfile() else None
                if path is None:
                    continue
                check_name_is_utf8(member.name, str(archive))
                stream = tar.extractfile(member)
                articles[path] = read_limited(stream, f"{archive}:{member.name}")
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        raise UserError(f"{archive} is truncated or corrupt; delete it and download it again") from None
    if not articles:
        raise UserError(f"no articles in {archive}: expected members text/<category>/<name>.txt")
    return articles


def read_directory(root: Path) -> dict[str, bytes]:
    """Article bytes by '<category>/<file>.txt' from an extracted corpus (root holding text/ or categories)."""
    if (root / "text").is_dir():
        root = root / "text"
    articles: dict[str, bytes] = {}
    try:
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for file in sorted(folder.glob("*.txt")):
                path = article_path(f"{folder.name}/{file.name}")
                if path is None or not file.is_file():
                    continue
                check_name_is_utf8(path, str(root))
                if file.stat().st_size > MAX_ARTICLE_BYTES:
                    raise UserError(f"refusing {file}: over the {MAX_ARTICLE_BYTES // 2**20} MiB limit for an "
                                    f"article; remove it")
                with open(file, "rb") as f:
                    articles[path] = read_limited(f, str(file))
    except OSError as e:
        raise UserError(f"cannot read {e.filename or root}: {e.strerror}") from None
    if not articles:
        raise UserError(f"no category folders under {root}: expected text/<category>/<name>.txt "
                        f"or <category>/<name>.txt")
    return articles


def corpus_digest(articles: dict[str, bytes]) -> str:
    """The CORPUS_DIGEST recipe, applied to the bytes actually read."""
    lines = (f"{path}\t{hashlib.sha256(data).hexdigest()}\n" for path, data in sorted(articles.items()))
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def verify_corpus(articles: dict[str, bytes], source: Path) -> None:
    n_categories = len({path.split("/")[0] for path in articles})
    original = "extract the original tarball again" if source.is_dir() else f"re-download it (delete {source})"
    hint = f"{original} or pass --no_verify to use another version"
    if (n_categories, len(articles)) != (N_CATEGORIES, N_ARTICLES):
        raise UserError(f"{source} is not ldcc-20140209: {len(articles)} articles in {n_categories} categories, "
                        f"expected {N_ARTICLES} in {N_CATEGORIES}; {hint}")
    if corpus_digest(articles) != CORPUS_DIGEST:
        raise UserError(f"{source} is not ldcc-20140209: the article contents differ from the original; {hint}")


def article_location(source: Path, path: str) -> str:
    """Where an article came from, for messages: its file, or the archive and member."""
    if source.is_dir():
        return str((source / "text" if (source / "text").is_dir() else source) / path)
    return f"{source}:{path}"


def livedoor_rows(articles: dict[str, bytes], source: Path) -> tuple[list[dict], dict[str, int]]:
    """One row per article in path order, and label2id with the categories sorted by name."""
    label2id = {c: i for i, c in enumerate(sorted({path.split("/")[0] for path in articles}))}
    rows, seen = [], {}
    for path in sorted(articles):
        category, filename = path.split("/")
        stem = filename[: -len(".txt")]
        prefix = f"{category}-"
        article_id = stem[len(prefix):] if stem.startswith(prefix) else stem
        row_id = f"{prefix}{article_id}"
        if row_id in seen:
            raise UserError(f"{source}: {seen[row_id]} and {path} both give the id {row_id!r}; rename one")
        seen[row_id] = path
        article = parse_article(articles[path], article_location(source, path))
        rows.append({"id": row_id, "label": label2id[category], "category": category,
                     "article_id": article_id, **article})
    return rows, label2id


# ---------------------------------------------------------------- your own data

def parse_text_fields(spec: str, label_field: str) -> list[str]:
    fields = [f.strip() for f in spec.split(",")]
    if not 1 <= len(fields) <= 2 or not all(fields) or len(set(fields)) != len(fields):
        raise UserError(f"--text_fields {spec!r}: give one field (e.g. text) or two different ones "
                        f"(e.g. title,body)")
    if label_field in fields:
        raise UserError(f"--label_field {label_field!r} is also a text field; the label must not be input text")
    return fields


def csv_delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def cut_at_lone_cr(text: str) -> list[str]:
    """Text also cut after each lone "\\r" (an old Mac line end), as csv reads a file opened with newline=""."""
    return [piece for piece in re.split(r"(?<=\r)(?!\n)", text) if piece] if "\r" in text else [text]


def csv_pieces(line: Line) -> list[tuple[int, int, str]]:
    """A line cut as csv reads it, with the bytes [start, end) of each piece."""
    pieces = cut_at_lone_cr(line.text)
    if len(pieces) == 1:
        return [(line.start, line.end, line.text)]
    bounds = [line.end]
    for piece in reversed(pieces[1:]):
        bounds.insert(0, bounds[0] - len(piece.encode("utf-8")))
    bounds.insert(0, line.start)  # the first piece also holds the BOM, if any
    return [(bounds[i], bounds[i + 1], piece) for i, piece in enumerate(pieces)]


def iter_csv(path: Path) -> Iterator[tuple[int, int, int, dict]]:
    """(line number, start, end, row) of each non-empty record, read as a stream; [start, end) are its bytes."""
    # the default field limit (128 KiB) is smaller than some documents
    csv.field_size_limit(2**31 - 1)
    span: list[int] = []  # bytes of the pieces read since the last record: [start, end]

    def pieces() -> Iterator[str]:
        for line in iter_lines(path):
            for start, end, text in csv_pieces(line):
                span[:] = [span[0] if span else start, end]
                yield text

    reader = csv.DictReader(pieces(), delimiter=csv_delimiter(path))
    try:
        reader.fieldnames  # reads the header, which belongs to no record
        span.clear()
        for row in reader:
            start, end = span
            span.clear()
            if any(v not in (None, "") for v in row.values()):
                yield reader.line_num, start, end, row
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: bad CSV ({e}); fix that line") from None


def csv_header(path: Path) -> list[str]:
    return csv.DictReader((text for line in iter_lines(path) for *_, text in csv_pieces(line)),
                          delimiter=csv_delimiter(path)).fieldnames or []


def read_record(f: BinaryIO, start: int, end: int, fieldnames: list[str] | None, delimiter: str) -> dict:
    """The record in bytes [start, end) of own data that own_rows has checked; fieldnames: the CSV header."""
    f.seek(start)
    text = f.read(end - start).decode("utf-8-sig" if start == 0 else "utf-8")
    if fieldnames is None:
        return json.loads(text)
    lines = [piece for line in re.split(r"(?<=\n)", text) for piece in cut_at_lone_cr(line) if piece]
    return next(csv.DictReader(lines, fieldnames=fieldnames, delimiter=delimiter))


def field_text(value: object, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    raise UserError(f"{where}: field {field!r} holds {type(value).__name__}, expected text; fix that line")


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def label_order(names: set[str]) -> list[str]:
    """By name; integer labels numerically, so that labels 0..K-1 keep their ids."""
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


class OwnData(NamedTuple):
    """How to read examples of your own data back from the file: rows keep their bytes, not their texts."""
    path: Path
    text_fields: list[str]
    fieldnames: list[str] | None  # the CSV header; None for JSONL

    def lines(self, rows: Sequence[dict]) -> Iterator[str]:
        """The output line of each row, its texts read again from the input."""
        names = ["text"] if len(self.text_fields) == 1 else ["title", "body"]
        with open(self.path, "rb") as f:
            for row in rows:
                record = read_record(f, *row["at"], self.fieldnames, csv_delimiter(self.path))
                texts = [field_text(record[field], "", field) for field in self.text_fields]
                yield jsonl_line({"id": row["id"], "label": row["label"], "category": row["category"],
                                  **dict(zip(names, texts))})


def own_rows(path: Path, text_fields: list[str], label_field: str) -> tuple[list[dict], dict[str, int], OwnData]:
    """Rows sorted by id from a .jsonl/.csv/.tsv, label2id from the label values, and how to read the texts back.

    The file is read as a stream, and a row keeps its id, label, the bytes of its record in the file and a
    digest of its body (for the duplicate report), not its texts: a few hundred bytes per example, whatever
    the length of the texts. The texts are read again when the dataset is written.
    """
    is_jsonl = path.suffix.lower() == ".jsonl"
    records = ((line.number, line.start, line.end, row) for line, row in iter_jsonl(path)) if is_jsonl \
        else iter_csv(path)
    rows, lines_by_id, categories = [], {}, {}
    with Progress(path.stat().st_size / 2**20, f"reading {path.name}", unit="MiB") as progress:
        for index, (lineno, start, end, record) in enumerate(records):
            progress.update(end / 2**20 - progress.done)
            where = f"{path}:{lineno}"
            for field in [*text_fields, label_field]:
                if record.get(field) is None:
                    have = ", ".join(k for k in record if k is not None) or "none"
                    raise UserError(f"{where}: no field {field!r} (fields there: {have}); "
                                    f"name yours with --text_fields and --label_field")
            category = field_text(record[label_field], where, label_field)
            if not category:
                raise UserError(f"{where}: empty label in field {label_field!r}; give every example a label")
            row_id = str(record["id"]) if record.get("id") not in (None, "") else str(index)
            if row_id in lines_by_id:
                raise UserError(f"{where}: id {row_id!r} already used on line {lines_by_id[row_id]}; "
                                "ids must be unique")
            lines_by_id[row_id] = lineno
            texts = [field_text(record[f], where, f) for f in text_fields]
            rows.append({"id": row_id, "category": categories.setdefault(category, category), "at": (start, end),
                         "body_digest": text_digest(texts[-1])})
    if not rows:
        raise UserError(f"{path} holds no records; expected one object (or CSV row) per example")
    label2id = {name: i for i, name in enumerate(label_order(set(categories)))}
    rows = [{"id": r["id"], "label": label2id[r["category"]], **r} for r in sorted(rows, key=lambda r: r["id"])]
    return rows, label2id, OwnData(path, text_fields, None if is_jsonl else csv_header(path))


# ---------------------------------------------------------------- split, duplicates, report

def parts(items: list, seed: int, k: int) -> list[list]:
    """Shuffle items (already sorted by key) with random.Random(seed) and cut them into k near-equal parts,
    the first len(items) % k one larger."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    base, extra = divmod(len(shuffled), k)
    cut, start = [], 0
    for i in range(k):
        cut.append(shuffled[start: start + base + (i < extra)])
        start += base + (i < extra)
    return cut


def split(items: list, seed: int) -> tuple[list, list, list]:
    """Shuffle items (already sorted by key) with random.Random(seed), cut into 10 near-equal parts
    (the first n % 10 one larger): train = parts 1-8, val = part 9, test = part 10."""
    cut = parts(items, seed, 10)
    return [x for part in cut[:8] for x in part], cut[8], cut[9]


def fold_splits(items: list, seed: int, k: int) -> list[tuple[list, list, list]]:
    """(train, val, test) of each of k folds over the parts of the same shuffle as split(): fold i tests on
    part k-1-i and validates on part k-2-i (mod k), and trains on the others in part order, so that every
    item is tested once and validated once, and fold 0 of 10 is split()."""
    cut = parts(items, seed, k)
    folds = []
    for i in range(k):
        test, val = (k - 1 - i) % k, (k - 2 - i) % k
        folds.append(([x for j, part in enumerate(cut) if j not in (test, val) for x in part], cut[val], cut[test]))
    return folds


def check_folds(k: int | None, n_examples: int | None = None) -> None:
    if k is not None and k < 3:
        raise UserError(f"--folds {k}: a fold needs a train, a val and a test part; use --folds 3 or more "
                        f"(--folds 10 gives 8:1:1)")
    if k is not None and n_examples is not None and k > n_examples:
        raise UserError(f"--folds {k} is more than the {n_examples} examples: use --folds {n_examples} or fewer")


def duplicate_groups(rows: list[dict]) -> list[list[str]]:
    """Ids of rows sharing an identical body (or text), groups of two or more, in row order."""
    by_text: dict[str | bytes, list[str]] = defaultdict(list)
    for row in rows:
        by_text[row["body_digest"] if "body_digest" in row else row.get("body", row.get("text", ""))].append(row["id"])
    return [ids for ids in by_text.values() if len(ids) > 1]


def drop_duplicates(rows: list[dict], groups: list[list[str]]) -> list[dict]:
    dropped = {i for ids in groups for i in ids[1:]}
    return [r for r in rows if r["id"] not in dropped]


def summary(splits: dict[str, list[dict]], label2id: dict[str, int]) -> str:
    counts = {name: Counter(r["category"] for r in rows) for name, rows in splits.items()}
    width = max(len("category"), *map(len, label2id))
    lines = [f"{'category':<{width}}  label  " + "  ".join(f"{n:>6}" for n in splits)]
    for category, label in label2id.items():
        lines.append(f"{category:<{width}}  {label:>5}  " + "  ".join(f"{counts[n][category]:>6}" for n in splits))
    lines.append(f"{'total':<{width}}  {'':>5}  " + "  ".join(f"{len(rows):>6}" for rows in splits.values()))
    return "\n".join(lines)


def duplicate_report(groups: list[list[str]], split_of: dict[str, str], dedupe: bool) -> str:
    if not groups:
        return "duplicate bodies: none"
    straddling = [ids for ids in groups if len({split_of.get(i) for i in ids}) > 1]
    head = (f"duplicate bodies: {len(groups)} groups ({sum(map(len, groups))} rows) with an identical body "
            f"under different ids; ")
    if dedupe:
        return head + "--dedupe kept the first of each"
    lines = [head + f"{len(straddling)} straddle splits (--dedupe keeps one of each)"]
    for ids in groups[:10]:
        lines.append("  " + ", ".join(f"{i} ({split_of[i]})" for i in ids))
    if len(groups) > 10:
        lines.append(f"  ... and {len(groups) - 10} more groups")
    return "\n".join(lines)


def rare_label_warning(splits: dict[str, list[dict]], label2id: dict[str, int]) -> str | None:
    present = {name: {r["category"] for r in rows} for name, rows in splits.items() if name != "all"}
    missing = {c: [n for n in SPLIT_NAMES if c not in present[n]] for c in label2id}
    missing = {c: ns for c, ns in missing.items() if ns}
    if not missing:
        return None
    total = Counter(r["category"] for r in splits["all"])
    listed = "; ".join(f"{c!r} ({total[c]} examples, none in {'/'.join(ns)})" for c, ns in list(missing.items())[:10])
    more = f"; and {len(missing) - 10} more" if len(missing) > 10 else ""
    return (f"prepare.py: warning: {len(missing)} label(s) too rare to appear in every split: {listed}{more}; "
            f"scores for them will be missing or noisy")


# ---------------------------------------------------------------- output

def check_dataset_dir(output_dir: Path) -> None:
    """Fail before any work if the output cannot be written without clobbering something else."""
    check_output_dir(output_dir)
    check_writable(output_dir.parent)  # where the dataset is staged, then swapped into place
    if output_dir.is_dir():
        foreign = sorted(p.name for p in output_dir.iterdir()
                         if p.name not in OUTPUT_FILES and not is_fold_dir(p))
        if foreign:
            raise UserError(f"{output_dir} holds files prepare.py did not write ({', '.join(foreign[:3])}); "
                            f"pass a new or empty --output_dir")


def write_rows(path: Path, rows: Sequence[dict], lines: Iterable[str], progress: Progress) -> dict[str, range]:
    """Write the lines of rows; returns where each row's line is in the file, by row id."""
    where, offset = {}, 0
    with open(path, "wb") as f:
        for row, line in zip(rows, lines, strict=True):
            data = line.encode("utf-8")
            where[row["id"]] = range(offset, offset + len(data))
            f.write(data)
            offset += len(data)
            progress.update(1)
        f.flush()
        os.fsync(f.fileno())
    return where


def copy_rows(source: BinaryIO, where: dict[str, range], path: Path, rows: Sequence[dict], progress: Progress) -> None:
    """Write the lines of rows by copying them from the file that `where` describes."""
    with open(path, "wb") as f:
        for row in rows:
            line = where[row["id"]]
            source.seek(line.start)
            f.write(source.read(len(line)))
            progress.update(1)
        f.flush()
        os.fsync(f.fileno())


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link where the file system has them (no bytes copied), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextlib.contextmanager
def staged_directory(output_dir: Path, keep: Callable[[Path], bool] = lambda entry: False) -> Iterator[Path]:
    """A sibling staging directory to fill, swapped into place as output_dir once the block completes.

    The entries of the old output_dir for which keep() is true are carried over (hard-linked), so that the
    default split and the folds, each written in one swap, leave each other in place.
    """
    output_dir = Path(os.path.abspath(output_dir))
    parent = output_dir.parent
    staging = parent / f".{output_dir.name}.{secrets.token_hex(4)}.tmp"
    old = parent / f".{output_dir.name}.{secrets.token_hex(4)}.old"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        yield staging
        if output_dir.is_dir():
            for entry in filter(keep, output_dir.iterdir()):
                if entry.is_dir():
                    shutil.copytree(entry, staging / entry.name, copy_function=link_or_copy)
                else:
                    link_or_copy(entry, staging / entry.name)
        if output_dir.exists():
            os.replace(output_dir, old)
        try:
            os.replace(staging, output_dir)
        except OSError:
            if old.exists():
                os.replace(old, output_dir)
            raise
    except OSError as e:
        raise UserError(f"cannot write {output_dir}: {e.strerror or e}; check the path and free space") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def is_fold_dir(entry: Path) -> bool:
    return entry.is_dir() and FOLD_DIR.fullmatch(entry.name) is not None


def write_dataset(output_dir: Path, splits: dict[str, list[dict]], label2id: dict[str, int],
                  lines: Callable[[Sequence[dict]], Iterable[str]] | None = None, fold: dict | None = None) -> None:
    """Write the splits, label2id.json (and a fold's fold.json) into a staging directory, then swap it into place.

    `lines` gives the output line of each row (default: the row as JSON; your own data reads its texts back from
    the input). With an "all" split each line is made once, for all.jsonl, and the split files copy theirs from it.
    """
    lines = lines or (lambda rows: map(jsonl_line, rows))
    with staged_directory(output_dir, keep=is_fold_dir) as staging, \
            Progress(sum(map(len, splits.values())), "writing") as progress:
        if "all" in splits:
            where = write_rows(staging / "all.jsonl", splits["all"], lines(splits["all"]), progress)
            with open(staging / "all.jsonl", "rb") as all_file:
                for name in SPLIT_NAMES:
                    copy_rows(all_file, where, staging / f"{name}.jsonl", splits[name], progress)
        else:
            for name in SPLIT_NAMES:
                write_rows(staging / f"{name}.jsonl", splits[name], lines(splits[name]), progress)
        atomic_write_text(staging / "label2id.json", json.dumps(label2id, ensure_ascii=False, indent=2) + "\n")
        if fold is not None:
            atomic_write_text(staging / "fold.json", json.dumps(fold, indent=2) + "\n")


def folds_id(lines: Iterable[str], k: int, seed: int) -> str:
    """What identifies a set of folds (the examples' lines, K and the seed), so that their runs make one experiment."""
    h = hashlib.sha256(f"{k} folds, seed {seed}\n".encode())
    for line in lines:
        h.update(line.encode("utf-8"))
    return h.hexdigest()[:16]


def write_folds(output_dir: Path, folds: list[dict[str, list[dict]]], label2id: dict[str, int], fold_set: str,
                seed: int, lines: Callable[[Sequence[dict]], Iterable[str]] | None = None) -> None:
    """Every fold-<i>/ dataset, swapped into place together (the previous folds go, the default split stays)."""
    with staged_directory(output_dir, keep=lambda entry: entry.name in OUTPUT_FILES) as staging:
        for i, splits in enumerate(folds):
            write_dataset(staging / f"fold-{i}", splits, label2id, lines,
                          {"fold": i, "folds": len(folds), "seed": seed, "set": fold_set})


# ---------------------------------------------------------------- download

def format_progress(done: int, total: int | None, seconds: float) -> str:
    mib = 2**20
    rate = done / mib / seconds if seconds > 0 else 0.0
    of = f" of {total / mib:.1f} MiB ({100 * done / total:.0f}%)" if total else " MiB"
    return f"downloaded {done / mib:.1f}{of}, {rate:.1f} MiB/s"


def fetch(url: str, part: Path) -> None:
    """Fetch url into part, resuming from its current size; DownloadInterrupted when worth retrying."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "bertcls-prepare"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the server cannot resume from here: start again
            part.unlink(missing_ok=True)
            raise DownloadInterrupted("the server refused to resume") from None
        if e.code >= 500 or e.code == 429:
            raise DownloadInterrupted(f"HTTP {e.code} {e.reason}") from None
        raise UserError(f"cannot download {url}: HTTP {e.code} {e.reason}; check --url") from None
    except ValueError as e:
        raise UserError(f"cannot download {url!r}: {e}; check --url") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DownloadInterrupted(str(getattr(e, "reason", e))) from None
    with response:
        resumed = have and response.status == 206 and \
            response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        start = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        done, started, shown = start, time.monotonic(), time.monotonic()
        tty = sys.stderr.isatty()
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if (tty and now - shown > 0.2) or now - shown > PROGRESS_EVERY_S:
                        line = format_progress(done, total, now - started)
                        print(f"\r{line}   " if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
                        shown = now
        except (OSError, http.client.HTTPException) as e:
            raise DownloadInterrupted(f"stopped at {done} bytes: {e}") from None
    if total is not None and done < total:
        raise DownloadInterrupted(f"connection closed after {done} of {total} bytes")
    line = format_progress(done, total, time.monotonic() - started)
    print(f"\r{line}   " if tty else line, file=sys.stderr, flush=True)


def download_target(url: str, download_dir: Path) -> Path:
    return download_dir / (PurePosixPath(urllib.parse.urlparse(url).path).name or "corpus.tar.gz")


def download(url: str, download_dir: Path) -> Path:
    """The tarball under download_dir: reused if there, else fetched via a .part file renamed when complete."""
    target = download_target(url, download_dir)
    if target.is_file():
        print(f"using {target} (already downloaded)")
        return target
    part = target.with_name(target.name + ".part")
    try:
        download_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --download_dir {download_dir}: {e.strerror}") from None
    print(f"downloading {url} to {target}")
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            fetch(url, part)
            break
        except DownloadInterrupted as e:
            if attempt == DOWNLOAD_ATTEMPTS:
                raise UserError(f"cannot download {url} ({e}, {attempt} attempts); run again to resume "
                                f"{part}, or fetch the file yourself and pass --input") from None
            wait = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            print(f"prepare.py: warning: download interrupted ({e}); retry {attempt}/{DOWNLOAD_ATTEMPTS - 1} "
                  f"in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
    try:
        os.replace(part, target)
    except OSError as e:
        raise UserError(f"cannot save the download as {target}: {e.strerror}; check --download_dir") from None
    return target


# ---------------------------------------------------------------- main

def is_own_data(args: argparse.Namespace) -> bool:
    return args.input is not None and Path(args.input).suffix.lower() in OWN_DATA_SUFFIXES


def load(args: argparse.Namespace) -> tuple[list[dict], dict[str, int], str, Callable | None]:
    """Rows sorted by key, label2id, a line saying where they came from, and how to write rows out (for
    write_dataset; None: as they are)."""
    source = Path(args.input) if args.input else None
    own_data = is_own_data(args)
    if (args.text_fields or args.label_field) and not own_data:
        raise UserError("--text_fields and --label_field are for your own .jsonl/.csv/.tsv input only")
    if own_data:
        label_field = args.label_field or "label"
        rows, label2id, own_data = own_rows(source, parse_text_fields(args.text_fields or "text", label_field),
                                            label_field)
        return rows, label2id, f"read {len(rows)} examples with {len(label2id)} labels from {source}", own_data.lines
    if source is None:
        source = download(args.url, Path(args.download_dir))
    if source.is_dir():
        articles = read_directory(source)
    elif source.exists():
        articles = read_tarball(source)
    else:
        raise UserError(f"input {source} does not exist; pass the livedoor tarball, its extracted directory, "
                        f"or a .jsonl/.csv file")
    if not args.no_verify:
        verify_corpus(articles, source)
    rows, label2id = livedoor_rows(articles, source)
    checked = "not verified (--no_verify)" if args.no_verify else "verified as ldcc-20140209"
    return rows, label2id, f"read {len(rows)} articles in {len(label2id)} categories from {source}, {checked}", None


def prepare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    default_dir = f"datasets/{Path(args.input).stem}" if is_own_data(args) else "datasets/livedoor"
    output_dir = Path(args.output_dir or default_dir)
    check_folds(args.folds)
    check_dataset_dir(output_dir)
    rows, label2id, source_line, lines = load(args)
    print(source_line)
    groups = duplicate_groups(rows)
    if args.dedupe:
        rows = drop_duplicates(rows, groups)
    if args.folds is not None:
        return prepare_folds(args, output_dir, rows, label2id, groups, started, lines)
    train, val, test = split(rows, args.seed)
    splits = {"train": train, "val": val, "test": test, "all": rows}
    write_dataset(output_dir, splits, label2id, lines)
    split_of = {r["id"]: name for name in SPLIT_NAMES for r in splits[name]}
    print(summary(splits, label2id))
    print(duplicate_report(groups, split_of, args.dedupe))
    warning = rare_label_warning(splits, label2id)
    if warning:
        print(warning, file=sys.stderr)
    if not (train and val and test):
        print(f"prepare.py: warning: {len(rows)} examples leave a split empty; bertcls.py needs at least 10",
              file=sys.stderr)
    print(f"wrote {output_dir}/{{all,train,val,test}}.jsonl and label2id.json (seed {args.seed}) "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def stopped_message(args: argparse.Namespace) -> str:
    """What an interrupted prepare.py leaves: never a partial dataset, perhaps a partial download to resume."""
    kept = "no dataset was written (one is swapped into place only when complete)"
    target = download_target(args.url, Path(args.download_dir))
    part = target.with_name(target.name + ".part")
    if args.input is None and part.is_file():
        kept += f"; the partial download {part} is kept, and running again resumes it"
    return kept


def prepare_folds(args: argparse.Namespace, output_dir: Path, rows: list[dict], label2id: dict[str, int],
                  groups: list[list[str]], started: float,
                  lines: Callable[[Sequence[dict]], Iterable[str]] | None = None) -> int:
    check_folds(args.folds, len(rows))
    folds = [{"train": train, "val": val, "test": test}
             for train, val, test in fold_splits(rows, args.seed, args.folds)]
    lines = lines or (lambda rows: map(jsonl_line, rows))
    write_folds(output_dir, folds, label2id, folds_id(lines(rows), args.folds, args.seed), args.seed, lines)
    for i, splits in enumerate(folds):
        print(f"fold-{i}: " + ", ".join(f"{name} {len(splits[name])}" for name in SPLIT_NAMES))
        warning = rare_label_warning({**splits, "all": rows}, label2id)
        if warning:
            print(warning.replace("prepare.py: warning:", f"prepare.py: warning: fold-{i}:", 1), file=sys.stderr)
    split_of = {r["id"]: name for name in SPLIT_NAMES for r in folds[0][name]}
    print("fold-0 " + duplicate_report(groups, split_of, args.dedupe))
    print(f"wrote {output_dir}/fold-{{0..{args.folds - 1}}}/{{train,val,test}}.jsonl, label2id.json and fold.json "
          f"(seed {args.seed}) in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("prepare.py", lambda: prepare(args), args.debug, stopped=lambda: stopped_message(args))


if __name__ == "__main__":
    sys.exit(main())
