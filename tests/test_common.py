"""Tests for common.py: file reading and writing, the command-line tail, devices and run directories."""

from __future__ import annotations

import contextlib

import pytest
import torch

import common


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": "\xe3\x81\x82"}\n{"a": "\xff"}\n')
    with pytest.raises(common.UserError, match=r"d\.jsonl:4: not UTF-8"):
        common.read_jsonl(path)
    path.write_bytes('{"a": 1}\n{"a": "x\u2028y"}\n{oops}\n'.encode())
    with pytest.raises(common.UserError, match=r"d\.jsonl:3: not valid JSON"):
        common.read_jsonl(path)
    path.write_bytes('\ufeff{"a": 1}\n{"a": "x\u2028y"}\n'.encode())
    assert common.read_jsonl(path) == [{"a": 1}, {"a": "x\u2028y"}]


def test_atomic_write_text_replaces_whole_file(tmp_path):
    target = tmp_path / "f.json"
    common.atomic_write_text(target, "old")
    common.atomic_write_text(target, "新しい\n")
    assert target.read_text(encoding="utf-8") == "新しい\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_lone_surrogate_escape_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    # a valid pair (an emoji) is text; a lone half of one is not, though json.loads accepts it
    path.write_text('{"a": "\\ud83d\\ude00"}\n{"a": "x\\ud800"}\n', encoding="utf-8")
    with pytest.raises(common.UserError, match=r"d\.jsonl:2: holds a lone surrogate escape"):
        common.read_jsonl(path)
    path.write_text('{"a": "\\ud83d\\ude00", "b": "\\\\ud800"}\n', encoding="utf-8")  # an escaped backslash
    assert common.read_jsonl(path) == [{"a": "\U0001f600", "b": "\\ud800"}]


# ------------------------------------------------------------------------------------------ devices
# CUDA is absent here: these check the decisions with torch.cuda's answers replaced (tests/test_cuda.py asks a GPU).


class FakeGpus:
    """torch.cuda as seen on a machine whose GPU 0 has bf16 units (an A100) and GPU 1 only emulates bf16 (a T4)."""

    def __init__(self, monkeypatch):
        self.current, self.asked = 0, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", self.is_bf16_supported)

    def set_device(self, device):
        self.current = torch.device(device).index

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = previous

    def is_bf16_supported(self, including_emulation=True):
        self.asked.append((self.current, including_emulation))
        return self.current == 0 or including_emulation


def test_auto_dtype_asks_the_chosen_gpu_for_native_bf16(monkeypatch):
    gpus = FakeGpus(monkeypatch)
    assert common.resolve_dtype("auto", torch.device("cuda", 1)) == torch.float16  # emulated bf16 is slow
    assert common.resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert gpus.asked == [(1, False), (0, False)]
    assert common.resolve_dtype("bf16", torch.device("cuda", 1)) == torch.bfloat16  # asked for: as asked


def test_the_chosen_gpu_becomes_the_current_one(monkeypatch):
    gpus = FakeGpus(monkeypatch)
    assert common.pick_device("cuda:1") == torch.device("cuda", 1) and gpus.current == 1
    assert common.pick_device("cuda") == torch.device("cuda", 1)  # no index: the current GPU, named
    assert common.pick_device(None, local_rank=0) == torch.device("cuda", 0) and gpus.current == 0
    with pytest.raises(common.UserError, match="cuda:2 does not exist"):
        common.pick_device("cuda:2")


def test_a_gpu_index_under_torchrun_is_refused(monkeypatch):
    FakeGpus(monkeypatch)
    with pytest.raises(common.UserError, match="--device cuda:1 cannot be used under torchrun.*CUDA_VISIBLE_DEVICES"):
        common.pick_device("cuda:1", local_rank=0)
    assert common.pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert common.pick_device("cpu", local_rank=1) == torch.device("cpu")


def test_fp32_on_cuda_multiplies_in_tf32():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        for device, dtype in [("cpu", torch.float32), ("cuda", torch.bfloat16), ("cuda", torch.float16)]:
            common.use_tf32(torch.device(device), dtype)
            assert torch.get_float32_matmul_precision() == "highest"
        common.use_tf32(torch.device("cuda"), torch.float32)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(previous)


def test_torchrun_is_told_apart_from_a_plain_run(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert common.dist_env() == (0, 0, 1, False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert common.dist_env() == (0, 0, 1, True)  # torchrun --nproc_per_node 1 is a DDP job of one


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("error, line", [
    (common.UserError("no dataset"), "bertcls.py [rank 1]: error: no dataset"),
    (torch.OutOfMemoryError("CUDA out of memory"), "bertcls.py [rank 1]: error: out of memory: lower --batch_size"),
    (RuntimeError("NCCL error: unhandled system error\ndetails"),
     "bertcls.py [rank 1]: error: RuntimeError: NCCL error: unhandled system error (traceback below)"),
])
def test_any_error_on_a_rank_is_named_with_its_rank(error, line, capsys):
    def fail():
        raise error

    if isinstance(error, RuntimeError) and not isinstance(error, torch.OutOfMemoryError):
        with pytest.raises(RuntimeError):  # a bug keeps its traceback
            common.run_cli("bertcls.py", fail, oom_advice="lower --batch_size", who=" [rank 1]")
    else:
        assert common.run_cli("bertcls.py", fail, oom_advice="lower --batch_size", who=" [rank 1]") == 1
    assert capsys.readouterr().err.splitlines() == [line]


def test_without_a_rank_a_bug_is_left_to_its_traceback(capsys):
    def fail():
        raise KeyError("x")

    with pytest.raises(KeyError):
        common.run_cli("predict.py", fail)
    assert capsys.readouterr().err == ""
