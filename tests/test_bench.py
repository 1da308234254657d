"""bench.py and the hot path it measures: the JSON report, the FLOPs formula, the tokenization cache,
length-grouped batches, vectorised collate and evaluation order."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bench
import bertcls
import common
import data
from conftest import train_args, write_dataset

REQUIRED_KEYS = {"examples_per_s", "tokens_per_s", "padding_fraction", "peak_mem_mb", "mfu", "peak_flops", "device"}


def bench_json(capsys, *argv: str) -> dict:
    assert bench.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", [[], ["--tutorial_style"]])
def test_bench_prints_one_json_line_with_sane_figures(mode, tiny_bert, tiny_dataset, tmp_path, capsys):
    result = bench_json(capsys, *train_args(tiny_bert, tiny_dataset, tmp_path), "--steps", "3", "--warmup", "1",
                        *mode)
    assert REQUIRED_KEYS <= set(result)
    assert result["mode"] == ("tutorial_style" if mode else "bertcls")
    # --dtype auto: bf16 on a CPU with bf16 matrix units (AVX512-BF16, AMX), else fp32; the peak in the same dtype
    expected = common.dtype_name(common.resolve_dtype("auto", torch.device("cpu")))
    assert result["device"] == "cpu" and result["dtype"] == expected
    assert result["peak_flops_source"].startswith(f"{expected} matmul")
    assert result["examples"] == 3 * 8  # only the timed steps are counted
    assert result["examples_per_s"] > 0 and result["tokens_per_s"] > 0
    assert 0 <= result["padding_fraction"] < 1
    assert 0 < result["mfu"] < 1.5
    assert result["peak_flops"] > 1e9 and result["peak_mem_mb"] > 100
    layers, hidden = 2, 64  # conftest's tiny BERT
    per_token = bench.flops_per_token(result["params_non_embedding"], layers, hidden, result["mean_padded_len"])
    assert result["flops_per_token"] == pytest.approx(per_token, rel=1e-4)
    assert result["mfu"] == pytest.approx(per_token * result["tokens_per_s"] / result["peak_flops"], rel=1e-3)


def test_bench_peak_flops_flag_grad_accumulation_and_host_figures(tiny_bert, tiny_dataset, tmp_path, capsys):
    result = bench_json(capsys, *train_args(tiny_bert, tiny_dataset, tmp_path), "--steps", "2", "--warmup", "0",
                        "--grad_accum_steps", "2", "--peak_flops", "1e12", "--profile_steps", "1", "--always_mask")
    assert result["peak_flops"] == 10**12 and result["peak_flops_source"] == "--peak_flops"
    assert result["examples"] == 2 * 2 * 8  # steps x micro-batches x batch: the profiled step is not counted
    # "seconds" is rounded to the millisecond: over 2 steps that is up to 0.25 ms of each step's time
    assert result["step_ms"] == pytest.approx(1000 * result["seconds"] / 2, abs=1000 * 0.0005 / 2 + 1e-6)
    assert 0 < result["host_data_ms_per_step"] < result["step_ms"]
    assert result["profile_steps"] == 1 and "gpu_idle_fraction" not in result  # the GPU figures need CUDA
    assert result["always_mask"] and result["padding_fraction"] >= 0


def test_always_mask_gives_unpadded_batches_a_mask_of_ones():
    packed = data.pack({"input_ids": [[5] * 8, [6] * 8], "token_type_ids": [[], []]})
    counts = {"examples": 0, "tokens": 0, "slots": 0, "host_data_s": 0.0}
    plain = bench.counting(bertcls.collate, counts, torch.device("cpu"))(packed, [0, 1], None, 0)
    masked = bench.counting(bertcls.collate, counts, torch.device("cpu"), always_mask=True)(packed, [0, 1], None, 0)
    assert "attention_mask" not in plain and masked["attention_mask"].tolist() == [[1] * 8] * 2
    assert counts["examples"] == 4 and counts["tokens"] == counts["slots"] == 32


def test_covered_time_hand_computed():
    assert bench.covered_time([(5, 6), (0, 2), (1, 3), (1.5, 2.5)]) == (6, 4)  # [0, 3] and [5, 6]
    assert bench.covered_time([(0, 10), (2, 3)]) == (10, 10)
    assert bench.covered_time([]) == (0.0, 0.0)


def test_device_activity_reads_a_profile():
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    intervals = bench.device_activity(prof, DeviceType.CPU)
    assert intervals and all(start <= end for start, end in intervals)
    span, covered = bench.covered_time(intervals)
    assert 0 < covered <= span
    assert bench.device_activity(prof, DeviceType.CUDA) == []


def test_flops_per_token_hand_computed():
    # the 4-layer tiny-ja-bert: 3,227,657 non-embedding parameters, hidden 256, sequence 256
    assert bench.flops_per_token(3_227_657, 4, 256, 256) == 6 * 3_227_657 + 12 * 4 * 256 * 256 == 22_511_670
    # BERT-base: 85,054,464 non-embedding parameters (12 layers x 7,087,872), hidden 768, sequence 512
    assert bench.flops_per_token(85_054_464, 12, 768, 512) == 510_326_784 + 56_623_104
    from transformers import BertConfig
    assert bench.model_shape(BertConfig(num_hidden_layers=3, hidden_size=96, num_attention_heads=2)) == (3, 96)


# ---------------------------------------------------------------------------------- tokenization cache


class Tokenized(Exception):
    pass


def refuse_tokenizing(*args, **kwargs):
    raise Tokenized()


def make_run(model: Path, dataset: Path, cache: Path, *extra: str) -> bertcls.Run:
    args = bertcls.parse_args(train_args(model, dataset, cache.parent / "out", "--cache_dir", str(cache), *extra))
    return bertcls.Run(args, log=lambda message: None)


def test_tokenization_cache_is_reused_and_invalidated(tiny_bert, tiny_dataset, tiny_rows, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = make_run(tiny_bert, tiny_dataset, cache)
    assert len(list(cache.glob("*.pt"))) == 3  # one file per split
    monkeypatch.setattr(data, "encode_rows", refuse_tokenizing)
    second = make_run(tiny_bert, tiny_dataset, cache)  # same tokenizer, max_seq_len and data: nothing to do
    for split in data.SPLITS:
        assert all(torch.equal(first.packed[split][k], second.packed[split][k]) for k in first.packed[split])

    with pytest.raises(Tokenized):
        make_run(tiny_bert, tiny_dataset, cache, "--max_seq_len", "32")
    changed_rows = {split: [dict(r) for r in rows] for split, rows in tiny_rows.items()}
    changed_rows["val"][0]["body"] += "。"
    with pytest.raises(Tokenized):
        make_run(tiny_bert, write_dataset(tmp_path / "changed-data", changed_rows), cache)
    changed_model = Path(shutil.copytree(tiny_bert, tmp_path / "changed-model"))
    with open(changed_model / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("新語\n")
    with pytest.raises(Tokenized):
        make_run(changed_model, tiny_dataset, cache)


# ------------------------------------------------------------------------------------------- batching


def test_length_grouped_batches_cover_everything_once_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    batches = bertcls.length_grouped_batches(lengths, 8, random.Random(1), group_batches=16)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert [len(b) for b in batches].count(8) == 125
    assert all([lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in batches)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = list(range(1000))
    random.Random(1).shuffle(shuffled)
    assert padding(batches) < padding([shuffled[i:i + 8] for i in range(0, 1000, 8)]) / 4
    assert batches == bertcls.length_grouped_batches(lengths, 8, random.Random(1), group_batches=16)
    assert batches != bertcls.length_grouped_batches(lengths, 8, random.Random(2), group_batches=16)


def test_one_chunk_gives_consecutive_slices_of_the_sorted_order():
    lengths = [7, 3, 9, 1, 5, 8, 2, 6, 4, 10]  # distinct, so the sorted order is unique
    batches = bertcls.length_grouped_batches(lengths, 3, random.Random(0), group_batches=10)
    by_length = sorted(range(10), key=lambda i: -lengths[i])
    assert sorted(batches) == sorted([by_length[0:3], by_length[3:6], by_length[6:9], by_length[9:]])


def test_padded_length_and_compile_buckets():
    assert [bertcls.padded_length(n) for n in (1, 8, 9, 250, 256)] == [8, 8, 16, 256, 256]
    assert bertcls.compile_buckets(512) == [64, 128, 256, 384, 512]
    assert bertcls.compile_buckets(300) == [64, 128, 256, 300]
    assert bertcls.compile_buckets(48) == [48]
    assert [bertcls.padded_length(n, buckets=[64, 128, 256]) for n in (3, 64, 65, 256)] == [64, 64, 128, 256]


def test_collate_gathers_rows_pads_and_masks():
    packed = data.pack({"input_ids": [[2, 5, 3], [2, 6, 7, 8, 3], [2, 3]],
                           "token_type_ids": [[0, 0, 0], [0, 0, 1, 1, 1], [0, 0]]})
    batch = bertcls.collate(packed, [1, 2], torch.tensor([0, 1, 2]), pad_id=9)
    assert batch["input_ids"].tolist() == [[2, 6, 7, 8, 3, 9, 9, 9], [2, 3, 9, 9, 9, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 2 + [0] * 6]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0] * 8]
    assert batch["labels"].tolist() == [1, 2]
    assert all(v.dtype == torch.long for v in batch.values())
    assert "token_type_ids" not in bertcls.collate(data.pack({"input_ids": [[2, 3]], "token_type_ids": [[]]}),
                                                   [0], None, pad_id=0)


class LengthModel(torch.nn.Module):
    """Logits that identify each example by its length, to check which prediction lands where."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        # a batch without padding comes without a mask: every row is input_ids' full width
        n = (attention_mask.sum(1) if attention_mask is not None else torch.full((len(input_ids),), input_ids.shape[1])
             ).float()
        return SimpleNamespace(logits=torch.stack([n, torch.zeros_like(n)], 1))


