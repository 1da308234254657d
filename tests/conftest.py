"""Shared fixtures: a tiny learnable Japanese corpus, and tiny random models of each family that load offline.

No hub is reachable from the test machines, so models are built here: random configs of each model type with
tokenizers of the right class, made from the test corpus and laid out like the hub checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A shell without job control starts a background command with SIGINT ignored, and the processes the tests start
# would inherit that: the tests that press Ctrl-C on a run need it delivered.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from make_tiny import CATEGORY_WORDS, COMMON_WORDS, SPECIAL_TOKENS  # noqa: E402


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


def write_dataset(directory: Path, splits: dict[str, list[dict]], label2id: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    label2id = label2id or {c: i for i, c in enumerate(sorted(CATEGORY_WORDS))}
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
    """A cl-tohoku-v3-style model: BertJapaneseTokenizer (MeCab + unidic-lite + WordPiece) and a random BERT."""
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
def corpus_texts(tiny_rows) -> list[str]:
    return [r[f] for rows in tiny_rows.values() for r in rows for f in ("title", "body")]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_rows) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "tiny", tiny_rows)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, corpus_texts) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert", corpus_texts)


@pytest.fixture(scope="session")
def tiny_modernbert(tmp_path_factory, corpus_texts) -> Path:
    """An sbintuitions/modernbert-ja-style model (see build_tiny_modernbert)."""
    return build_tiny_modernbert(tmp_path_factory.mktemp("models") / "tiny-modernbert", corpus_texts)


def train_args(model: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    """bertcls.py flags for a quick CPU run that learns the tiny corpus."""
    return ["--model_name", str(model), "--dataset_dir", str(dataset), "--output_dir", str(output_dir),
            "--epochs", "6", "--batch_size", "8", "--lr", "3e-3", "--num_warmup_epochs", "0.5",
            "--max_seq_len", "64", "--device", "cpu", "--cache_dir", str(output_dir / "cache"), *extra]


def finished_runs(output_dir: Path) -> list[Path]:
    return sorted(p.parent for p in output_dir.rglob("test-metrics.json"))


def only_run(output_dir: Path) -> Path:
    """The one run directory (finished or not) under output_dir."""
    (run_dir,) = {p.parent for p in output_dir.rglob("config.json") if "model" not in p.parent.name}
    return run_dir


def results(run_dir: Path) -> dict:
    """What a resumed run must reproduce exactly: its result files, without the timings."""
    val = json.loads((run_dir / "val-metrics.json").read_text(encoding="utf-8"))
    assert val.pop("train_seconds") > 0
    log = [{k: v for k, v in row.items() if k not in ("seconds", "examples_per_s")}
           for row in csv.DictReader((run_dir / "log.csv").open(encoding="utf-8"))]
    return {"val": val, "log": log, "test": (run_dir / "test-metrics.json").read_bytes(),
            "predictions": (run_dir / "test-predictions.jsonl").read_bytes()}


def run_script(script: str, *args: str, env: dict | None = None, timeout: float = 300,
               **kwargs) -> subprocess.CompletedProcess:
    """A script of the repository as a user runs it: its own process, output captured."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def torchrun(n: int, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """bertcls.py under torchrun with n CPU processes (gloo)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           str(REPO / "bertcls.py"), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def read_only_mount_prefix(directory: Path) -> list[str] | None:
    """A command prefix running a command with directory bind-mounted read-only (a private mount namespace:
    root, or an unprivileged user namespace), or None where this system allows neither."""
    mount = ['sh', '-c', 'mount --bind -o ro "$0" "$0" && exec "$@"', str(directory)]
    for unshare in (["unshare", "--mount"], ["unshare", "--map-root-user", "--mount"]):
        with contextlib.suppress(OSError):
            probe = subprocess.run([*unshare, *mount, "sh", "-c", 'touch "$0/probe" 2>/dev/null; test $? -ne 0',
                                    str(directory)], capture_output=True)
            if probe.returncode == 0:
                return [*unshare, *mount]
    return None


# bertcls.py, except that at training batch STOP_BATCH of epoch STOP_EPOCH each process writes its pid to
# <STOP_MARKER>.<rank> and waits: the test then kills it there, in the middle of an epoch.
STOPPING_BERTCLS = """\
import os, sys, time
import bertcls, data

stop_epoch, stop_batch, marker = int(os.environ["STOP_EPOCH"]), int(os.environ["STOP_BATCH"]), os.environ["STOP_MARKER"]
where = {"epoch": 0, "batches": 0}
original_train_epoch, original_batch = bertcls.train_epoch, data.Inputs.batch

def train_epoch(*args, **kwargs):
    where.update(epoch=int(args[-1].desc.split()[1].split("/")[0]), batches=0)
    try:
        return original_train_epoch(*args, **kwargs)
    finally:
        where["epoch"] = 0

def batch(self, *args, **kwargs):
    if where["epoch"] == stop_epoch:
        where["batches"] += 1
        if where["batches"] == stop_batch:
            path = f"{marker}.{os.environ.get('RANK', '0')}"
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)  # whole: the test reads the pid as soon as the file exists
            time.sleep(600)
    return original_batch(self, *args, **kwargs)

bertcls.train_epoch, data.Inputs.batch = train_epoch, batch
sys.exit(bertcls.main())
"""


