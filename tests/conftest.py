"""Shared fixtures: a tiny learnable Japanese corpus and a tiny random BERT that loads offline.

No hub is reachable from the test machines, so the model is built here: a random BertConfig of two
layers, a WordPiece vocab.txt made from the MeCab (unidic-lite) segmentation of the corpus, and a
BertJapaneseTokenizer config, so the real Japanese tokenization path runs.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Each category has its own words, so a classifier can learn it from scratch in a few epochs.
CATEGORY_WORDS = {
    "sports": ["野球", "サッカー", "選手", "試合", "監督", "優勝", "得点", "球場"],
    "movie": ["映画", "俳優", "女優", "公開", "上映", "主演", "劇場", "脚本"],
    "tech": ["スマホ", "アプリ", "端末", "電池", "画面", "発売", "通信", "機能"],
}
COMMON_WORDS = ["今日", "新しい", "発表", "話題", "人気", "多く", "注目", "会見"]


def make_rows(n_per_label: int, seed: int = 0) -> list[dict]:
    """Articles whose title and body mix their category's words with words shared by all categories."""
    rng = random.Random(seed)
    rows = []
    for label, (category, words) in enumerate(sorted(CATEGORY_WORDS.items())):
        for k in range(n_per_label):
            title = "の".join(rng.sample(words, 2) + rng.sample(COMMON_WORDS, 1)) + "が話題"
            body = "\n".join("、".join(rng.sample(words, 3) + rng.sample(COMMON_WORDS, 1)) + "が発表された。"
                             for _ in range(rng.randint(2, 5)))
            rows.append({"id": f"{category}-{k}", "label": label, "category": category, "title": title, "body": body})
    rng.shuffle(rows)
    return rows


def write_dataset(directory: Path, splits: dict[str, list[dict]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    label2id = {c: i for i, c in enumerate(sorted(CATEGORY_WORDS))}
    (directory / "label2id.json").write_text(json.dumps(label2id), encoding="utf-8")
    for split, rows in splits.items():
        (directory / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return directory


def mecab_words(texts: list[str]) -> list[str]:
    import fugashi
    import unidic_lite
    tagger = fugashi.GenericTagger(f'-d "{unidic_lite.DICDIR}" -r "{os.path.join(unidic_lite.DICDIR, "mecabrc")}"')
    return sorted({w.surface for t in texts for w in tagger(t)})


def build_tiny_bert(directory: Path, texts: list[str], layers: int = 2, hidden: int = 64) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    words = mecab_words(texts)
    chars = sorted({c for t in texts for c in t if not c.isspace()} - set(words))
    vocab = SPECIAL_TOKENS + words + chars + ["##" + c for c in chars]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertJapaneseTokenizer", "word_tokenizer_type": "mecab",
        "mecab_kwargs": {"mecab_dic": "unidic_lite"}, "subword_tokenizer_type": "wordpiece",
        "do_lower_case": False, "model_max_length": 512}), encoding="utf-8")
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_rows() -> dict[str, list[dict]]:
    rows = make_rows(40)  # 120 articles: 80 / 20 / 20
    return {"train": rows[:80], "val": rows[80:100], "test": rows[100:]}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_rows) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny", tiny_rows)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tiny_rows) -> Path:
    texts = [r[f] for rows in tiny_rows.values() for r in rows for f in ("title", "body")]
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert", texts)


def train_args(model: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    """bertcls.py flags for a quick CPU run that learns the tiny corpus."""
    return ["--model_name", str(model), "--dataset_dir", str(dataset), "--output_dir", str(output_dir),
            "--epochs", "6", "--batch_size", "8", "--lr", "3e-3", "--num_warmup_epochs", "0.5",
            "--max_seq_len", "64", "--device", "cpu", "--cache_dir", str(output_dir / "cache"), *extra]


def finished_runs(output_dir: Path) -> list[Path]:
    return sorted(p.parent for p in output_dir.rglob("test-metrics.json"))
