"""Large datasets: tokenization in worker processes, the memory-mapped cache, and what happens when a worker dies
or the user presses Ctrl-C. (Token-for-token equality of workers and one process, per model family, is in
test_families.py.)"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bertcls
import common
import data
from conftest import REPO, finished_runs, train_args, write_dataset
from tokenizer_faults import use_faulty_tokenizer

FAULTS = Path(__file__).resolve().parent / "tokenizer_faults.py"
TRIGGER = "爆発"  # in the 36th training example only: chunk 4 of 8 (examples 31-40) with chunks of 10


@pytest.fixture(scope="module")
def marked_dataset(tmp_path_factory, tiny_rows) -> Path:
    rows = {split: [dict(r) for r in rows] for split, rows in tiny_rows.items()}
    rows["train"][35]["body"] += TRIGGER
    return write_dataset(tmp_path_factory.mktemp("marked") / "data", rows)


def files_under(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*")) if directory.exists() else []


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_tokenize_workers_must_be_a_positive_integer(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bertcls.parse_args(["--tokenize_workers", value])
    assert exit_info.value.code == 2
    assert "--tokenize_workers" in capsys.readouterr().err


def test_default_workers_are_the_cores_this_process_may_use():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert bertcls.parse_args([]).tokenize_workers == min(cores, data.MAX_DEFAULT_WORKERS)
    assert bertcls.parse_args(["--tokenize_workers", "3"]).tokenize_workers == 3


def test_chunks_cover_every_example_once_in_order(tiny_dataset):
    train = data.read_split(tiny_dataset, "train", data.load_label2id(tiny_dataset))
    chunks = data.chunks_of(train, workers=3)  # 80 examples: ceil(80 / 12) = 7 per chunk
    assert [(c.first, c.last) for c in chunks] == [(i, min(i + 7, 80)) for i in range(0, 80, 7)]
    assert [r for c in chunks for r in data.read_rows(train.path, c.start, c.end)] == common.read_jsonl(train.path)


def test_parallel_run_shows_progress_and_matches_one_process(tiny_bert, tiny_dataset, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)  # a plain line per chunk: stderr is not a terminal here
    monkeypatch.setattr(data, "PARALLEL_MIN_EXAMPLES", 0)
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 10)
    args = bertcls.parse_args(train_args(tiny_bert, tiny_dataset, tmp_path, "--tokenize_workers", "2"))
    run = bertcls.Run(args, log=common.log)
    err = capsys.readouterr().err
    assert "tokenizing train: 10/80 examples (12%)" in err  # chunks of 10, one line each
    for split, n in [("train", 80), ("val", 20), ("test", 20)]:
        assert re.search(rf"tokenized {split}: {n} examples in [0-9.]+s \(2 processes\)", err)
        assert f"tokenizing {split}: {n}/{n} examples (100%)" in err
        rows = data.load_split(tiny_dataset, split, run.label2id)
        expected = data.pack(data.tokenize_rows(run.tokenizer, rows, run.spec))  # as predict.py does
        assert run.packed[split].keys() == expected.keys() == {"offsets", "input_ids", "token_type_ids"}
        assert all(torch.equal(run.packed[split][k], expected[k]) for k in expected)


def test_a_failing_worker_names_the_chunk(tiny_bert, marked_dataset, tmp_path, monkeypatch, capsys):
    use_faulty_tokenizer(TRIGGER, "raise", set_attr=monkeypatch.setattr)
    code = bertcls.main(train_args(tiny_bert, marked_dataset, tmp_path / "out", "--tokenize_workers", "2"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert lines[-1].startswith("bertcls.py: error: a tokenization worker failed on examples 31-40 of ")
    assert "train.jsonl (chunk 4 of 8): ValueError: cannot tokenize '爆発'" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert files_under(tmp_path / "out" / "cache") == []


def fault_run(fault: str, model: Path, dataset: Path, output_dir: Path, pid_dir: Path) -> subprocess.Popen:
    command = [sys.executable, str(FAULTS), "--fault", fault, "--trigger", TRIGGER if fault == "kill" else "",
               "--pid_dir", str(pid_dir), "--", *train_args(model, dataset, output_dir, "--tokenize_workers", "2")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_worker_killed_ends_the_run_with_one_line_and_no_cache(tiny_bert, marked_dataset, tmp_path):
    process = fault_run("kill", tiny_bert, marked_dataset, tmp_path / "out", tmp_path)
    _, err = process.communicate(timeout=300)  # a hang fails here
    assert process.returncode == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("bertcls.py: error: a tokenization worker died (killed by SIGKILL, as the "
                                "out-of-memory killer does) while tokenizing examples 31-40 of ")
    assert "train.jsonl (chunk 4 of 8); no cache was written" in lines[-1]
    assert "Traceback" not in err
    assert files_under(tmp_path / "out" / "cache") == []  # no cache file, no half-written one
    assert not finished_runs(tmp_path / "out")


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped; only its exit status is left to collect


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_ctrl_c_stops_every_worker_and_leaves_no_cache(tiny_bert, tiny_dataset, tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    process = fault_run("hang", tiny_bert, tiny_dataset, tmp_path / "out", pid_dir)  # every text hangs
    deadline = time.monotonic() + 240
    while len(list(pid_dir.iterdir())) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p.name) for p in pid_dir.iterdir()]
    assert len(workers) == 2, process.stderr.read() if process.poll() is not None else "workers never started"
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "bertcls.py: interrupted; no run directory was made"
    assert "Traceback" not in err
    deadline = time.monotonic() + 30
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(running, workers))
    assert files_under(tmp_path / "out" / "cache") == []


def test_an_unwritable_cache_directory_is_a_warning(tiny_bert, tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    args = train_args(tiny_bert, tiny_dataset, tmp_path / "out", "--cache_dir", str(blocker / "c"))
    run = bertcls.Run(bertcls.parse_args(args), log=common.log)
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot write the tokenization cache in {blocker / 'c'}; tokenizing without it") == 3
    assert len(data.example_lengths(run.packed["train"])) == 80


# ---------------------------------------------------------------------------------- memory-mapped cache


def resident_anonymous_bytes() -> int:
    """Private memory of this process in RAM (RssAnon): pages of a mapped file are not counted."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_the_cache_is_mapped_not_read(tmp_path):
    n_examples, length = 50_000, 500  # 25M tokens: 100 MB of input_ids
    offsets = torch.arange(n_examples + 1, dtype=torch.int64) * length
    path = tmp_path / "big.pt"
    torch.save({"offsets": offsets, "input_ids": torch.ones(n_examples * length, dtype=torch.int32)}, path)
    before = resident_anonymous_bytes()
    packed = data.load_packed(path, n_examples)
    batch = bertcls.collate(packed, [0, 4_999, 49_999], torch.zeros(n_examples, dtype=torch.long), pad_id=0)
    lengths = data.example_lengths(packed)
    mapped = resident_anonymous_bytes() - before
    assert batch["input_ids"].shape == (3, 504) and lengths[-1] == length
    del packed, batch
    before = resident_anonymous_bytes()
    read = torch.load(path, weights_only=True)  # what the cache was before: read into this process's memory
    copied = resident_anonymous_bytes() - before
    assert copied > 90e6 and read["input_ids"].numel() == 25_000_000
    assert mapped < 20e6  # the offsets (0.4 MB), the example lengths as a list (~2 MB), one batch


