"""Prepare the livedoor news corpus (or your own data) as JSONL splits for bertcls.py.

    python prepare.py                                     # download into data/, write datasets/livedoor/
    python prepare.py --input data/ldcc-20140209.tar.gz   # a tarball you already have (or its extracted dir)
    python prepare.py --folds 10                          # datasets/livedoor/fold-0/ ... fold-9/ as well
    python prepare.py --input news.jsonl --text_fields title,body --label_field category   # or .csv, .tsv

Writes all.jsonl, train.jsonl, val.jsonl, test.jsonl and label2id.json into --output_dir. The rows, sorted by path
(your own data: by id), are shuffled with random.Random(--seed) and cut into 10 near-equal parts: train = parts 1-8,
val = part 9, test = part 10 (5895 / 736 / 736 for livedoor). --folds K cuts the same shuffle into K parts and
writes <output_dir>/fold-<i>/ for each i (fold-0 of --folds 10 is the default split byte for byte); the default
split and the folds live side by side. A dataset is written into a staging directory and swapped into place when
complete: a failed or interrupted run leaves the previous one as it was. Your own data is held in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import http.client
import io
import json
import os
import random
import re
import secrets
import shutil
import tarfile
import textwrap
import time
import unicodedata
import urllib.parse
import urllib.request
import zlib
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from common import (Progress, UserError, atomic_write, iter_jsonl, jsonl_line, log, number, refuse_overwrite, run_cli,
                    seed_int, write_json)

CORPUS_URL = "https://www.rondhuit.com/download/ldcc-20140209.tar.gz"
N_CATEGORIES, N_ARTICLES = 9, 7367
# sha256 over the sorted lines "<category>/<file>.txt\t<sha256 of the file>\n" of the 7367 article files, computed
# once from ../shared/data/livedoor/MANIFEST.sha256: it depends on the articles' bytes only, not on the archive's.
CORPUS_DIGEST = "de91044071ce73c1e0904388e678ec5b001968e50159046baaa80c6e2bf2d31d"
NON_ARTICLES = {"LICENSE.txt", "README.txt", "CHANGES.txt"}
MAX_ARTICLE_BYTES = 10 * 2**20  # the largest livedoor article is 32 KB: more is a mistake or a decompression bomb
SPLITS = ("train", "val", "test")
OUTPUT_FILES = {"all.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"}
STOPPED = "no dataset was written (one is swapped into place only when complete)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="livedoor tarball or its extracted directory, or your own .jsonl/.csv/.tsv "
                                   "(default: download --url into --download_dir)")
    p.add_argument("--output_dir", help="dataset directory (default: datasets/livedoor, or datasets/<input stem>)")
    p.add_argument("--seed", type=seed_int, default=42, help="seed of the shuffle before the split (default: 42)")
    p.add_argument("--folds", type=number(int, "3 or more (a train, a val and a test part)", lambda v: v >= 3),
                   metavar="K", help="write K datasets <output_dir>/fold-<i>, (K-2):1:1 each (default: off)")
    p.add_argument("--url", default=CORPUS_URL, help=f"where to download the corpus (default: {CORPUS_URL})")
    p.add_argument("--download_dir", default="data", help="where the download is kept (default: data)")
    p.add_argument("--no_verify", action="store_true", help="accept another livedoor version (default: off)")
    p.add_argument("--dedupe", action="store_true", help="keep one of the rows with an identical body (default: off)")
    p.add_argument("--text_fields", help="own data: text, or title,body: one or two fields (default: text)")
    p.add_argument("--label_field", help="own data: the field holding the label (default: label)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (default: off; or env BERTCLS_DEBUG=1)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- livedoor articles

def normalize_text(line: str) -> str:
    """NFKC, then ASCII and full-width spaces stripped at both ends."""
    return unicodedata.normalize("NFKC", line).strip(" \t\r\n\f\v\u3000")


def parse_article(raw: bytes, where: str) -> dict:
    """Line 1 URL, line 2 date, line 3 title, lines 4+ body (empty lines dropped, joined with \\n)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{where}:{line}: not UTF-8; convert it to UTF-8 or remove it") from None
    # str.splitlines(), as the tutorial did: one article (peachy-4490543) has a U+2028 that breaks a line
    lines = [normalize_text(line) for line in text.splitlines()]
    if len(lines) < 3 or not all(lines[:3]):
        raise UserError(f"{where}: empty, or not an article (lines URL, date, title, then the body); remove it")
    return {"url": lines[0], "date": lines[1], "title": lines[2], "body": "\n".join(filter(None, lines[3:]))}


