"""Make JSONL splits of the livedoor news corpus (or your own data) for bertcls.py.

    python prepare.py             # download into data/, write datasets/livedoor/
    python prepare.py --folds 10  # also datasets/livedoor/fold-0/ ... fold-9/
    python prepare.py --input data/ldcc-20140209.tar.gz  # or its extracted directory
    python prepare.py --input news.jsonl --text_fields title,body --label_field category  # or .csv, .tsv

Splits 8:1:1 after a seeded shuffle; --folds K cuts it into K parts (fold-0 of 10 is the default split).
"""

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

from common import (Progress, UserError, atomic_write, decode_utf8, iter_jsonl, jsonl_line, log, number,
                    refuse_overwrite, run_cli, seed_int, write_json)

CORPUS_URL = "https://www.rondhuit.com/download/ldcc-20140209.tar.gz"
N_CATEGORIES, N_ARTICLES = 9, 7367
# of the articles, not the archive
CORPUS_DIGEST = "de91044071ce73c1e0904388e678ec5b001968e50159046baaa80c6e2bf2d31d"
MAX_ARTICLE_BYTES = 10 * 2**20  # the largest article has 32 KB
SPLITS = ("train", "val", "test")
OUTPUT_FILES = {"all.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--input", help="livedoor tarball or directory, or a .jsonl/.csv/.tsv (default: download)")
    add("--output_dir", help="(default: datasets/livedoor, or datasets/<input stem>)")
    add("--seed", type=seed_int, default=42, help="shuffle seed (default: 42)")
    add("--folds", type=number(int, "3 or more (a train, a val and a test part)", lambda v: v >= 3),
        metavar="K", help="also write K folds, fold-<i>/ (default: off)")
    add("--url", default=CORPUS_URL, help="corpus to download (default: %(default)s)")
    add("--download_dir", default="data", help="(default: data)")
    add("--no_verify", action="store_true", help="accept another livedoor version")
    add("--dedupe", action="store_true", help="keep one row per identical body")
    add("--text_fields", help="own data: text, or title,body (default: text)")
    add("--label_field", help="own data: label field (default: label)")
    add("--debug", action="store_true", help="show tracebacks (or BERTCLS_DEBUG=1)")
    return p.parse_args(argv)


def normalize_text(line: str) -> str:
    return unicodedata.normalize("NFKC", line).strip()


def parse_article(raw: bytes, where: str) -> dict:
    # splitlines(), as the tutorial: peachy-4490543 has a U+2028 line break
    lines = [normalize_text(line) for line in decode_utf8(raw, where).splitlines()]
    if len(lines) < 3 or not all(lines[:3]):
        raise UserError(f"{where}: empty, or not an article (URL, date, title, body); remove it")
    return {"url": lines[0], "date": lines[1], "title": lines[2], "body": "\n".join(filter(None, lines[3:]))}


def article_path(name: str) -> str | None:
    """'<category>/<file>.txt', or None for other, hidden or non-UTF-8 names."""
    parts = PurePosixPath(name).parts
    parts = parts[1:] if parts[:1] == ("text",) else parts
    ok = len(parts) == 2 and parts[1].endswith(".txt") and parts[1] != "LICENSE.txt"
    return "/".join(parts) if ok and name.isprintable() and not any(p.startswith((".", "/")) for p in parts) else None


def read_limited(stream: BinaryIO, where: str) -> bytes:
    data = stream.read(MAX_ARTICLE_BYTES + 1)  # not what a header promised
    if len(data) > MAX_ARTICLE_BYTES:
        raise UserError(f"refusing {where}: over {MAX_ARTICLE_BYTES / 2**20:g} MiB (a bomb?)")
    return data


