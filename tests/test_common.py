"""common.py: the one place each class of failure is turned into one line, and the shared file mechanisms."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

import common
from conftest import REPO


def run_cli(work, **kwargs) -> int:
    return common.run_cli("script.py", work, **kwargs)


def test_user_errors_and_os_errors_are_one_line_with_exit_1(capsys, tmp_path):
    def user_error():
        raise common.UserError("the dataset is missing: run prepare.py")

    def long_name():  # any OSError about a path: e.g. a 300-character file name component
        (tmp_path / ("x" * 300)).write_text("")

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    for work, expected in [(user_error, "script.py: error: the dataset is missing: run prepare.py\n"),
                           (long_name, f"script.py: error: {tmp_path / ('x' * 300)}: File name too long: check the "
                                       "path, its permissions and the free space\n"),
                           (full_disk, "script.py: error: No space left on device: check the path, its permissions "
                                       "and the free space\n")]:
        assert run_cli(work) == 1
        assert capsys.readouterr().err == expected


def test_debug_shows_the_traceback_and_a_bug_is_never_swallowed():
    def work():
        raise common.UserError("x")

    with pytest.raises(common.UserError):
        run_cli(work, debug=True)
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 // 0)


def test_interrupt_and_terminate_say_what_was_kept(capsys):
    def interrupted():
        raise KeyboardInterrupt

    def terminated():
        os.kill(os.getpid(), 15)

    assert run_cli(interrupted, stopped=lambda: "nothing was written") == 130
    assert capsys.readouterr().err == "script.py: interrupted; nothing was written\n"
    assert run_cli(terminated) == 143
    assert capsys.readouterr().err == "script.py: terminated\n"


def test_out_of_memory_gives_the_advice(capsys):
    def work():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    assert run_cli(work, oom_advice="lower --batch_size") == 1
    assert capsys.readouterr().err == "script.py: error: out of memory: lower --batch_size\n"


@pytest.mark.parametrize("parse, text, ok", [
    (common.positive_int, "3", 3), (common.positive_int, "0", None), (common.positive_int, "2.5", None),
    (common.positive_float, "3e-5", 3e-5), (common.positive_float, "0", None), (common.positive_float, "nan", None),
    (common.positive_float, "inf", None), (common.non_negative_float, "0", 0.0), (common.finite_float, "-2", -2.0),
    (common.seed_int, "4294967295", 4294967295), (common.seed_int, "100000000000000000000", None),
    (common.seed_int, "-1", None)])
def test_numbers_are_range_checked_where_they_are_parsed(parse, text, ok):
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    else:
        assert parse(text) == ok


def test_atomic_write_replaces_whole_and_keeps_the_usual_permissions(tmp_path):
    path = tmp_path / "a.json"
    common.write_json(path, {"k": "日本"})
    umask = os.umask(0)
    os.umask(umask)
    assert json.loads(path.read_text(encoding="utf-8")) == {"k": "日本"}
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_iter_jsonl_streams_with_offsets_and_names_a_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = ['\ufeff{"a": 1}\n', "\n", '{"b": "\u2028"}\n']
    path.write_text("".join(lines), encoding="utf-8")
    rows = list(common.iter_jsonl(path))
    assert [(n, row) for n, _, _, row in rows] == [(1, {"a": 1}), (3, {"b": "\u2028"})]
    data = path.read_bytes()
    assert [data[start:end] for _, start, end, _ in rows] == [lines[0].encode(), lines[2].encode()]
    for content, message in [(b'{"a": 1}\n[1]\n', "x.jsonl:2: expected a JSON object, got list"),
                             (b'{"a": 1}\n{"a": \n', "x.jsonl:2: not valid JSON"),
                             (b'{"a": "\\ud800"}\n', "x.jsonl:1: holds a lone surrogate escape"),
                             (b'{"a": "\xff"}\n', "x.jsonl:1: not UTF-8")]:
        path.write_bytes(content)
        with pytest.raises(common.UserError, match=message.replace("[", r"\[")):
            list(common.iter_jsonl(path))


def test_an_output_that_is_an_input_is_refused_however_spelled(tmp_path):
    source = tmp_path / "data" / "in.jsonl"
    source.parent.mkdir()
    source.write_text("x")
    (tmp_path / "link").symlink_to(source.parent)
    for output in [source, tmp_path / "data" / ".." / "data" / "in.jsonl", tmp_path / "link" / "in.jsonl",
                   tmp_path / "data"]:  # the last: a directory that holds the input
        with pytest.raises(common.UserError, match="would overwrite the input"):
            common.refuse_overwrite([("--output", output)], [source])
    common.refuse_overwrite([("--output", tmp_path / "data" / "out.jsonl")], [source])  # a new file is fine


def test_a_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import common, "
                               f"time\nwith common.locked(__import__('pathlib').Path({str(path)!r}), 'x'):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(common.UserError, match=f"in use by another process \\(pid {holder.pid}\\)"):
        with common.locked(path, "x"):
            pass
    holder.kill()  # SIGKILL: nothing cleans up, yet the lock is free
    holder.wait()
    with common.locked(path, "x"):
        assert path.read_text().strip() == str(os.getpid())


def test_saved_tensors_round_trip_and_any_damage_is_one_line(tmp_path, capsys):
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    path = common.save_tensors(tmp_path / "ckpt", {"model": weights, "best": None}, {"epoch": 3, "rng": [b"\x00"]})
    tensors, state = common.load_tensors(path)
    assert torch.equal(tensors["model"]["w"], weights["w"]) and "best" not in tensors and state["epoch"] == 3
    assert not list(tmp_path.glob(".*"))  # the temporary directory went
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # the same size, one byte flipped
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(common.UserError, match=r"damaged \(model.safetensors: not the bytes written\)"):
        common.load_tensors(path)
    # random bytes in the training state with a matching digest (written so): our line, never torch's advice
    path = common.save_tensors(tmp_path / "ckpt2", {"model": weights}, {})
    (path / "state.pt").write_bytes(os.urandom(300))
    digests = json.loads((path / "digests.json").read_text())
    digests["state.pt"] = common.sha256(path / "state.pt")
    (path / "digests.json").write_text(json.dumps(digests))
    with pytest.raises(common.UserError) as caught:
        common.load_tensors(path)
    assert "is damaged" in str(caught.value) and "weights_only" not in str(caught.value)


def test_progress_off_a_terminal_is_plain_lines(capsys):
    with common.Progress(100, "epoch 1/2", every=None) as progress:
        progress.update(40)
        progress.report(step="4/10", loss="1.2345")
    line = capsys.readouterr().err
    assert line.startswith("epoch 1/2: 40/100 examples (40%), ") and line.endswith(", step 4/10, loss 1.2345\n")
    assert "\r" not in line


def test_auto_dtype_follows_the_hardware():
    capabilities = torch.cpu.get_capabilities()
    native = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    assert common.resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert common.resolve_dtype("fp16", torch.device("cpu")) == torch.float16


def test_cuda_without_cuda_and_bad_devices_are_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in [("cuda", "CUDA is not available here"), ("tpu", "unknown --device|not supported"),
                            ("gpu:0", "unknown --device")]:
        with pytest.raises(common.UserError, match=message):
            common.pick_device(device)
    assert common.pick_device(None) == torch.device("cpu")
