"""Every model family of the tutorial's table (models.py): tiny local stand-ins, fed exactly as pre-trained, trained
end to end; and what loading someone else's model may and may not do.

No hub is reachable here, so each family is a random config of its model type plus a tokenizer of its class built
from the test corpus, laid out like the hub checkpoint (which files, which configs name what): see conftest.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import fugashi
import ipadic
import pytest
import sentencepiece
import torch
import unidic_lite

import bertcls
import data
import models
from common import UserError
from conftest import (build_tiny_bert_japanese, build_tiny_luke, build_tiny_modernbert, build_tiny_multilingual_bert,
                      build_tiny_xlm_roberta, finished_runs, save_tiny_model, torchrun, train_args,
                      train_tiny_sentencepiece)

# IPAdic and unidic-lite split both of these differently (東北大学 | 東北 大学, スマ ホ | スマホ)
SENTENCES = ["東北大学で自然言語処理の研究をしています。", "新しいスマホが発表された。"]
FAMILIES = ["v3", "char", "v1", "mbert", "xlmr", "luke", "modernbert", "llm_jp"]
LONG_TITLE = "野球の試合で選手が得点した" * 6  # longer than 24 tokens under every stand-in's tokenizer
LABEL2ID = {"movie": 0, "sports": 1, "tech": 2}


def quiet(message: str) -> None:
    pass


def ipadic_surfaces(text: str) -> list[str]:
    return [w.surface for w in fugashi.GenericTagger(ipadic.MECAB_ARGS)(text)]


def unidic_lite_surfaces(text: str) -> list[str]:
    rc = os.path.join(unidic_lite.DICDIR, "mecabrc")
    return [w.surface for w in fugashi.GenericTagger(f'-d "{unidic_lite.DICDIR}" -r "{rc}"')(text)]


@pytest.fixture(scope="module")
def spm_model(corpus_texts) -> bytes:
    return train_tiny_sentencepiece(corpus_texts)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, corpus_texts, spm_model):
    """Builds each family's stand-in on first use: family_models("luke") is its directory."""
    root = tmp_path_factory.mktemp("families")
    builders = {
        "v3": lambda: build_tiny_bert_japanese(root / "v3", corpus_texts),
        "char": lambda: build_tiny_bert_japanese(root / "char", corpus_texts, subword="character"),
        "char_v1": lambda: build_tiny_bert_japanese(root / "char_v1", corpus_texts, "ipadic", "character",
                                                    names_dictionary=False),
        "v1": lambda: build_tiny_bert_japanese(root / "v1", corpus_texts, "ipadic", names_dictionary=False),
        "mbert": lambda: build_tiny_multilingual_bert(root / "mbert", corpus_texts),
        "xlmr": lambda: build_tiny_xlm_roberta(root / "xlmr", spm_model),
        "luke": lambda: build_tiny_luke(root / "luke", spm_model),
        "modernbert": lambda: build_tiny_modernbert(root / "modernbert", corpus_texts),
        "llm_jp": lambda: build_tiny_modernbert(root / "llm_jp", corpus_texts, layout="llm_jp"),
    }
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = builders[family]()
        return built[family]
    return get


def tokenizer_of(family_models, family: str, **kwargs):
    return models.load_tokenizer(str(family_models(family)), log=quiet, **kwargs)