def article_path(name: str) -> str | None:
    """'<category>/<file>.txt' for an article's name ([text/]<category>/<file>.txt), else None: other files, and
    names that are absolute, hidden, climb out with '..' or are not UTF-8 (lone surrogates are not printable)."""
    parts = PurePosixPath(name).parts
    parts = parts[1:] if parts[:1] == ("text",) else parts
    if len(parts) != 2 or any(p.startswith((".", "/")) for p in parts) or not parts[1].endswith(".txt") \
            or parts[1] in NON_ARTICLES or not name.isprintable():
        return None
    return "/".join(parts)


def read_limited(stream: BinaryIO, where: str) -> bytes:
    """At most MAX_ARTICLE_BYTES, whatever a header or stat promised."""
    data = stream.read(MAX_ARTICLE_BYTES + 1)
    if len(data) > MAX_ARTICLE_BYTES:
        raise UserError(f"refusing {where}: over the {MAX_ARTICLE_BYTES / 2**20:g} MiB an article may have (a bomb?)")
    return data


def read_tarball(archive: Path) -> dict[str, bytes]:
    """Article bytes by '<category>/<file>.txt', read without extracting anything: only regular files with an
    article's name are read, so links, devices and names that climb out can do no harm."""
    articles = {}
    with open(archive, "rb") as f:  # opened first: an OSError here is about the path, below about the data
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tar:
                for member in tar:
                    path = article_path(member.name)
                    if member.isfile() and path is not None:
                        articles[path] = read_limited(tar.extractfile(member), f"{archive}:{member.name}")
        except (tarfile.TarError, EOFError, zlib.error, OSError):
            raise UserError(f"{archive} is not a tar or tar.gz archive, or is truncated: download it again, or pass "
                            "its extracted directory or your own .jsonl/.csv/.tsv") from None
    return articles


def read_directory(root: Path) -> dict[str, bytes]:
    """Article bytes by '<category>/<file>.txt' from an extracted corpus (root holding text/ or the categories)."""
    root = root / "text" if (root / "text").is_dir() else root
    articles = {}
    for file in sorted(root.glob("*/*.txt")):
        path = article_path(f"{file.parent.name}/{file.name}")
        if path is not None and file.is_file():
            with open(file, "rb") as f:
                articles[path] = read_limited(f, str(file))
    return articles


def verify_corpus(articles: dict[str, bytes], source: Path) -> None:
    n_categories = len({path.split("/")[0] for path in articles})
    hint = f"{'extract it' if source.is_dir() else f'delete {source} and download it'} again, or pass --no_verify"
    if (n_categories, len(articles)) != (N_CATEGORIES, N_ARTICLES):
        raise UserError(f"{source} is not ldcc-20140209: {len(articles)} articles in {n_categories} categories, "
                        f"expected {N_ARTICLES} in {N_CATEGORIES}; {hint}")
    lines = "".join(f"{path}\t{hashlib.sha256(data).hexdigest()}\n" for path, data in sorted(articles.items()))
    if hashlib.sha256(lines.encode("utf-8")).hexdigest() != CORPUS_DIGEST:
        raise UserError(f"{source} is not ldcc-20140209: the article contents differ from the original; {hint}")


def livedoor_rows(source: Path, verify: bool) -> tuple[list[dict], dict[str, int]]:
    """One row per article of a tarball or directory in path order, and label2id with the categories by name."""
    articles = read_directory(source) if source.is_dir() else read_tarball(source)
    if not articles:
        raise UserError(f"no articles in {source}: expected text/<category>/<name>.txt or <category>/<name>.txt")
    if verify:
        verify_corpus(articles, source)
    label2id = {c: i for i, c in enumerate(sorted({path.split("/")[0] for path in articles}))}
    rows = []
    for path in sorted(articles):
        category, stem = path.removesuffix(".txt").split("/")
        article_id = stem.removeprefix(f"{category}-")
        rows.append({"id": f"{category}-{article_id}", "label": label2id[category], "category": category,
                     "article_id": article_id, **parse_article(articles[path], f"{source}:{path}")})
    print(f"read {len(rows)} articles in {len(label2id)} categories from {source}, "
          + ("verified as ldcc-20140209" if verify else "not verified (--no_verify)"))
    return rows, label2id


# ---------------------------------------------------------------- your own data

