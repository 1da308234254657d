"""scripts/make_tiny.py: a random BERT and a synthetic corpus that load offline and tokenize without [UNK]."""

from __future__ import annotations

import json

import make_tiny


def test_tiny_model_and_corpus_load_offline(tmp_path):
    from transformers import AutoConfig, AutoTokenizer
    model_dir, data = tmp_path / "m", tmp_path / "d.jsonl"
    assert make_tiny.main(["--model_dir", str(model_dir), "--data", str(data), "--per_category", "5",
                           "--vocab_size", "300"]) == 0
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 15 and {r["category"] for r in rows} == {"movie", "sports", "tech"}
    assert len({r["id"] for r in rows}) == 15
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    assert len(tokenizer) == config.vocab_size == 300  # padded with unused entries
    for row in rows:
        ids = tokenizer(row["title"], row["body"])["input_ids"]
        assert tokenizer.unk_token_id not in ids
    assert make_tiny.make_rows(5, 8, seed=0) == make_tiny.make_rows(5, 8, seed=0)  # deterministic
