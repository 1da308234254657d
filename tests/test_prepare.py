"""Tests for prepare.py: pure functions, a synthetic corpus in the livedoor layout, hostile archives, your own
JSONL/CSV/TSV, output safety, a download from a local server, and the real corpus when it is beside the checkout."""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402

REAL_TARBALL = Path(__file__).resolve().parents[2] / "shared/data/livedoor/ldcc-20140209.tar.gz"
OUTPUTS = ["all.jsonl", "label2id.json", "test.jsonl", "train.jsonl", "val.jsonl"]
FOLD_FILES = ["fold.json", "label2id.json", "test.jsonl", "train.jsonl", "val.jsonl"]

# ---------------------------------------------------------------- a small corpus in the livedoor layout

CATEGORIES = ("alpha-news", "beta-life", "gamma-sports")
PER_CATEGORY = 12
N = len(CATEGORIES) * PER_CATEGORY
DUPLICATES = {"alpha-news-1001": "alpha-news-1000", "beta-life-1005": "beta-life-1004",
              "beta-life-1006": "beta-life-1004", "gamma-sports-1011": "gamma-sports-1003"}  # copy -> original


def article(stem: str) -> bytes:
    article_id = int(stem.rsplit("-", 1)[1])
    body = (f"　{DUPLICATES.get(stem, stem)}の記事、本文１行目。　\n\n  ２行目 ＡＢＣ \n")  # normalisation at work
    return (f"http://news.livedoor.com/article/detail/{article_id}/\n2012-01-0{1 + article_id % 9}T10:00:00+0900\n"
            f"タイトル　{stem}　\n{body}").encode()