def stopping_run(tmp_path: Path, args: list[str], epoch: int, batch: int, processes: int = 1,
                 timeout: float = 180) -> None:
    """Run bertcls.py (under torchrun when processes > 1) and SIGKILL every process at training batch `batch` of
    epoch `epoch`."""
    script, marker = tmp_path / "stopping_bertcls.py", tmp_path / "stop-marker"
    script.write_text(STOPPING_BERTCLS)
    # as many threads as the test process (whose runs it is compared with) or as torchrun's processes: the number of
    # threads changes the order of floating-point sums
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "STOP_MARKER": str(marker),
           "STOP_EPOCH": str(epoch), "STOP_BATCH": str(batch), **({"OMP_NUM_THREADS": "1"} if processes > 1 else {})}
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node", str(processes)]
    process = subprocess.Popen([*launcher, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    deadline = time.monotonic() + timeout
    markers = [marker.with_name(f"{marker.name}.{rank}") for rank in range(processes)]
    while not all(m.exists() for m in markers):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not reach the point where it is killed"
        time.sleep(0.05)
    for m in markers:
        os.kill(int(m.read_text()), signal.SIGKILL)
    process.communicate(timeout=120)


# ------------------------------------------------------------ tiny stand-ins for each model family of the table


def ipadic_words(texts: list[str]) -> list[str]:
    import fugashi
    import ipadic
    tagger = fugashi.GenericTagger(ipadic.MECAB_ARGS)
    return sorted({w.surface for t in texts for w in tagger(t)})


def save_tiny_model(directory: Path, config) -> Path:
    import torch
    from transformers import AutoModel
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(directory)
    return directory


def build_tiny_bert_japanese(directory: Path, texts: list[str], dictionary: str = "unidic_lite",
                             subword: str = "wordpiece", names_dictionary: bool = True) -> Path:
    """A cl-tohoku-style model. names_dictionary=False copies the v1 layout: the tokenizer config names no
    MeCab dictionary and no tokenizer class (config.json declares BertJapaneseTokenizer)."""
    from transformers import BertConfig
    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    if subword == "character":
        vocab = SPECIAL_TOKENS + chars
    else:
        words = ipadic_words(texts) if dictionary == "ipadic" else mecab_words(texts)
        vocab = SPECIAL_TOKENS + words + sorted(set(chars) - set(words)) + ["##" + c for c in chars]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer_config = {"do_lower_case": False, "word_tokenizer_type": "mecab", "subword_tokenizer_type": subword,
                        "model_max_length": 512}
    if names_dictionary:
        tokenizer_config |= {"tokenizer_class": "BertJapaneseTokenizer", "mecab_kwargs": {"mecab_dic": dictionary}}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return save_tiny_model(directory, BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, tokenizer_class="BertJapaneseTokenizer"))


def build_tiny_multilingual_bert(directory: Path, texts: list[str]) -> Path:
    """bert-base-multilingual-cased style: a plain vocab.txt, a config that names no tokenizer class."""
    from transformers import BertConfig
    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": False, "model_max_length": 512}), encoding="utf-8")
    return save_tiny_model(directory, BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128))


def train_tiny_sentencepiece(texts: list[str], vocab_size: int = 120) -> bytes:
    """A unigram sentencepiece model (<unk> 0, <s> 1, </s> 2, like XLM-R's) trained in memory on `texts`."""
    import io
    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                             character_coverage=1.0, model_type="unigram", minloglevel=2)
    return model.getvalue()


def build_tiny_xlm_roberta(directory: Path, spm_model: bytes, max_position_embeddings: int = 66) -> Path:
    """xlm-roberta-base style: sentencepiece.bpe.model, a tokenizer config with only model_max_length."""
    from transformers import XLMRobertaConfig
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sentencepiece.bpe.model").write_bytes(spm_model)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}), encoding="utf-8")
    return save_tiny_model(directory, XLMRobertaConfig(
        vocab_size=spm_pieces(spm_model) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=max_position_embeddings, type_vocab_size=1, pad_token_id=1))


