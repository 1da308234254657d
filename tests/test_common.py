"""Tests for common.py: file reading and writing, the command-line tail, devices and run directories."""

from __future__ import annotations

import pytest

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
