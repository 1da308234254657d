"""Long texts: what an over-long example keeps (--truncation head | head_tail), texts far past any limit bounded
before the tokenizer sees them, and batches of a token budget (--max_batch_tokens) whose gradient weighs every
example alike."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
from pathlib import Path

import pytest
import torch

import bertcls
import data
import models
import predict
from conftest import finished_runs, train_args, write_dataset


def quiet(message: str) -> None:
    pass


class LetterTokenizer:
    """A slow tokenizer laid out like BERT's: one token per character (its code point), [CLS] 1, [SEP] 2."""
    is_fast = False

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [ord(c) for c in text if not c.isspace()]}

    def build_inputs_with_special_tokens(self, a, b=None):
        return [1] + a + [2] + ([] if b is None else b + [2])

    def create_token_type_ids_from_sequences(self, a, b=None):
        return [0] * (len(a) + 2) + ([] if b is None else [1] * (len(b) + 1))

    def get_special_tokens_mask(self, a, b=None):
        return [1] + [0] * len(a) + [1] + ([] if b is None else [0] * len(b) + [1])


def letters(ids: list[int]) -> str:
    return "".join({1: "[", 2: "]"}.get(i, chr(i)) for i in ids)


# --------------------------------------------------------------------------------------------------- truncation


def test_head_and_head_tail_hand_computed():
    title, body = "abc", "ABCDEFGHIJKLMNOPQRST"  # [CLS] abc [SEP] + 20 body letters + [SEP]
    # max_len 16: 3 special tokens and the title leave room for 10 of the body
    ids, types, counts = data.encode(LetterTokenizer(), title, body, data.InputSpec(16, True, "head"))
    assert letters(ids) == "[abc]ABCDEFGHIJ]"
    assert types == [0] * 5 + [1] * 11 and not counts["title_cut"]
    # head_tail: round(10 * 128 / 510) = round(2.51) = 3 from the start of the body, the other 7 from its end
    ids, types, _ = data.encode(LetterTokenizer(), title, body, data.InputSpec(16, True, "head_tail"))
    assert letters(ids) == "[abc]ABCNOPQRST]" and len(types) == 16
    assert data.encode(LetterTokenizer(), title, body, data.InputSpec(16, False, "head_tail"))[1] == []
    # it fits: all of it, whatever the truncation
    assert letters(data.encode(LetterTokenizer(), title, body, data.InputSpec(26, True, "head_tail"))[0]) == \
        f"[{title}]{body}]"
    # a title longer than the room: its start, no body, counted
    ids, _, counts = data.encode(LetterTokenizer(), "abcdefghijklmnop", "ABCDE", data.InputSpec(10, True, "head_tail"))
    assert letters(ids) == "[abcdefg]]" and counts["title_cut"] == 1


def test_head_tail_at_512_keeps_sun_et_al_128_and_382():
    text = "".join(chr(0x4E00 + i) for i in range(1000))  # one text of 1000 tokens
    ids, _, _ = data.encode(LetterTokenizer(), text, None, data.InputSpec(512, False, "head_tail"))
    assert ids == [1] + [ord(c) for c in text[:128] + text[-382:]] + [2]