def build_tiny_luke(directory: Path, spm_model: bytes, max_position_embeddings: int = 66) -> Path:
    """studio-ousia LUKE-japanese-lite / mLUKE-lite style: MLukeTokenizer over sentencepiece.bpe.model, an
    entity vocab of the 4 special entities, type_vocab_size 1, no model_max_length."""
    from transformers import LukeConfig
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sentencepiece.bpe.model").write_bytes(spm_model)
    (directory / "entity_vocab.json").write_text(
        json.dumps({"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, "[MASK2]": 3}), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "MLukeTokenizer", "task": None, "max_entity_length": 32, "max_mention_length": 30,
        "entity_token_1": "<ent>", "entity_token_2": "<ent2>", "entity_unk_token": "[UNK]",
        "entity_pad_token": "[PAD]", "entity_mask_token": "[MASK]", "entity_mask2_token": "[MASK2]",
        "sp_model_kwargs": {}}), encoding="utf-8")
    return save_tiny_model(directory, LukeConfig(
        vocab_size=spm_pieces(spm_model) + 4, entity_vocab_size=4, entity_emb_size=16, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=max_position_embeddings, type_vocab_size=1, pad_token_id=1))


def spm_pieces(spm_model: bytes) -> int:
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_proto=spm_model).get_piece_size()


# Special tokens as the long-context Japanese ModernBERTs number them (their config.json's *_token_id fields).
SBINTUITIONS_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                         "sep_token": "<sep>", "mask_token": "<mask>", "cls_token": "<cls>"}  # ids 0..6
LLM_JP_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "mask_token": "<MASK|LLM-jp>",
                   "pad_token": "<PAD|LLM-jp>", "cls_token": "<CLS|LLM-jp>", "sep_token": "<SEP|LLM-jp>"}  # ids 0..6


def build_tiny_modernbert(directory: Path, texts: list[str], layout: str = "sbintuitions") -> Path:
    """A long-context Japanese ModernBERT: a random ModernBertConfig (8192 positions, local + global attention, no
    segment embeddings) and a unigram sentencepiece tokenizer trained on `texts`, laid out like the hub's.

    sbintuitions/modernbert-ja-*: tokenizer.json + tokenizer.model + special_tokens_map.json, a tokenizer_config
    naming LlamaTokenizer that adds <s> ... </s>; ids <unk> 0, <s> 1, </s> 2, <pad> 3, <sep> 4, <mask> 5, <cls> 6.
    llm-jp/llm-jp-modernbert-base: tokenizer.json only (PreTrainedTokenizerFast), whose post-processor writes
    <CLS|LLM-jp> A <SEP|LLM-jp> B <SEP|LLM-jp>; ids <unk> 0, <s> 1, </s> 2, mask 3, pad 4, CLS 5, SEP 6.
    """
    import io
    import sentencepiece
    import torch
    from tokenizers import processors
    from transformers import ModernBertConfig, ModernBertForMaskedLM, TokenizersBackend
    directory.mkdir(parents=True, exist_ok=True)
    assert layout in ("sbintuitions", "llm_jp"), layout
    specials = SBINTUITIONS_SPECIALS if layout == "sbintuitions" else LLM_JP_SPECIALS
    controls = [specials[k] for k in (("sep_token", "mask_token", "cls_token") if layout == "sbintuitions" else
                                      ("mask_token", "pad_token", "cls_token", "sep_token"))]
    spm = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=spm, vocab_size=120, character_coverage=1.0, model_type="unigram",
        minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=3 if layout == "sbintuitions" else -1,
        control_symbols=controls)
    (directory / "tokenizer.model").write_bytes(spm.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    tokenizer = TokenizersBackend.from_pretrained(directory, **specials)  # converts tokenizer.model
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in specials.items()}
    if layout == "sbintuitions":
        tokenizer.add_bos_token = tokenizer.add_eos_token = True  # <s> A </s> (<s> B </s>)
    else:
        cls, sep = specials["cls_token"], specials["sep_token"]
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A:0 {sep}", pair=f"{cls} $A:0 {sep} $B:1 {sep}:1",
            special_tokens=[(cls, ids["cls_token"]), (sep, ids["sep_token"])])
    tokenizer.save_pretrained(directory)  # tokenizer.json
    hub_config = {**specials, "model_max_length": 8192, "clean_up_tokenization_spaces": False}
    if layout == "sbintuitions":
        hub_config |= {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": True,
                       "legacy": False, "sp_model_kwargs": {}}
        (directory / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    else:
        (directory / "tokenizer.model").unlink()
        hub_config |= {"tokenizer_class": "PreTrainedTokenizerFast",
                       "model_input_names": ["input_ids", "attention_mask"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(hub_config), encoding="utf-8")
    first, last = ("bos_token", "eos_token") if layout == "sbintuitions" else ("cls_token", "sep_token")
    config = ModernBertConfig(
        vocab_size=spm_pieces(spm.getvalue()), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=8192, local_attention=16, global_attn_every_n_layers=3,
        pad_token_id=ids["pad_token"], bos_token_id=ids[first], eos_token_id=ids[last], cls_token_id=ids["cls_token"],
        sep_token_id=ids["sep_token"])
    torch.manual_seed(0)
    # saved as pre-trained, with the MLM head whose dense + norm layers the classifier's pooling head reuses
    ModernBertForMaskedLM(config).save_pretrained(directory)
    return directory
