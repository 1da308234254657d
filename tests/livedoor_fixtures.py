"""Small synthetic corpora in the livedoor layout (text/<category>/<category>-<id>.txt) for tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

CATEGORIES = ("alpha-news", "beta-life", "gamma-sports")
PER_CATEGORY = 12
# Two articles with the same body under different ids, like the 7 groups in the real corpus.
DUPLICATE_IDS = ("alpha-news-1001", "alpha-news-1002")


def article_text(category: str, article_id: int) -> str:
    stem = f"{category}-{article_id}"
    if stem in DUPLICATE_IDS:
        body = "同じ本文です。\n"
    else:  # full-width digits and letters, spaces at line ends and an empty line for normalisation to fix
        body = f"　{category}の記事{article_id}、本文１行目。　\n\n  ２行目 ＡＢＣ \n"
    return (f"http://news.livedoor.com/article/detail/{article_id}/\n"
            f"2012-01-0{1 + article_id % 9}T10:00:00+0900\n"
            f"タイトル　{stem}　\n{body}")


def corpus_files(categories=CATEGORIES, per_category: int = PER_CATEGORY) -> dict[str, bytes]:
    """Relative path -> bytes of a whole tree, non-article files included."""
    files = {"text/README.txt": b"readme\n", "text/CHANGES.txt": b"changes\n"}
    for category in categories:
        files[f"text/{category}/LICENSE.txt"] = b"license\n"
        for i in range(per_category):
            article_id = 1000 + i
            files[f"text/{category}/{category}-{article_id}.txt"] = article_text(category, article_id).encode("utf-8")
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               linkname: str = "", size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if size is None else size
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_tarball(path: Path, files: dict[str, bytes], reverse: bool = False, extra=()) -> Path:
    """A tar.gz holding files (directories first, like GNU tar), then extra (name, data, kind, linkname)."""
    names = sorted(files, reverse=reverse)
    with tarfile.open(path, "w:gz") as tar:
        for folder in sorted({str(Path(n).parent) for n in names}):
            add_member(tar, folder, kind=tarfile.DIRTYPE)
        for name in names:
            add_member(tar, name, files[name])
        for name, data, kind, linkname in extra:
            add_member(tar, name, data, kind, linkname)
    return path
