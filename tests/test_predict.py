"""predict.py and bertcls.py --save_model: a saved model reproduces its run and loads with transformers alone."""

from __future__ import annotations

import errno
import io
import random
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import bertcls
import common
import data
import families
import predict
from conftest import REPO, finished_runs, train_args

LABELS = ["movie", "sports", "tech"]  # sorted category names = ids 0, 1, 2 in the tiny dataset


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert, tiny_dataset) -> Path:
    output_dir = tmp_path_factory.mktemp("predict-runs")
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, output_dir, "--save_model")) == 0
    [run] = finished_runs(output_dir)
    return run


def read_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def run_predict(capsys, *argv: str) -> tuple[int, list[dict], str]:
    rc = predict.main(list(argv))
    captured = capsys.readouterr()
    return rc, read_lines(captured.out), captured.err


def copy_model(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir / "model", tmp_path / "model"))


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config), encoding="utf-8")


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("predict.py:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("predict.py: error: ")
    return lines[0]


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
    assert json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["max_seq_len_used"] == 64


def test_predict_reproduces_test_predictions(run_dir, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    rc, stdout, err = run_predict(capsys, "--model_dir", str(run_dir / "model"), "--input",
                                  str(tiny_dataset / "test.jsonl"), "--output", str(out), "--batch_size", "7")
    assert rc == 0, err
    assert stdout == []
    predicted = read_lines(out.read_text(encoding="utf-8"))
    expected = read_lines((run_dir / "test-predictions.jsonl").read_text(encoding="utf-8"))
    assert len(predicted) == len(expected) == 20
    assert [p["id"] for p in predicted] == [e["id"] for e in expected]
    assert [p["label"] for p in predicted] == [e["predicted"] for e in expected]
    for p, e in zip(predicted, expected):
        assert [k["label"] for k in p["top_k"]] == sorted(LABELS, key=lambda name: -e["probabilities"][name])
        for k in p["top_k"]:
            assert k["probability"] == pytest.approx(e["probabilities"][k["label"]], abs=1e-5)
        assert p["top_k"][0] == {"label": p["label"], "probability": p["probability"]}


def test_predict_shows_its_progress_off_a_terminal(run_dir, tiny_dataset, tmp_path, monkeypatch, capsys):
    """A large --input is not silent until it ends: plain progress lines for tokenizing and classifying."""
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.0)  # a line at each update: stderr is not a terminal here
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 8)
    rc, _, err = run_predict(capsys, "--model_dir", str(run_dir / "model"), "--input", str(tiny_dataset / "test.jsonl"),
                             "--output", str(tmp_path / "p.jsonl"), "--batch_size", "7")
    assert rc == 0, err
    tokenizing = [line.split(" (")[0] for line in err.splitlines() if line.startswith("tokenizing: ")]
    classifying = [line.split(" (")[0] for line in err.splitlines() if line.startswith("classifying: ")]
    assert tokenizing == ["tokenizing: 8/20 examples", "tokenizing: 16/20 examples", "tokenizing: 20/20 examples"]
    done = [int(line.split(" ")[1].split("/")[0]) for line in classifying]  # batches of 7, 7, 6 in length order
    assert len(done) == 3 and done[-1] == 20
    assert sorted(b - a for a, b in zip([0] + done, done)) == [6, 7, 7]