def read_articles(source: Path) -> dict[str, bytes]:
    articles = {}
    if source.is_dir():
        root = source / "text" if (source / "text").is_dir() else source
        for file in root.glob("*/*.txt"):
            if (path := article_path(f"{file.parent.name}/{file.name}")) and file.is_file():
                with open(file, "rb") as f:
                    articles[path] = read_limited(f, str(file))
        return articles
    with open(source, "rb") as f:  # an OSError here is about the path
        try:
            with tarfile.open(fileobj=f) as tar:  # read, never extracted
                for member in tar:
                    if member.isfile() and (path := article_path(member.name)):
                        articles[path] = read_limited(tar.extractfile(member), f"{source}:{member.name}")
        except (tarfile.TarError, EOFError, zlib.error, OSError):
            raise UserError(f"{source} is not a tar or tar.gz archive, or is truncated: download it again, or pass "
                            "its directory or a .jsonl/.csv/.tsv") from None
    return articles


def verify_corpus(articles: dict[str, bytes], source: Path) -> None:
    n_categories = len({path.split("/")[0] for path in articles})
    lines = "".join(f"{path}\t{hashlib.sha256(data).hexdigest()}\n" for path, data in sorted(articles.items()))
    if hashlib.sha256(lines.encode()).hexdigest() != CORPUS_DIGEST:
        why = (f"{len(articles)} articles in {n_categories} categories, expected {N_ARTICLES} in {N_CATEGORIES}"
               if (n_categories, len(articles)) != (N_CATEGORIES, N_ARTICLES) else
               "the article contents differ from the original")
        hint = f"{'extract it' if source.is_dir() else f'delete {source} and download it'} again, or pass --no_verify"
        raise UserError(f"{source} is not ldcc-20140209: {why}; {hint}")


def livedoor_rows(source: Path, verify: bool) -> list[dict]:
    articles = read_articles(source)
    if not articles:
        raise UserError(f"no articles in {source}: expected [text/]<category>/<name>.txt")
    if verify:
        verify_corpus(articles, source)
    rows = []
    for path in sorted(articles):
        category, stem = path.removesuffix(".txt").split("/")
        article_id = stem.removeprefix(f"{category}-")
        rows.append({"id": f"{category}-{article_id}", "category": category, "article_id": article_id,
                     **parse_article(articles[path], f"{source}:{path}")})
    print(f"read {len(rows)} articles in {len({r['category'] for r in rows})} categories from {source}, "
          + ("verified as ldcc-20140209" if verify else "not verified (--no_verify)"))
    return rows


def table_records(path: Path) -> Iterator[tuple[int, dict]]:
    text = decode_utf8(path.read_bytes(), path)
    if path.suffix.lower() == ".tsv":
        rows = enumerate((line.removesuffix("\r").split("\t") for line in text.split("\n")), 1)  # unquoted
    else:
        csv.field_size_limit(2**31 - 1)  # a document may exceed 128 KiB
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        rows = ((reader.line_num, fields) for fields in reader)
    try:
        rows = ((n, fields) for n, fields in rows if any(fields))
        _, header = next(rows, (0, []))
        for n, fields in rows:
            if len(fields) != len(header):
                raise UserError(f"{path}:{n}: {len(fields)} field(s) where the header has {len(header)}; fix that row")
            yield n, dict(zip(header, fields))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV row ({e}); quote a field holding commas, quotes or "
                        "line breaks, and double its quotes") from None