def train_inputs(model_dir: Path, tokenizer, config, dataset: Path, max_len: int) -> data.Inputs:
    """The train split of the tiny dataset as bertcls.py batches it for this model (no cache)."""
    _, splits = data.load_dataset(dataset, quiet)
    spec = data.InputSpec(max_len, models.uses_token_type_ids(config))
    packed = data.tokenized("train", splits["train"], tokenizer, spec, "", 1, quiet, show=False)
    return data.Inputs(packed, splits["train"].labels, tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------- MeCab dictionaries


def test_v1_models_segment_with_ipadic_and_say_so(family_models):
    v1 = family_models("v1")
    on_disk = json.loads((v1 / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "tokenizer_class" not in on_disk and "mecab_kwargs" not in on_disk  # the hub's v1 layout
    notes = []
    tokenizer = models.load_tokenizer(str(v1), log=notes.append)
    assert notes == [f"note: {v1}: BertJapaneseTokenizer with MeCab dictionary ipadic (--mecab_dic to change)"]
    for sentence in SENTENCES:
        assert ipadic_surfaces(sentence) != unidic_lite_surfaces(sentence)
        assert tokenizer.word_tokenizer.tokenize(sentence) == ipadic_surfaces(sentence)
    # every IPAdic word of the corpus is in the vocab: WordPiece keeps them whole
    assert tokenizer.tokenize(SENTENCES[1]) == ["新しい", "スマ", "ホ", "が", "発表", "さ", "れ", "た", "。"]


@pytest.mark.parametrize("family", ["v1", "v3"])
def test_mecab_dic_overrides_the_dictionary(family_models, family):
    notes = []
    tokenizer = models.load_tokenizer(str(family_models(family)), mecab_dic="ipadic" if family == "v3" else
                                      "unidic_lite", log=notes.append)
    wanted = "ipadic" if family == "v3" else "unidic_lite"
    assert notes == [f"note: {family_models(family)}: BertJapaneseTokenizer with MeCab dictionary {wanted} "
                     "(--mecab_dic to change)"]
    segment = ipadic_surfaces if family == "v3" else unidic_lite_surfaces
    assert tokenizer.word_tokenizer.tokenize(SENTENCES[0]) == segment(SENTENCES[0])


def test_v3_models_keep_unidic_lite_without_a_note(family_models):
    notes = []
    tokenizer = models.load_tokenizer(str(family_models("v3")), log=notes.append)
    assert notes == []
    assert tokenizer.tokenize(SENTENCES[1]) == unidic_lite_surfaces(SENTENCES[1]) == ["新しい", "スマホ", "が", "発表",
                                                                                      "さ", "れ", "た", "。"]


@pytest.mark.parametrize("family, segment", [("char", unidic_lite_surfaces), ("char_v1", ipadic_surfaces)])
def test_character_models_split_mecab_words_into_characters(family_models, family, segment):
    tokenizer = tokenizer_of(family_models, family)
    assert tokenizer.word_tokenizer.tokenize(SENTENCES[0]) == segment(SENTENCES[0])
    assert tokenizer.tokenize(SENTENCES[1]) == list(SENTENCES[1])


# ------------------------------------------------------------------------------------ sentencepiece families


def fairseq_ids(spm_model: bytes, text: str) -> list[int]:
    """XLM-R / LUKE pre-training ids: <s> 0, <pad> 1, </s> 2, <unk> 3, a piece = its sentencepiece id + 1."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    pieces = [processor.PieceToId(p) for p in processor.encode(text, out_type=str)]
    return [0] + [i + 1 if i != processor.unk_id() else 3 for i in pieces] + [2]


@pytest.mark.parametrize("family", ["xlmr", "luke"])
def test_sentencepiece_families_get_their_pretraining_ids(family_models, spm_model, family):
    from transformers import AutoConfig
    text = "野球の試合でｽﾏﾎの[MASK]が優勝した"  # half-width katakana: NFKC-normalised by sentencepiece
    notes = []
    tokenizer = models.load_tokenizer(str(family_models(family)), log=notes.append)
    ids = tokenizer(text)["input_ids"]
    assert ids == fairseq_ids(spm_model, text)
    assert tokenizer("ｽﾏﾎ")["input_ids"] == tokenizer("スマホ")["input_ids"] and 3 not in tokenizer("ｽﾏﾎ")["input_ids"]
    assert max(ids) < AutoConfig.from_pretrained(family_models(family)).vocab_size
    assert tokenizer.pad_token_id == 1
    # transformers' MLukeTokenizer numbers LUKE's sentencepiece model wrongly: swapped, with a note (fails once
    # transformers numbers it right, and the swap can go)
    if family == "luke":
        assert len(notes) == 1 and "using XLMRobertaTokenizer on its sentencepiece model" in notes[0]
    else:
        assert notes == []


# ------------------------------------------------------------------------------------- long-context ModernBERT


def test_modernbert_tokenizers_load_as_the_hub_ships_them(family_models):
    from transformers import AutoConfig
    sbintuitions, llm_jp = family_models("modernbert"), family_models("llm_jp")
    assert {p.name for p in sbintuitions.iterdir()} >= {"tokenizer.json", "tokenizer.model", "special_tokens_map.json"}
    assert not (llm_jp / "tokenizer.model").exists()
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sbintuitions / "tokenizer.model"))
    for model_dir, (first, middle, last) in ((sbintuitions, ([1], [2, 1], [2])), (llm_jp, ([5], [6], [6]))):
        notes = []
        tokenizer = models.load_tokenizer(str(model_dir), log=notes.append)
        config = AutoConfig.from_pretrained(model_dir)
        assert notes == []
        title, body = SENTENCES
        words = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (title, body)]
        if model_dir == sbintuitions:  # the pieces and ids of the sentencepiece model it was trained with
            assert words == [processor.encode(title), processor.encode(body)]
        assert tokenizer(title, body)["input_ids"] == first + words[0] + middle + words[1] + last
        assert (tokenizer.pad_token_id, tokenizer.cls_token_id) == (config.pad_token_id, config.cls_token_id)
        assert not models.uses_token_type_ids(config)


# --------------------------------------------------------------------------------- segment ids and lengths


@pytest.mark.parametrize("family, with_types", [("v3", True), ("mbert", True), ("xlmr", False), ("luke", False),
                                                ("modernbert", False)])
def test_token_type_ids_only_for_models_with_segment_embeddings(family_models, tiny_dataset, family, with_types):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(family_models(family))
    assert models.uses_token_type_ids(config) is with_types
    assert (getattr(config, "type_vocab_size", 0) > 1) is with_types
    inputs = train_inputs(family_models(family), tokenizer_of(family_models, family), config, tiny_dataset, 64)
    batch = inputs.batch([0, 1, 2, 3], torch.device("cpu"))
    assert batch["input_ids"].shape[0] == 4
    if with_types:
        assert batch["token_type_ids"].max() == 1 and batch["token_type_ids"][:, 0].eq(0).all()  # the body is B
    else:
        assert "token_type_ids" not in batch and "token_type_ids" not in inputs.packed


class NoLimitTokenizer:
    model_max_length = int(1e30)  # transformers' sentinel for "no limit"


def test_max_length_is_capped_by_roberta_style_positions_with_a_note():
    from transformers import RobertaConfig, XLMRobertaConfig
    notes = []
    config = XLMRobertaConfig(max_position_embeddings=34, pad_token_id=1)  # positions start after padding_idx
    assert models.max_length(512, NoLimitTokenizer(), config, notes.append) == 32
    assert notes == ["note: max_seq_len capped at 32 by the model's position embeddings"]
    assert models.max_length(16, NoLimitTokenizer(), config, notes.append) == 16 and len(notes) == 1
    assert models.max_length(10**4, NoLimitTokenizer(), RobertaConfig(max_position_embeddings=514, pad_token_id=0),
                             quiet) == 513


def test_max_length_is_capped_by_bert_positions_and_the_tokenizer():
    from transformers import BertConfig
    notes = []
    assert models.max_length(512, NoLimitTokenizer(), BertConfig(max_position_embeddings=40), notes.append) == 40
    tokenizer = NoLimitTokenizer()
    tokenizer.model_max_length = 24
    assert models.max_length(512, tokenizer, BertConfig(max_position_embeddings=40), notes.append) == 24
    assert notes == ["note: max_seq_len capped at 40 by the model's position embeddings",
                     "note: max_seq_len capped at 24 by the tokenizer's model_max_length"]


def test_modernbert_is_capped_at_its_8192_tokens_with_a_note(family_models):
    from transformers import AutoConfig
    notes = []
    model_dir = family_models("modernbert")
    assert models.max_length(10000, tokenizer_of(family_models, "modernbert"), AutoConfig.from_pretrained(model_dir),
                             notes.append) == 8192
    assert notes == ["note: max_seq_len capped at 8192 by the model's position embeddings"]


# ---------------------------------------------------------------------------------- every family's pair layout


@pytest.mark.parametrize("family", FAMILIES)
def test_an_uncut_example_is_exactly_what_the_tokenizer_makes_of_it(family_models, tiny_rows, family):
    tokenizer = tokenizer_of(family_models, family)
    spec = data.InputSpec(10**5, True, "head_tail")
    rows = tiny_rows["train"][:8] + [{"title": "野球", "body": ""}, {"title": "", "body": "映画の公開"}]
    for row in rows:
        expected = tokenizer(row["title"], row["body"], return_token_type_ids=True)
        ids, types, counts = data.encode(tokenizer, row["title"], row["body"], spec)
        assert (ids, types) == (expected["input_ids"], expected["token_type_ids"])
        assert not counts["title_cut"] and not counts["chars_cut"]
        single, _, _ = data.encode(tokenizer, row["body"], None, spec)
        assert single == tokenizer(row["body"])["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_title_longer_than_the_budget_keeps_its_start(family_models, family):
    tokenizer = tokenizer_of(family_models, family)
    body = "映画の公開が話題になった。" * 10
    uncut = tokenizer(LONG_TITLE, body)["input_ids"]
    title = tokenizer(LONG_TITLE, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # <unk> can be text
    n_special = sum(i in special for i in uncut)
    assert len(title) > 24 - n_special
    for truncation in data.TRUNCATIONS:
        ids, _, counts = data.encode(tokenizer, LONG_TITLE, body, data.InputSpec(24, False, truncation))
        assert len(ids) == 24 and counts["title_cut"] == 1
        assert [i for i in ids if i not in special] == title[:24 - n_special]  # no body left
        assert [i for i in ids if i in special] == [i for i in uncut if i in special]
        assert (ids[0], ids[-1]) == (uncut[0], uncut[-1])


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_evaluates(family_models, tiny_dataset, tmp_path, capsys, family):
    # the 66 positions of the XLM-R and LUKE stand-ins hold 64 tokens: ask LUKE for more to see the cap
    max_seq_len = "128" if family == "luke" else "32"
    assert bertcls.main(train_args(family_models(family), tiny_dataset, tmp_path, "--epochs", "1",
                                   "--max_seq_len", max_seq_len)) == 0
    [run_dir] = finished_runs(tmp_path)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["max_seq_len_used"] == (64 if family == "luke" else 32)
    metrics = json.loads((run_dir / "test-metrics.json").read_text(encoding="utf-8"))
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 20
    err = capsys.readouterr().err
    assert ("capped at 64 by the model's position embeddings" in err) is (family == "luke")
    assert ("MeCab dictionary ipadic" in err) is (family == "v1")
    assert ("using XLMRobertaTokenizer" in err) is (family == "luke")
    assert ("M parameters frozen (entity embeddings" in err) is (family == "luke")
    assert err.count("a new classification head for 3 labels (") == 1
    assert "not in its checkpoint" not in err  # every weight of the model itself was loaded
    assert "none of the families bertcls adapts" not in err


def test_bert_learns_and_its_saved_model_keeps_no_attention_choice(tiny_bert, tiny_dataset, tmp_path, monkeypatch):
    """bf16 on the CPU trains with eager attention (attention_implementation); config.json must not record that,
    or the model would load with eager attention on a GPU too."""
    from transformers import AutoModelForSequenceClassification
    chosen = []

    def load_model(*args, **kwargs):
        model = models.load_model(*args, **kwargs)
        chosen.append(model.config._attn_implementation)
        return model
    monkeypatch.setattr(bertcls, "load_model", load_model)
    assert bertcls.main(train_args(tiny_bert, tiny_dataset, tmp_path, "--epochs", "2", "--batch_size", "4",
                                   "--max_seq_len", "32", "--dtype", "bf16", "--save_model")) == 0
    assert chosen == ["eager"]
    [run_dir] = finished_runs(tmp_path)
    metrics = json.loads((run_dir / "test-metrics.json").read_text(encoding="utf-8"))
    assert metrics["accuracy"] >= 0.6  # 3 balanced labels: chance is 1/3
    saved = (run_dir / "model" / "config.json").read_text(encoding="utf-8")
    assert "eager" not in saved and "attn_implementation" not in saved
    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert reloaded.config._attn_implementation == "sdpa"


def test_attention_is_sdpa_except_reduced_precision_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert models.attention_implementation(cpu, torch.bfloat16) == "eager"  # CPU SDPA would upcast to fp32
    assert models.attention_implementation(cpu, torch.float16) == "eager"
    assert models.attention_implementation(cpu, torch.float32) == "sdpa"
    assert models.attention_implementation(cuda, torch.bfloat16) == "sdpa"  # flash kernels
    assert models.attention_implementation(cuda, torch.float32) == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_only_luke_entity_parameters_are_frozen_and_every_other_one_learns(family_models, tiny_dataset, family):
    """DDP needs every trainable parameter to get a gradient each step: bertcls's inputs (words, segments, mask)
    reach all but LUKE's entity parts, which are frozen."""
    model = models.load_model(str(family_models(family)), LABEL2ID, log=quiet)
    inputs = train_inputs(family_models(family), tokenizer_of(family_models, family), model.config, tiny_dataset, 32)
    batch = inputs.batch([0, 1, 2, 3], torch.device("cpu"))
    assert torch.equal(batch["labels"], inputs.labels[:4])
    model(**batch).loss.backward()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, p in model.named_parameters() if p.grad is None}
    assert frozen == {name for name, _ in model.named_parameters() if models.NEEDS_ENTITIES & set(name.split("."))}
    assert bool(frozen) is (family == "luke")


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unpadded_batch_without_a_mask_gives_the_masked_logits(family_models, tiny_dataset, family):
    """Inputs.batch leaves the mask out of a batch without padding: every family must compute what ones give."""
    model = models.load_model(str(family_models(family)), LABEL2ID, log=quiet).eval()
    inputs = train_inputs(family_models(family), tokenizer_of(family_models, family), model.config, tiny_dataset, 16)
    full = [i for i, n in enumerate(data.lengths_of(inputs.packed)) if n == 16][:4]  # cut to 16 tokens
    batch = inputs.batch(full, torch.device("cpu"))
    batch.pop("labels")
    assert len(full) == 4 and "attention_mask" not in batch and batch["input_ids"].shape == (4, 16)
    with torch.no_grad():
        unmasked = model(**batch).logits
        masked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).logits
    assert torch.equal(unmasked, masked)


def test_luke_trains_under_torchrun(family_models, tiny_dataset, tmp_path):
    """2 processes (gloo): DDP fails if a trainable parameter gets no gradient (LUKE's entity parts)."""
    result = torchrun(2, *train_args(family_models("luke"), tiny_dataset, tmp_path, "--epochs", "1",
                                     "--max_seq_len", "32"))
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = finished_runs(tmp_path)
    assert json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["world_size"] == 2
    metrics = json.loads((run_dir / "test-metrics.json").read_text(encoding="utf-8"))
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 20


# ------------------------------------------------------------------------------------ unknown models


def test_an_unknown_model_type_trains_with_the_auto_classes_and_a_note(tmp_path, tiny_dataset, corpus_texts, capsys):
    from transformers import DistilBertConfig
    model_dir = build_tiny_multilingual_bert(tmp_path / "distilbert", corpus_texts)  # its vocab.txt and config
    vocab_size = len((model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())
    save_tiny_model(model_dir, DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                max_position_embeddings=128))
    assert bertcls.main(train_args(model_dir, tiny_dataset, tmp_path / "out", "--epochs", "1",
                                   "--max_seq_len", "32")) == 0
    assert len(finished_runs(tmp_path / "out")) == 1
    notes = [line for line in capsys.readouterr().err.splitlines() if "none of the families" in line]
    assert notes == [f"note: {model_dir}: model type 'distilbert' is none of the families bertcls adapts (bert, luke, "
                     "modernbert, xlm-roberta): loaded with the Auto classes, no family-specific fix checked"]


@pytest.mark.parametrize("name", ["nobody/no-such-model", "./no/such/model", "EMPTY_DIR"])
def test_an_unknown_model_is_a_one_line_error(tiny_dataset, tmp_path, capsys, name):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    if name == "EMPTY_DIR":
        name = str(tmp_path / "empty")
        os.mkdir(name)
    with pytest.raises(UserError, match=f"^cannot load the tokenizer of {name!r}: "):
        models.load_tokenizer(name, log=quiet)
    assert bertcls.main(train_args(name, tiny_dataset, tmp_path / "out")) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bertcls.py: error: cannot load the tokenizer of {name!r}: ")
    assert not finished_runs(tmp_path / "out")


@pytest.mark.parametrize("family, blocked", [("v3", "fugashi"), ("v1", "ipadic")])
def test_a_missing_package_is_one_line(family_models, tiny_dataset, tmp_path, capsys, monkeypatch, family, blocked):
    model_dir = family_models(family)
    monkeypatch.setitem(sys.modules, blocked, None)  # import fails as if not installed
    assert bertcls.main(train_args(model_dir, tiny_dataset, tmp_path)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"bertcls.py: error: cannot load the tokenizer of {str(model_dir)!r}: ")
    assert not any("Traceback" in line for line in lines)


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
    assert bertcls.main(train_args(model_dir, tiny_dataset, tmp_path / "out")) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"bertcls.py: error: refusing to load model {str(model_dir)!r}: its pickled weights")
    assert "safetensors" in lines[-1] and not any("Traceback" in line for line in lines)
    assert not marker.exists()
    assert not finished_runs(tmp_path / "out")


