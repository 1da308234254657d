"""Large datasets: tokenization in worker processes, the memory-mapped cache (reused, invalidated, never used
damaged, optional), what happens when a worker dies or the user presses Ctrl-C, and a run that keeps no texts."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import bertcls
import common
import data
import models
from conftest import (build_tiny_bert_japanese, build_tiny_luke, finished_runs, make_rows, train_args,
                      train_tiny_sentencepiece, write_dataset)

TRIGGER = "爆発"  # in one training example only


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def large_dataset(tmp_path_factory) -> Path:
    """A training split just past data.POOL_MIN_EXAMPLES: the smallest that worker processes tokenize."""
    rows = make_rows(700, seed=1)  # 2100 articles
    assert len(rows) - 40 >= data.POOL_MIN_EXAMPLES
    return write_dataset(tmp_path_factory.mktemp("large") / "data", {"train": rows[:-40], "val": rows[-40:-20],
                                                                      "test": rows[-20:]})


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return models.load_tokenizer(str(tiny_bert), log=quiet)


def splits_of(dataset: Path) -> dict[str, data.Split]:
    return data.load_dataset(dataset, quiet)[1]


def same_tokens(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def entries(cache: Path) -> list[Path]:
    """Every cache entry and temporary directory under cache."""
    return sorted(cache.iterdir()) if cache.exists() else []


# -------------------------------------------------------------------------------------------- worker processes


def test_tokenize_workers_must_be_a_positive_integer(capsys):
    for value in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exit_info:
            bertcls.parse_args(["--tokenize_workers", value])
        assert exit_info.value.code == 2
    assert "--tokenize_workers" in capsys.readouterr().err
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert bertcls.parse_args([]).tokenize_workers == min(16, cores)


def test_the_number_of_workers_does_not_make_another_experiment():
    one, two = ({"args": vars(bertcls.parse_args(["--tokenize_workers", n]))} for n in ("1", "2"))
    assert one != two and bertcls.experiment(one) == bertcls.experiment(two)


def test_worker_processes_give_exactly_the_tokens_of_one_process(large_dataset, tokenizer, monkeypatch):
    pools = []

    class RecordedPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, workers, *args, **kwargs):
            pools.append(workers)
            super().__init__(workers, *args, **kwargs)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", RecordedPool)
    monkeypatch.setattr(data, "CHUNK", 300)  # 7 chunks, appended in order whichever worker ends first
    train = splits_of(large_dataset)["train"]
    spec = data.InputSpec(8, True, "head_tail")  # titles cut: the counts come back from the workers too
    logs = {1: [], 2: []}
    packed = {w: data.tokenized("train", train, tokenizer, spec, "", w, logs[w].append, show=False) for w in (1, 2)}
    assert pools == [2]  # one process, then a pool of 2
    assert same_tokens(packed[1], packed[2])
    assert len(data.lengths_of(packed[2])) == len(train.labels) >= data.POOL_MIN_EXAMPLES
    [one], [two] = ([re.sub(r" in [0-9.]+s", "", line) for line in lines] for lines in logs.values())
    assert one == two and "titles alone are longer than 8 tokens" in one


def test_a_smaller_split_is_tokenized_in_this_process(tiny_dataset, tokenizer, monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a pool for fewer than POOL_MIN_EXAMPLES examples")
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    packed = data.tokenized("train", splits_of(tiny_dataset)["train"], tokenizer, data.InputSpec(32, True), "", 8,
                            quiet, show=False)
    assert len(data.lengths_of(packed)) == 80


@pytest.mark.parametrize("family", ["v1", "luke"])
def test_workers_unpickle_the_tokenizer_as_it_was_fixed(tmp_path, corpus_texts, family):
    """A worker tokenizes with the parent's tokenizer, unpickled: v1's IPAdic and LUKE's numbering must survive."""
    if family == "v1":
        model_dir = build_tiny_bert_japanese(tmp_path / "v1", corpus_texts, "ipadic", names_dictionary=False)
    else:
        model_dir = build_tiny_luke(tmp_path / "luke", train_tiny_sentencepiece(corpus_texts))
    notes = []
    parent = models.load_tokenizer(str(model_dir), log=notes.append)
    assert len(notes) == 1  # the fix was made
    worker = pickle.loads(pickle.dumps(parent))
    spec = data.InputSpec(64, True)
    for title, body in zip(corpus_texts[::2][:20], corpus_texts[1::2][:20]):
        assert data.encode(worker, title, body, spec) == data.encode(parent, title, body, spec)
    assert type(worker) is type(parent)


# ----------------------------------------------------------------------------------------------------- the cache