def test_no_loading_bar_in_a_log_file(run_dir, capfd):
    """Off a terminal predict.py's log has no "Loading weights" bar (a run of carriage returns), as bertcls.py's."""
    from transformers.utils import logging as transformers_logging
    capfd.readouterr()
    assert predict.main(["--model_dir", str(run_dir / "model"), "--text", "野球の試合で選手が得点した"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["label"] in LABELS
    assert "Loading weights" not in err and "\r" not in err
    assert transformers_logging.is_progress_bar_enabled()  # as before, for what follows


def test_stdin_text_and_top_k(run_dir, monkeypatch, capsys):
    model = str(run_dir / "model")
    text = "野球の試合で選手が得点した"
    lines = [json.dumps({"id": 7, "text": text}, ensure_ascii=False), "",
             json.dumps({"title": "映画の主演女優", "body": "劇場で公開された。"}, ensure_ascii=False)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    rc, from_stdin, err = run_predict(capsys, "--model_dir", model, "--top_k", "1")
    assert rc == 0, err
    assert [r.get("id", "none") for r in from_stdin] == [7, "none"]
    assert [r["label"] for r in from_stdin] == ["sports", "movie"]
    assert all(len(r["top_k"]) == 1 for r in from_stdin)

    rc, from_text, err = run_predict(capsys, "--model_dir", model, "--text", text, "--top_k", "5")
    assert rc == 0, err
    [record] = from_text
    assert "id" not in record
    assert (record["label"], record["probability"]) == (from_stdin[0]["label"], from_stdin[0]["probability"])
    assert sorted(k["label"] for k in record["top_k"]) == LABELS  # top_k beyond the label count lists all
    assert sum(k["probability"] for k in record["top_k"]) == pytest.approx(1, abs=1e-5)


def test_pipeline_loads_saved_model(run_dir, tiny_rows, monkeypatch, capsys):
    from transformers import pipeline
    row = tiny_rows["test"][0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(row, ensure_ascii=False) + "\n"))
    # the pipeline computes in fp32; predict.py's default on a CPU with bf16 units is bf16 autocast
    rc, [expected], err = run_predict(capsys, "--model_dir", str(run_dir / "model"), "--dtype", "fp32")
    assert rc == 0, err
    classifier = pipeline("text-classification", model=str(run_dir / "model"), device="cpu")
    ranked = classifier({"text": row["title"], "text_pair": row["body"]}, truncation="only_second", top_k=None)
    assert sorted(r["label"] for r in ranked) == LABELS  # category names, not LABEL_0..
    assert ranked[0]["label"] == expected["label"]
    # same truncation and token types as training: the pipeline's probability is predict.py's
    assert ranked[0]["score"] == pytest.approx(expected["probability"], abs=1e-5)


def readme_pipeline_snippet() -> list[str]:
    """The lines of the README's Python block that uses pipeline(...)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    [block] = [b for b in readme.split("```python\n")[1:] if "pipeline(" in b.split("```")[0]]
    return block.split("```")[0].splitlines()


def test_readme_pipeline_snippet_classifies_a_long_article(run_dir, tiny_rows, monkeypatch, capsys):
    """The README's snippet, run as written on an article far past the training length, gives predict.py's labels;
    without truncation= the same call fails: the saved tokenizer does not truncate by itself."""
    from transformers import pipeline
    row = dict(tiny_rows["test"][0], body="\n".join([tiny_rows["test"][0]["body"]] * 20))
    model_dir = str(run_dir / "model")
    tokenizer = families.load_tokenizer(model_dir)
    assert len(tokenizer(row["title"], row["body"])["input_ids"]) > 10 * 64  # train_args' --max_seq_len 64
    code = "\n".join("result = " + line if line.startswith("clf(") else line for line in readme_pipeline_snippet())
    assert 'model="outputs/.../model"' in code and '"タイトル"' in code and '"本文"' in code
    code = (code.replace('"outputs/.../model"', repr(model_dir))
            .replace('"タイトル"', repr(row["title"])).replace('"本文"', repr(row["body"])))
    namespace: dict = {}
    exec(code, namespace)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(row, ensure_ascii=False) + "\n"))
    rc, [expected], err = run_predict(capsys, "--model_dir", model_dir, "--dtype", "fp32")
    assert rc == 0, err
    assert [r["label"] for r in namespace["result"]] == [k["label"] for k in expected["top_k"]]
    for got, want in zip(namespace["result"], expected["top_k"]):
        assert got["score"] == pytest.approx(want["probability"], abs=1e-5)
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        pipeline("text-classification", model=model_dir)({"text": row["title"], "text_pair": row["body"]})


def test_command_line_reads_stdin(run_dir, tiny_rows):
    # a test article whose gold label the run got right, sent as bertcls.py reads it: id + title + body
    predictions = read_lines((run_dir / "test-predictions.jsonl").read_text(encoding="utf-8"))
    rows = {row["id"]: row for row in tiny_rows["test"]}
    hit = next(p for p in predictions if p["gold"] == p["predicted"])
    row = rows[hit["id"]]
    line = json.dumps({"id": row["id"], "title": row["title"], "body": row["body"]}, ensure_ascii=False) + "\n"
    result = subprocess.run([sys.executable, str(REPO / "predict.py"), "--model_dir", str(run_dir / "model")],
                            input=line, capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
    [record] = read_lines(result.stdout)
    assert (record["id"], record["label"]) == (row["id"], hit["gold"])


@pytest.mark.parametrize("content, message", [
    ('{"text": "野球"}\n{oops\n', ":2: not valid JSON"),
    ('{"text": "野球"}\n\n[1, 2]\n', ":3: expected a JSON object, got list"),
    ('{"id": 1, "title": "野球"}\n', ":1: needs a string 'text', or string 'title' and 'body'"),
])
def test_bad_line_stops_with_one_line(run_dir, tmp_path, capsys, content, message):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(content, encoding="utf-8")
    rc, stdout, err = run_predict(capsys, "--model_dir", str(run_dir / "model"), "--input", str(source),
                                  "--output", str(out))
    assert rc == 1 and stdout == [] and not out.exists()
    assert f"{source}{message}" in error_line(err)


def test_skip_bad_lines_reports_and_goes_on(run_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    lines = ['{"id": "a", "text": "野球の試合"}', "not json", '{"id": "b"}',
             '{"id": "c", "text": "映画の公開"}']
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc, stdout, err = run_predict(capsys, "--model_dir", str(run_dir / "model"), "--input", str(source),
                                  "--skip_bad_lines")
    assert rc == 0, err
    assert [r["id"] for r in stdout] == ["a", "c"]
    warnings = [line for line in err.splitlines() if line.startswith("predict.py: warning:")]
    assert len(warnings) == 2
    assert f"{source}:2: not valid JSON" in warnings[0] and f"{source}:3: needs a string" in warnings[1]


def test_refuses_model_without_classification_head(tiny_bert, capsys):
    rc, stdout, err = run_predict(capsys, "--model_dir", str(tiny_bert), "--text", "野球")
    assert rc == 1 and stdout == []
    assert "holds no sequence classification model (architectures: BertModel)" in error_line(err)


def test_refuses_default_label_names(run_dir, tmp_path, capsys):
    model_dir = copy_model(run_dir, tmp_path)
    edit_config(model_dir, id2label={str(i): f"LABEL_{i}" for i in range(3)},
                label2id={f"LABEL_{i}": i for i in range(3)})
    rc, stdout, err = run_predict(capsys, "--model_dir", str(model_dir), "--text", "野球")
    assert rc == 1 and stdout == []
    assert "has no label names" in error_line(err)


def test_refuses_non_safetensors_weights(run_dir, tmp_path, capsys):
    model_dir = copy_model(run_dir, tmp_path)
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    rc, stdout, err = run_predict(capsys, "--model_dir", str(model_dir), "--text", "野球")
    assert rc == 1 and stdout == []
    assert "has no model.safetensors" in error_line(err)


def test_refuses_weights_without_classifier(run_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    model_dir = copy_model(run_dir, tmp_path)
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    rc, stdout, err = run_predict(capsys, "--model_dir", str(model_dir), "--text", "野球")
    assert rc == 1 and stdout == []
    assert "lacks weights the classifier needs (classifier.bias, classifier.weight)" in error_line(err)


def test_save_model_replaces_stale_temporary_directory(run_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model", use_safetensors=True)
    tokenizer = families.load_tokenizer(str(run_dir / "model"))
    stale = tmp_path / ".model.tmp"
    stale.mkdir()
    (stale / "pytorch_model.bin").write_bytes(b"left by an interrupted save")
    run = SimpleNamespace(raw_model=model, tokenizer=tokenizer, spec=data.InputSpec(32, True),
                          args=SimpleNamespace(model_name="base"))
    bertcls.save_model(run, tmp_path / "model")
    assert not stale.exists() and not (tmp_path / "model" / "pytorch_model.bin").exists()
    settings = json.loads((tmp_path / "model" / "bertcls.json").read_text(encoding="utf-8"))
    assert (settings["max_seq_len"], settings["base_model"]) == (32, "base")
    tokenizer_config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tokenizer_config["model_max_length"] == 32
    assert tokenizer_config["model_input_names"] == ["input_ids", "token_type_ids", "attention_mask"]


# ------------------------------------------------------------- a long-context model trained with head_tail


@pytest.fixture(scope="module")
def modernbert_run(tmp_path_factory, tiny_modernbert, tiny_dataset) -> Path:
    output_dir = tmp_path_factory.mktemp("modernbert-runs")
    # 24 tokens cut most tiny bodies, so head_tail is what decides the inputs; batches of at most 128 tokens
    flags = ["--save_model", "--epochs", "4", "--truncation", "head_tail", "--max_seq_len", "24",
             "--max_batch_tokens", "128"]
    assert bertcls.main(train_args(tiny_modernbert, tiny_dataset, output_dir, *flags)) == 0
    [run] = finished_runs(output_dir)
    return run


def test_head_tail_and_token_budget_are_recorded(modernbert_run, tiny_rows):
    config = json.loads((modernbert_run / "config.json").read_text(encoding="utf-8"))
    assert (config["args"]["truncation"], config["args"]["max_batch_tokens"]) == ("head_tail", 128)
    settings = json.loads((modernbert_run / "model" / "bertcls.json").read_text(encoding="utf-8"))
    assert (settings["max_seq_len"], settings["token_type_ids"], settings["truncation"]) == (24, False, "head_tail")
    # the schedule counts the batches of every epoch: with a token budget their number varies
    tokenizer = families.load_tokenizer(str(modernbert_run / "model"))
    spec = data.InputSpec(24, False, "head_tail")
    packed = data.pack(data.tokenize_rows(tokenizer, tiny_rows["train"], spec))
    lengths = data.example_lengths(packed)
    steps = [len(bertcls.length_grouped_batches(lengths, 8, random.Random(f"42-{epoch}"), max_tokens=128))
             for epoch in range(1, 5)]
    assert config["total_optimizer_steps"] == sum(steps)
    assert config["effective_batch_size"] == round(80 / steps[0], 1)


def test_predict_reproduces_a_head_tail_run(modernbert_run, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    rc, _, err = run_predict(capsys, "--model_dir", str(modernbert_run / "model"), "--input",
                             str(tiny_dataset / "test.jsonl"), "--output", str(out), "--max_batch_tokens", "64")
    assert rc == 0, err
    predicted = read_lines(out.read_text(encoding="utf-8"))
    expected = read_lines((modernbert_run / "test-predictions.jsonl").read_text(encoding="utf-8"))
    assert [p["label"] for p in predicted] == [e["predicted"] for e in expected]
    for p, e in zip(predicted, expected):
        assert p["probability"] == pytest.approx(e["probabilities"][p["label"]], abs=1e-5)


def test_pipeline_loads_a_saved_modernbert(modernbert_run, capsys):
    from transformers import pipeline
    text = "野球の試合"  # fits uncut: head_tail and the pipeline's own truncation both keep all of it
    rc, [expected], err = run_predict(capsys, "--model_dir", str(modernbert_run / "model"), "--text", text,
                                      "--dtype", "fp32")
    assert rc == 0, err
    classifier = pipeline("text-classification", model=str(modernbert_run / "model"), device="cpu")
    [top] = classifier(text)
    assert (top["label"], top["score"]) == (expected["label"], pytest.approx(expected["probability"], abs=1e-5))


def test_saved_settings_without_truncation_mean_head_and_a_bad_one_is_refused(run_dir, tmp_path, capsys):
    model_dir = copy_model(run_dir, tmp_path)
    path = model_dir / "bertcls.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    del settings["truncation"]  # written before --truncation existed
    path.write_text(json.dumps(settings), encoding="utf-8")
    assert predict.read_saved_settings(model_dir)["truncation"] == "head"
    path.write_text(json.dumps({**settings, "truncation": "middle"}), encoding="utf-8")
    rc, stdout, err = run_predict(capsys, "--model_dir", str(model_dir), "--text", "野球")
    assert rc == 1 and stdout == []
    assert "a truncation of head or head_tail; re-save the model with bertcls.py --save_model" in error_line(err)


def test_save_model_shows_no_shard_progress_bar(run_dir, tmp_path, capfd):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model", use_safetensors=True)
    run = SimpleNamespace(raw_model=model, tokenizer=families.load_tokenizer(str(run_dir / "model")),
                          spec=data.InputSpec(32, True), args=SimpleNamespace(model_name="base"))
    capfd.readouterr()
    assert transformers_logging.is_progress_bar_enabled()
    bertcls.save_model(run, tmp_path / "model")
    assert "Writing model shards" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()  # back on for what follows (downloads)


@pytest.mark.parametrize("content, message", [
    (b'{"max_seq_len": 64, "token_type_ids": tr\xffue}', "bertcls.json:1: not UTF-8 (byte 0xff)"),
    (b'{"max_seq_len": 64, "token_type_ids": "yes"}', "bertcls.json: expected a JSON object with a positive"),
])
def test_bad_bertcls_json_is_one_line(run_dir, tmp_path, capsys, content, message):
    model_dir = copy_model(run_dir, tmp_path)
    (model_dir / "bertcls.json").write_bytes(content)
    rc, stdout, err = run_predict(capsys, "--model_dir", str(model_dir), "--text", "野球")
    assert rc == 1 and stdout == []
    assert message in error_line(err)


def test_bertcls_json_with_a_bom_is_read(run_dir, tmp_path, capsys):
    model_dir = copy_model(run_dir, tmp_path)
    (model_dir / "bertcls.json").write_bytes(b"\xef\xbb\xbf" + (run_dir / "model" / "bertcls.json").read_bytes())
    rc, stdout, err = run_predict(capsys, "--model_dir", str(model_dir), "--text", "野球")
    assert rc == 0 and len(stdout) == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--text", "野球", "--max_seq_len", "2"], "a length of 2 tokens leaves no room for text: the tokenizer adds 2"),
    (["--text", "野球\udcff"], "--text is not valid UTF-8"),  # how non-UTF-8 bytes on the command line arrive
])
def test_inputs_that_cannot_be_classified_are_one_line(run_dir, capsys, argv, message):
    rc, stdout, err = run_predict(capsys, "--model_dir", str(run_dir / "model"), *argv)
    assert rc == 1 and stdout == []
    assert message in error_line(err)


@pytest.mark.parametrize("output, message", [
    ("out", "--output {tmp}/out is a directory: pass a file name, e.g. {tmp}/out/predictions.jsonl"),
    ("missing/p.jsonl", "--output {tmp}/missing/p.jsonl: {tmp}/missing does not exist: create the directory or pass "
                        "another path"),
    ("file/p.jsonl", "--output {tmp}/file/p.jsonl: {tmp}/file is not a directory: create the directory or pass "
                     "another path"),
])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_is_loaded(tmp_path, capsys, output, message):
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("")
    # no model there: a check made after loading it (and after the inference) would report that instead
    rc, stdout, err = run_predict(capsys, "--model_dir", str(tmp_path / "no-model"), "--text", "野球",
                                  "--output", str(tmp_path / output))
    assert rc == 1 and stdout == []
    assert error_line(err) == "predict.py: error: " + message.format(tmp=tmp_path)


def test_a_full_disk_while_writing_the_output_is_one_line_and_no_file(run_dir, tmp_path, capsys, monkeypatch):
    def full_disk(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predict, "atomic_write_text", full_disk)
    output = tmp_path / "p.jsonl"
    rc, stdout, err = run_predict(capsys, "--model_dir", str(run_dir / "model"), "--text", "野球",
                                  "--output", str(output))
    assert rc == 1 and stdout == []
    assert error_line(err) == (f"predict.py: error: could not write --output {output} (No space left on device): "
                               "nothing was written; free space and run again, or pass --output - for stdout")
    assert list(tmp_path.iterdir()) == []
