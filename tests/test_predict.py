"""predict.py and bertcls.py --save_model: a saved model reproduces its run, loads with transformers alone, and
predict.py never writes over what it reads."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import bertcls
import common
import data
import models
import predict
from conftest import REPO, finished_runs, train_args

LABELS = ["movie", "sports", "tech"]  # sorted category names = ids 0, 1, 2 in the tiny dataset
TEXT = "野球の試合で選手が得点した"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert, tiny_dataset) -> Path:
    """A head run that learns the tiny corpus, saved under umask 022."""
    output_dir = tmp_path_factory.mktemp("predict-runs")
    umask = os.umask(0o022)
    try:
        assert bertcls.main(train_args(tiny_bert, tiny_dataset, output_dir, "--epochs", "2", "--batch_size", "4",
                                       "--save_model")) == 0
    finally:
        os.umask(umask)
    [run] = finished_runs(output_dir)
    return run


@pytest.fixture(scope="module")
def head_tail_run(tmp_path_factory, tiny_modernbert, tiny_dataset) -> Path:
    """A long-context model trained with head_tail: 24 tokens cut most tiny bodies, so head_tail decides the inputs;
    batches of at most 128 tokens."""
    output_dir = tmp_path_factory.mktemp("head-tail-runs")
    flags = ["--save_model", "--epochs", "1", "--truncation", "head_tail", "--max_seq_len", "24",
             "--max_batch_tokens", "128"]
    assert bertcls.main(train_args(tiny_modernbert, tiny_dataset, output_dir, *flags)) == 0
    [run] = finished_runs(output_dir)
    return run


def read_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def run_predict(capsys, *argv: str) -> tuple[int, list[dict], str]:
    rc = predict.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, read_lines(captured.out), captured.err


def error_line(err: str) -> str:
    """The one line predict.py ends with."""
    lines = [line for line in err.splitlines() if line.startswith("predict.py:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("predict.py: error: ")
    return lines[0]


def copy_model(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir / "model", tmp_path / "model"))


def edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text(encoding="utf-8"))
    obj.update(changes)
    path.write_text(json.dumps(obj), encoding="utf-8")


def stdin_of(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8"))


# ------------------------------------------------------------------------------------------ the saved model


def test_saved_model_directory(run_dir):
    model_dir = run_dir / "model"
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "vocab.txt", "bertcls.json"} \
        <= {p.name for p in model_dir.iterdir()}
    assert not list(model_dir.glob("*.bin")) and not (run_dir / ".model.tmp").exists()
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "movie", "1": "sports", "2": "tech"}
    assert config["label2id"] == {"movie": 0, "sports": 1, "tech": 2}
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tokenizer_config["model_max_length"] == 64  # train_args' --max_seq_len
    assert tokenizer_config["mecab_kwargs"] == {"mecab_dic": "unidic_lite"}
    assert tokenizer_config["model_input_names"] == ["input_ids", "token_type_ids", "attention_mask"]
    settings = json.loads((model_dir / "bertcls.json").read_text(encoding="utf-8"))
    assert settings == {"format": 1, "base_model": settings["base_model"], "max_seq_len": 64, "token_type_ids": True,
                        "truncation": "head"}


def test_saved_model_files_are_readable_by_others(run_dir):
    """On a shared cluster colleagues load the model: under umask 022 every file is rw-r--r--."""
    model_dir = run_dir / "model"
    assert stat.S_IMODE(model_dir.stat().st_mode) == 0o755
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in model_dir.iterdir()}
    assert set(modes.values()) == {oct(0o644)}, modes


def test_save_model_replaces_a_stale_temporary_directory_without_a_progress_bar(run_dir, tmp_path, capfd,
                                                                                 monkeypatch):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model", use_safetensors=True)
    tokenizer = models.load_tokenizer(str(run_dir / "model"), log=lambda m: None)
    save_pretrained = tokenizer.save_pretrained

    def private_files(directory, *args, **kwargs):  # a writer that makes its files 0600
        saved = save_pretrained(directory, *args, **kwargs)
        for path in Path(directory).iterdir():
            path.chmod(0o600)
        return saved
    monkeypatch.setattr(tokenizer, "save_pretrained", private_files)
    run = SimpleNamespace(model=model, tokenizer=tokenizer, spec=data.InputSpec(32, True),
                          args=SimpleNamespace(model_name="base"))
    stale = tmp_path / ".model.tmp"
    stale.mkdir()
    (stale / "pytorch_model.bin").write_bytes(b"left by an interrupted save")
    capfd.readouterr()
    umask = os.umask(0o022)
    try:
        bertcls.save_model(run, tmp_path / "model")
    finally:
        os.umask(umask)
    assert "Writing model shards" not in capfd.readouterr().err  # no bar in a log file
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()} == {0o644}  # readable by all
    assert not stale.exists() and not (tmp_path / "model" / "pytorch_model.bin").exists()
    settings = json.loads((tmp_path / "model" / "bertcls.json").read_text(encoding="utf-8"))
    assert (settings["max_seq_len"], settings["base_model"], settings["truncation"]) == (32, "base", "head")
    assert json.loads((tmp_path / "model" / "tokenizer_config.json").read_text(encoding="utf-8"))[
        "model_max_length"] == 32


# -------------------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("run, flags", [("run_dir", ["--batch_size", "8"]),  # the run's eval batches: 2 x 4
                                        ("head_tail_run", ["--max_batch_tokens", "256"])])  # 2 x 128
def test_predict_reproduces_the_runs_test_predictions(request, tiny_dataset, tmp_path, capsys, run, flags):
    run_dir = request.getfixturevalue(run)
    out = tmp_path / "predictions.jsonl"
    rc, stdout, err = run_predict(capsys, "--model_dir", run_dir / "model", "--input", tiny_dataset / "test.jsonl",
                                  "--output", out, *flags)
    assert rc == 0, err
    assert stdout == []
    predicted = read_lines(out.read_text(encoding="utf-8"))
    expected = read_lines((run_dir / "test-predictions.jsonl").read_text(encoding="utf-8"))
    assert len(predicted) == len(expected) == 20
    assert [p["id"] for p in predicted] == [e["id"] for e in expected]  # ids copied, input order
    assert [p["label"] for p in predicted] == [e["predicted"] for e in expected]
    for p, e in zip(predicted, expected):
        assert [k["label"] for k in p["top_k"]] == sorted(LABELS, key=lambda name: -e["probabilities"][name])
        assert {k["label"]: k["probability"] for k in p["top_k"]} == e["probabilities"]  # same batches: same numbers
        assert p["top_k"][0] == {"label": p["label"], "probability": p["probability"]}


def test_other_batches_give_the_same_labels(run_dir, tiny_dataset, capsys):
    rc, predicted, err = run_predict(capsys, "--model_dir", run_dir / "model", "--input", tiny_dataset / "test.jsonl",
                                     "--batch_size", "7", "--max_batch_tokens", "200")
    assert rc == 0, err
    expected = read_lines((run_dir / "test-predictions.jsonl").read_text(encoding="utf-8"))
    assert [p["label"] for p in predicted] == [e["predicted"] for e in expected]


def test_text_stdin_and_top_k(run_dir, monkeypatch, capsys):
    model = run_dir / "model"
    lines = [json.dumps({"id": 7, "text": TEXT}, ensure_ascii=False), "",
             json.dumps({"title": "映画の主演女優", "body": "劇場で公開された。"}, ensure_ascii=False)]
    stdin_of(monkeypatch, "\n".join(lines) + "\n")
    rc, from_stdin, err = run_predict(capsys, "--model_dir", model, "--top_k", "1")
    assert rc == 0, err
    assert [r.get("id", "none") for r in from_stdin] == [7, "none"]
    assert all(len(r["top_k"]) == 1 and r["label"] in LABELS for r in from_stdin)

    rc, [record], err = run_predict(capsys, "--model_dir", model, "--text", TEXT, "--top_k", "5")
    assert rc == 0, err
    assert "id" not in record
    assert (record["label"], record["probability"]) == (from_stdin[0]["label"], from_stdin[0]["probability"])
    assert [k["label"] for k in record["top_k"]] == sorted(LABELS, key=lambda n: -next(
        k["probability"] for k in record["top_k"] if k["label"] == n))  # all labels, most probable first
    assert sorted(k["label"] for k in record["top_k"]) == LABELS
    assert sum(k["probability"] for k in record["top_k"]) == pytest.approx(1, abs=1e-5)


def test_no_loading_bar_in_a_log_file(run_dir, capfd):
    from transformers.utils import logging as transformers_logging
    capfd.readouterr()
    assert predict.main(["--model_dir", str(run_dir / "model"), "--text", TEXT]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["label"] in LABELS
    assert "Loading weights" not in err and "\r" not in err
    assert transformers_logging.is_progress_bar_enabled()  # as before, for what follows


def test_an_empty_text_is_a_warning(run_dir, tmp_path, capsys):
    rc, [record], err = run_predict(capsys, "--model_dir", run_dir / "model", "--text", "")
    assert rc == 0 and record["label"] in LABELS
    assert "warning: 1 of 1 examples have no text" in err
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "野球"}\n{"id": 2, "title": "", "body": " "}\n{"id": 3, "text": ""}\n',
                      encoding="utf-8")
    rc, records, err = run_predict(capsys, "--model_dir", run_dir / "model", "--input", source)
    assert rc == 0 and [r["id"] for r in records] == [1, 2, 3]
    assert "warning: 2 of 3 examples have no text" in err


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, message", [
    ('{"text": "野球"}\n{oops\n', ":2: not valid JSON"),
    ('{"text": "野球"}\n\n[1, 2]\n', ":3: needs a string 'text', or string 'title' and 'body'"),
    ('{"id": 1, "title": "野球"}\n', ":1: needs a string 'text', or string 'title' and 'body'"),
    (b'{"text": "\xff"}\n', ":1: not UTF-8"),
])
def test_a_bad_line_is_one_line_naming_it(run_dir, tmp_path, capsys, content, message):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    rc, stdout, err = run_predict(capsys, "--model_dir", run_dir / "model", "--input", source, "--output", out)
    assert rc == 1 and stdout == [] and not out.exists()
    line = error_line(err)
    assert f"{source}{message}" in line and "--skip_bad_lines" in line


def test_skip_bad_lines_warns_and_goes_on(run_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    lines = ['{"id": "a", "text": "野球の試合"}', "not json", '{"id": "b"}', '{"id": "c", "text": "映画の公開"}']
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc, stdout, err = run_predict(capsys, "--model_dir", run_dir / "model", "--input", source, "--skip_bad_lines")
    assert rc == 0, err
    assert [r["id"] for r in stdout] == ["a", "c"]
    warnings = [line for line in err.splitlines() if line.startswith("predict.py: warning:")]
    assert len(warnings) == 2
    assert f"{source}:2: not valid JSON" in warnings[0] and f"{source}:3: needs a string" in warnings[1]


def test_text_that_is_not_utf8_is_one_line(run_dir, capsys):
    rc, stdout, err = run_predict(capsys, "--model_dir", run_dir / "model", "--text", "野球\udcff")  # argv bytes
    assert rc == 1 and stdout == []
    assert "--text is not UTF-8 text" in error_line(err)


def test_a_length_with_no_room_for_text_is_one_line(run_dir, capsys):
    rc, stdout, err = run_predict(capsys, "--model_dir", run_dir / "model", "--text", TEXT, "--max_seq_len", "2")
    assert rc == 1 and stdout == []
    assert "leaves no room for text" in error_line(err)


# --------------------------------------------------------------------------------- what is not a classifier


def test_refuses_non_safetensors_weights(run_dir, tmp_path, capsys):
    model_dir = copy_model(run_dir, tmp_path)
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    rc, stdout, err = run_predict(capsys, "--model_dir", model_dir, "--text", "野球")
    assert rc == 1 and stdout == []
    assert f"{model_dir} has no model.safetensors" in error_line(err)


def test_refuses_a_model_without_a_classification_head(tiny_bert, capsys):
    rc, stdout, err = run_predict(capsys, "--model_dir", tiny_bert, "--text", "野球")
    assert rc == 1 and stdout == []
    assert "holds no classifier with label names (architectures ['BertModel']" in error_line(err)


def test_refuses_default_label_names(run_dir, tmp_path, capsys):
    model_dir = copy_model(run_dir, tmp_path)
    edit_json(model_dir / "config.json", id2label={str(i): f"LABEL_{i}" for i in range(3)},
              label2id={f"LABEL_{i}": i for i in range(3)})
    rc, stdout, err = run_predict(capsys, "--model_dir", model_dir, "--text", "野球")
    assert rc == 1 and stdout == []
    assert "holds no classifier with label names" in error_line(err) and "LABEL_0" in error_line(err)


def test_refuses_weights_without_the_classifier(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    model_dir = copy_model(run_dir, tmp_path)
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    rc, stdout, err = run_predict(capsys, "--model_dir", model_dir, "--text", "野球")
    assert rc == 1 and stdout == []
    assert "lacks weights the classifier needs (classifier.bias, classifier.weight)" in error_line(err)


def test_bertcls_json_without_truncation_means_head_and_a_bad_one_is_one_line(head_tail_run, tiny_rows, tmp_path,
                                                                             capsys):
    model_dir = copy_model(head_tail_run, tmp_path)
    path = model_dir / "bertcls.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    assert (settings["max_seq_len"], settings["token_type_ids"], settings["truncation"]) == (24, False, "head_tail")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"title": r["title"], "body": r["body"] * 3}, ensure_ascii=False) + "\n"
                              for r in tiny_rows["test"]), encoding="utf-8")

    def probabilities(saved: dict) -> list:
        path.write_text(json.dumps(saved), encoding="utf-8")
        rc, records, err = run_predict(capsys, "--model_dir", model_dir, "--input", source, "--dtype", "fp32")
        assert rc == 0, err
        return [r["top_k"] for r in records]
    head_tail = probabilities(settings)
    head = probabilities({**settings, "truncation": "head"})
    del settings["truncation"]  # written before --truncation existed
    assert probabilities(settings) == head != head_tail
    for bad in ({**settings, "truncation": "middle"}, {**settings, "max_seq_len": "64"}):
        path.write_text(json.dumps(bad), encoding="utf-8")
        rc, stdout, err = run_predict(capsys, "--model_dir", model_dir, "--text", "野球")
        assert rc == 1 and stdout == []
        assert f"{path}: expected max_seq_len (a positive integer), token_type_ids (true/false) and truncation " \
               "(head or head_tail)" in error_line(err)
    path.write_bytes(b'{"max_seq_len": 24, "token_type_ids": fa\xfflse}')
    rc, stdout, err = run_predict(capsys, "--model_dir", model_dir, "--text", "野球")
    assert rc == 1 and f"{path}:1: not UTF-8" in error_line(err)


# ---------------------------------------------------------------------------- outputs that must not be written


@pytest.fixture
def source(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "text": "野球の試合"}\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("spelling", ["same", "dot", "dotdot", "symlink"])
def test_output_equal_to_the_input_is_refused_however_spelled(run_dir, source, capsys, spelling):
    output = {"same": str(source), "dot": "./in.jsonl", "dotdot": "sub/../in.jsonl", "symlink": "link.jsonl"}[spelling]
    if spelling == "symlink":
        os.symlink(source, output)
    before = source.read_bytes()
    rc, stdout, err = run_predict(capsys, "--model_dir", run_dir / "model", "--input", "in.jsonl",
                                  "--output", output)
    assert rc == 1 and stdout == []
    assert f"--output {Path(output)} would overwrite the input {source}" in error_line(err)
    assert source.read_bytes() == before


def test_output_equal_to_the_model_directory_is_refused(run_dir, tmp_path, capsys):
    model_dir = copy_model(run_dir, tmp_path)
    rc, stdout, err = run_predict(capsys, "--model_dir", model_dir, "--text", TEXT, "--output", model_dir)
    assert rc == 1 and "would overwrite the input" in error_line(err)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_output_inside_the_model_directory_is_refused(run_dir, tmp_path, capsys, name):
    model_dir = copy_model(run_dir, tmp_path)
    before = (model_dir / name).read_bytes()
    rc, stdout, err = run_predict(capsys, "--model_dir", model_dir, "--text", TEXT, "--output", model_dir / name)
    assert (model_dir / name).read_bytes() == before
    assert rc == 1 and "would overwrite the input" in error_line(err)


@pytest.mark.parametrize("output, message", [
    ("out", "--output {tmp}/out is a directory: pass a file name"),
    ("missing/p.jsonl", "{tmp}/missing: No such file or directory"),
])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_is_loaded(tmp_path, capsys, output, message):
    (tmp_path / "out").mkdir()
    # no model there: a check made after loading it (and after the inference) would report that instead
    rc, stdout, err = run_predict(capsys, "--model_dir", tmp_path / "no-model", "--text", "野球",
                                  "--output", tmp_path / output)
    assert rc == 1 and stdout == []
    assert error_line(err).startswith("predict.py: error: " + message.format(tmp=tmp_path))


def test_an_output_under_a_file_is_refused_before_the_model_is_loaded(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc, stdout, err = run_predict(capsys, "--model_dir", tmp_path / "no-model", "--text", "野球",
                                  "--output", tmp_path / "file" / "p.jsonl")
    assert rc == 1 and stdout == []
    assert f"{tmp_path / 'file'}" in error_line(err) and "model" not in error_line(err)


class FullDisk:
    """open() for common.atomic_write, whose files take 10 bytes, then raise ENOSPC as write(2) does."""

    def __init__(self, real_open):
        self.real_open = real_open

    def __call__(self, *args, **kwargs):
        f = self.real_open(*args, **kwargs)
        real_write = f.write

        def write(text):
            real_write(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        f.write = write
        return f


def test_a_full_disk_while_writing_leaves_no_file(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "open", FullDisk(open), raising=False)
    output = tmp_path / "p.jsonl"
    rc, stdout, err = run_predict(capsys, "--model_dir", run_dir / "model", "--text", "野球", "--output", output)
    assert rc == 1 and stdout == []
    assert "No space left on device" in error_line(err)
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary file


def test_a_full_disk_names_the_output(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "open", FullDisk(open), raising=False)
    output = tmp_path / "p.jsonl"
    rc, _, err = run_predict(capsys, "--model_dir", run_dir / "model", "--text", "野球", "--output", output)
    assert rc == 1 and str(output) in error_line(err)


# ----------------------------------------------------------------------------------------- transformers alone


def readme_pipeline_snippet() -> str:
    """The README's Python block that uses pipeline(...)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    [block] = [b.split("```")[0] for b in readme.split("```python\n")[1:] if "pipeline(" in b.split("```")[0]]
    return block


