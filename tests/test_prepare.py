"""Tests for prepare.py: pure functions, hostile inputs, a synthetic corpus, a local download, the real corpus."""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.server
import io
import json
import sys
import tarfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import prepare  # noqa: E402
from conftest import run_on_read_only  # noqa: E402
from livedoor_fixtures import (CATEGORIES, DUPLICATE_IDS, PER_CATEGORY, corpus_files,  # noqa: E402
                               write_tarball, write_tree)

REAL_DIR = ROOT.parent / "shared" / "data" / "livedoor"
REAL_TARBALL = REAL_DIR / "ldcc-20140209.tar.gz"
REAL_MANIFEST = REAL_DIR / "MANIFEST.sha256"
OUTPUTS = ["all.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"]


def one_line_error(capsys, rc: int, *fragments: str) -> str:
    """The error contract: non-zero exit, exactly one non-empty stderr line, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("prepare.py: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def corpus_tarball(tmp_path) -> Path:
    return write_tarball(tmp_path / "corpus.tar.gz", corpus_files())


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    return write_tree(tmp_path / "extracted", corpus_files())


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("raw, expected", [
    ("ＡＢＣ１２３", "ABC123"),
    ("ｶﾀｶﾅ", "カタカナ"),
    ("　本文です。　", "本文です。"),
    ("  text \t\r", "text"),
    ("内側の　空白", "内側の 空白"),
    ("㈱①", "(株)1"),
    ("　 　", ""),
])
def test_normalize_text(raw, expected):
    assert prepare.normalize_text(raw) == expected


def test_parse_article_fields():
    raw = "http://x/1/\n2012-01-01T00:00:00+0900\n　タイトル！　\n\n　１行目　\n \n２行目\n".encode()
    assert prepare.parse_article(raw, "a.txt") == {
        "url": "http://x/1/", "date": "2012-01-01T00:00:00+0900", "title": "タイトル!", "body": "1行目\n2行目"}


@pytest.mark.parametrize("raw, fragment", [
    (b"", "empty"),
    (b" \n\n", "empty"),
    (b"http://x/\n2012\n", "line"),
    (b"http://x/\n2012\ntitle\n\xff\xfe body\n", "a.txt:4: not UTF-8"),
])
def test_parse_article_refuses_bad_articles(raw, fragment):
    with pytest.raises(prepare.UserError, match=fragment):
        prepare.parse_article(raw, "a.txt")


# sizes worked out by hand: n = 10 * base + extra, the first `extra` parts one larger
@pytest.mark.parametrize("n, sizes", [
    (0, (0, 0, 0)), (1, (1, 0, 0)), (7, (7, 0, 0)), (8, (8, 0, 0)), (9, (8, 1, 0)), (10, (8, 1, 1)),
    (11, (9, 1, 1)), (18, (16, 1, 1)), (19, (16, 2, 1)), (20, (16, 2, 2)), (25, (21, 2, 2)),
    (7367, (5895, 736, 736)),
])
def test_split_sizes(n, sizes):
    train, val, test = prepare.split(list(range(n)), seed=42)
    assert (len(train), len(val), len(test)) == sizes
    assert sorted(train + val + test) == list(range(n))


@pytest.mark.parametrize("n", range(26))
def test_split_sizes_small_n(n):
    sizes = [len(part) for part in prepare.split(list(range(n)), seed=0)]
    base, extra = divmod(n, 10)
    assert sizes == [8 * base + min(extra, 8), base + (extra > 8), base]


def test_split_depends_on_seed_and_key_order_only():
    keys = [f"cat/{i}.txt" for i in range(100)]
    shuffled = list(reversed(keys))
    assert prepare.split(sorted(shuffled), 42) == prepare.split(sorted(keys), 42)
    assert prepare.split(keys, 42) != prepare.split(keys, 43)
    assert keys == [f"cat/{i}.txt" for i in range(100)], "split must not shuffle its input in place"


def require_real_corpus(path: Path) -> Path:
    """The real corpus is shared data beside the checkout (CC BY-ND: never in the repository); without it the checks
    against it cannot run, and the skip says so."""
    if not path.exists():
        pytest.skip(f"needs the real livedoor corpus: {path} is not there (shared data beside the checkout, never in "
                    "the repository); put ldcc-20140209.tar.gz and its MANIFEST.sha256 there to check prepare.py "
                    "against it")
    return path


def test_real_corpus_skips_say_why(tmp_path):
    with pytest.raises(pytest.skip.Exception, match="needs the real livedoor corpus: .* is not there"):
        require_real_corpus(tmp_path / "ldcc-20140209.tar.gz")
    assert require_real_corpus(tmp_path) == tmp_path


def test_digest_constant_matches_manifest():
    require_real_corpus(REAL_MANIFEST)
    lines = []
    for entry in REAL_MANIFEST.read_text(encoding="utf-8").splitlines():
        digest, path = entry.split("  ", 1)
        rel = prepare.article_path(path)
        if rel is not None:
            lines.append(f"{rel}\t{digest}\n")
    assert len(lines) == prepare.N_ARTICLES
    assert hashlib.sha256("".join(sorted(lines)).encode()).hexdigest() == prepare.CORPUS_DIGEST


def test_read_limited_checks_while_reading(monkeypatch):
    import io
    monkeypatch.setattr(prepare, "MAX_ARTICLE_BYTES", 100)
    assert prepare.read_limited(io.BytesIO(b"x" * 100), "ok") == b"x" * 100
    with pytest.raises(prepare.UserError, match="decompression bomb"):
        prepare.read_limited(io.BytesIO(b"x" * 101), "big.txt")


# ---------------------------------------------------------------- synthetic corpus end to end

def test_tarball_and_directory_give_identical_files(tmp_path, corpus_tarball, corpus_dir, capsys):
    reversed_tarball = write_tarball(tmp_path / "reversed.tar.gz", corpus_files(), reverse=True)
    outputs = []
    for i, source in enumerate([corpus_tarball, corpus_dir, corpus_dir / "text", reversed_tarball]):
        out = tmp_path / f"out{i}"
        assert prepare.main(["--input", str(source), "--output_dir", str(out), "--no_verify"]) == 0
        outputs.append(snapshot(out))
    assert all(o == outputs[0] for o in outputs[1:])
    assert sorted(outputs[0]) == sorted(OUTPUTS)

    out = tmp_path / "out0"
    label2id = json.loads((out / "label2id.json").read_text(encoding="utf-8"))
    assert label2id == {c: i for i, c in enumerate(sorted(CATEGORIES))}
    all_rows = read_rows(out / "all.jsonl")
    n = len(CATEGORIES) * PER_CATEGORY
    assert len(all_rows) == n and [r["id"] for r in all_rows] == sorted(r["id"] for r in all_rows)
    sizes = [len(read_rows(out / f"{s}.jsonl")) for s in ("train", "val", "test")]
    assert sizes == [len(p) for p in prepare.split(list(range(n)), 42)]
    row = next(r for r in all_rows if r["id"] == "beta-life-1003")
    assert list(row) == ["id", "label", "category", "article_id", "url", "date", "title", "body"]
    assert row == {"id": "beta-life-1003", "label": 1, "category": "beta-life", "article_id": "1003",
                   "url": "http://news.livedoor.com/article/detail/1003/", "date": "2012-01-05T10:00:00+0900",
                   "title": "タイトル beta-life-1003", "body": "beta-lifeの記事1003、本文1行目。\n2行目 ABC"}
    assert "の記事" in (out / "all.jsonl").read_text(encoding="utf-8"), "written as UTF-8, not \\u escapes"
    stdout = capsys.readouterr().out
    assert "duplicate bodies: 1 groups (2 rows)" in stdout and "total" in stdout and " s\n" in stdout


def test_dedupe_keeps_one_of_each_group(tmp_path, corpus_tarball):
    out = tmp_path / "out"
    assert prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify", "--dedupe"]) == 0
    ids = [r["id"] for r in read_rows(out / "all.jsonl")]
    assert len(ids) == len(CATEGORIES) * PER_CATEGORY - 1
    assert DUPLICATE_IDS[0] in ids and DUPLICATE_IDS[1] not in ids


def test_seed_changes_split_not_content(tmp_path, corpus_tarball):
    for seed in ("1", "2"):
        assert prepare.main(["--input", str(corpus_tarball), "--output_dir", str(tmp_path / seed),
                             "--no_verify", "--seed", seed]) == 0
    assert (tmp_path / "1/all.jsonl").read_bytes() == (tmp_path / "2/all.jsonl").read_bytes()
    assert (tmp_path / "1/train.jsonl").read_bytes() != (tmp_path / "2/train.jsonl").read_bytes()


def test_rerun_replaces_previous_dataset(tmp_path, corpus_tarball):
    out = tmp_path / "out"
    assert prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify"]) == 0
    assert prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify", "--dedupe"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.tar.gz", "out"], "no staging dirs left"


def test_verification_rejects_another_corpus(tmp_path, corpus_tarball, capsys):
    out = tmp_path / "out"
    rc = prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out)])
    one_line_error(capsys, rc, "not ldcc-20140209", "36 articles in 3 categories", "--no_verify")
    assert not out.exists()


def test_verification_catches_altered_content(monkeypatch, corpus_tarball, tmp_path):
    articles = prepare.read_tarball(corpus_tarball)
    monkeypatch.setattr(prepare, "N_ARTICLES", len(articles))
    monkeypatch.setattr(prepare, "N_CATEGORIES", len(CATEGORIES))
    monkeypatch.setattr(prepare, "CORPUS_DIGEST", prepare.corpus_digest(articles))
    prepare.verify_corpus(articles, corpus_tarball)
    path = sorted(articles)[5]
    articles[path] = articles[path].replace("本文".encode(), "本分".encode())
    with pytest.raises(prepare.UserError, match="contents differ"):
        prepare.verify_corpus(articles, corpus_tarball)


# ---------------------------------------------------------------- hostile and bad input

BAD_MEMBERS = {
    "traversal": ("text/../../evil.txt", b"x", tarfile.REGTYPE, "", "'..'"),
    "absolute": ("/tmp/evil.txt", b"x", tarfile.REGTYPE, "", "absolute"),
    "symlink": ("text/alpha-news/alpha-news-9.txt", b"", tarfile.SYMTYPE, "/etc/passwd", "symbolic link"),
    "hardlink": ("text/alpha-news/alpha-news-9.txt", b"", tarfile.LNKTYPE, "/etc/passwd", "hard link"),
    "fifo": ("text/alpha-news/fifo", b"", tarfile.FIFOTYPE, "", "device or fifo"),
    "device": ("text/alpha-news/dev", b"", tarfile.CHRTYPE, "", "device or fifo"),
}


@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
def test_refuses_malicious_members(tmp_path, capsys, case):
    name, data, kind, linkname, why = BAD_MEMBERS[case]
    archive = write_tarball(tmp_path / "evil.tar.gz", corpus_files(), extra=[(name, data, kind, linkname)])
    out = tmp_path / "out"
    rc = prepare.main(["--input", str(archive), "--output_dir", str(out), "--no_verify"])
    one_line_error(capsys, rc, "refusing unsafe archive member", why)
    assert not out.exists()
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_refuses_decompression_bomb(tmp_path, capsys):
    bomb = b"\0" * (prepare.MAX_ARTICLE_BYTES + 1)  # about 10 KB once gzipped
    archive = write_tarball(tmp_path / "bomb.tar.gz", {**corpus_files(), "text/alpha-news/alpha-news-9.txt": bomb})
    assert archive.stat().st_size < 200_000
    rc = prepare.main(["--input", str(archive), "--output_dir", str(tmp_path / "out"), "--no_verify"])
    one_line_error(capsys, rc, "alpha-news-9.txt", "MiB limit")
    assert not (tmp_path / "out").exists()


def test_refuses_oversized_file_in_directory(tmp_path, corpus_dir, capsys, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_ARTICLE_BYTES", 1000)
    (corpus_dir / "text/beta-life/beta-life-9.txt").write_bytes(b"x" * 1001)
    rc = prepare.main(["--input", str(corpus_dir), "--output_dir", str(tmp_path / "out"), "--no_verify"])
    one_line_error(capsys, rc, "beta-life-9.txt", "limit")


def test_truncated_gzip(tmp_path, capsys):
    files = {**corpus_files(), **{f"text/alpha-news/alpha-news-{i}.txt": str(i).encode() * 5000 for i in range(50)}}
    data = write_tarball(tmp_path / "full.tar.gz", files).read_bytes()
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    rc = prepare.main(["--input", str(archive), "--output_dir", str(tmp_path / "out"), "--no_verify"])
    one_line_error(capsys, rc, "truncated or corrupt", str(archive))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"this is not an archive\n" * 10, gzip.compress(b"not a tar file" * 100), b""])
def test_not_an_archive(tmp_path, capsys, content):
    archive = tmp_path / "ldcc.tar.gz"
    archive.write_bytes(content)
    rc = prepare.main(["--input", str(archive), "--output_dir", str(tmp_path / "out")])
    one_line_error(capsys, rc, "not a tar")
    assert not (tmp_path / "out").exists()


def test_input_does_not_exist(tmp_path, capsys):
    rc = prepare.main(["--input", str(tmp_path / "missing.tar.gz"), "--output_dir", str(tmp_path / "out")])
    one_line_error(capsys, rc, "does not exist")
    assert not (tmp_path / "out").exists()


def test_directory_without_category_folders(tmp_path, capsys):
    (tmp_path / "empty" / "text").mkdir(parents=True)
    (tmp_path / "empty" / "text" / "README.txt").write_text("x")
    rc = prepare.main(["--input", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])
    one_line_error(capsys, rc, "no category folders")
    assert not (tmp_path / "out").exists()


def test_archive_without_articles(tmp_path, capsys):
    archive = write_tarball(tmp_path / "a.tar.gz", {"text/README.txt": b"x", "other/deep/x/y.txt": b"z"})
    rc = prepare.main(["--input", str(archive), "--output_dir", str(tmp_path / "out")])
    one_line_error(capsys, rc, "no articles")


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty"),
    ("http://x/\n2012\nタイトル\n本文\n".encode("shift_jis"), "text/beta-life/beta-life-9.txt:3: not UTF-8"),
])
def test_bad_article_in_category_folder(tmp_path, corpus_dir, capsys, content, fragment):
    (corpus_dir / "text/beta-life/beta-life-9.txt").write_bytes(content)
    rc = prepare.main(["--input", str(corpus_dir), "--output_dir", str(tmp_path / "out"), "--no_verify"])
    one_line_error(capsys, rc, fragment)
    assert not (tmp_path / "out").exists()


def test_bad_article_in_tarball(tmp_path, capsys):
    archive = write_tarball(tmp_path / "a.tar.gz", {**corpus_files(), "text/beta-life/beta-life-9.txt": b"\x81\x40"})
    rc = prepare.main(["--input", str(archive), "--output_dir", str(tmp_path / "out"), "--no_verify"])
    one_line_error(capsys, rc, "beta-life-9.txt:1: not UTF-8")


@pytest.mark.parametrize("layout", ["tarball", "directory"])
def test_article_name_that_is_not_utf8(tmp_path, capsys, layout):
    # tar and the file system hand over such bytes as lone surrogates, which no UTF-8 file can hold
    files = corpus_files()
    files["text/beta-life/beta-life-\udcff9.txt"] = files["text/beta-life/beta-life-1000.txt"]
    source = (write_tarball(tmp_path / "a.tar.gz", files) if layout == "tarball"
              else write_tree(tmp_path / "extracted", files))
    rc = prepare.main(["--input", str(source), "--output_dir", str(tmp_path / "out"), "--no_verify"])
    one_line_error(capsys, rc, "beta-life/beta-life-\\xff9.txt' is not UTF-8; rename it")
    assert not (tmp_path / "out").exists()


def test_output_path_is_a_file(tmp_path, corpus_tarball, capsys):
    out = tmp_path / "out"
    out.write_text("precious")
    rc = prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify"])
    one_line_error(capsys, rc, "is a file")
    assert out.read_text() == "precious"


def test_read_only_output_dir_is_refused_before_the_input_is_read(tmp_path):
    read_only = tmp_path / "datasets"
    # no such input: a check made after reading it (or after a download) would report that instead
    result = run_on_read_only(read_only, [sys.executable, str(ROOT / "prepare.py"), "--input",
                                          str(tmp_path / "none.jsonl"), "--output_dir", str(read_only / "mine")])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"prepare.py: error: cannot write in {read_only} (Read-only file "
                                              "system): --output_dir needs a directory you can write to")


def test_output_dir_with_other_files_is_left_alone(tmp_path, corpus_tarball, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify"])
    one_line_error(capsys, rc, "notes.txt")
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_failed_run_leaves_previous_dataset_unchanged(tmp_path, corpus_tarball, capsys):
    out = tmp_path / "out"
    assert prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    bad = write_tarball(tmp_path / "bad.tar.gz", corpus_files(), extra=[("../x", b"x", tarfile.REGTYPE, "")])
    rc = prepare.main(["--input", str(bad), "--output_dir", str(out), "--no_verify"])
    one_line_error(capsys, rc, "refusing")
    assert snapshot(out) == before


def test_debug_shows_traceback(tmp_path, monkeypatch):
    """--debug (or BERTCLS_DEBUG=1) lets the error through, so Python prints its traceback and exits 1."""
    with pytest.raises(prepare.UserError, match="does not exist"):
        prepare.main(["--input", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"), "--debug"])
    monkeypatch.setenv("BERTCLS_DEBUG", "1")
    with pytest.raises(prepare.UserError, match="does not exist"):
        prepare.main(["--input", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")])


# ---------------------------------------------------------------- k-fold cross-validation

@pytest.mark.parametrize("k", [3, 4, 5, 10])
@pytest.mark.parametrize("n", [10, 25, 101])
def test_fold_splits_test_and_validate_every_example_once(k, n):
    items = list(range(n))
    folds = prepare.fold_splits(items, seed=7, k=k)
    assert len(folds) == k
    for train, val, test in folds:
        assert sorted(train + val + test) == items  # complete, and no example in two splits of a fold
    assert sorted(x for _, _, test in folds for x in test) == items  # each tested in exactly one fold
    assert sorted(x for _, val, _ in folds for x in val) == items  # each validated in exactly one fold
    parts = prepare.parts(items, 7, k)
    assert [len(p) for p in parts] == [n // k + (i < n % k) for i in range(k)]  # the first n % k one larger
    # (k-2):1:1 by parts; fold i tests on part k-1-i and validates on the part before it
    assert [(val, test) for _, val, test in folds] == [(parts[(k - 2 - i) % k], parts[k - 1 - i]) for i in range(k)]


@pytest.mark.parametrize("n", [*range(10, 31), 7367])
def test_fold_0_of_10_is_the_default_split(n):
    items = [f"cat/{i:05d}.txt" for i in range(n)]
    assert prepare.fold_splits(items, 42, 10)[0] == prepare.split(items, 42)


def test_folds_are_written_next_to_the_default_split(tmp_path, corpus_tarball, capsys):
    out = tmp_path / "out"
    base = ["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify"]
    assert prepare.main(base) == 0
    default = snapshot(out)
    assert prepare.main([*base, "--folds", "10"]) == 0
    assert {p.name for p in out.iterdir()} == {*OUTPUTS, *(f"fold-{i}" for i in range(10))}
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == default  # left as it was
    fold_0 = snapshot(out / "fold-0")
    assert sorted(fold_0) == ["fold.json", "label2id.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"):
        assert fold_0[name] == default[name], name  # byte for byte
    records = [json.loads((out / f"fold-{i}" / "fold.json").read_text()) for i in range(10)]
    assert [(r["fold"], r["folds"], r["seed"]) for r in records] == [(i, 10, 42) for i in range(10)]
    assert len({r["set"] for r in records}) == 1
    tested = [r["id"] for i in range(10) for r in read_rows(out / f"fold-{i}" / "test.jsonl")]
    assert sorted(tested) == sorted(r["id"] for r in read_rows(out / "all.jsonl"))
    stdout = capsys.readouterr().out
    # 36 articles in parts of 4, 4, 4, 4, 4, 4, 3, 3, 3, 3: fold 9 tests on the first, validates on the last
    assert "fold-0: train 30, val 3, test 3\n" in stdout and "fold-9: train 29, val 3, test 4\n" in stdout
    # writing the default split again keeps the folds; fewer folds replace all of the old ones
    folds = {i: snapshot(out / f"fold-{i}") for i in range(10)}
    assert prepare.main(base) == 0
    assert {i: snapshot(out / f"fold-{i}") for i in range(10)} == folds
    assert prepare.main([*base, "--folds", "3", "--seed", "5"]) == 0
    assert {p.name for p in out.iterdir()} == {*OUTPUTS, "fold-0", "fold-1", "fold-2"}
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == default
    assert json.loads((out / "fold-2" / "fold.json").read_text())["set"] != records[0]["set"]
    assert [len(read_rows(out / "fold-1" / f"{s}.jsonl")) for s in ("train", "val", "test")] == [12, 12, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.tar.gz", "out"], "no staging dirs left"


def test_folds_of_own_data(tmp_path, capsys):
    data = write_jsonl(tmp_path / "reviews.jsonl", labelled(50))
    out = tmp_path / "out"
    assert prepare.main(["--input", str(data), "--output_dir", str(out), "--folds", "5"]) == 0
    for i in range(5):
        sizes = [len(read_rows(out / f"fold-{i}" / f"{s}.jsonl")) for s in ("train", "val", "test")]
        assert sizes == [30, 10, 10]  # 3:1:1
        assert json.loads((out / f"fold-{i}" / "label2id.json").read_text()) == {"neg": 0, "pos": 1}
    assert not (out / "train.jsonl").exists()


@pytest.mark.parametrize("folds, fragment", [
    ("2", "--folds 2: a fold needs a train, a val and a test part; use --folds 3 or more"),
    ("0", "use --folds 3 or more"),
    ("37", "--folds 37 is more than the 36 examples: use --folds 36 or fewer"),
])
def test_bad_number_of_folds(tmp_path, corpus_tarball, capsys, folds, fragment):
    out = tmp_path / "out"
    rc = prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify", "--folds", folds])
    one_line_error(capsys, rc, fragment)
    assert not out.exists()


def test_failed_folds_leave_the_previous_ones(tmp_path, corpus_tarball, capsys, monkeypatch):
    out = tmp_path / "out"
    assert prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify", "--folds", "3"]) == 0
    before = {i: snapshot(out / f"fold-{i}") for i in range(3)}
    written = []

    def write_then_fail(output_dir, splits, label2id, *args):
        if written:
            raise prepare.UserError(f"cannot write {output_dir}: No space left on device")
        written.append(output_dir)
        original(output_dir, splits, label2id, *args)

    original = prepare.write_dataset
    monkeypatch.setattr(prepare, "write_dataset", write_then_fail)
    rc = prepare.main(["--input", str(corpus_tarball), "--output_dir", str(out), "--no_verify", "--folds", "4"])
    one_line_error(capsys, rc, "No space left")
    assert {p.name for p in out.iterdir()} == {"fold-0", "fold-1", "fold-2"}
    assert {i: snapshot(out / f"fold-{i}") for i in range(3)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.tar.gz", "out"], "no staging dirs left"


# ---------------------------------------------------------------- bring your own data

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled(n: int, labels=("neg", "pos")) -> list[dict]:
    return [{"text": f"文 {i}", "label": labels[i % len(labels)], "extra": i} for i in range(n)]


def test_own_jsonl_one_text_field(tmp_path, capsys):
    data = write_jsonl(tmp_path / "reviews.jsonl", labelled(40))
    out = tmp_path / "out"
    assert prepare.main(["--input", str(data), "--output_dir", str(out)]) == 0
    assert json.loads((out / "label2id.json").read_text()) == {"neg": 0, "pos": 1}
    rows = read_rows(out / "all.jsonl")
    assert rows[0] == {"id": "0", "label": 0, "category": "neg", "text": "文 0"}
    assert [len(read_rows(out / f"{s}.jsonl")) for s in ("train", "val", "test")] == [32, 4, 4]
    assert capsys.readouterr().err == ""


def test_own_text_with_line_separators_stays_one_line(tmp_path):
    rows = labelled(20) + [{"text": "a\u2028b\u2029c\x85d\re", "label": "pos", "id": "zz"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert prepare.main(["--input", str(data), "--output_dir", str(tmp_path / "out")]) == 0
    lines = (tmp_path / "out/all.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 21 and json.loads(lines[-1])["text"] == "a\u2028b\u2029c\x85d\re"
    assert common.read_jsonl(tmp_path / "out/all.jsonl")[-1]["id"] == "zz"


def test_own_csv_title_body_pair_and_ids(tmp_path):
    data = tmp_path / "news.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "headline", "content", "topic"])
        for i in range(30):
            writer.writerow([f"n{i:02d}", f"見出し{i}", f"本文,{i}\n2行目", ["10", "2", "1"][i % 3]])
    out = tmp_path / "out"
    assert prepare.main(["--input", str(data), "--output_dir", str(out),
                         "--text_fields", "headline,content", "--label_field", "topic"]) == 0
    assert json.loads((out / "label2id.json").read_text()) == {"1": 0, "2": 1, "10": 2}
    row = read_rows(out / "all.jsonl")[4]
    assert row == {"id": "n04", "label": 1, "category": "2", "title": "見出し4", "body": "本文,4\n2行目"}


def reference_csv_rows(text: str) -> list[dict]:
    """The records csv reads from the whole text at once, as a file opened with newline="" gives them."""
    return [r for r in csv.DictReader(io.StringIO(text, newline="")) if any(v not in (None, "") for v in r.values())]


def test_own_csv_read_as_a_stream_gives_the_records_of_the_whole_file(tmp_path):
    records = [["id", "text", "label"]] + [[f"r{i}", f"本文{i}" + ["", ",カンマ", "\n改行", '"引用"', "\r\n行"][i % 5],
                                            "ab"[i % 2]] for i in range(40)]
    buffer = io.StringIO(newline="")
    for i, record in enumerate(records):  # Windows, Unix and old Mac line ends; empty lines between records
        ending = ["\r\n", "\n", "\r"][i % 3]  # csv.writer quotes a field with "\n" only when "\n" ends its lines
        csv.writer(buffer, lineterminator=ending, quoting=csv.QUOTE_ALL if ending == "\r" else csv.QUOTE_MINIMAL
                   ).writerow(record)
        buffer.write("\n" if i % 7 == 3 else "")
    text = "\ufeff" + buffer.getvalue()
    data = tmp_path / "mixed.csv"
    data.write_text(text, encoding="utf-8", newline="")
    expected = reference_csv_rows(text.removeprefix("\ufeff"))
    assert [r["id"] for r in expected] == [f"r{i}" for i in range(40)]
    streamed = list(prepare.iter_csv(data))
    assert [row for *_, row in streamed] == expected
    header = prepare.csv_header(data)
    with open(data, "rb") as f:  # each record's bytes hold that record alone
        assert [prepare.read_record(f, start, end, header, ",") for _, start, end, _ in streamed] == expected
    out = tmp_path / "out"
    assert prepare.main(["--input", str(data), "--output_dir", str(out)]) == 0
    assert [r["text"] for r in read_rows(out / "all.jsonl")] == [r["text"] for r in sorted(expected,
                                                                                            key=lambda r: r["id"])]


def test_own_data_rows_keep_no_texts_and_progress_is_shown(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)  # stderr is not a terminal here: plain lines
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"r{i}", "title": "題" * 50, "body": "本文" * 500,
                                               "label": "ab"[i % 2]} for i in range(20)])
    rows, label2id, own_data = prepare.own_rows(data, ["title", "body"], "label")
    assert [set(r) for r in rows] == [{"id", "label", "category", "at", "body_digest"}] * 20  # ids, not texts
    assert next(own_data.lines(rows[:1])) == common.jsonl_line(
        {"id": "r0", "label": 0, "category": "a", "title": "題" * 50, "body": "本文" * 500})
    assert prepare.main(["--input", str(data), "--output_dir", str(tmp_path / "out"),
                         "--text_fields", "title,body"]) == 0
    err = capsys.readouterr().err
    assert f"reading d.jsonl: {data.stat().st_size / 2**20:.0f}/{data.stat().st_size / 2**20:.0f} MiB (100%)" in err
    assert "writing: 40/40 examples (100%)" in err  # all.jsonl, then train/val/test copied from it


def test_own_data_split_independent_of_line_order(tmp_path):
    rows = [{"id": f"r{i}", "text": str(i), "label": "ab"[i % 2]} for i in range(50)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", rows[::-1])
    for name in "ab":
        assert prepare.main(["--input", str(tmp_path / f"{name}.jsonl"), "--output_dir", str(tmp_path / name)]) == 0
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_own_data_default_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "reviews.jsonl", labelled(20))
    assert prepare.main(["--input", "reviews.jsonl"]) == 0
    assert (tmp_path / "datasets/reviews/train.jsonl").exists()


def test_rare_label_is_a_warning(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", labelled(30) + [{"text": "珍しい", "label": "rare"}])
    assert prepare.main(["--input", str(data), "--output_dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "'rare' (1 examples" in err and "error" not in err


def test_tiny_own_data_warns_of_empty_split(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", labelled(5, labels=("x",)))
    assert prepare.main(["--input", str(data), "--output_dir", str(tmp_path / "out")]) == 0
    assert [len(read_rows(tmp_path / f"out/{s}.jsonl")) for s in ("train", "val", "test")] == [5, 0, 0]
    assert "leave a split empty" in capsys.readouterr().err


@pytest.mark.parametrize("lines, args, fragment", [
    (['{"text": "a", "label": "x"}', '{"text": "b"}'], [], "d.jsonl:2: no field 'label'"),
    (['{"body": "a", "label": "x"}'], [], "no field 'text' (fields there: body, label)"),
    (['{"text": "a", "label": "x"}', '{"text": "b", "label": "y"'], [], "d.jsonl:2: not valid JSON"),
    (['{"text": "a", "label": "x"}', '{"text": "b\\ud800", "label": "y"}'], [],
     "d.jsonl:2: holds a lone surrogate escape such as \\ud800, which is not text"),
    (['[1, 2]'], [], "d.jsonl:1: expected a JSON object"),
    (['{"text": ["a"], "label": "x"}'], [], "expected text"),
    (['{"text": "a", "label": ""}'], [], "empty label"),
    (['{"id": 1, "text": "a", "label": "x"}', '{"id": 1, "text": "b", "label": "x"}'], [], "id '1' already used"),
    ([], [], "no records"),
    (['{"text": "a", "label": "x"}'], ["--text_fields", "a,b,c"], "one field"),
    (['{"text": "a", "label": "x"}'], ["--text_fields", "text,label"], "also a text field"),
])
def test_bad_own_jsonl(tmp_path, capsys, lines, args, fragment):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out"
    rc = prepare.main(["--input", str(data), "--output_dir", str(out), *args])
    one_line_error(capsys, rc, fragment)
    assert not out.exists()


def test_bad_own_csv(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\nhello,x\n", encoding="utf-8")
    rc = prepare.main(["--input", str(data), "--output_dir", str(tmp_path / "out")])
    one_line_error(capsys, rc, "d.csv:2: no field 'text' (fields there: sentence, label)")
    data.write_bytes("text,label\nこんにちは,x\n".encode("cp932"))
    rc = prepare.main(["--input", str(data), "--output_dir", str(tmp_path / "out")])
    one_line_error(capsys, rc, "d.csv:2: not UTF-8")
    assert not (tmp_path / "out").exists()


def test_text_fields_need_own_data(tmp_path, corpus_tarball, capsys):
    rc = prepare.main(["--input", str(corpus_tarball), "--output_dir", str(tmp_path / "o"), "--text_fields", "x"])
    one_line_error(capsys, rc, "own .jsonl/.csv/.tsv input only")


# ---------------------------------------------------------------- download from a local server

class CorpusServer:
    """http.server on 127.0.0.1 in a thread; `drops` requests are cut off halfway after a full Content-Length."""

    def __init__(self, payload: bytes):
        self.payload, self.drops, self.requests = payload, 0, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 5

            def log_message(self, *args):  # keep the test's stderr for prepare.py
                pass

            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][len("bytes="):].rstrip("-"))
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drops:
                    server.drops -= 1
                    body = body[: len(body) // 2]
                self.wfile.write(body)
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ldcc-20140209.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(corpus_tarball, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(prepare, "DOWNLOAD_TIMEOUT_S", 5.0)
    monkeypatch.setattr(prepare, "RETRY_BACKOFF_S", 0.0)
    srv = CorpusServer(corpus_tarball.read_bytes())
    yield srv
    srv.close()


def download_args(server, tmp_path, out="out"):
    return ["--url", server.url, "--download_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / out),
            "--no_verify"]


def test_interrupted_prepare_says_what_it_leaves(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "load", interrupted)
    argv = ["--url", "http://127.0.0.1:9/ldcc-20140209.tar.gz", "--download_dir", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out")]
    assert prepare.main(argv) == 130
    assert capsys.readouterr().err == ("prepare.py: interrupted; no dataset was written (one is swapped into place "
                                       "only when complete)\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ldcc-20140209.tar.gz.part").write_bytes(b"half")
    assert prepare.main(argv) == 130
    assert capsys.readouterr().err.endswith(f"; the partial download {tmp_path / 'data/ldcc-20140209.tar.gz.part'} "
                                            "is kept, and running again resumes it\n")


def test_download_then_reuse(tmp_path, server, capsys):
    assert prepare.main(download_args(server, tmp_path)) == 0
    target = tmp_path / "data/ldcc-20140209.tar.gz"
    assert target.read_bytes() == server.payload
    assert not target.with_name(target.name + ".part").exists()
    captured = capsys.readouterr()
    assert "downloaded" in captured.err and "MiB/s" in captured.err and "downloading" in captured.out
    assert server.requests == [None]
    assert prepare.main(download_args(server, tmp_path, out="out2")) == 0
    assert server.requests == [None], "a complete tarball is reused without a request"
    assert "already downloaded" in capsys.readouterr().out
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "out2")


def test_download_dropped_halfway_then_resumed(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setattr(prepare, "DOWNLOAD_ATTEMPTS", 1)
    server.drops = 1
    rc = prepare.main(download_args(server, tmp_path))
    one_line_error(capsys, rc, "cannot download", "run again to resume")
    target = tmp_path / "data/ldcc-20140209.tar.gz"
    part = target.with_name(target.name + ".part")
    half = len(server.payload) // 2
    assert not target.exists() and part.stat().st_size == half
    assert not (tmp_path / "out").exists()

    assert prepare.main(download_args(server, tmp_path)) == 0
    assert server.requests == [None, f"bytes={half}-"]
    assert target.read_bytes() == server.payload and not part.exists()


def test_download_retries_within_one_run(tmp_path, server, capsys):
    server.drops = 2
    assert prepare.main(download_args(server, tmp_path)) == 0
    assert (tmp_path / "data/ldcc-20140209.tar.gz").read_bytes() == server.payload
    assert len(server.requests) == 3 and server.requests[1].startswith("bytes=")
    assert capsys.readouterr().err.count("warning: download interrupted") == 2


def test_download_http_error_is_not_retried(tmp_path, server, capsys):
    server.url = server.url.replace("ldcc", "missing/ldcc")
    server.payload = b""

    def not_found(handler):
        handler.send_error(404)
    server.httpd.RequestHandlerClass.do_GET = not_found
    rc = prepare.main(download_args(server, tmp_path))
    one_line_error(capsys, rc, "HTTP 404", "--url")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the real corpus

@pytest.fixture(scope="module")
def real_tarball() -> Path:
    return require_real_corpus(REAL_TARBALL)


def test_real_corpus(tmp_path, real_tarball, capsys):
    assert prepare.main(["--input", str(real_tarball), "--output_dir", str(tmp_path / "a")]) == 0
    # a second run, of 10 folds: its fold-0 is the default split byte for byte; every article is tested once
    assert prepare.main(["--input", str(real_tarball), "--output_dir", str(tmp_path / "b"), "--folds", "10"]) == 0
    assert sorted(snapshot(tmp_path / "b" / "fold-0")) == ["fold.json", "label2id.json", "test.jsonl", "train.jsonl",
                                                            "val.jsonl"]
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "label2id.json"):
        assert (tmp_path / "b" / "fold-0" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    tested = [r["id"] for i in range(10) for r in read_rows(tmp_path / "b" / f"fold-{i}" / "test.jsonl")]
    assert len(tested) == len(set(tested)) == 7367
    out = tmp_path / "a"
    sizes = {s: len(read_rows(out / f"{s}.jsonl")) for s in ("all", "train", "val", "test")}
    assert sizes == {"all": 7367, "train": 5895, "val": 736, "test": 736}
    rows = read_rows(out / "all.jsonl")
    per_category = {c: sum(r["category"] == c for r in rows) for c in {r["category"] for r in rows}}
    assert per_category == {"dokujo-tsushin": 870, "it-life-hack": 870, "kaden-channel": 864,
                            "livedoor-homme": 511, "movie-enter": 870, "peachy": 842, "smax": 870,
                            "sports-watch": 900, "topic-news": 770}
    assert len({r["id"] for r in rows}) == 7367
    assert all(r["title"] and r["body"] and r["url"].startswith("http") for r in rows)
    ids = {s: {r["id"] for r in read_rows(out / f"{s}.jsonl")} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    stdout = capsys.readouterr().out
    assert "verified as ldcc-20140209" in stdout and "7 groups (15 rows)" in stdout


def test_real_corpus_altered_or_truncated_is_caught(real_tarball):
    articles = prepare.read_tarball(real_tarball)
    prepare.verify_corpus(articles, real_tarball)
    path = "peachy/peachy-4490543.txt"
    original = articles[path]
    articles[path] = original + b"\n"
    with pytest.raises(prepare.UserError, match="contents differ"):
        prepare.verify_corpus(articles, real_tarball)
    del articles[path]
    with pytest.raises(prepare.UserError, match="7366 articles"):
        prepare.verify_corpus(articles, real_tarball)