def table_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line, record by header) of each non-empty row of a .csv, parsed strictly, or of a .tsv, which has no quoting:
    a field is what lies between tabs on a line, quotes included."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8; convert the file to UTF-8") from None
    if path.suffix.lower() == ".tsv":
        rows = enumerate((line.removesuffix("\r").split("\t") for line in text.split("\n")), 1)
    else:
        csv.field_size_limit(2**31 - 1)  # the default 128 KiB is less than some documents
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        rows = ((reader.line_num, fields) for fields in reader)
    header = None
    try:
        for n, fields in rows:
            if not any(fields):
                continue
            if header is None:
                header = fields
            elif len(fields) != len(header):
                raise UserError(f"{path}:{n}: {len(fields)} field(s) where the header has {len(header)}; fix that row")
            else:
                yield n, dict(zip(header, fields))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV row ({e}); quote a field holding commas, quotes or "
                        "line breaks, and double its quotes") from None


def field_text(record: dict, field: str, where: str) -> str:
    """A field's value as text (numbers and booleans as JSON writes them)."""
    if field not in record:
        raise UserError(f"{where}: no field {field!r} (fields there: {', '.join(record) or 'none'}); name yours with "
                        "--text_fields and --label_field")
    value = record[field]
    if value is None or isinstance(value, (dict, list)):
        raise UserError(f"{where}: field {field!r} is {json.dumps(value)[:40]}, not text; fix or remove that line")
    return value if isinstance(value, str) else json.dumps(value)


def own_rows(path: Path, text_fields: list[str], label_field: str) -> tuple[list[dict], dict[str, int]]:
    """Rows sorted by id from a .jsonl/.csv/.tsv, texts as they are, and label2id from the label values (by name;
    numerically when all are integers, so that labels 0..K-1 keep their ids)."""
    jsonl = path.suffix.lower() == ".jsonl"
    records = ((n, record) for n, _, _, record in iter_jsonl(path)) if jsonl else table_records(path)
    names = ["text"] if len(text_fields) == 1 else ["title", "body"]
    rows = []
    for index, (n, record) in enumerate(records):
        where = f"{path}:{n}"
        texts = {name: field_text(record, field, where) for name, field in zip(names, text_fields)}
        category = field_text(record, label_field, where)
        if not category:
            raise UserError(f"{where}: field {label_field!r} is empty; give every example a label")
        row_id = str(record["id"]) if record.get("id") not in (None, "") else str(index)
        rows.append({"id": row_id, "category": category, **texts})
    if not rows:
        raise UserError(f"{path} holds no records; expected one object (or CSV/TSV row) per example")
    labels = {r["category"] for r in rows}
    numeric = all(re.fullmatch(r"-?\d+", label) for label in labels)
    label2id = {label: i for i, label in enumerate(sorted(labels, key=int if numeric else None))}
    print(f"read {len(rows)} examples with {len(label2id)} labels from {path}")
    return [{"id": r["id"], "label": label2id[r["category"]], **r} for r in sorted(rows, key=lambda r: r["id"])], \
        label2id


# ---------------------------------------------------------------- split, duplicates, report