def corpus_files() -> dict[str, bytes]:
    files = {"text/README.txt": b"readme\n", "text/CHANGES.txt": b"changes\n"}
    for category in CATEGORIES:
        files[f"text/{category}/LICENSE.txt"] = b"license\n"
        for i in range(PER_CATEGORY):
            files[f"text/{category}/{category}-{1000 + i}.txt"] = article(f"{category}-{1000 + i}")
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_tarball(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, size if kind == tarfile.REGTYPE else 0
    return info


@pytest.fixture
def tarball(tmp_path) -> Path:
    return write_tarball(tmp_path / "corpus.tar.gz", corpus_files())


def run(*args: str | Path) -> int:
    return prepare.main([str(a) for a in args])


def one_line_error(capsys, rc: int, *fragments: str, after: str = "prepare.py: warning: ") -> str:
    """The error contract: exit 1, one line at the end of stderr, no traceback; what comes before it are lines
    starting with `after` (warnings, or the download's progress). Returns the line."""
    *before, line = capsys.readouterr().err.splitlines() or [""]
    assert rc == 1 and line.startswith("prepare.py: error: "), line
    assert all(b.startswith(after) for b in before), before
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("raw, expected", [
    ("ＡＢＣ１２３", "ABC123"), ("ｶﾀｶﾅ", "カタカナ"), ("　本文です。　", "本文です。"), ("  text \t\r", "text"),
    ("内側の　空白", "内側の 空白"), ("㈱①", "(株)1"), ("　 　", ""),
])
def test_normalize_text(raw, expected):
    assert prepare.normalize_text(raw) == expected


def test_parse_article():
    raw = "http://x/1/\n2012-01-01T00:00:00+0900\n　タイトル！　\n\n　１行目\u2028続き　\n \n２行目\n".encode()
    assert prepare.parse_article(raw, "a.txt") == {"url": "http://x/1/", "date": "2012-01-01T00:00:00+0900",
                                                   "title": "タイトル!", "body": "1行目\n続き\n2行目"}


@pytest.mark.parametrize("raw, message", [
    (b"", "a.txt: empty, or not an article"), (b" \n\n\n", "a.txt: empty"), (b"http://x/\n2012\n", "not an article"),
    (b"http://x/\n2012\ntitle\n\xff body\n", "a.txt:4: not UTF-8"),
])
def test_parse_article_refuses(raw, message):
    with pytest.raises(prepare.UserError, match=message):
        prepare.parse_article(raw, "a.txt")


# n = 10 * base + extra, the first `extra` parts one larger: (train, val, test) worked out by hand
@pytest.mark.parametrize("n, sizes", [(0, (0, 0, 0)), (1, (1, 0, 0)), (8, (8, 0, 0)), (9, (8, 1, 0)),
                                      (10, (8, 1, 1)), (11, (9, 1, 1)), (19, (16, 2, 1)), (25, (21, 2, 2)),
                                      (7367, (5895, 736, 736))])
def test_default_split_sizes(n, sizes):
    train, val, test = prepare.folds(list(range(n)), 42, 10)[0]
    assert (len(train), len(val), len(test)) == sizes
    assert sorted(train + val + test) == list(range(n))


def test_split_is_deterministic_and_depends_on_the_seed():
    items = [f"c/{i}.txt" for i in range(100)]
    assert prepare.folds(items, 42, 10) == prepare.folds(list(items), 42, 10)
    assert prepare.folds(items, 42, 10)[0] != prepare.folds(items, 43, 10)[0]
    assert items == [f"c/{i}.txt" for i in range(100)], "the input is not shuffled in place"


@pytest.mark.parametrize("k", [3, 4, 10])
@pytest.mark.parametrize("n", [10, 25, 101])
def test_fold_layout(n, k):
    folds = prepare.folds(list(range(n)), 7, k)
    tests, vals = [f[2] for f in folds], [f[1] for f in folds]
    assert sorted(x for t in tests for x in t) == list(range(n)), "every example tested once"
    assert sorted(x for v in vals for x in v) == list(range(n)), "every example validated once"
    assert sorted(len(t) for t in tests) == sorted(n // k + (i < n % k) for i in range(k))
    for i, (train, val, test) in enumerate(folds):
        assert sorted(train + val + test) == list(range(n)) and not set(train) & set(val + test)
        assert val == tests[(i + 1) % k], "fold i validates on the part fold i+1 tests on"


def test_duplicate_report_counts_by_hand():
    groups = [["a", "b"], ["c", "d", "e"], ["f", "g"]]
    splits = {"train": [{"id": i} for i in "ace"], "val": [{"id": i} for i in "dfg"], "test": [{"id": "b"}]}
    assert prepare.duplicate_report(groups, splits, dedupe=False) == (
        "duplicate bodies: 3 groups (7 rows): 1 straddle test and train, 2 any two splits (--dedupe keeps one of "
        "each)\n  a (train), b (test)\n  c (train), d (val), e (train)")
    assert prepare.duplicate_report([], splits, dedupe=False) == "duplicate bodies: 0 groups (0 rows)"


# ---------------------------------------------------------------- the synthetic corpus end to end

def test_tarball_and_directory_give_the_same_dataset(tmp_path, tarball, capsys):
    tree = write_tree(tmp_path / "extracted", corpus_files())
    for i, source in enumerate([tarball, tree, tree / "text"]):
        assert run("--input", source, "--output_dir", tmp_path / f"out{i}", "--no_verify") == 0
    out = snapshot(tmp_path / "out0")
    assert sorted(out) == OUTPUTS and snapshot(tmp_path / "out1") == out == snapshot(tmp_path / "out2")
    assert json.loads(out["label2id.json"]) == {c: i for i, c in enumerate(CATEGORIES)}
    rows = read_rows(tmp_path / "out0/all.jsonl")
    assert [r["id"] for r in rows] == sorted(f"{c}-{1000 + i}" for c in CATEGORIES for i in range(PER_CATEGORY))
    assert rows[13] == {"id": "beta-life-1001", "label": 1, "category": "beta-life", "article_id": "1001",
                        "url": "http://news.livedoor.com/article/detail/1001/", "date": "2012-01-03T10:00:00+0900",
                        "title": "タイトル beta-life-1001", "body": "beta-life-1001の記事、本文1行目。\n2行目 ABC"}
    assert "の記事" in out["all.jsonl"].decode(), "UTF-8, not \\u escapes"
    splits = {s: read_rows(tmp_path / f"out0/{s}.jsonl") for s in ("train", "val", "test", "all")}
    assert [len(rows) for rows in splits.values()] == [30, 3, 3, 36]
    stdout = capsys.readouterr().out
    assert "category      label   train     val    test     all\n" in stdout  # the category x split table
    for label, category in enumerate(CATEGORIES):
        counts = [sum(r["category"] == category for r in rows) for rows in splits.values()]
        assert f"\n{category:<12}  {label:>5}  " + "  ".join(f"{n:>6}" for n in counts) + "\n" in stdout
    assert "\ntotal                    30       3       3      36\n" in stdout
    assert "duplicate bodies: 3 groups (7 rows)" in stdout


def test_seed_changes_the_split_not_the_rows(tmp_path, tarball):
    for seed in ("1", "2"):
        assert run("--input", tarball, "--output_dir", tmp_path / seed, "--no_verify", "--seed", seed) == 0
    assert (tmp_path / "1/all.jsonl").read_bytes() == (tmp_path / "2/all.jsonl").read_bytes()
    assert (tmp_path / "1/test.jsonl").read_bytes() != (tmp_path / "2/test.jsonl").read_bytes()


def test_dedupe_keeps_the_first_of_each_group(tmp_path, tarball, capsys):
    assert run("--input", tarball, "--output_dir", tmp_path / "out", "--no_verify", "--dedupe") == 0
    ids = {r["id"] for r in read_rows(tmp_path / "out/all.jsonl")}
    assert len(ids) == N - len(DUPLICATES) and not ids & set(DUPLICATES) and set(DUPLICATES.values()) <= ids
    assert "--dedupe kept the first of each" in capsys.readouterr().out


def test_folds_and_default_split_live_side_by_side(tmp_path, tarball, capsys):
    out = tmp_path / "out"
    base = ["--input", tarball, "--output_dir", out, "--no_verify"]
    assert run(*base) == 0
    default = snapshot(out)
    assert run(*base, "--folds", "10") == 0
    assert snapshot(out) == {**default, **{k: v for k, v in snapshot(out).items() if k.startswith("fold-")}}
    for i in range(10):
        assert sorted(snapshot(out / f"fold-{i}")) == FOLD_FILES
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"):
        assert (out / "fold-0" / name).read_bytes() == default[name], "fold-0 of 10 is the default split"
    records = [json.loads((out / f"fold-{i}/fold.json").read_text()) for i in range(10)]
    assert [(r["fold"], r["folds"], r["seed"]) for r in records] == [(i, 10, 42) for i in range(10)]
    assert len({r["set"] for r in records}) == 1 and len(records[0]["set"]) == 16
    tested = sorted(r["id"] for i in range(10) for r in read_rows(out / f"fold-{i}/test.jsonl"))
    assert tested == sorted(r["id"] for r in read_rows(out / "all.jsonl"))
    stdout = capsys.readouterr().out
    # 36 articles in parts of 4, 4, 4, 4, 4, 4, 3, 3, 3, 3: fold 9 tests on part 1, validates on part 10
    assert "fold-0: train 30, val 3, test 3\n" in stdout and "fold-9: train 29, val 3, test 4\n" in stdout

    folds = {k: v for k, v in snapshot(out).items() if k.startswith("fold-")}
    assert run(*base, "--seed", "5") == 0  # the default split again: the folds stay
    assert {k: v for k, v in snapshot(out).items() if k.startswith("fold-")} == folds
    assert run(*base, "--folds", "3") == 0  # fewer folds replace the old ones; the default split stays
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, "fold-0", "fold-1", "fold-2"])
    assert [len(read_rows(out / f"fold-1/{s}.jsonl")) for s in ("train", "val", "test")] == [12, 12, 12]
    assert json.loads((out / "fold-0/fold.json").read_text())["set"] != records[0]["set"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.tar.gz", "out"], "no staging left"


def test_duplicates_reported_for_every_fold(tmp_path, tarball, capsys):
    out = tmp_path / "out"
    assert run("--input", tarball, "--output_dir", out, "--no_verify", "--folds", "4") == 0
    stdout = capsys.readouterr().out
    groups = [["alpha-news-1000", "alpha-news-1001"], ["beta-life-1004", "beta-life-1005", "beta-life-1006"],
              ["gamma-sports-1003", "gamma-sports-1011"]]
    seen = set()
    for i in range(4):
        split_of = {r["id"]: s for s in ("train", "val", "test") for r in read_rows(out / f"fold-{i}/{s}.jsonl")}
        where = [{split_of[x] for x in ids} for ids in groups]
        test_train, any_two = sum({"test", "train"} <= w for w in where), sum(len(w) > 1 for w in where)
        block = stdout.split(f"fold-{i}: ")[1].split("\nfold-")[0]
        assert f"duplicate bodies: 3 groups (7 rows): {test_train} straddle test and train, {any_two} any two" in block
        for ids, w in zip(groups, where):
            assert (", ".join(f"{x} ({split_of[x]})" for x in ids) in block) == (len(w) > 1)
        seen.add((test_train, any_two))
    assert len(seen) > 1, "the folds differ, so their reports must"


def test_bad_number_of_folds(tmp_path, tarball, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run("--input", tarball, "--output_dir", tmp_path / "out", "--folds", "2")
    assert exit_info.value.code == 2 and "3 or more" in capsys.readouterr().err
    rc = run("--input", tarball, "--output_dir", tmp_path / "out", "--no_verify", "--folds", "37")
    one_line_error(capsys, rc, "--folds 37 is more than the 36 examples")
    assert not (tmp_path / "out").exists()


def test_verification(tmp_path, tarball, capsys, monkeypatch):
    rc = run("--input", tarball, "--output_dir", tmp_path / "out")
    one_line_error(capsys, rc, "not ldcc-20140209: 36 articles in 3 categories, expected 7367 in 9", "--no_verify")
    assert not (tmp_path / "out").exists()
    # the digest recipe, written out here independently: sha256 of sorted "<category>/<file>.txt\t<sha256>\n" lines
    files = {k.removeprefix("text/"): v for k, v in corpus_files().items() if k.count("/") == 2 and "LICENSE" not in k}
    lines = "".join(f"{path}\t{hashlib.sha256(data).hexdigest()}\n" for path, data in sorted(files.items()))
    monkeypatch.setattr(prepare, "CORPUS_DIGEST", hashlib.sha256(lines.encode()).hexdigest())
    monkeypatch.setattr(prepare, "N_ARTICLES", N)
    monkeypatch.setattr(prepare, "N_CATEGORIES", 3)
    assert run("--input", tarball, "--output_dir", tmp_path / "out") == 0
    assert "verified as ldcc-20140209" in capsys.readouterr().out
    altered = corpus_files()
    altered["text/beta-life/beta-life-1003.txt"] = altered["text/beta-life/beta-life-1003.txt"].replace(b"1", b"2")
    rc = run("--input", write_tree(tmp_path / "altered", altered), "--output_dir", tmp_path / "out2")
    one_line_error(capsys, rc, "the article contents differ from the original")


# ---------------------------------------------------------------- hostile or broken archives

@pytest.mark.parametrize("extra", [
    member("text/alpha-news/alpha-news-9.txt", tarfile.SYMTYPE, "/etc/passwd"),
    member("text/alpha-news/alpha-news-9.txt", tarfile.LNKTYPE, "text/beta-life/beta-life-1000.txt"),
    member("text/../alpha-news/alpha-news-9.txt"), member("../../alpha-news/alpha-news-9.txt"),
    member("/alpha-news/alpha-news-9.txt"), member("text/alpha-news/alpha-news-9.txt", tarfile.CHRTYPE),
    member("text/alpha-news/alpha-news-9.txt", tarfile.FIFOTYPE), member("text/alpha-news/.hidden.txt"),
    member("text/alpha-news/alpha-news-\udcff.txt"),  # a name that is not UTF-8
], ids=["symlink", "hardlink", "dotdot", "dotdot-top", "absolute", "device", "fifo", "hidden", "not-utf8"])
def test_other_members_are_never_read(tmp_path, tarball, extra):
    archive = write_tarball(tmp_path / "odd.tar.gz", corpus_files(), [extra])
    assert run("--input", tarball, "--output_dir", tmp_path / "clean", "--no_verify") == 0
    assert run("--input", archive, "--output_dir", tmp_path / "odd", "--no_verify") == 0
    assert snapshot(tmp_path / "odd") == snapshot(tmp_path / "clean")


def test_oversized_member_is_refused(tmp_path, capsys):
    bomb = b"\0" * (prepare.MAX_ARTICLE_BYTES + 1)  # about 10 KB once gzipped
    archive = write_tarball(tmp_path / "bomb.tar.gz", {**corpus_files(), "text/alpha-news/alpha-news-9.txt": bomb})
    assert archive.stat().st_size < 100_000
    rc = run("--input", archive, "--output_dir", tmp_path / "out", "--no_verify")
    one_line_error(capsys, rc, "refusing", "alpha-news-9.txt", "bomb")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["truncated", b"not an archive\n" * 10, gzip.compress(b"not a tar" * 100), b""])
def test_truncated_or_not_an_archive(tmp_path, capsys, content):
    if content == "truncated":
        files = {**corpus_files(), **{f"text/alpha-news/x-{i}.txt": os.urandom(5000) for i in range(20)}}
        data = write_tarball(tmp_path / "full.tar.gz", files).read_bytes()
        content = data[: len(data) // 2]
    (tmp_path / "c.tar.gz").write_bytes(content)
    rc = run("--input", tmp_path / "c.tar.gz", "--output_dir", tmp_path / "out", "--no_verify")
    one_line_error(capsys, rc, "c.tar.gz is not a tar or tar.gz archive, or is truncated")
    assert not (tmp_path / "out").exists()


def test_bad_article_and_empty_input(tmp_path, capsys):
    archive = write_tarball(tmp_path / "a.tar.gz", {**corpus_files(), "text/beta-life/beta-life-9.txt": b"\x81\x40"})
    one_line_error(capsys, run("--input", archive, "--output_dir", tmp_path / "o", "--no_verify"),
                   "a.tar.gz:beta-life/beta-life-9.txt:1: not UTF-8")
    (tmp_path / "empty/text").mkdir(parents=True)
    one_line_error(capsys, run("--input", tmp_path / "empty", "--output_dir", tmp_path / "o"), "no articles in")
    one_line_error(capsys, run("--input", tmp_path / "missing.tar.gz", "--output_dir", tmp_path / "o"),
                   "missing.tar.gz: No such file or directory")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- your own data

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled(n: int, labels=("neg", "pos")) -> list[dict]:
    return [{"text": f"文 {i}", "label": labels[i % len(labels)], "extra": i} for i in range(n)]


def test_own_jsonl(tmp_path, capsys):
    rows = labelled(39) + [{"text": "a\u2028b\u2029c\x85d\re  ", "label": "pos", "id": "zz"}]
    out = tmp_path / "out"
    assert run("--input", write_jsonl(tmp_path / "reviews.jsonl", rows), "--output_dir", out) == 0
    assert json.loads((out / "label2id.json").read_text()) == {"neg": 0, "pos": 1}
    written = read_rows(out / "all.jsonl")
    assert written[0] == {"id": "0", "label": 0, "category": "neg", "text": "文 0"}
    assert written[-1]["text"] == "a\u2028b\u2029c\x85d\re  ", "texts are written as they are"
    assert len((out / "all.jsonl").read_bytes().split(b"\n")) == 41, "one line per row"
    assert [len(read_rows(out / f"{s}.jsonl")) for s in ("train", "val", "test")] == [32, 4, 4]
    assert capsys.readouterr().err == ""


def test_own_data_default_output_dir_and_line_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"id": f"r{i}", "text": str(i), "label": "ab"[i % 2]} for i in range(30)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", rows[::-1])
    assert run("--input", "a.jsonl") == 0 and run("--input", "b.jsonl") == 0
    assert snapshot(tmp_path / "datasets/a") == snapshot(tmp_path / "datasets/b"), "sorted by id, not by line"


def test_own_csv_title_body_and_integer_labels(tmp_path):
    data = tmp_path / "news.csv"
    with open(data, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "headline", "content", "topic"])
        for i in range(30):
            writer.writerow([f"n{i:02d}", f'見出し"{i}"', f"本文,{i}\r\n2行目", ["10", "2", "1"][i % 3]])
    out = tmp_path / "out"
    assert run("--input", data, "--output_dir", out, "--text_fields", "headline,content", "--label_field", "topic") == 0
    assert json.loads((out / "label2id.json").read_text()) == {"1": 0, "2": 1, "10": 2}
    assert read_rows(out / "all.jsonl")[4] == {"id": "n04", "label": 1, "category": "2", "title": '見出し"4"',
                                               "body": "本文,4\r\n2行目"}