def test_head_tail_keeps_the_start_and_the_end_of_the_body(tiny_bert):
    tokenizer = models.load_tokenizer(str(tiny_bert), log=quiet)
    title, body = "野球の試合", "。".join(f"選手{i}が得点した" for i in range(30))
    title_ids = tokenizer(title, add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    room = 40 - 3 - len(title_ids)  # [CLS] title [SEP] body [SEP]
    head = round(room * 128 / 510)
    kept = {"head": body_ids[:room], "head_tail": body_ids[:head] + body_ids[-(room - head):]}
    for truncation, kept_body in kept.items():
        ids, types, counts = data.encode(tokenizer, title, body, data.InputSpec(40, True, truncation))
        assert ids == tokenizer.build_inputs_with_special_tokens(title_ids, kept_body)
        assert types == [0] * (len(title_ids) + 2) + [1] * (room + 1)
        assert not counts["title_cut"]


def test_cut_titles_are_counted_in_one_note_without_transformers_warnings(tiny_bert, tmp_path, capfd):
    import transformers
    tokenizer = models.load_tokenizer(str(tiny_bert), log=quiet)
    rows = [{"label": i % 3, "title": "野球の試合で選手が得点した" * (8 if i % 2 else 1), "body": "映画の公開。" * 20}
            for i in range(38)]
    write_dataset(tmp_path, {"train": rows, "val": rows[:3], "test": rows[:3]})
    _, splits = data.load_dataset(tmp_path, quiet)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(logging.WARNING)  # conftest silences them; users see them
    try:
        notes = []
        packed = data.tokenized("train", splits["train"], tokenizer, data.InputSpec(24, True), "", 1, notes.append,
                                show=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
    [note] = notes
    assert note.startswith("tokenized train: 38 examples in ")
    assert note.endswith("; 19 of 38 titles alone are longer than 24 tokens: those examples keep the start of the "
                         "title and none of the body")
    assert data.lengths_of(packed) == [24] * 38
    assert capfd.readouterr() == ("", "")


def test_an_unknown_truncation_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bertcls.parse_args(["--truncation", "tail"])
    assert exit_info.value.code == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "argument --truncation: invalid choice: 'tail' (choose from " in error and "head_tail" in error


def test_truncation_is_part_of_the_cache_key(tiny_bert, tiny_dataset, tmp_path):
    tokenizer = models.load_tokenizer(str(tiny_bert), log=quiet)
    fingerprint = data.tokenizer_fingerprint(tokenizer)
    _, splits = data.load_dataset(tiny_dataset, quiet)
    packed = {}
    for truncation in data.TRUNCATIONS:
        spec = data.InputSpec(24, True, truncation)
        packed[truncation] = data.tokenized("train", splits["train"], tokenizer, spec, str(tmp_path), 1, quiet,
                                            show=False, fingerprint=fingerprint)
        assert len(list(tmp_path.iterdir())) == len(packed)  # an entry of its own
    assert not torch.equal(packed["head"]["input_ids"], packed["head_tail"]["input_ids"])  # tiny bodies cut at 24


# -------------------------------------------------------------------------------- texts far past any limit


class SeenLengths:
    """data.layout, recording how many characters the tokenizer is given; a text over `limit` fails the test
    before the tokenizer sees it (MeCab crashes the whole process on texts of about a million characters)."""

    def __init__(self, monkeypatch, limit: int):
        self.limit, self.longest, self.layout = limit, 0, data.layout
        monkeypatch.setattr(data, "layout", self)

    def __call__(self, tokenizer, texts):
        self.longest = max([self.longest, *map(len, texts)])
        assert self.longest <= self.limit, f"the tokenizer would be given {self.longest} characters"
        return self.layout(tokenizer, texts)


START, END = "野球の試合で選手が得点した。", "映画の主演女優が会見した。"
HUGE = 2_000_000


def huge_text() -> str:
    filler = "今日は新しいスマホの発表が話題になった。"
    return START + filler * ((HUGE - len(START) - len(END)) // len(filler)) + END


def test_a_huge_text_is_bounded_before_the_tokenizer_sees_it(tiny_bert, monkeypatch):
    tokenizer = models.load_tokenizer(str(tiny_bert), log=quiet)
    bound = data.CHARS_PER_TOKEN * 32
    seen = SeenLengths(monkeypatch, 2 * bound + 1)
    text = huge_text()
    assert len(text) > HUGE - 30
    # texts of 2 x bound characters are not cut: what the huge text must give at its start and at its end
    start, end = text[:2 * bound], text[-2 * bound:]
    title = tokenizer(START, add_special_tokens=False)["input_ids"]
    room = 32 - 3 - len(title)
    kept_head = 2 + len(title) + round(room * data.HEAD_SHARE)  # [CLS] title [SEP] and the body's first tokens
    for truncation in data.TRUNCATIONS:
        spec = data.InputSpec(32, True, truncation)
        ids, _, counts = data.encode(tokenizer, START, text, spec)
        assert counts["chars_cut"] == 1 and len(ids) == 32
        from_start, _, uncut = data.encode(tokenizer, START, start, spec)
        from_end, _, _ = data.encode(tokenizer, START, end, spec)
        assert not uncut["chars_cut"]
        if truncation == "head":
            assert ids == from_start
        else:  # the end of the text too
            assert ids[:kept_head] == from_start[:kept_head] and ids[kept_head:] == from_end[kept_head:]
            assert ids != from_start
        one, _, counts = data.encode(tokenizer, text, None, spec)  # one text
        assert counts["chars_cut"] == 1
        assert (one[-5:] == data.encode(tokenizer, end, None, spec)[0][-5:]) is (truncation == "head_tail")
        both, _, counts = data.encode(tokenizer, text, text, spec)  # a huge title too: only its start
        assert counts["chars_cut"] == 2 and counts["title_cut"] == 1
        assert both == data.encode(tokenizer, start, "", spec)[0]  # [CLS] its first 29 tokens [SEP] [SEP]
    assert bound < seen.longest <= 2 * bound + 1  # start + "\n" + end with head_tail


@pytest.fixture(scope="module")
def huge_run(tmp_path_factory, tiny_bert, tiny_rows) -> tuple[Path, Path, str]:
    """A head_tail run on a dataset whose training split holds one article of 2 million characters:
    (run directory, dataset, its stderr)."""
    root = tmp_path_factory.mktemp("huge")
    rows = {split: [dict(r) for r in split_rows] for split, split_rows in tiny_rows.items()}
    rows["train"][3]["body"] = huge_text()
    dataset = write_dataset(root / "data", rows)
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = SeenLengths(monkeypatch, 2 * data.CHARS_PER_TOKEN * 32 + 1)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert bertcls.main(train_args(tiny_bert, dataset, root / "out", "--epochs", "1", "--max_seq_len", "32",
                                           "--truncation", "head_tail", "--save_model")) == 0
        assert seen.longest > data.CHARS_PER_TOKEN * 32
    [run_dir] = finished_runs(root / "out")
    return run_dir, dataset, err.getvalue()


def bound_note(n: int, of: int) -> str:
    return (f"{n} of {of} texts were longer than {2 * data.CHARS_PER_TOKEN * 32} characters and only their first "
            f"(head_tail: first and last) {data.CHARS_PER_TOKEN * 32} were tokenized, far more than the tokens kept")


def test_a_run_with_a_huge_article_trains_and_says_so_once(huge_run):
    run_dir, _, err = huge_run
    assert err.count(bound_note(1, 80)) == 1
    assert err.count("texts were longer than") == 1  # val and test hold none
    assert json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["examples"]["train"] == 80


def test_predict_bounds_a_huge_text_too(huge_run, tmp_path, monkeypatch, capsys):
    run_dir, _, _ = huge_run
    seen = SeenLengths(monkeypatch, 2 * data.CHARS_PER_TOKEN * 32 + 1)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "huge", "title": START, "body": huge_text()}, ensure_ascii=False) + "\n" +
                      json.dumps({"id": "small", "title": START, "body": END}, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    assert predict.main(["--model_dir", str(run_dir / "model"), "--input", str(source)]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["huge", "small"]
    assert err.count(bound_note(1, 2)) == 1
    assert predict.main(["--model_dir", str(run_dir / "model"), "--text", huge_text()]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and err.count(bound_note(1, 1)) == 1
    assert data.CHARS_PER_TOKEN * 32 < seen.longest


def long_articles(rows: list[dict], n: int) -> list[tuple[str, str]]:
    """Articles of ordinary text, many times longer than the bound at short lengths."""
    bodies = [r["body"] for r in rows]
    return [(rows[i]["title"], "\n".join(bodies[i:] + bodies[:i])[:4000]) for i in range(n)]


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_modernbert"])
def test_the_bound_does_not_change_the_tokens_of_ordinary_texts(request, tiny_rows, monkeypatch, family):
    tokenizer = models.load_tokenizer(str(request.getfixturevalue(family)), log=quiet)
    examples = [(r["title"], r["body"]) for r in tiny_rows["train"]] + long_articles(tiny_rows["train"], 10)
    specs = [data.InputSpec(n, True, t) for n in (16, 64) for t in data.TRUNCATIONS]
    bounded = [[data.encode(tokenizer, title, body, spec) for title, body in examples] for spec in specs]
    assert sum(counts["chars_cut"] for per_spec in bounded for _, _, counts in per_spec) >= 10  # it was used
    monkeypatch.setattr(data, "CHARS_PER_TOKEN", 10**9)  # no bound
    unbounded = [[data.encode(tokenizer, title, body, spec) for title, body in examples] for spec in specs]
    assert [[e[:2] for e in per_spec] for per_spec in bounded] == [[e[:2] for e in per_spec] for per_spec in unbounded]


# ------------------------------------------------------------------------------------------- token budgets


def test_budget_batches_never_exceed_the_budget_and_hold_more_short_examples():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    order = sorted(range(1000), key=lambda i: -lengths[i])
    batches = data.cut_batches(order, lengths, 8, 2048, None)
    assert [i for b in batches for i in b] == order
    assert all(len(b) * data.padded_length(max(lengths[i] for i in b)) <= 2048 for b in batches)
    short = [len(b) for b in batches if max(lengths[i] for i in b) <= 100]
    long = [len(b) for b in batches if min(lengths[i] for i in b) > 400]
    assert min(short) > 4 * max(long)
    args = argparse.Namespace(seed=1, batch_size=8, max_batch_tokens=2048)
    epoch = bertcls.epoch_batches(lengths, args, 1, 1)
    assert sorted(i for b in epoch for i in b) == list(range(1000))
    assert all(len(b) * data.padded_length(max(lengths[i] for i in b)) <= 2048 for b in epoch)


def test_budget_batches_hand_computed():
    lengths = [100, 60, 50, 20, 10, 8]
    # padded widths 104, 64, 16: 2 x 104 > 200 | 3 x 64 = 192 <= 200 < 4 x 64 | 2 x 16
    assert data.cut_batches(range(6), lengths, 2, 200, None) == [[0], [1, 2, 3], [4, 5]]
    assert data.cut_batches(range(6), lengths, 2, None, None) == [[0, 1], [2, 3], [4, 5]]
    # widths 104, 64, 56, 24, 16, 8: 2 x 104 > 130 | 2 x 64 <= 130 < 3 x 64 | 3 x 24
    assert data.cut_batches(range(6), lengths, 2, 130, None) == [[0], [1, 2], [3, 4, 5]]
    # compiled, the widths are buckets (64, then max_len 128): 2 x 64 | 2 x 64 | 1
    assert data.cut_batches(range(6), lengths, 2, 130, [64, 128]) == [[0], [1, 2], [3, 4], [5]]


def test_a_budget_smaller_than_one_example_is_a_one_line_error(tiny_bert, tiny_dataset, tmp_path, capsys):
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, tmp_path, "--max_batch_tokens", "40")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "bertcls.py: error: --max_batch_tokens 40 cannot hold one example of 64 tokens (padded): raise it or lower "
        "--max_seq_len")
    assert not list(tmp_path.rglob("config.json"))


def test_predict_refuses_a_budget_smaller_than_one_example(huge_run, capsys):
    run_dir, _, _ = huge_run
    assert predict.main(["--model_dir", str(run_dir / "model"), "--text", START * 10, "--max_batch_tokens", "8"]) == 1
    assert "--max_batch_tokens 8 cannot hold one example" in capsys.readouterr().err


class GradientRecorder:
    """An optimizer that records the gradient of each step instead of stepping."""

    def __init__(self, params):
        self.params, self.param_groups, self.steps = list(params), [{"lr": 0.0}], []

    def step(self):
        self.steps.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_token_budget_batches_give_the_gradient_of_the_whole_batch(tiny_bert, tiny_dataset):
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # the same each call
    tokenizer = models.load_tokenizer(str(tiny_bert), log=quiet)
    _, splits = data.load_dataset(tiny_dataset, quiet)
    packed = data.tokenized("train", splits["train"], tokenizer, data.InputSpec(64, True), "", 1, quiet, show=False)
    inputs = data.Inputs(packed, splits["train"].labels, tokenizer.pad_token_id)
    lengths = data.lengths_of(packed)
    examples = sorted(range(16), key=lambda i: -lengths[i])
    batches = data.cut_batches(examples, lengths, 8, 200, None)
    assert len({len(b) for b in batches}) > 1  # batches of different sizes: a mean per batch would be wrong
    args = argparse.Namespace(grad_accum_steps=len(batches), lr=1e-3, max_grad_norm=0.0, log_interval=1)
    recorder = GradientRecorder(model.parameters())
    _, loss = bertcls.train_epoch(model, recorder, torch.amp.GradScaler("cpu", enabled=False), inputs, batches,
                                  bertcls.step_sizes(batches, len(batches), 1), args, (1, 0), 0,
                                  contextlib.nullcontext(), torch.device("cpu"))
    [budget] = recorder.steps
    model.zero_grad(set_to_none=True)
    whole = model(**inputs.batch(examples, torch.device("cpu")))  # one hand-made batch: the mean over all 16
    whole.loss.backward()
    assert loss == pytest.approx(whole.loss.item(), abs=1e-5)
    assert all(torch.allclose(b, p.grad, atol=1e-6) for b, p in zip(budget, model.parameters()))
    # what a mean per batch would give instead
    model.zero_grad(set_to_none=True)
    for batch in batches:
        (model(**inputs.batch(batch, torch.device("cpu"))).loss / len(batches)).backward()
    assert not all(torch.allclose(b, p.grad, atol=1e-6) for b, p in zip(budget, model.parameters()))


class LengthModel(torch.nn.Module):
    """Logits from the number of real tokens: tells whether padding or batching changed anything."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        n = (input_ids != 0).sum(-1).float() if attention_mask is None else attention_mask.sum(-1).float()
        return argparse.Namespace(logits=torch.stack([n / 10, -n / 10], -1))


def test_evaluation_with_a_budget_gives_the_same_predictions():
    lengths = [3, 9, 2, 12, 5, 40, 33]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed = {"offsets": offsets, "input_ids": torch.ones(int(offsets[-1]), dtype=torch.int32)}
    inputs = data.Inputs(packed, torch.tensor([0, 1, 0, 1, 0, 1, 1]), 0)
    cpu, ctx = torch.device("cpu"), contextlib.nullcontext()
    fixed = bertcls.predict(LengthModel(), inputs, 2, None, ctx, cpu)
    budget = bertcls.predict(LengthModel(), inputs, 2, 48, ctx, cpu)
    assert all(torch.equal(a, b) for a, b in zip(fixed, budget))
    assert fixed[0][:, 0].tolist() == pytest.approx(torch.tensor(lengths).div(10).mul(2).sigmoid().tolist(), abs=1e-6)