def test_remote_code_in_a_model_directory_is_not_run_without_trust_remote_code(tiny_bert, tiny_dataset, tmp_path):
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
    assert bertcls.main(train_args(model_dir, tiny_dataset, tmp_path / "out", "--epochs", "1",
                                   "--max_seq_len", "32")) == 0
    assert not marker.exists()  # the built-in BERT class was used, custom.py never imported
    assert finished_runs(tmp_path / "out")


# ------------------------------------------------------------------------------------------ loading report


@pytest.fixture
def transformers_warnings():
    """transformers' warnings shown, as for a user (conftest runs with TRANSFORMERS_VERBOSITY=error)."""
    from transformers.utils import logging as transformers_logging
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    yield
    transformers_logging.set_verbosity(level)


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_new_head_is_one_note_and_the_load_report_is_held_back(tiny_bert, transformers_warnings):
    recorder, notes = Recorder(), []
    logging.getLogger("transformers").addHandler(recorder)  # what transformers' own handler would print
    try:
        models.load_model(str(tiny_bert), LABEL2ID, log=notes.append)
        logging.getLogger("transformers.modeling_utils").warning("a real warning after loading")
    finally:
        logging.getLogger("transformers").removeHandler(recorder)
    assert notes == [f"note: {tiny_bert}: a new classification head for 3 labels (classifier.bias, "
                     "classifier.weight) starts from random weights; fine-tuning trains it"]
    assert recorder.messages == ["a real warning after loading"]  # only the report, only while loading