def cache_files(cache: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of every file in the cache."""
    return {str(p.relative_to(cache)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*")}


def test_the_cache_is_reused_and_invalidated_by_what_changes_the_tokens(tiny_dataset, tiny_bert, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    dataset = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    spec = data.InputSpec(32, True)

    def tokenize(split: data.Split, tokenizer=tokenizer, spec=spec) -> tuple[dict, list[str]]:
        logs = []
        packed = data.tokenized("train", split, tokenizer, spec, str(cache), 1, logs.append, show=False,
                                fingerprint=data.tokenizer_fingerprint(tokenizer))
        return packed, logs

    train = splits_of(dataset)["train"]
    first, logs = tokenize(train)
    assert len(logs) == 1 and logs[0].startswith("tokenized train: 80 examples")
    files = cache_files(cache)
    assert len(entries(cache)) == 1 and {Path(f).name for f in files} >= {"offsets.bin", "input_ids.bin",
                                                                           "token_type_ids.bin"}
    again, logs = tokenize(train)
    assert logs == [] and same_tokens(first, again)
    assert cache_files(cache) == files  # read, not written again
    # what changes the tokens makes an entry of its own: the tokenizer, the length, the data
    ipadic = models.load_tokenizer(str(tiny_bert), mecab_dic="ipadic", log=quiet)
    assert len(tokenize(train, tokenizer=ipadic)[1]) == 1
    longer, logs = tokenize(train, spec=data.InputSpec(48, True))
    assert len(logs) == 1 and not same_tokens(first, longer)
    rows = (dataset / "train.jsonl").read_text(encoding="utf-8")
    (dataset / "train.jsonl").write_text(rows.replace("話題", "話題！", 1), encoding="utf-8")
    changed, logs = tokenize(splits_of(dataset)["train"])
    assert len(logs) == 1 and not same_tokens(first, changed)
    assert len(entries(cache)) == 4
    assert {k: v for k, v in cache_files(cache).items() if k in files} == files  # the first entry untouched


def damage_truncated_ids(entry: Path) -> None:
    ids = entry / "input_ids.bin"
    ids.write_bytes(ids.read_bytes()[:-4])


def damage_offsets(entry: Path) -> None:
    offsets = torch.tensor(bytearray((entry / "offsets.bin").read_bytes()), dtype=torch.uint8).view(torch.int64)
    offsets[5] = offsets[6] + 1  # no longer increasing
    (entry / "offsets.bin").write_bytes(offsets.view(torch.uint8).numpy().tobytes())


def damage_short_offsets(entry: Path) -> None:
    (entry / "offsets.bin").write_bytes((entry / "offsets.bin").read_bytes()[:80])


def damage_missing_ids(entry: Path) -> None:
    (entry / "input_ids.bin").unlink()


def damage_missing_token_types(entry: Path) -> None:
    (entry / "token_type_ids.bin").unlink()


@pytest.mark.parametrize("damage", [
    damage_truncated_ids, damage_offsets, damage_short_offsets, damage_missing_ids,
    damage_missing_token_types,
])
def test_a_damaged_cache_entry_is_warned_about_and_rebuilt(tiny_dataset, tokenizer, tmp_path, damage):
    cache, spec = tmp_path / "cache", data.InputSpec(32, True)
    train = splits_of(tiny_dataset)["train"]
    fingerprint = data.tokenizer_fingerprint(tokenizer)
    first = data.tokenized("train", train, tokenizer, spec, str(cache), 1, quiet, False, fingerprint)
    first = {k: v.clone() for k, v in first.items()}  # the files are mapped, and damaged below
    [entry] = entries(cache)
    damage(entry)
    logs = []
    again = data.tokenized("train", train, tokenizer, spec, str(cache), 1, logs.append, False, fingerprint)
    assert [line.split(":")[0] for line in logs] == ["warning", "tokenized train"], logs
    assert logs[0].startswith(f"warning: ignoring the tokenization cache {entry}: ")
    assert logs[0].endswith("; tokenizing again")
    assert same_tokens(first, again)
    assert entries(cache) == [entry]  # rebuilt in place: the next run reads it
    assert same_tokens(first, data.load_tokens(entry, 80, True))


def test_a_cache_dir_that_is_a_file_is_a_warning_and_the_run_goes_on(tiny_bert, tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, tmp_path / "out", "--epochs", "1", "--max_seq_len", "32",
                                   "--cache_dir", str(blocker))) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot use the tokenization cache in {blocker} (") == 3  # train, val, test
    assert blocker.read_text() == "not a directory"
    assert len(finished_runs(tmp_path / "out")) == 1


def test_a_split_changed_after_it_was_checked_is_one_line(tiny_dataset, tokenizer, tmp_path):
    dataset = tmp_path / "data"
    shutil.copytree(tiny_dataset, dataset)
    train = splits_of(dataset)["train"]
    (dataset / "train.jsonl").write_text("{not json\n" * len(train.labels), encoding="utf-8")
    with pytest.raises(common.UserError, match=r"train.jsonl changed while it was being read: run again"):
        data.tokenized("train", train, tokenizer, data.InputSpec(32, True), "", 1, quiet, False)


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A directory nobody may write in, root included (the tests run as root in CI): chattr +i where the file system
    has it."""
    directory = tmp_path / "shared-cache"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("no immutable directories here (chattr +i)")
    try:
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_cache_dir_that_cannot_be_written_is_a_warning_and_the_run_goes_on(tiny_bert, tiny_dataset, tmp_path,
                                                                             unwritable_dir, capsys):
    with pytest.raises(PermissionError):
        (unwritable_dir / "probe").mkdir()
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, tmp_path / "out", "--epochs", "1", "--max_seq_len", "32",
                                   "--cache_dir", str(unwritable_dir))) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot use the tokenization cache in {unwritable_dir} (") == 3
    assert list(unwritable_dir.iterdir()) == []
    assert len(finished_runs(tmp_path / "out")) == 1


# ------------------------------------------------------------------------------------- workers that die, Ctrl-C


class FaultyTokenizer:
    """Behaves as `inner` until a text holds TRIGGER, then, in a worker process: kill (it dies of SIGKILL, as the
    out-of-memory killer does it) or interrupt (Ctrl-C reaches the parent, whose pid it was made with, then the
    worker goes on). Worker processes unpickle it by importing this module."""

    def __init__(self, inner: Any, fault: str):
        self.inner, self.fault, self.parent = inner, fault, os.getpid()

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        if TRIGGER in text and os.getpid() != self.parent:
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os.kill(self.parent, signal.SIGINT)
            time.sleep(1)
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet while unpickling
            raise AttributeError(name)
        return getattr(self.inner, name)


@pytest.fixture
def faulty_run(tiny_bert, tiny_rows, tmp_path, monkeypatch):
    """bertcls.main with a FaultyTokenizer and worker processes in chunks of 10 for the tiny splits; TRIGGER in
    training example 45 (chunk 5 of 8). Returns a function of the fault giving (exit code, stderr lines)."""
    rows = {split: [dict(r) for r in split_rows] for split, split_rows in tiny_rows.items()}
    rows["train"][44]["body"] += TRIGGER
    dataset = write_dataset(tmp_path / "data", rows)
    monkeypatch.setattr(data, "POOL_MIN_EXAMPLES", 0)
    monkeypatch.setattr(data, "CHUNK", 10)

    def run(fault: str, capsys) -> tuple[int, list[str]]:
        monkeypatch.setattr(bertcls, "load_tokenizer", lambda *args, **kwargs: FaultyTokenizer(
            models.load_tokenizer(*args, **kwargs), fault))
        code = bertcls.main(train_args(tiny_bert, dataset, tmp_path / "out", "--tokenize_workers", "2",
                                       "--max_seq_len", "32", "--epochs", "1"))
        return code, capsys.readouterr().err.strip().splitlines()
    return run


def test_a_worker_killed_ends_the_run_with_one_line_and_no_cache(faulty_run, tmp_path, capsys):
    code, lines = faulty_run("kill", capsys)
    assert code == 1
    assert lines[-1] == (f"bertcls.py: error: a tokenization worker died while tokenizing {tmp_path}/data/train.jsonl "
                         "(out of memory?): nothing was cached; lower --tokenize_workers")
    assert not any("Traceback" in line for line in lines)
    assert entries(tmp_path / "out" / "cache") == []  # no entry, no half-written one
    assert not list((tmp_path / "out").rglob("config.json"))
    assert multiprocessing.active_children() == []


def test_ctrl_c_during_tokenization_leaves_no_cache_entry(faulty_run, tmp_path, capsys):
    code, lines = faulty_run("interrupt", capsys)
    assert code == 130
    assert lines[-1] == "bertcls.py: interrupted; no run was started"
    assert not any("Traceback" in line for line in lines)
    assert entries(tmp_path / "out" / "cache") == []
    assert not list((tmp_path / "out").rglob("config.json"))
    assert multiprocessing.active_children() == []  # every worker stopped


# ---------------------------------------------------------------------------------------------------- memory


def test_a_run_keeps_no_texts(tiny_dataset, tiny_rows):
    """A split is its labels and the offsets of its lines: a run's memory does not grow with its texts."""
    splits = splits_of(tiny_dataset)
    train = splits["train"]
    assert data.Split._fields == ("path", "labels", "starts", "digest", "pairs")
    assert train.labels.tolist() == [r["label"] for r in tiny_rows["train"]]
    assert len(train.starts) == 81 and train.starts[-1] == (tiny_dataset / "train.jsonl").stat().st_size
    kept = pickle.dumps(splits)
    assert not any(r["title"].encode() in kept or r["body"].encode() in kept for r in tiny_rows["train"])
    assert len(kept) < (tiny_dataset / "train.jsonl").stat().st_size / 4
    line = (tiny_dataset / "train.jsonl").read_bytes()[train.starts[7]:train.starts[8]]
    assert line.decode("utf-8").startswith('{"id": "' + tiny_rows["train"][7]["id"])