def test_predict_restores_the_original_order():
    lengths = [3, 9, 2, 12, 5]
    packed = data.pack({"input_ids": [[1] * n for n in lengths], "token_type_ids": [[] for _ in lengths]})
    labels = torch.tensor([0, 1, 0, 1, 0])
    probs, losses = bertcls.predict(LengthModel(), packed, batch_size=2, device=torch.device("cpu"),
                                    ctx=contextlib.nullcontext(), pad_id=0, labels=labels)
    expected = torch.tensor([[float(n), 0.0] for n in lengths]).softmax(-1)
    assert torch.allclose(probs, expected)
    assert torch.allclose(losses, -expected[torch.arange(5), labels].log().double())


def test_long_context_bench_compares_both_shapes_at_each_length(tmp_path, capsys):
    import long_context_bench
    assert long_context_bench.main(["--lengths", "64", "--max_batch_tokens", "256", "--hidden", "32", "--layers", "3",
                                    "--heads", "2", "--local_attention", "16", "--steps", "1", "--warmup", "0",
                                    "--work_dir", str(tmp_path), "--output", str(tmp_path / "results.json")]) == 0
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
    (1, "warning: the warmup is longer than the run\nbench.py: out of memory: lower --max_batch_tokens\n",
     "bench.py: out of memory: lower --max_batch_tokens"),  # the error line, not the last warning
    (1, "Traceback (most recent call last):\n  ...\n", "exit 1")])
def test_long_context_bench_says_why_a_run_failed(monkeypatch, tmp_path, returncode, stderr, error):
    import long_context_bench
    monkeypatch.setattr(long_context_bench.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a[0], returncode, stdout="", stderr=stderr))
    args = long_context_bench.parse_args(["--work_dir", str(tmp_path)])
    assert long_context_bench.bench_run(tmp_path / "m", tmp_path / "d", 8192, args) == {"error": error}
    assert long_context_bench.table_row("bert", 8192, {"error": error}) == f"| bert | 8192 | | | | | {error} |"