def test_weights_missing_from_the_model_itself_are_a_warning(tiny_bert, tmp_path):
    from safetensors.torch import load_file, save_file
    model_dir = Path(shutil.copytree(tiny_bert, tmp_path / "no-pooler"))
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    notes = []
    models.load_model(str(model_dir), {"a": 0, "b": 1}, log=notes.append)
    assert len(notes) == 2 and notes[0].startswith(f"note: {model_dir}: a new classification head for 2 labels")
    assert notes[1] == (f"warning: {model_dir}: 2 weights of the model itself are not in its checkpoint and start "
                        "random (bert.pooler.dense.bias, bert.pooler.dense.weight)")


def test_no_loading_bar_in_a_log_file(tiny_bert, capfd):
    """Off a terminal (nohup, CI, a sweep's log) transformers' "Loading weights" bar is a run of carriage returns:
    it is left out, and the bars are as before afterwards."""
    from transformers.utils import logging as transformers_logging
    assert not sys.stderr.isatty()
    capfd.readouterr()
    models.load_model(str(tiny_bert), LABEL2ID, log=quiet)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "\r" not in err
    assert transformers_logging.is_progress_bar_enabled()


# ----------------------------------------------------------------------------------------- compiled layers


def test_compiled_layers_keep_their_names_and_train_with_the_fused_attention():
    """The CPU check of "the compiled training step must not run a decomposed attention": a compiled step (forward
    and backward, fp32, no attention dropout) runs SDPA's fused kernel, never a softmax of its own."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, attention_probs_dropout_prob=0.0,
                        num_labels=3, attn_implementation="sdpa")
    model = BertForSequenceClassification(config).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert models.compile_layers(model) == 2
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    batch = {"input_ids": torch.randint(5, 40, (4, 16)), "labels": torch.tensor([0, 1, 2, 0])}
    model(**batch).loss.backward()  # compiles
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**batch).loss.backward()
    ops = {e.key: e.count for e in prof.key_averages()}
    assert ops.get("aten::_scaled_dot_product_flash_attention_for_cpu", 0) >= 2, sorted(ops)  # one per layer
    assert ops.get("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 0) >= 2, sorted(ops)
    assert not [op for op in ops if "_safe_softmax" in op or op in ("aten::softmax", "aten::_softmax")]