def test_the_number_of_workers_does_not_make_another_experiment():
    import sweep
    one, two = (vars(bertcls.parse_args(["--tokenize_workers", n])) for n in ("1", "2"))
    assert one != two and sweep.experiment(one) == sweep.experiment(two)


# ----------------------------------------------------------------------------------- the scale benchmark


def test_bench_scale_runs_end_to_end_at_a_tiny_scale(tmp_path, capsys):
    """Every stage of scripts/bench_scale.py, on 3000 synthetic articles instead of 737k livedoor ones."""
    import json

    from conftest import make_rows
    import bench_scale
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(common.jsonl_line({k: r[k] for k in ("id", "category", "title", "body")})
                              for r in make_rows(1000)), encoding="utf-8")
    assert bench_scale.main(["--corpus", str(corpus), "--copies", "1", "--ratio_examples", "2000",
                             "--max_seq_len", "64", "--tokenize_workers", "2", "--work_dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert out[0].startswith("| | x1 (3000 articles) |")
    x1 = report["x1"]
    assert x1["examples"] == 3000 and x1["prepare"]["seconds"] > 0 and x1["prepare"]["peak_rss_mib"] > 10
    assert report["tokenization_ratio"]["examples"] == 2000 and report["tokenization_ratio"]["speedup"] > 0
    assert x1["alone_cold"]["tokenize_processes"] == 2 and x1["alone_cold"]["cache_mib"] > 0
    assert x1["alone_warm"]["tokenize_processes"] is None  # the warm cache: nothing tokenized
    assert x1["torchrun_cold"]["tokenize_processes"] == 2  # rank 0, with its workers, while rank 1 waited
    for run in ("alone_cold", "alone_warm", "torchrun_cold"):
        ranks = x1[run]["ranks"]
        assert len(ranks) == (2 if run == "torchrun_cold" else 1)
        assert all(0 < r["cache_rss_mib"] <= x1[run]["cache_mib"] + 0.1 < r["peak_rss_mib"] for r in ranks)
    lines = (tmp_path / "w" / "corpus-x1.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3000 and len({json.loads(line)["id"] for line in lines}) == 3000
    article = {"id": "a", "category": "c", "title": "t", "body": "一\n二\n三\n四"}
    copy = bench_scale.edited(article, 7, random.Random(0))  # copies after the first: a new id, lightly edited
    body_lines = copy["body"].split("\n")
    assert copy["id"] == "a-7" and copy["title"] == "t" and len(body_lines) == 4 and "（写し7）" in body_lines
    assert len(set(body_lines) & {"一", "二", "三", "四"}) == 3
