"""Other people's models: no downloaded code runs and no pickle executes unless the user asks for it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import bertcls
import common
import data
from conftest import finished_runs, train_args


class RunsCode:
    """A pickle payload that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_that_run_code_are_refused(tiny_bert, tiny_dataset, tmp_path, capsys):
    model_dir = Path(shutil.copytree(tiny_bert, tmp_path / "evil"))
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"payload": RunsCode(marker)}, model_dir / "pytorch_model.bin")
    args = train_args(model_dir, tiny_dataset, tmp_path / "out")
    assert bertcls.main(args) == 1
    err = capsys.readouterr().err
    assert "refusing to load model" in err and "safetensors" in err and "Traceback" not in err
    assert not marker.exists()
    assert not list((tmp_path / "out").rglob("*metrics.json"))


def test_remote_code_in_a_model_directory_is_not_run_by_default(tiny_bert, tiny_dataset, tmp_path):
    model_dir = Path(shutil.copytree(tiny_bert, tmp_path / "remote"))
    marker = tmp_path / "code-ran"
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig",
                          "AutoModelForSequenceClassification": "custom.CustomModel"}
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (model_dir / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import BertConfig as CustomConfig\n"
        "from transformers import BertForSequenceClassification as CustomModel\n", encoding="utf-8")
    output_dir = tmp_path / "out"
    assert bertcls.main(train_args(model_dir, tiny_dataset, output_dir, "--epochs", "1")) == 0
    assert not marker.exists()  # the built-in BERT class was used, custom.py never imported
    assert finished_runs(output_dir)


def test_an_unreadable_cache_is_never_used(tiny_bert, tiny_dataset, tmp_path, capsys):
    args = train_args(tiny_bert, tiny_dataset, tmp_path / "out", "--epochs", "1")
    assert bertcls.main(args) == 0
    capsys.readouterr()
    cache_files = list((tmp_path / "out" / "cache").glob("*.pt"))
    assert len(cache_files) == 3  # train, val, test
    for path in cache_files:
        path.write_bytes(b"not a torch file")
    assert bertcls.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("ignoring unreadable tokenization cache") == 3
    assert err.count("tokenized") == 3
    first, second = [json.loads((r / "test-metrics.json").read_text()) for r in finished_runs(tmp_path / "out")]
    assert first == second


def test_a_cache_holding_objects_is_ignored_without_torchs_unsafe_advice(tiny_bert, tiny_dataset, tmp_path, capsys):
    args = bertcls.parse_args(train_args(tiny_bert, tiny_dataset, tmp_path / "out"))
    # cloned: the cache files are mapped, and this test overwrites them in place (bertcls replaces them whole)
    first = {split: {k: v.clone() for k, v in packed.items()}
             for split, packed in bertcls.Run(args, log=lambda message: None).packed.items()}
    marker = tmp_path / "code-ran"
    cache_files = sorted((tmp_path / "out" / "cache").glob("*.pt"))
    assert len(cache_files) == 3
    for path in cache_files:  # what a file from elsewhere could hold: torch refuses it under weights_only...
        torch.save({"offsets": torch.zeros(1, dtype=torch.int64), "payload": RunsCode(marker)}, path)
    second = bertcls.Run(args, log=common.log)
    lines = capsys.readouterr().err.strip().splitlines()
    # ...and its message advises loading with weights_only=False, which would run the payload: not passed on
    assert not any("weights_only" in line or "trust" in line for line in lines)
    assert sorted(line for line in lines if "cache" in line) == sorted(
        f"warning: ignoring unreadable tokenization cache {path} (it holds objects other than tensors); "
        "tokenizing again" for path in cache_files)
    assert sum(line.startswith("tokenized ") for line in lines) == 3
    assert not marker.exists()
    for split in data.SPLITS:  # rebuilt, the same as before
        assert all(torch.equal(first[split][k], second.packed[split][k]) for k in first[split])
