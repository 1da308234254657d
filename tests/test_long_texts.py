"""Long texts: what an over-long example keeps (--truncation head | head_tail), and batches of a token budget
(--max_batch_tokens) whose gradient weighs every example alike, on one process or several."""

from __future__ import annotations

import contextlib
import logging
import random

import pytest
import torch

import bertcls
import data
import families
from conftest import train_args
from test_bench import LengthModel, make_run

# --------------------------------------------------------------------------------------- truncation


def test_kept_positions_hand_computed():
    # [CLS] t t t [SEP] b x 20 [SEP]: 3 special tokens, a 3-token title, a 20-token body at positions 5..24
    sources = [None, 0, 0, 0, None] + [1] * 20 + [None]
    head, cut = data.kept_positions(sources, True, 16, "head")  # room for 13: the title and 10 of the body
    assert (head, cut) == ([0, 1, 2, 3, 4, *range(5, 15), 25], False)
    # head_tail: round(10 * 128 / 510) = 3 from the start of the body, the other 7 from its end
    head_tail, cut = data.kept_positions(sources, True, 16, "head_tail")
    assert (head_tail, cut) == ([0, 1, 2, 3, 4, 5, 6, 7, *range(18, 25), 25], False)
    assert data.kept_positions(sources, True, 100, "head_tail") == (list(range(26)), False)  # fits: all of it
    # a title longer than the room: its start, no body, said so
    assert data.kept_positions([None] + [0] * 30 + [None] + [1] * 5 + [None], True, 10, "head_tail") == \
        ([0, *range(1, 8), 31, 37], True)


def test_head_tail_at_512_keeps_sun_et_al_128_and_382():
    sources = [None] + [0] * 1000 + [None]  # [CLS] text [SEP], one text of 1000 tokens
    kept, cut = data.kept_positions(sources, False, 512, "head_tail")
    assert kept == [0, *range(1, 129), *range(1001 - 382, 1001), 1001] and not cut


def test_head_tail_keeps_the_start_and_the_end_of_the_body(tiny_bert):
    tokenizer = families.load_tokenizer(str(tiny_bert))
    title, body = "野球の試合", "。".join(f"選手{i}が得点した" for i in range(30))
    title_ids = tokenizer(title, add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    room = 40 - 3 - len(title_ids)  # [CLS] title [SEP] body [SEP]
    head = round(room * 128 / 510)
    kept = {"head": body_ids[:room], "head_tail": body_ids[:head] + body_ids[-(room - head):]}
    for truncation, kept_body in kept.items():
        enc = data.encode_one(tokenizer, title, body, data.InputSpec(40, True, truncation))
        assert enc["input_ids"] == tokenizer.build_inputs_with_special_tokens(title_ids, kept_body)
        assert enc["token_type_ids"] == [0] * (len(title_ids) + 2) + [1] * (room + 1)
        assert not enc["title_cut"]


def test_cut_titles_are_counted_in_one_line_without_transformers_warnings(tiny_bert, capfd):
    import transformers
    tokenizer = families.load_tokenizer(str(tiny_bert))
    rows = [{"title": "野球の試合で選手が得点した" * (8 if i % 2 else 1), "body": "映画の公開。" * 20}
            for i in range(38)]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(logging.WARNING)  # conftest silences them; users see them
    try:
        notes = []
        encoded = data.tokenize_rows(tokenizer, rows, data.InputSpec(24, True), log=notes.append)
    finally:
        transformers.logging.set_verbosity(verbosity)
    assert notes == ["note: 19 of 38 titles were cut to fit: each alone is longer than 24 tokens with the special "
                     "tokens, so its example keeps the start of the title and none of its body"]
    assert all(len(ids) == 24 for ids in encoded["input_ids"])
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_an_unknown_truncation_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bertcls.parse_args(["--truncation", "tail"])
    assert exit_info.value.code == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "argument --truncation: invalid choice: 'tail' (choose from " in error and "head_tail" in error


def test_truncation_is_part_of_the_input_spec_and_the_cache_key(tiny_bert, tiny_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    head = make_run(tiny_bert, tiny_dataset, cache, "--max_seq_len", "24")
    assert head.spec == data.InputSpec(24, True, "head")
    head_tail = make_run(tiny_bert, tiny_dataset, cache, "--max_seq_len", "24", "--truncation", "head_tail")
    assert head_tail.spec == data.InputSpec(24, True, "head_tail")
    assert len(list(cache.glob("*.pt"))) == 6  # a cache of its own: the tiny bodies are cut, differently
    assert not torch.equal(head.packed["train"]["input_ids"], head_tail.packed["train"]["input_ids"])


# ------------------------------------------------------------------------------------ token budgets


def test_budget_batches_hold_more_short_examples_and_never_exceed_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    batches = bertcls.length_grouped_batches(lengths, 8, random.Random(1), group_batches=16, max_tokens=2048)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) * bertcls.padded_length(max(lengths[i] for i in b)) <= 2048 for b in batches)
    short = [len(b) for b in batches if max(lengths[i] for i in b) <= 100]
    long = [len(b) for b in batches if min(lengths[i] for i in b) > 400]
    assert min(short) > max(long) and max(long) == 2048 // 504  # 4 examples of 497..500 tokens, padded to 504
    assert batches == bertcls.length_grouped_batches(lengths, 8, random.Random(1), group_batches=16, max_tokens=2048)