def field_text(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise UserError(f"{where}: no field {field!r} (fields there: {', '.join(record) or 'none'}); name yours with "
                        "--text_fields and --label_field")
    if (value := record[field]) is None or isinstance(value, (dict, list)):
        raise UserError(f"{where}: field {field!r} is {json.dumps(value)[:40]}, not text; fix or remove that line")
    return value if isinstance(value, str) else json.dumps(value)


def own_rows(path: Path, text_fields: list[str], label_field: str) -> list[dict]:
    records = ((n, r) for n, _, _, r in iter_jsonl(path)) if path.suffix.lower() == ".jsonl" else table_records(path)
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
        raise UserError(f"{path} holds no records; expected one per example")
    print(f"read {len(rows)} examples with {len({r['category'] for r in rows})} labels from {path}")
    return sorted(rows, key=lambda r: r["id"])


def folds(items: list, seed: int, k: int) -> list[tuple[list, list, list]]:
    """(train, val, test) of k folds over a seeded shuffle cut into k parts: fold i tests on part k-1-i and validates
    on k-2-i (mod k)."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    base, extra = divmod(len(shuffled), k)
    cut = [shuffled[i * base + min(i, extra):(i + 1) * base + min(i + 1, extra)] for i in range(k)]
    return [([x for j, part in enumerate(cut) if j not in (k - 1 - i, (k - 2 - i) % k) for x in part],
             cut[(k - 2 - i) % k], cut[k - 1 - i]) for i in range(k)]


def duplicate_report(groups: list[list[str]], splits: dict[str, list[dict]], dedupe: bool) -> str:
    head = f"duplicate bodies: {len(groups)} groups ({sum(map(len, groups))} rows)"
    if dedupe or not groups:
        return head + ("; --dedupe kept the first of each" if groups else "")
    split_of = {row["id"]: name for name in SPLITS for row in splits[name]}
    where = [{split_of[i] for i in ids} for ids in groups]
    straddling = [ids for ids, names in zip(groups, where) if len(names) > 1]
    lines = [f"{head}: {sum({'test', 'train'} <= names for names in where)} straddle test and train, "
             f"{len(straddling)} any two splits" + (" (--dedupe keeps one of each)" if straddling else "")]
    return "\n".join(lines + ["  " + ", ".join(f"{i} ({split_of[i]})" for i in ids) for ids in straddling[:5]])


def report(name: str, splits: dict[str, list[dict]], label2id: dict[str, int], duplicates: str) -> None:
    """Sizes (the default split's by category), duplicates and a warning of labels too rare for every split."""
    counts = {split: Counter(r["category"] for r in rows) for split, rows in splits.items()}
    table = [("category", "label", *splits), ("total", "", *map(len, splits.values()))]
    table[1:1] = [(c, label, *(counts[n][c] for n in splits)) for c, label in label2id.items()]
    width = max(len(row[0]) for row in table)
    print(name + ", ".join(f"{n} {len(splits[n])}" for n in SPLITS) if name else
          "\n".join(f"{c:<{width}}  {label:>5}  " + "  ".join(f"{n:>6}" for n in rest) for c, label, *rest in table))
    print(textwrap.indent(duplicates, "  " if name else ""))
    if missing := {c: names for c in label2id if (names := [n for n in SPLITS if not counts[n][c]])}:
        listed = "; ".join(f"{c!r} ({sum(counts[n][c] for n in SPLITS)} examples, none in {'/'.join(missing[c])})"
                           for c in list(missing)[:5])
        log(f"prepare.py: warning: {name}{len(missing)} label(s) too rare to appear in every split, such as "
            f"{listed}; scores for them will be missing or noisy")


def is_fold_dir(entry: Path) -> bool:
    return entry.is_dir() and bool(re.fullmatch(r"fold-\d+", entry.name))


@contextlib.contextmanager
def staged(output_dir: Path, keep: Callable[[Path], bool]) -> Iterator[Path]:
    """A directory swapped in for output_dir at the end, with links to the old entries keep() holds."""
    def link_or_copy(source, target):
        try:
            os.link(source, target)  # no bytes copied
        except OSError:  # no hard links here
            shutil.copy2(source, target)

    output_dir = Path(os.path.abspath(output_dir))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.{os.urandom(4).hex()}.tmp"
    old = staging.with_suffix(".old")
    staging.mkdir()  # fails early if unwritable
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


def download(url: str, target: Path) -> Path:
    if target.is_file():
        log(f"using {target} (already downloaded)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = Path(f"{target}.part")
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
                raise ConnectionError(f"closed after {f.tell()} of {total} bytes")
        os.replace(part, target)
    except (OSError, http.client.HTTPException, ValueError) as e:
        why = f"HTTP {e.code} {e.reason}" if hasattr(e, "code") else getattr(e, "reason", e)
        raise UserError(f"cannot download {url} ({why}): run again, or download the file yourself and pass "
                        "--input") from None
    finally:
        part.unlink(missing_ok=True)
    log(f"downloaded {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    return target


def prepare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    own = Path(args.input or "").suffix.lower() in (".jsonl", ".csv", ".tsv")
    if (args.text_fields or args.label_field) and not own:
        raise UserError("--text_fields and --label_field are for your own .jsonl/.csv/.tsv input only")
    label_field, text_fields = args.label_field or "label", [f.strip() for f in (args.text_fields or "text").split(",")]
    if not 1 <= len(text_fields) <= 2 or len({*text_fields, label_field}) != len(text_fields) + 1 or "" in text_fields:
        raise UserError(f"--text_fields {','.join(text_fields)} --label_field {label_field}: give one or two text "
                        "fields and another label field")
    url_name = PurePosixPath(urllib.parse.urlparse(args.url).path).name or "corpus.tar.gz"
    source = Path(args.input) if args.input else Path(args.download_dir) / url_name
    output_dir = Path(args.output_dir or (f"datasets/{source.stem}" if own else "datasets/livedoor"))
    refuse_overwrite([("--output_dir", output_dir)], [source])
    entries = output_dir.iterdir() if output_dir.exists() else []  # a file: iterdir's OSError names it
    if foreign := sorted(p.name for p in entries if p.name not in OUTPUT_FILES and not is_fold_dir(p)):
        raise UserError(f"--output_dir {output_dir} holds files prepare.py did not write ({', '.join(foreign[:3])}); "
                        "pass a new or empty directory")
    with staged(output_dir, (lambda e: e.name in OUTPUT_FILES) if args.folds else is_fold_dir) as staging:
        rows = own_rows(source, text_fields, label_field) if own else \
            livedoor_rows(source if args.input else download(args.url, source), not args.no_verify)
        labels = {r["category"] for r in rows}
        numeric = all(re.fullmatch(r"-?\d+", label) for label in labels)
        label2id = {label: i for i, label in enumerate(sorted(labels, key=int if numeric else None))}
        uses = Counter(r["id"] for r in rows)  # livedoor: c/c-1.txt and c/1.txt
        if len(uses) < len(rows):
            raise UserError(f"{source}: id {uses.most_common(1)[0][0]!r} is used more than once")
        bodies = defaultdict(list)
        for row in rows:
            bodies[row.get("body", row.get("text"))].append(row)
        groups = [[r["id"] for r in same] for same in bodies.values() if len(same) > 1]
        rows = [same[0] for same in bodies.values()] if args.dedupe else rows
        if (args.folds or 0) > len(rows):
            raise UserError(f"--folds {args.folds} is more than the {len(rows)} examples: use {len(rows)} or fewer")
        lines = {r["id"]: jsonl_line({"id": r["id"], "label": label2id[r["category"]], **r}) for r in rows}
        if args.folds:  # the set's id: its folds' runs are one experiment
            fold_set = hashlib.sha256(f"{args.folds} folds, seed {args.seed}\n{''.join(lines.values())}".encode())
        cuts = [dict(zip(SPLITS, parts)) for parts in folds(rows, args.seed, args.folds or 10)]
        for i, splits in enumerate(cuts if args.folds else [{**cuts[0], "all": rows}]):  # fold 0 of 10, with all
            directory, name = (staging / f"fold-{i}", f"fold-{i}: ") if args.folds else (staging, "")
            directory.mkdir(exist_ok=True)
            for split, split_rows in splits.items():
                atomic_write(directory / f"{split}.jsonl", "".join(lines[r["id"]] for r in split_rows))
            write_json(directory / "label2id.json", label2id)
            if args.folds:
                write_json(directory / "fold.json", {"fold": i, "folds": args.folds, "seed": args.seed,
                                                     "set": fold_set.hexdigest()[:16]})
            report(name, splits, label2id, duplicate_report(groups, splits, args.dedupe))
    print(f"wrote {output_dir} (seed {args.seed}) in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("prepare.py", lambda: prepare(args), args.debug,
                   stopped=lambda: "no dataset was written (one is swapped into place only when complete)")


if __name__ == "__main__":
    raise SystemExit(main())