def folds(items: list, seed: int, k: int) -> list[tuple[list, list, list]]:
    """(train, val, test) of k folds over items (sorted by key) shuffled with random.Random(seed) and cut into k
    near-equal parts, the first len(items) % k one larger. Fold i tests on part k-1-i, validates on part k-2-i (mod k)
    and trains on the others in order; fold 0 of 10 is the default split (train: parts 1-8, val: 9, test: 10)."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    base, extra = divmod(len(shuffled), k)
    bounds = [i * base + min(i, extra) for i in range(k + 1)]
    cut = [shuffled[bounds[i]:bounds[i + 1]] for i in range(k)]
    return [([x for j, part in enumerate(cut) if j not in (k - 1 - i, (k - 2 - i) % k) for x in part],
             cut[(k - 2 - i) % k], cut[k - 1 - i]) for i in range(k)]


def duplicate_groups(rows: list[dict]) -> list[list[str]]:
    """Ids of the rows sharing an identical body (or text), in groups of two or more, in row order."""
    by_text = defaultdict(list)
    for row in rows:
        by_text[row.get("body", row.get("text"))].append(row["id"])
    return [ids for ids in by_text.values() if len(ids) > 1]


def duplicate_report(groups: list[list[str]], splits: dict[str, list[dict]], dedupe: bool) -> str:
    """The groups; how many straddle test and train (tested on what was trained on) and any two splits; a few."""
    head = f"duplicate bodies: {len(groups)} groups ({sum(map(len, groups))} rows)"
    if dedupe or not groups:
        return head + ("; --dedupe kept the first of each" if groups else "")
    split_of = {row["id"]: name for name in SPLITS for row in splits[name]}
    where = [{split_of[i] for i in ids} for ids in groups]
    straddling = [ids for ids, names in zip(groups, where) if len(names) > 1]
    lines = [f"{head}: {sum({'test', 'train'} <= names for names in where)} straddle test and train, "
             f"{len(straddling)} any two splits" + (" (--dedupe keeps one of each)" if straddling else "")]
    return "\n".join(lines + ["  " + ", ".join(f"{i} ({split_of[i]})" for i in ids) for ids in straddling[:5]])


def summary(splits: dict[str, list[dict]], label2id: dict[str, int]) -> str:
    """Examples per category and split, as a table."""
    counts = {name: Counter(r["category"] for r in rows) for name, rows in splits.items()}
    width = max(len("category"), *map(len, label2id))
    lines = [f"{'category':<{width}}  label  " + "  ".join(f"{n:>6}" for n in splits)]
    for category, label in label2id.items():
        lines.append(f"{category:<{width}}  {label:>5}  " + "  ".join(f"{counts[n][category]:>6}" for n in splits))
    lines.append(f"{'total':<{width}}  {'':>5}  " + "  ".join(f"{len(rows):>6}" for rows in splits.values()))
    return "\n".join(lines)


def warn_of_rare_labels(splits: dict[str, list[dict]], rows: list[dict], label2id: dict[str, int], prefix: str) -> None:
    """Warn of labels too rare to appear in every split (a split left empty has none)."""
    present = {name: {r["category"] for r in splits[name]} for name in SPLITS}
    missing = {c: names for c in label2id if (names := [n for n in SPLITS if c not in present[n]])}
    if missing:
        total = Counter(r["category"] for r in rows)
        listed = "; ".join(f"{c!r} ({total[c]} examples, none in {'/'.join(missing[c])})" for c in list(missing)[:5])
        log(f"prepare.py: warning: {prefix}{len(missing)} label(s) too rare to appear in every split, such as "
            f"{listed}; scores for them will be missing or noisy")


# ---------------------------------------------------------------- output

def is_fold_dir(entry: Path) -> bool:
    return entry.is_dir() and re.fullmatch(r"fold-\d+", entry.name) is not None


def check_output_dir(output_dir: Path) -> None:
    """Refuse an --output_dir holding files prepare.py did not write (or a file: iterdir's OSError names it)."""
    entries = output_dir.iterdir() if output_dir.exists() else []
    foreign = sorted(p.name for p in entries if p.name not in OUTPUT_FILES and not is_fold_dir(p))
    if foreign:
        raise UserError(f"--output_dir {output_dir} holds files prepare.py did not write ({', '.join(foreign[:3])}); "
                        "pass a new or empty directory")


def link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system has them (no bytes copied), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextlib.contextmanager
def staged(output_dir: Path, keep: Callable[[Path], bool]) -> Iterator[Path]:
    """A staging directory beside output_dir (made first: an unwritable output fails before any work), swapped into
    place when the block completes. The old entries for which keep() holds are carried over as hard links (the
    default split and the folds keep each other); until the swap the old directory is untouched."""
    output_dir = Path(os.path.abspath(output_dir))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.{secrets.token_hex(4)}.tmp"
    old = staging.with_suffix(".old")
    staging.mkdir()
    try:
        yield staging
        for entry in filter(keep, output_dir.iterdir() if output_dir.is_dir() else []):
            if entry.is_dir():
                shutil.copytree(entry, staging / entry.name, copy_function=link_or_copy)
            else:
                link_or_copy(entry, staging / entry.name)
        if output_dir.exists():
            os.replace(output_dir, old)
        os.replace(staging, output_dir)
    finally:
        if old.exists() and not output_dir.exists():  # stopped between the two renames
            os.replace(old, output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_dataset(directory: Path, splits: dict[str, list[dict]], label2id: dict[str, int], lines: dict[str, str],
                  fold: dict | None) -> None:
    """<split>.jsonl for each split (lines: the JSONL line of each row id), label2id.json and a fold's fold.json."""
    directory.mkdir(exist_ok=True)
    for name, rows in splits.items():
        atomic_write(directory / f"{name}.jsonl", "".join(lines[r["id"]] for r in rows))
    write_json(directory / "label2id.json", label2id)
    if fold is not None:
        write_json(directory / "fold.json", fold)


# ---------------------------------------------------------------- download

def download(url: str, target: Path) -> Path:
    """target, reused if it is there, else fetched from url into target.part and renamed once complete."""
    if target.is_file():
        log(f"using {target} (already downloaded)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    log(f"downloading {url} to {target}")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "bertcls-prepare"})
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            with Progress(total / 2**20, "downloading", unit="MiB", every=10) as progress:
                while chunk := response.read(2**20):
                    f.write(chunk)
                    progress.update(len(chunk) / 2**20)
            if f.tell() < total:
                raise ConnectionError(f"the connection closed after {f.tell()} of {total} bytes")
        os.replace(part, target)
    except (OSError, http.client.HTTPException, ValueError) as e:
        why = f"HTTP {e.code} {e.reason}" if hasattr(e, "code") else getattr(e, "reason", e)
        raise UserError(f"cannot download {url} ({why}): run again, or download the file yourself and pass "
                        "--input") from None
    finally:
        part.unlink(missing_ok=True)
    log(f"downloaded {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    return target


# ---------------------------------------------------------------- main

def prepare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    own = args.input is not None and Path(args.input).suffix.lower() in (".jsonl", ".csv", ".tsv")
    if (args.text_fields or args.label_field) and not own:
        raise UserError("--text_fields and --label_field are for your own .jsonl/.csv/.tsv input only")
    label_field, text_fields = args.label_field or "label", [f.strip() for f in (args.text_fields or "text").split(",")]
    if not 1 <= len(text_fields) <= 2 or len({*text_fields, label_field}) != len(text_fields) + 1 or "" in text_fields:
        raise UserError(f"--text_fields {','.join(text_fields)} --label_field {label_field}: give one or two text "
                        "fields (text, or title,body) and another field for the label")
    url_name = PurePosixPath(urllib.parse.urlparse(args.url).path).name or "corpus.tar.gz"
    source = Path(args.input) if args.input else Path(args.download_dir) / url_name
    output_dir = Path(args.output_dir or (f"datasets/{source.stem}" if own else "datasets/livedoor"))
    refuse_overwrite([("--output_dir", output_dir)], [source])
    check_output_dir(output_dir)
    keep = (lambda entry: entry.name in OUTPUT_FILES) if args.folds else is_fold_dir
    with staged(output_dir, keep) as staging:
        if own:
            rows, label2id = own_rows(source, text_fields, label_field)
        else:
            rows, label2id = livedoor_rows(source if args.input else download(args.url, source), not args.no_verify)
        uses = Counter(r["id"] for r in rows)  # livedoor: <category>/<category>-1.txt and <category>/1.txt too
        if len(uses) < len(rows):
            raise UserError(f"{source}: id {uses.most_common(1)[0][0]!r} is used more than once; ids must be unique")
        groups = duplicate_groups(rows)
        if args.dedupe:
            dropped = {i for ids in groups for i in ids[1:]}
            rows = [r for r in rows if r["id"] not in dropped]
        lines = {r["id"]: jsonl_line(r) for r in rows}
        if args.folds is None:
            datasets = [("", staging, dict(zip(SPLITS, folds(rows, args.seed, 10)[0]), all=rows), None)]
        elif args.folds > len(rows):
            raise UserError(f"--folds {args.folds} is more than the {len(rows)} examples: use {len(rows)} or fewer")
        else:
            # the set's id: what makes the runs on its folds one experiment (examples, K and seed)
            fold_set = hashlib.sha256(f"{args.folds} folds, seed {args.seed}\n{''.join(lines.values())}".encode())
            fold = {"folds": args.folds, "seed": args.seed, "set": fold_set.hexdigest()[:16]}
            datasets = [(f"fold-{i}: ", staging / f"fold-{i}", dict(zip(SPLITS, splits)), {"fold": i, **fold})
                        for i, splits in enumerate(folds(rows, args.seed, args.folds))]
        for name, directory, splits, fold in datasets:
            write_dataset(directory, splits, label2id, lines, fold)
            print(name + ", ".join(f"{n} {len(splits[n])}" for n in SPLITS) if name else summary(splits, label2id))
            print(textwrap.indent(duplicate_report(groups, splits, args.dedupe), "  " if name else ""))
            warn_of_rare_labels(splits, rows, label2id, name)
    print(f"wrote {output_dir} (seed {args.seed}) in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("prepare.py", lambda: prepare(args), args.debug, stopped=lambda: STOPPED)


if __name__ == "__main__":
    raise SystemExit(main())