def test_sorted_batches_with_a_budget_hand_computed():
    lengths = [100, 60, 50, 20, 10, 8]
    # padded widths 104, 64, 16: 2 x 104 > 200 | 3 x 64 = 192 <= 200 < 4 x 64 | 2 x 16
    assert bertcls.sorted_batches(lengths, 2, max_tokens=200) == [[0], [1, 2, 3], [4, 5]]
    assert bertcls.sorted_batches(lengths, 2) == [[0, 1], [2, 3], [4, 5]]


def test_examples_per_step_hand_computed():
    batches = [[0] * n for n in (3, 5, 2, 4, 1, 6, 2)]
    # 2 ranks x 2 micro-batches: a step takes 4 consecutive batches of the global order
    assert bertcls.examples_per_step(batches, 2, 2) == [3 + 5 + 2 + 4, 1 + 6 + 2]
    assert bertcls.examples_per_step(batches, 1, 1) == [3, 5, 2, 4, 1, 6, 2]


class GradientRecorder:
    """An optimizer that records the gradient of each step instead of stepping."""

    def __init__(self, params):
        self.params, self.param_groups, self.steps = list(params), [{"lr": 0.0}], []

    def step(self):
        self.steps.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def step_gradient(run, batches, world_size, rank, grad_accum_steps, step_examples=None) -> list[torch.Tensor]:
    run.world_size, run.rank, run.args.grad_accum_steps = world_size, rank, grad_accum_steps
    optimizer = GradientRecorder(run.raw_model.parameters())
    bertcls.train_epoch(run.raw_model, optimizer, torch.amp.GradScaler("cpu", enabled=False), run, batches, 0, 1,
                        step_examples=step_examples)
    [gradient] = optimizer.steps
    return gradient


def test_ranks_average_to_the_gradient_of_all_the_steps_examples(tiny_bert, tiny_dataset, tmp_path):
    from transformers import AutoModelForSequenceClassification
    run = make_run(tiny_bert, tiny_dataset, tmp_path / "cache", "--max_batch_tokens", "256", "--max_grad_norm", "0")
    run.raw_model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # same forward each call
    run.ctx = contextlib.nullcontext()
    first, second = next((a, b) for a, b in zip(*[iter(bertcls.all_train_batches(run, 1))] * 2) if len(a) != len(b))
    # one process, one step of both batches: the mean gradient over all their examples
    single = step_gradient(run, [first, second], world_size=1, rank=0, grad_accum_steps=2)
    # two ranks, a batch each: DDP averages the ranks' gradients
    counts = bertcls.examples_per_step([first, second], 1, 2)
    ranks = [step_gradient(run, [batch], 2, rank, 1, counts) for rank, batch in enumerate((first, second))]
    assert all(torch.allclose((a + b) / 2, s, atol=1e-6) for a, b, s in zip(*ranks, single))
    # each rank's own mean would weigh the examples of the smaller batch more
    naive = [step_gradient(run, [batch], 2, rank, 1) for rank, batch in enumerate((first, second))]
    assert not all(torch.allclose((a + b) / 2, s, atol=1e-6) for a, b, s in zip(*naive, single))


def test_evaluation_with_a_budget_gives_the_same_predictions():
    lengths = [3, 9, 2, 12, 5, 40, 33]
    packed = data.pack({"input_ids": [[1] * n for n in lengths], "token_type_ids": [[] for _ in lengths]})
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    kwargs = dict(device=torch.device("cpu"), ctx=contextlib.nullcontext(), pad_id=0, labels=labels)
    fixed = bertcls.predict(LengthModel(), packed, batch_size=2, **kwargs)
    budget = bertcls.predict(LengthModel(), packed, batch_size=2, max_batch_tokens=48, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(fixed, budget))


def test_a_budget_smaller_than_one_example_is_a_one_line_error(tiny_bert, tiny_dataset, tmp_path, capsys):
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, tmp_path, "--max_batch_tokens", "40")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "bertcls.py: error: --max_batch_tokens 40 cannot hold one example of 64 tokens (padded to 64): raise it or "
        "lower --max_seq_len")
    assert not list(tmp_path.glob("*/*/*/config.json"))