def test_readme_pipeline_snippet_classifies_a_long_article_as_predict_does(run_dir, tiny_rows, monkeypatch, capsys):
    """The README's snippet, run as written on an article far past the training length, gives predict.py's labels;
    without truncation= the same call fails: the saved tokenizer does not truncate by itself."""
    from transformers import pipeline
    row = dict(tiny_rows["test"][0], body="\n".join([tiny_rows["test"][0]["body"]] * 20))
    model_dir = str(run_dir / "model")
    tokenizer = models.load_tokenizer(model_dir, log=lambda m: None)
    assert len(tokenizer(row["title"], row["body"])["input_ids"]) > 10 * 64  # train_args' --max_seq_len 64
    code = readme_pipeline_snippet()
    assert code.count('"タイトル"') == code.count('"本文"') == 1 and 'top_k=3' in code
    code, n = re.subn(r'model="[^"]*"', f"model={model_dir!r}", code)
    assert n == 1
    code = code.replace('"タイトル"', repr(row["title"])).replace('"本文"', repr(row["body"]))
    code = "\n".join("result = " + line if line.startswith("clf(") else line for line in code.splitlines())
    namespace: dict = {}
    exec(code, namespace)
    stdin_of(monkeypatch, json.dumps(row, ensure_ascii=False) + "\n")
    rc, [expected], err = run_predict(capsys, "--model_dir", model_dir, "--dtype", "fp32")  # as the pipeline computes
    assert rc == 0, err
    assert [r["label"] for r in namespace["result"]] == [k["label"] for k in expected["top_k"]]
    for got, want in zip(namespace["result"], expected["top_k"]):
        assert got["score"] == pytest.approx(want["probability"], abs=1e-5)
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        pipeline("text-classification", model=model_dir)({"text": row["title"], "text_pair": row["body"]})


def test_pipeline_loads_a_saved_modernbert(head_tail_run, capsys):
    from transformers import pipeline
    text = "野球の試合"  # fits uncut: head_tail and the pipeline's own truncation both keep all of it
    rc, [expected], err = run_predict(capsys, "--model_dir", head_tail_run / "model", "--text", text, "--dtype", "fp32")
    assert rc == 0, err
    [top] = pipeline("text-classification", model=str(head_tail_run / "model"), device="cpu")(text)
    assert (top["label"], top["score"]) == (expected["label"], pytest.approx(expected["probability"], abs=1e-5))
