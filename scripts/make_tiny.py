"""Build a randomly initialised BERT and a synthetic labelled corpus, to try bertcls without a download.

    python scripts/make_tiny.py                                   # models/tiny-bert/ and data/tiny.jsonl
    python prepare.py --input data/tiny.jsonl --text_fields title,body --label_field category
    python bertcls.py --model_name models/tiny-bert --dataset_dir datasets/tiny --epochs 3 --lr 3e-3
    # a model of BERT-base's shape (random weights), e.g. to measure throughput on a GPU:
    python scripts/make_tiny.py --layers 12 --hidden 768 --heads 12 --vocab_size 32000 \\
        --model_dir models/bert-base-shape
    # articles that all fill 512 tokens (about 24 tokens a sentence), as 72% of livedoor's do:
    python scripts/make_tiny.py --min_sentences 24 --max_sentences 32 --data data/long.jsonl ...

The corpus has three categories, each with its own words mixed with words all categories share, so a
model learns it from scratch in a few epochs; titles and bodies vary in length. The tokenizer is a plain
WordPiece vocab.txt (characters and ##characters of the corpus, padded with unused entries up to
--vocab_size) read by transformers' BertTokenizer: no MeCab is needed, so this also runs where only
torch and transformers are installed. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from common import jsonl_line, positive_int  # noqa: E402

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CATEGORY_WORDS = {
    "movie": ["映画", "俳優", "女優", "公開", "上映", "主演", "劇場", "脚本"],
    "sports": ["野球", "サッカー", "選手", "試合", "監督", "優勝", "得点", "球場"],
    "tech": ["スマホ", "アプリ", "端末", "電池", "画面", "発売", "通信", "機能"],
}
COMMON_WORDS = ["今日", "新しい", "発表", "話題", "人気", "多く", "注目", "会見"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default="models/tiny-bert", help="model directory to write (default: %(default)s)")
    p.add_argument("--data", default="data/tiny.jsonl",
                   help="corpus JSONL to write; '' for none (default: %(default)s)")
    p.add_argument("--per_category", type=positive_int, default=200,
                   help="examples per category (default: %(default)s)")
    p.add_argument("--min_sentences", type=positive_int, default=2,
                   help="body sentences at least (default: %(default)s)")
    p.add_argument("--max_sentences", type=positive_int, default=8,
                   help="body sentences at most (default: %(default)s)")
    p.add_argument("--layers", type=positive_int, default=2, help="(default: %(default)s)")
    p.add_argument("--hidden", type=positive_int, default=64, help="(default: %(default)s)")
    p.add_argument("--heads", type=positive_int, default=2, help="(default: %(default)s)")
    p.add_argument("--vocab_size", type=positive_int, default=0,
                   help="pad the vocabulary with unused entries up to this size (default: the corpus's own)")
    p.add_argument("--max_position_embeddings", type=positive_int, default=512, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return p.parse_args(argv)


def make_rows(per_category: int, max_sentences: int, seed: int, min_sentences: int = 2) -> list[dict]:
    """Articles whose title and body mix their category's words with words shared by all categories."""
    rng = random.Random(seed)
    rows = []
    for category, words in sorted(CATEGORY_WORDS.items()):
        for k in range(per_category):
            title = "の".join(rng.sample(words, 2) + rng.sample(COMMON_WORDS, 1)) + "が話題"
            body = "\n".join("、".join(rng.sample(words, 3) + rng.sample(COMMON_WORDS, 2)) + "が発表された。"
                             for _ in range(rng.randint(min_sentences, max(min_sentences, max_sentences))))
            rows.append({"id": f"{category}-{k:05d}", "category": category, "title": title, "body": body})
    rng.shuffle(rows)
    return rows


def wordpiece_vocab(texts: Sequence[str], vocab_size: int) -> list[str]:
    """Every character as a word start and as a ##continuation, so any text of the corpus has no [UNK]."""
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    return vocab + [f"[unused{i}]" for i in range(max(0, vocab_size - len(vocab)))]


def build_model(model_dir: Path, vocab: list[str], args: argparse.Namespace) -> None:
    import torch
    from transformers import BertConfig, BertModel
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": False,
         "model_max_length": args.max_position_embeddings}), encoding="utf-8")
    config = BertConfig(vocab_size=len(vocab), hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                        max_position_embeddings=args.max_position_embeddings)
    torch.manual_seed(args.seed)
    BertModel(config).save_pretrained(model_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = make_rows(args.per_category, args.max_sentences, args.seed, args.min_sentences)
    vocab = wordpiece_vocab([r[f] for r in rows for f in ("title", "body")], args.vocab_size)
    build_model(Path(args.model_dir), vocab, args)
    print(f"wrote {args.model_dir} ({args.layers} layers, hidden {args.hidden}, vocab {len(vocab)})", file=sys.stderr)
    if args.data:
        Path(args.data).parent.mkdir(parents=True, exist_ok=True)
        Path(args.data).write_text("".join(map(jsonl_line, rows)), encoding="utf-8")
        print(f"wrote {args.data} ({len(rows)} examples, {len(CATEGORY_WORDS)} categories)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
