"""The developer scripts in scripts/: bench.py's figures, make_tiny.py's model and corpus, gpu_check.py on a machine
without CUDA, and long_context_bench.py and bench_scale.py on the smallest settings that still measure something."""

from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import bench
import common
import data
import make_tiny
from conftest import REPO, make_rows, run_script, train_args, write_dataset

BENCH_KEYS = {"mode", "model_name", "device", "device_name", "dtype", "compile", "always_mask", "batch_size",
              "max_seq_len", "steps", "examples", "seconds", "warmup_s", "examples_per_s", "tokens_per_s",
              "padding_fraction", "mean_padded_len", "params_non_embedding", "flops_per_token", "peak_flops",
              "peak_flops_source", "mfu", "peak_mem_mb", "train_loss", "step_ms", "host_data_ms_per_step"}


def bench_json(capsys, *argv: str) -> dict:
    """bench.py's result: its stdout is a summary line, then the JSON line, last."""
    assert bench.main(list(argv)) == 0
    summary, last = capsys.readouterr().out.strip().splitlines()
    assert not summary.startswith("{")
    return json.loads(last)


# ------------------------------------------------------------------------------------------------ bench.py


@pytest.mark.parametrize("mode", ["bertcls", "tutorial_style"])
def test_bench_prints_one_json_line_with_sane_figures(mode, tiny_bert, tiny_dataset, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification
    # the tutorial's run takes the peak from --peak_flops (measuring it takes seconds); the other measures it
    flags = ["--tutorial_style", "--peak_flops", "1e10"] if mode == "tutorial_style" else []
    result = bench_json(capsys, *train_args(tiny_bert, tiny_dataset, tmp_path), "--steps", "3", "--warmup", "1", *flags)
    assert set(result) == BENCH_KEYS and result["mode"] == mode
    # --dtype auto: bf16 on a CPU with bf16 matrix units (AVX512-BF16, AMX), else fp32; the peak in the same dtype
    dtype = common.dtype_name(common.resolve_dtype("auto", torch.device("cpu")))
    assert (result["device"], result["dtype"]) == ("cpu", dtype)
    assert result["peak_flops_source"] == ("--peak_flops" if flags else f"{dtype} matmul 2048x2048")
    assert flags or (result["peak_flops"] > 1e9 and 0 < result["mfu"] < 1)  # a measured peak is a peak
    assert result["examples"] == 3 * 8  # the timed steps x --batch_size: the warmup step is not counted
    # within the rounding of "seconds" to the millisecond
    assert result["examples_per_s"] * result["seconds"] == pytest.approx(24, rel=1e-3 + 0.0005 / result["seconds"])
    assert result["step_ms"] == pytest.approx(1000 * result["seconds"] / 3, abs=0.2)
    assert 0 <= result["padding_fraction"] < 1 and 0 < result["mean_padded_len"] <= 64
    assert result["peak_mem_mb"] > 100  # this process's peak resident memory, torch and transformers loaded
    assert 0 < result["host_data_ms_per_step"] < result["step_ms"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)  # 2 layers, hidden 64
    config, total = model.config, sum(p.numel() for p in model.parameters())
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * config.hidden_size
    assert result["params_non_embedding"] == total - embeddings
    per_token = 6 * (total - embeddings) + 12 * 2 * 64 * result["mean_padded_len"]
    assert result["flops_per_token"] == pytest.approx(per_token, rel=1e-4)
    assert result["mfu"] == pytest.approx(per_token * result["tokens_per_s"] / result["peak_flops"], rel=1e-3, abs=1e-5)


def test_bench_counts_accumulated_micro_batches_takes_peak_flops_and_profiles_on_the_cpu(tiny_bert, tiny_dataset,
                                                                                          tmp_path, capsys):
    result = bench_json(capsys, *train_args(tiny_bert, tiny_dataset, tmp_path), "--steps", "2", "--warmup", "0",
                        "--grad_accum_steps", "2", "--peak_flops", "1e10", "--profile_steps", "1")
    assert result["examples"] == 2 * 2 * 8  # steps x micro-batches x batch: the profiled step is not counted
    assert (result["peak_flops"], result["peak_flops_source"]) == (10**10, "--peak_flops")
    assert result["mfu"] == pytest.approx(result["flops_per_token"] * result["tokens_per_s"] / 1e10, rel=1e-3, abs=1e-5)
    assert set(result) - BENCH_KEYS == {"profile_steps"} and result["profile_steps"] == 1  # the rest needs CUDA


def single_texts(rows: list[dict]) -> list[dict]:
    """The rows with one long text each (title and three bodies: over the tiny model's 128 positions) and no pair."""
    return [{"id": r["id"], "label": r["label"], "category": r["category"], "text": r["title"] + r["body"] * 3}
            for r in rows]


def test_bench_tutorial_style_on_single_texts(tiny_bert, tiny_rows, tmp_path, capsys):
    """The split has no pairs: its texts are tokenized alone and cut to --max_seq_len 64 (a None second text left
    them uncut, past the model's positions)."""
    dataset = write_dataset(tmp_path / "single", {s: single_texts(rows) for s, rows in tiny_rows.items()})
    result = bench_json(capsys, *train_args(tiny_bert, dataset, tmp_path / "out"), "--tutorial_style", "--steps", "2",
                        "--warmup", "0", "--peak_flops", "1e10")
    assert result["mode"] == "tutorial_style" and result["examples"] == 2 * 8
    assert result["mean_padded_len"] == 64 and result["padding_fraction"] >= 0  # every text is longer than 64 tokens


@pytest.mark.parametrize("pairs", [False, True])
def test_bench_tutorial_batches_are_pairs_only_when_the_split_has_pairs(tiny_bert, tiny_rows, pairs):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = tiny_rows["train"][:4] if pairs else single_texts(tiny_rows["train"][:4])
    inputs = SimpleNamespace(labels=torch.arange(4), packed={"offsets": torch.arange(5)})
    counted = bench.Counted(inputs, SimpleNamespace(always_mask=False), tokenizer, data.InputSpec(32, True), rows,
                            pairs)
    batch = counted.batch([0, 1, 2, 3], torch.device("cpu"))
    assert batch["input_ids"].shape == (4, 32)  # cut to max_len
    assert (batch["input_ids"] == tokenizer.sep_token_id).sum(1).tolist() == [1 + pairs] * 4
    assert bool(batch["token_type_ids"].any()) == pairs
    if not pairs:
        expected = [tokenizer(r["text"], truncation=True, max_length=32)["input_ids"] for r in rows]
        assert batch["input_ids"].tolist() == expected


@pytest.mark.parametrize("flag, value, expected", [("--steps", "0", "a positive integer"),
                                                   ("--warmup", "-1", "an integer >= 0"),
                                                   ("--profile_steps", "-1", "an integer >= 0")])
def test_bench_refuses_counts_out_of_range(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args([flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}: expected {expected}, got {value}" in capsys.readouterr().err
    args = bench.parse_args(["--steps", "1", "--warmup", "0", "--profile_steps", "0"])
    assert (args.steps, args.warmup, args.profile_steps) == (1, 0, 0)


# ------------------------------------------------------------------------------------------- make_tiny.py


def test_make_tiny_writes_a_model_transformers_loads_and_the_rows_asked_for(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model_dir, corpus = tmp_path / "m", tmp_path / "d.jsonl"
    assert make_tiny.main(["--model_dir", str(model_dir), "--data", str(corpus), "--per_category", "5", "--layers",
                           "1", "--hidden", "32", "--vocab_size", "300", "--min_sentences", "3", "--max_sentences",
                           "4"]) == 0
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert Counter(r["category"] for r in rows) == {"movie": 5, "sports": 5, "tech": 5}
    assert len({r["id"] for r in rows}) == 15 and all(3 <= len(r["body"].split("\n")) <= 4 for r in rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (1, 32, 300)
    assert len(tokenizer) == 300  # the corpus's characters, padded with unused entries
    batch = tokenizer([r["title"] for r in rows], [r["body"] for r in rows], padding=True, return_tensors="pt")
    assert tokenizer.unk_token_id not in batch["input_ids"]
    assert model(**batch).logits.shape == (15, 3)
    assert make_tiny.make_rows(5, 8, seed=0) == make_tiny.make_rows(5, 8, seed=0) != make_tiny.make_rows(5, 8, seed=1)


# ------------------------------------------------------------------------------------------- gpu_check.py


def test_gpu_check_without_cuda_runs_its_cpu_part_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "out"
    result = run_script("scripts/gpu_check.py", "--out_dir", out, "--budget_s", "5", env={"CUDA_VISIBLE_DEVICES": ""},
                        timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["gpu"] is None and summary["machine"]["torch"] == torch.__version__
    [row] = summary["rows"]  # the one CPU setting, run although it needs more than the budget: the first always runs
    assert (row["name"], row["rc"], row["device"], row["examples"]) == ("eager cpu", 0, "cpu", 3 * 8)
    [skipped] = summary["skipped"]
    assert skipped.startswith("without CUDA: tests/test_cuda.py") and "HF Trainer" in skipped
    assert "== summary" in result.stdout and {p.name for p in out.iterdir()} >= {"make_tiny.log", "prepare.log",
                                                                                 "eager-cpu.log", "summary.json"}


# ----------------------------------------------------------------------------------- long_context_bench.py


def test_long_context_bench_compares_both_shapes_at_each_length(tmp_path, capsys, monkeypatch):
    """Its smallest setting, with each bench.py command line run by bench.main in this process (a process per run
    would add some 10 s of imports each): what is tested is the models, the corpus, the commands and the report."""
    import long_context_bench
    commands = []

    def bench_in_process(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        commands.append(command)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            rc = bench.main(command[2:])
        return subprocess.CompletedProcess(command, rc, out.getvalue(), "")

    monkeypatch.setattr(long_context_bench.subprocess, "run", bench_in_process)
    assert long_context_bench.main(["--lengths", "64", "--max_batch_tokens", "256", "--hidden", "32", "--layers", "3",
                                    "--heads", "2", "--local_attention", "16", "--steps", "1", "--warmup", "0",
                                    "--work_dir", str(tmp_path), "--output", str(tmp_path / "results.json")]) == 0
    assert [c[1] for c in commands] == [str(REPO / "scripts" / "bench.py")] * 2
    lines = capsys.readouterr().out.strip().splitlines()
    results = json.loads(lines[-1])
    assert results == json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [(r["shape"], r["max_seq_len"], r["max_batch_tokens"]) for r in results] == [("bert", 64, 256),
                                                                                       ("modernbert", 64, 256)]
    for r in results:
        assert r["examples"] == 4 and r["padding_fraction"] == 0  # 256 tokens hold 4 examples of 64, all long
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 100
    types = [json.loads((tmp_path / f"{s}-shape" / "config.json").read_text())["model_type"] for s in ("bert",
                                                                                                     "modernbert")]
    assert types == ["bert", "modernbert"]
    bert, modernbert = (r["params_non_embedding"] for r in results)
    assert abs(bert - modernbert) < 0.05 * bert  # the same size: what differs is the architecture
    assert lines[2].startswith("| bert | 64 | 4 | ") and lines[3].startswith("| modernbert | 64 | 4 | ")


@pytest.mark.parametrize("returncode, stderr, error", [
    (-9, "", "killed by SIGKILL (out of memory?)"),  # the OOM killer: bench.py could not say why
    (1, "warning: the warmup is longer than the run\nbench.py: error: out of memory: lower --batch_size\n",
     "bench.py: error: out of memory: lower --batch_size"),  # the error line, not the last warning
    (1, "Traceback (most recent call last):\n  ...\n", "exit 1")])
def test_long_context_bench_says_why_a_run_failed(monkeypatch, tmp_path, returncode, stderr, error):
    import long_context_bench
    monkeypatch.setattr(long_context_bench.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a[0], returncode, stdout="", stderr=stderr))
    args = long_context_bench.parse_args(["--work_dir", str(tmp_path)])
    assert long_context_bench.bench_run(tmp_path / "m", tmp_path / "d", 8192, args) == {"error": error}
    assert long_context_bench.table_row("bert", 8192, {"error": error}) == f"| bert | 8192 | | | | | {error} |"


# ------------------------------------------------------------------------------------------ bench_scale.py
# A whole run, even on one copy of 2,000 articles, takes minutes (prepare.py, MeCab, three bertcls.py processes, one of
# them under torchrun): its parts are tested here, each on the product code it measures.


def test_bench_scale_copies_are_distinct_and_lightly_edited(tmp_path):
    import bench_scale
    article = {"id": "a", "category": "c", "title": "t", "body": "一\n二\n三\n四"}
    assert bench_scale.edited(article, 0, random.Random(0)) is article
    copy = bench_scale.edited(article, 7, random.Random(0))
    body = copy["body"].split("\n")
    assert (copy["id"], copy["title"], copy["category"], len(body)) == ("a-7", "t", "c", 4) and "（写し7）" in body
    assert len(set(body) & {"一", "二", "三", "四"}) == 3  # one line dropped, one marker added
    short = bench_scale.edited({**article, "body": "一\n二"}, 1, random.Random(0))
    assert short["body"].count("\n") == 2  # 2 lines: none dropped, the marker added
    assert bench_scale.write_corpus([article, {**article, "id": "b"}], 3, tmp_path / "c.jsonl") == 6
    ids = [row["id"] for *_, row in common.iter_jsonl(tmp_path / "c.jsonl")]
    assert ids == ["a", "b", "a-1", "b-1", "a-2", "b-2"]


def test_bench_scale_tokenization_ratio_times_one_process_and_workers(tmp_path, monkeypatch):
    import bench_scale
    rows = make_rows(700)  # 2,100: the least that starts worker processes is 2,000
    dataset = write_dataset(tmp_path / "d", {"train": rows[:2040], "val": rows[2040:2070], "test": rows[2070:]})
    vocab = make_tiny.wordpiece_vocab([r[f] for r in rows for f in ("title", "body")], 0)
    make_tiny.build_model(tmp_path / "m", vocab, make_tiny.parse_args(["--layers", "1", "--hidden", "16"]))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    calls = []
    tokenize_split = data.tokenize_split
    monkeypatch.setattr(data, "tokenize_split", lambda split, *a: calls.append((len(split.labels), a[2])) or
                        tokenize_split(split, *a))
    ratio = bench_scale.tokenization_ratio(tokenizer, dataset, 5000, 2, 64, tmp_path)
    assert calls == [(2040, 1), (2040, 2)]  # the whole train split (fewer than asked), then 2 worker processes
    assert ratio["examples"] == 2040 and ratio["workers"] == 2
    assert ratio["seconds_1"] > 0 and ratio["seconds_workers"] > 0 and ratio["speedup"] > 0
    with pytest.raises(common.UserError, match="30 training examples are fewer than the 2000"):
        bench_scale.tokenization_ratio(tokenizer, write_dataset(tmp_path / "small", {
            "train": rows[:30], "val": rows[30:40], "test": rows[40:50]}), 5000, 2, 64, tmp_path)


def test_bench_scale_memory_status_counts_the_mapped_cache_apart(tmp_path):
    """A cache entry as data.tokenized maps it: its resident pages count as the cache's, not as private memory."""
    import bench_scale
    entry = tmp_path / "cache" / "key"
    entry.mkdir(parents=True)
    n_tokens = 2**20  # 4 MiB of int32 ids
    (entry / "offsets.bin").write_bytes(torch.tensor([0, n_tokens], dtype=torch.int64).numpy().tobytes())
    (entry / "input_ids.bin").write_bytes(torch.arange(n_tokens, dtype=torch.int32).numpy().tobytes())
    before = bench_scale.memory_status(tmp_path / "cache")
    packed = data.load_tokens(entry, 1, False)
    assert int(packed["input_ids"].sum(dtype=torch.int64)) == n_tokens * (n_tokens - 1) // 2  # reads every page
    after = bench_scale.memory_status(tmp_path / "cache")
    assert before["cache_rss_mib"] == 0 and 4.0 <= after["cache_rss_mib"] <= 4.1
    assert after["rss_anon_mib"] - before["rss_anon_mib"] < 2 and after["peak_rss_mib"] >= after["rss_anon_mib"]
    assert bench_scale.memory_status(tmp_path / "cach")["cache_rss_mib"] == 0  # a directory, not a prefix of names


class Exited(Exception):
    pass


def test_bench_scale_probe_stops_bertcls_at_its_first_step_with_the_figures(tiny_bert, tiny_dataset, tmp_path,
                                                                            monkeypatch):
    """The probe in this process, os._exit made an exception: bertcls.main is cut at its first optimizer step."""
    import bench_scale

    def exit_(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(bench_scale.os, "_exit", exit_)
    with pytest.raises(Exited):
        bench_scale.probe(str(tmp_path), train_args(tiny_bert, tiny_dataset, tmp_path / "out"))
    figures = json.loads((tmp_path / "rank0.json").read_text())
    assert figures["peak_rss_mib"] >= figures["rss_anon_mib"] > 100 and figures["cache_rss_mib"] >= 0
    [config] = (tmp_path / "out").rglob("config.json")
    assert not (config.parent / "log.csv").exists()  # stopped in the first epoch
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]).step()  # the probe's hook went with it: no Exited here