def test_own_tsv_is_read_as_written(tmp_path):
    lines = ["id\ttext\tlabel", '1\t"Hello" he said\tx', '2\t"unbalanced quote\ty', "3\tplain, with comma\tx\r",
             '4\tends with a quote"\ty'] + [f"{i}\ttext {i}\t{'xy'[i % 2]}" for i in range(5, 20)]
    data = tmp_path / "d.tsv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run("--input", data, "--output_dir", tmp_path / "out") == 0
    texts = {r["id"]: r["text"] for r in read_rows(tmp_path / "out/all.jsonl")}
    assert len(texts) == 19, "the unbalanced quote swallowed nothing"
    assert texts["1"] == '"Hello" he said' and texts["2"] == '"unbalanced quote' and texts["3"] == "plain, with comma"
    assert texts["4"] == 'ends with a quote"'


@pytest.mark.parametrize("name, content, args, message", [
    ("d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"\n', [], "d.jsonl:3: not valid JSON"),
    ("d.jsonl", '[1, 2]\n', [], "d.jsonl:1: expected a JSON object"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', [], "d.jsonl:2: no field 'label' (fields there: text)"),
    ("d.jsonl", '{"title": null, "body": "b", "label": "x"}\n', ["--text_fields", "title,body"],
     "d.jsonl:1: field 'title' is null"),
    ("d.jsonl", '{"text": ["a"], "label": "x"}\n', [], "field 'text' is [\"a\"], not text"),
    ("d.jsonl", '{"text": "a", "label": ""}\n', [], "d.jsonl:1: field 'label' is empty"),
    ("d.jsonl", '{"id": 1, "text": "a", "label": "x"}\n{"id": "1", "text": "b", "label": "x"}\n', [],
     "id '1' is used more than once"),
    ("d.jsonl", "\n", [], "holds no records"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n', ["--text_fields", "a,b,c"], "give one or two text fields"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n', ["--text_fields", "text,label"], "give one or two text fields"),
    ("d.csv", 'text,label\nhello,x\n"bad"quote,y\nok,z\n', [], "d.csv:3: malformed CSV row"),
    ("d.csv", 'text,label\nhello,x\n"never closed,y\nok,z\n', [], "malformed CSV row (unexpected end of data)"),
    ("d.csv", "text,label\nhello,x\nthree,fields,here\n", [], "d.csv:3: 3 field(s) where the header has 2"),
    ("d.csv", "sentence,label\nhello,x\n", [], "d.csv:2: no field 'text' (fields there: sentence, label)"),
    ("d.csv", "text,label\nhello,\n", [], "d.csv:2: field 'label' is empty"),
    ("d.tsv", "text\tlabel\nhello\tx\nno tab here\n", [], "d.tsv:3: 1 field(s) where the header has 2"),
    ("d.csv", "text,label\nこんにちは,x\n".encode("cp932"), [], "d.csv:2: not UTF-8"),
])
def test_bad_own_data(tmp_path, capsys, name, content, args, message):
    data = tmp_path / name
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc = run("--input", data, "--output_dir", tmp_path / "out", *args)
    line = one_line_error(capsys, rc, message)
    if "is null" in message:
        assert "no field" not in line, "present but null is not missing"
    assert not (tmp_path / "out").exists()


def test_text_fields_need_own_data(tmp_path, tarball, capsys):
    rc = run("--input", tarball, "--output_dir", tmp_path / "o", "--text_fields", "x")
    one_line_error(capsys, rc, "--text_fields and --label_field are for your own .jsonl/.csv/.tsv input only")


def test_rare_label_is_a_warning(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", labelled(30) + [{"text": "珍しい", "label": "rare"}])
    assert run("--input", data, "--output_dir", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert err.startswith("prepare.py: warning: 1 label(s) too rare") and "'rare' (1 examples, none in" in err


def test_error_is_one_line_from_the_command_line(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text('text,label\nhello,x\n"bad"quote,y\n', encoding="utf-8")
    result = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--input", str(data), "--output_dir",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"prepare.py: error: {data}:3: malformed CSV row (',' expected after '\"'); quote a "
                             "field holding commas, quotes or line breaks, and double its quotes\n")


# ---------------------------------------------------------------- where the dataset goes

def test_output_that_is_the_input_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    data = write_jsonl(tmp_path / "d/x.jsonl", labelled(20))
    (tmp_path / "link").symlink_to(tmp_path / "d")
    for output in ["d", "./d/../d", str(tmp_path / "link"), "d/x.jsonl"]:
        rc = run("--input", data, "--output_dir", output)
        one_line_error(capsys, rc, f"--output_dir {Path(output)} would overwrite the input {data}")
    tree = write_tree(tmp_path / "extracted", corpus_files())
    one_line_error(capsys, run("--input", tree, "--output_dir", tree, "--no_verify"), "would overwrite the input")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x.jsonl"]


def test_download_dir_inside_the_output_is_refused(tmp_path, capsys):
    rc = run("--download_dir", tmp_path / "out/data", "--output_dir", tmp_path / "out", "--url",
             "http://127.0.0.1:9/x.tar.gz")
    one_line_error(capsys, rc, "would overwrite the input", "x.tar.gz")


def test_failures_leave_the_previous_dataset(tmp_path, tarball, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run("--input", tarball, "--output_dir", out, "--no_verify", "--folds", "3") == 0
    assert run("--input", tarball, "--output_dir", out, "--no_verify") == 0
    before = snapshot(out)
    capsys.readouterr()
    bomb = write_tarball(tmp_path / "bomb.tar.gz", corpus_files(), [member("text/a/a-1.txt", size=2**24)])
    one_line_error(capsys, run("--input", bomb, "--output_dir", out, "--no_verify"), "refusing")
    original = prepare.atomic_write

    def fail_in_the_second_fold(path, text):
        if path.parent.name == "fold-1":
            raise OSError(28, "No space left on device", str(path))
        original(path, text)

    monkeypatch.setattr(prepare, "atomic_write", fail_in_the_second_fold)
    one_line_error(capsys, run("--input", tarball, "--output_dir", out, "--no_verify", "--folds", "4"),
                   "No space left on device")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tar.gz", "corpus.tar.gz", "out"], "no staging left"


def test_interrupted_run_says_no_dataset_was_written(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "own_rows", interrupted)
    data = write_jsonl(tmp_path / "d.jsonl", labelled(20))
    assert run("--input", data, "--output_dir", tmp_path / "out") == 130
    assert capsys.readouterr().err == ("prepare.py: interrupted; no dataset was written (one is swapped into place "
                                       "only when complete)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_foreign_files_or_a_file_as_output_dir_are_refused_first(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "fold-x").mkdir()
    # no such input: a check made after reading it would report that instead
    rc = run("--input", tmp_path / "none.jsonl", "--output_dir", out)
    one_line_error(capsys, rc, "holds files prepare.py did not write (fold-x, notes.txt)")
    assert sorted(p.name for p in out.iterdir()) == ["fold-x", "notes.txt"]
    (tmp_path / "file").write_text("precious")
    one_line_error(capsys, run("--input", tmp_path / "none.jsonl", "--output_dir", tmp_path / "file"),
                   "Not a directory")
    assert (tmp_path / "file").read_text() == "precious"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(prepare.UserError, match="holds no records"):
        run("--input", write_jsonl(tmp_path / "d.jsonl", []), "--output_dir", tmp_path / "o", "--debug")
    monkeypatch.setenv("BERTCLS_DEBUG", "1")
    with pytest.raises(prepare.UserError, match="holds no records"):
        run("--input", tmp_path / "d.jsonl", "--output_dir", tmp_path / "o")


# ---------------------------------------------------------------- download from a local server

@pytest.fixture
def server(tarball, monkeypatch):
    """http.server on 127.0.0.1 serving the tarball; with `drop` set, it sends half and closes the connection."""
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    state = {"payload": tarball.read_bytes(), "drop": False, "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            state["requests"] += 1
            if self.path.endswith("missing.tar.gz"):
                return self.send_error(404)
            self.send_response(200)
            self.send_header("Content-Length", str(len(state["payload"])))
            self.end_headers()
            self.wfile.write(state["payload"][: len(state["payload"]) // 2] if state["drop"] else state["payload"])
            self.close_connection = True

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/ldcc-20140209.tar.gz"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_download_then_reuse(tmp_path, server, capsys):
    args = ["--url", server["url"], "--download_dir", tmp_path / "data", "--no_verify", "--output_dir"]
    assert run(*args, tmp_path / "out") == 0
    target = tmp_path / "data/ldcc-20140209.tar.gz"
    assert target.read_bytes() == server["payload"] and sorted(os.listdir(tmp_path / "data")) == [target.name]
    assert "downloading" in capsys.readouterr().err
    assert run(*args, tmp_path / "again") == 0
    assert server["requests"] == 1 and "already downloaded" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "again")


@pytest.mark.parametrize("case", ["dropped", "404", "refused"])
def test_failed_download_is_one_line(tmp_path, server, capsys, case):
    server["drop"] = case == "dropped"
    url = {"dropped": server["url"], "404": server["url"].replace("ldcc-20140209", "missing"),
           "refused": "http://127.0.0.1:9/x.tar.gz"}[case]
    rc = run("--url", url, "--download_dir", tmp_path / "data", "--output_dir", tmp_path / "out", "--no_verify")
    line = one_line_error(capsys, rc, f"cannot download {url}", "run again, or download the file yourself and pass "
                                      "--input", *(["HTTP 404"] if case == "404" else []), after="downloading ")
    assert "resum" not in line and "part" not in line
    assert not (tmp_path / "out").exists() and list((tmp_path / "data").iterdir()) == []


# ---------------------------------------------------------------- the real corpus

@pytest.fixture(scope="module")
def real_tarball() -> Path:
    if not REAL_TARBALL.exists():
        pytest.skip(f"needs the real livedoor corpus at {REAL_TARBALL} (shared data beside the checkout, never in "
                    "the repository)")
    return REAL_TARBALL


def test_real_corpus(tmp_path, real_tarball, capsys):
    out = tmp_path / "livedoor"
    assert run("--input", real_tarball, "--output_dir", out) == 0
    stdout = capsys.readouterr().out
    assert "verified as ldcc-20140209" in stdout and "duplicate bodies: 7 groups (15 rows): " in stdout
    assert {s: len(read_rows(out / f"{s}.jsonl")) for s in ("all", "train", "val", "test")} == \
        {"all": 7367, "train": 5895, "val": 736, "test": 736}
    assert len(json.loads((out / "label2id.json").read_text())) == 9
    rows = read_rows(out / "all.jsonl")
    assert len({r["id"] for r in rows}) == 7367 and all(r["title"] and r["body"] for r in rows)
    articles = prepare.read_articles(real_tarball)
    prepare.verify_corpus(articles, real_tarball)
    articles["peachy/peachy-4490543.txt"] += b"\n"
    with pytest.raises(prepare.UserError, match="the article contents differ"):
        prepare.verify_corpus(articles, real_tarball)
    del articles["peachy/peachy-4490543.txt"]
    with pytest.raises(prepare.UserError, match="7366 articles in 9 categories"):
        prepare.verify_corpus(articles, real_tarball)
