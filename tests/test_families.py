"""Every model family of the tutorial's table: tiny local stand-ins, tokenized as pre-trained, trained end to end.

No hub is reachable here, so each family is a random config of its model type plus a tokenizer of its class
built from the test corpus, laid out like the hub checkpoint (which files, which configs name what).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fugashi
import ipadic
import pytest
import sentencepiece
import torch
import unidic_lite


import bertcls
import common
import data
import families
from conftest import (build_tiny_bert_japanese, build_tiny_luke, build_tiny_modernbert, build_tiny_multilingual_bert,
                      build_tiny_xlm_roberta, finished_runs, save_tiny_model, train_args, train_tiny_sentencepiece,
                      write_dataset)
from test_distributed import torchrun

# IPAdic and unidic-lite split both of these differently (東北大学 | 東北 大学, スマ ホ | スマホ)
SENTENCES = ["東北大学で自然言語処理の研究をしています。", "新しいスマホが発表された。"]
FAMILIES = ["v3", "char_v3", "v1", "char_v1", "mbert", "xlmr", "luke", "modernbert", "llm_jp"]
LONG_TITLE = "野球の試合で選手が得点した" * 6  # longer than 24 tokens under every stand-in's tokenizer


def ipadic_surfaces(text: str) -> list[str]:
    return [w.surface for w in fugashi.GenericTagger(ipadic.MECAB_ARGS)(text)]


def unidic_lite_surfaces(text: str) -> list[str]:
    rc = os.path.join(unidic_lite.DICDIR, "mecabrc")
    return [w.surface for w in fugashi.GenericTagger(f'-d "{unidic_lite.DICDIR}" -r "{rc}"')(text)]


@pytest.fixture(scope="session")
def corpus_texts(tiny_rows) -> list[str]:
    return [r[f] for rows in tiny_rows.values() for r in rows for f in ("title", "body")]


@pytest.fixture(scope="session")
def spm_model(corpus_texts) -> bytes:
    return train_tiny_sentencepiece(corpus_texts)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, corpus_texts, spm_model):
    """Builds each family's stand-in on first use."""
    root = tmp_path_factory.mktemp("families")
    builders = {
        "v3": lambda: build_tiny_bert_japanese(root / "v3", corpus_texts),
        "char_v3": lambda: build_tiny_bert_japanese(root / "char_v3", corpus_texts, subword="character"),
        "v1": lambda: build_tiny_bert_japanese(root / "v1", corpus_texts, "ipadic", names_dictionary=False),
        "char_v1": lambda: build_tiny_bert_japanese(root / "char_v1", corpus_texts, "ipadic", "character",
                                                    names_dictionary=False),
        "mbert": lambda: build_tiny_multilingual_bert(root / "mbert", corpus_texts),
        "xlmr": lambda: build_tiny_xlm_roberta(root / "xlmr", spm_model),
        "luke": lambda: build_tiny_luke(root / "luke", spm_model),
        "modernbert": lambda: build_tiny_modernbert(root / "modernbert", corpus_texts),
        "llm_jp": lambda: build_tiny_modernbert(root / "llm_jp", corpus_texts, layout="llm_jp"),
    }
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = builders[family]()
        return built[family]
    return get


# ------------------------------------------------------------------------------ MeCab dictionaries


def test_v1_config_is_detected_from_config_json(family_models):
    v1 = family_models("v1")
    on_disk = json.loads((v1 / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "tokenizer_class" not in on_disk and "mecab_kwargs" not in on_disk  # the hub's v1 layout
    config = families.read_tokenizer_config(str(v1))
    assert config["tokenizer_class"] == "BertJapaneseTokenizer"
    assert families.mecab_override(config, "auto") == {"mecab_kwargs": {"mecab_dic": "ipadic"}}


def test_mecab_override_only_for_mecab_configs_without_a_dictionary():
    v1 = {"tokenizer_class": "BertJapaneseTokenizer", "word_tokenizer_type": "mecab"}
    v3 = {**v1, "mecab_kwargs": {"mecab_dic": "unidic_lite"}}
    assert families.mecab_override(v3, "auto") == {}
    assert families.mecab_override(v3, "ipadic") == {"mecab_kwargs": {"mecab_dic": "ipadic"}}
    assert families.mecab_override(v1, "unidic") == {"mecab_kwargs": {"mecab_dic": "unidic"}}
    assert families.mecab_override({"tokenizer_class": "BertJapaneseTokenizer"}, "auto") == {}  # basic, no MeCab
    assert families.mecab_override({"word_tokenizer_type": "mecab"}, "ipadic") == {}  # not a BertJapaneseTokenizer


def test_v1_models_segment_with_ipadic(family_models):
    notes = []
    tokenizer = families.load_tokenizer(str(family_models("v1")), log=notes.append)
    assert notes == [f"note: {family_models('v1')}: BertJapaneseTokenizer with MeCab dictionary ipadic "
                     "(--mecab_dic to change)"]
    for sentence in SENTENCES:
        assert ipadic_surfaces(sentence) != unidic_lite_surfaces(sentence)
        assert tokenizer.word_tokenizer.tokenize(sentence) == ipadic_surfaces(sentence)
    # every IPAdic word of the corpus is in the vocab: WordPiece keeps them whole
    assert tokenizer.tokenize(SENTENCES[1]) == ipadic_surfaces(SENTENCES[1]) == \
        ["新しい", "スマ", "ホ", "が", "発表", "さ", "れ", "た", "。"]


def test_mecab_dic_flag_overrides_the_v1_default(family_models):
    notes = []
    tokenizer = families.load_tokenizer(str(family_models("v1")), mecab_dic="unidic_lite", log=notes.append)
    assert notes[0].endswith("MeCab dictionary unidic_lite (--mecab_dic to change)")
    assert tokenizer.word_tokenizer.tokenize(SENTENCES[0]) == unidic_lite_surfaces(SENTENCES[0])


def test_v3_models_keep_unidic_lite_without_a_notice(family_models):
    notes = []
    tokenizer = families.load_tokenizer(str(family_models("v3")), log=notes.append)
    assert notes == []
    assert tokenizer.tokenize(SENTENCES[1]) == unidic_lite_surfaces(SENTENCES[1])


@pytest.mark.parametrize("family, segment", [("char_v3", unidic_lite_surfaces), ("char_v1", ipadic_surfaces)])
def test_character_models_split_mecab_words_into_characters(family_models, family, segment):
    tokenizer = families.load_tokenizer(str(family_models(family)), log=lambda message: None)
    assert tokenizer.word_tokenizer.tokenize(SENTENCES[0]) == segment(SENTENCES[0])
    assert tokenizer.tokenize(SENTENCES[1]) == list(SENTENCES[1])


# ------------------------------------------------------------------------- sentencepiece families


def fairseq_ids(spm_model: bytes, text: str) -> list[int]:
    """XLM-R / LUKE pre-training ids: <s> 0, <pad> 1, </s> 2, <unk> 3, a piece = its sentencepiece id + 1."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    pieces = [processor.PieceToId(p) for p in processor.encode(text, out_type=str)]
    return [0] + [i + 1 if i != processor.unk_id() else 3 for i in pieces] + [2]


@pytest.mark.parametrize("family", ["xlmr", "luke"])
def test_sentencepiece_families_get_pretraining_ids(family_models, spm_model, family):
    from transformers import AutoConfig
    text = "野球の試合でｽﾏﾎの[MASK]が優勝した"  # half-width katakana: NFKC-normalised by sentencepiece
    tokenizer = families.load_tokenizer(str(family_models(family)), log=lambda message: None)
    ids = tokenizer(text)["input_ids"]
    assert ids == fairseq_ids(spm_model, text)
    # sentencepiece's NFKC: half-width katakana gets the full-width pieces, not <unk>
    assert tokenizer("ｽﾏﾎ")["input_ids"] == tokenizer("スマホ")["input_ids"] and 3 not in tokenizer("ｽﾏﾎ")["input_ids"]
    assert max(ids) < AutoConfig.from_pretrained(family_models(family)).vocab_size
    assert tokenizer.pad_token_id == 1


def test_luke_tokenizer_swap_is_announced(family_models):
    # fails once transformers' MLukeTokenizer numbers sentencepiece models right: the swap can then go
    notes = []
    families.load_tokenizer(str(family_models("luke")), log=notes.append)
    assert len(notes) == 1 and "XLMRobertaTokenizer" in notes[0]


@pytest.mark.parametrize("family, with_types", [("xlmr", False), ("luke", False), ("mbert", True)])
def test_token_type_ids_only_for_models_with_segment_embeddings(family_models, tiny_rows, family, with_types):
    from transformers import AutoConfig
    model_dir = family_models(family)
    tokenizer = families.load_tokenizer(str(model_dir), log=lambda message: None)
    assert families.uses_token_type_ids(AutoConfig.from_pretrained(model_dir)) is with_types
    rows = tiny_rows["train"][:4]
    packed = data.pack(data.tokenize_rows(tokenizer, rows, data.InputSpec(64, with_types)))
    batch = bertcls.collate(packed, [0, 1, 2, 3], None, tokenizer.pad_token_id)
    if with_types:
        assert batch["token_type_ids"].max() == 1  # the body is segment B
    else:
        assert "token_type_ids" not in batch
        model = families.load_model(str(model_dir), {"a": 0, "b": 1, "c": 2})
        assert model(**batch).logits.shape == (4, 3)  # LUKE without entity inputs: words only


@pytest.mark.parametrize("family", ["tiny_bert", *FAMILIES])
def test_worker_processes_tokenize_as_one_process(request, family_models, tiny_rows, tmp_path, monkeypatch, family):
    """Each worker unpickles the parent's tokenizer (its MeCab dictionary, its numbering fix): same ids, same order."""
    from transformers import AutoConfig
    model_dir = request.getfixturevalue("tiny_bert") if family == "tiny_bert" else family_models(family)
    rows = tiny_rows["train"][:20] + [{"id": f"s{i}", "label": i % 3, "text": s} for i, s in enumerate(SENTENCES)]
    write_dataset(tmp_path, {"train": rows})
    label2id = data.load_label2id(tmp_path)
    tokenizer = families.load_tokenizer(str(model_dir), log=lambda message: None)
    spec = data.InputSpec(64, families.uses_token_type_ids(AutoConfig.from_pretrained(model_dir)))
    expected = data.pack(data.tokenize_rows(tokenizer, data.load_split(tmp_path, "train", label2id), spec))
    monkeypatch.setattr(data, "PARALLEL_MIN_EXAMPLES", 0)
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 3)  # 8 chunks
    train = data.read_split(tmp_path, "train", label2id)
    for workers in (1, 2):
        path = tmp_path / f"{workers}.pt"
        with common.Progress(len(rows), "tokenizing", enabled=False) as progress:
            assert data.tokenize_split(tokenizer, train, spec, workers, path, progress) == (workers, 0)
        packed = data.load_packed(path, len(rows))
        assert packed.keys() == expected.keys()
        assert all(torch.equal(packed[k], expected[k]) for k in expected), f"{workers} worker(s)"


# -------------------------------------------------------------------------------- sequence length


class HugeLimitTokenizer:
    model_max_length = int(1e30)  # transformers' sentinel for "no limit"


def test_max_len_capped_by_roberta_style_positions_with_a_notice():
    from transformers import RobertaConfig, XLMRobertaConfig
    notes = []
    config = XLMRobertaConfig(max_position_embeddings=34, pad_token_id=1)
    assert families.effective_max_len(512, HugeLimitTokenizer(), config, log=notes.append) == 32
    assert notes == ["note: max_seq_len capped at 32 by the model's position embeddings"]
    assert families.effective_max_len(16, HugeLimitTokenizer(), config, log=notes.append) == 16
    assert len(notes) == 1
    assert families.position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=0)) == 513


def test_max_len_capped_by_bert_positions_and_tokenizer():
    from transformers import BertConfig
    notes = []
    assert families.effective_max_len(512, HugeLimitTokenizer(), BertConfig(max_position_embeddings=40),
                                     log=notes.append) == 40
    tokenizer = HugeLimitTokenizer()
    tokenizer.model_max_length = 24
    assert families.effective_max_len(512, tokenizer, BertConfig(max_position_embeddings=40), log=notes.append) == 24
    assert notes == ["note: max_seq_len capped at 40 by the model's position embeddings",
                     "note: max_seq_len capped at 24 by the tokenizer's model_max_length"]


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_evaluates(family_models, tiny_dataset, tmp_path, capsys, family):
    model_dir = family_models(family)
    # LUKE's 66 positions hold 64 tokens: ask for more to see the cap
    max_seq_len = "128" if family == "luke" else "64"
    assert bertcls.main(train_args(model_dir, tiny_dataset, tmp_path, "--epochs", "1",
                                   "--max_seq_len", max_seq_len)) == 0
    [run_dir] = finished_runs(tmp_path)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["max_seq_len_used"] == 64
    metrics = json.loads((run_dir / "test-metrics.json").read_text(encoding="utf-8"))
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 20
    err = capsys.readouterr().err
    assert ("capped at 64 by the model's position embeddings" in err) is (family == "luke")
    assert ("MeCab dictionary ipadic" in err) is (family in ("v1", "char_v1"))
    assert "a new classification head for 3 labels (classifier." in err
    assert "not in its checkpoint" not in err  # every weight of the model itself was loaded


# ------------------------------------------------------------------------------------- loading report


@pytest.fixture
def transformers_warnings():
    """transformers' warnings shown, as for a user (the tests run with TRANSFORMERS_VERBOSITY=error)."""
    from transformers.utils import logging as transformers_logging
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    yield
    transformers_logging.set_verbosity(level)


def test_new_head_is_one_note_and_the_load_report_is_held_back(tiny_bert, transformers_warnings):
    import logging

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    recorder, notes = Recorder(), []
    logging.getLogger("transformers").addHandler(recorder)  # what transformers' own handler would print
    try:
        families.load_model(str(tiny_bert), {"movie": 0, "sports": 1, "tech": 2}, log=notes.append)
        logging.getLogger("transformers.modeling_utils").warning("a real warning after loading")
    finally:
        logging.getLogger("transformers").removeHandler(recorder)
    assert notes == [f"note: {tiny_bert}: a new classification head for 3 labels (classifier.bias, "
                     "classifier.weight) starts from random weights; fine-tuning trains it with the model"]
    # only the report was held back, and only while loading
    assert recorder.messages == ["a real warning after loading"]


def test_weights_missing_from_the_model_itself_are_still_a_warning(tiny_bert, tmp_path, transformers_warnings):
    import shutil
    from safetensors.torch import load_file, save_file
    model_dir = Path(shutil.copytree(tiny_bert, tmp_path / "no-pooler"))
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "pooler" not in k}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    notes = []
    families.load_model(str(model_dir), {"a": 0, "b": 1}, log=notes.append)
    assert len(notes) == 2 and notes[0].startswith(f"note: {model_dir}: a new classification head for 2 labels")
    assert notes[1] == (f"warning: {model_dir}: 2 weights of the model itself are not in its checkpoint and start "
                        "random (bert.pooler.dense.bias, bert.pooler.dense.weight)")


@pytest.mark.parametrize("family", FAMILIES)
def test_only_parameters_without_a_gradient_are_frozen(family_models, tiny_rows, family):
    """bertcls's inputs (words, segments, mask) reach every parameter that stays trainable: DDP needs that."""
    model_dir = family_models(family)
    model = families.load_model(str(model_dir), {"a": 0, "b": 1, "c": 2})
    tokenizer = families.load_tokenizer(str(model_dir), log=lambda message: None)
    spec = data.InputSpec(64, families.uses_token_type_ids(model.config))
    packed = data.pack(data.tokenize_rows(tokenizer, tiny_rows["train"][:4], spec))
    model(**bertcls.collate(packed, [0, 1, 2, 3], torch.tensor([0, 1, 2, 0]), tokenizer.pad_token_id)).loss.backward()
    without_gradient = {name for name, p in model.named_parameters() if p.grad is None}
    assert set(families.unreachable_parameters(model)) == without_gradient
    assert bool(without_gradient) is (family == "luke")  # LUKE's entity parts; mLUKE is the same class

    notes = []
    families.freeze_unreachable(model, log=notes.append)
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == without_gradient
    assert len(notes) == (family == "luke") and all("entity" in note for note in notes)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_batch_without_a_mask_gives_the_masked_outputs(family_models, tiny_rows, family):
    """collate leaves the mask out of a batch without padding: every family must compute what a mask of ones gives."""
    model_dir = family_models(family)
    model = families.load_model(str(model_dir), {"a": 0, "b": 1, "c": 2}).eval()
    tokenizer = families.load_tokenizer(str(model_dir), log=lambda message: None)
    spec = data.InputSpec(32, families.uses_token_type_ids(model.config))
    packed = data.pack(data.tokenize_rows(tokenizer, tiny_rows["train"][:4], spec))  # all cut to 32 tokens
    batch = bertcls.collate(packed, [0, 1, 2, 3], None, tokenizer.pad_token_id)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (4, 32)
    with torch.no_grad():
        unmasked = model(**batch).logits
        masked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).logits
    assert torch.equal(unmasked, masked)


@pytest.fixture(scope="module")
def torchrun_runs(family_models, tiny_dataset, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """One 2-process torchrun (gloo) whose ranks train every family in turn, one epoch each (imports paid once):
    {family: (outcome, output directory)}, the outcome being bertcls.main's exit code or the exception it raised."""
    root = tmp_path_factory.mktemp("torchrun")
    argv = {f: train_args(family_models(f), tiny_dataset, root / f, "--epochs", "1") for f in FAMILIES}
    driver = root / "every_family.py"
    # One process group for all: made again in the same processes, it can find the store keys of the last one.
    driver.write_text(
        "import json, os, sys\n"
        "import torch.distributed as dist\n"
        "import bertcls, common\n"
        "make_group = bertcls.init_distributed\n"
        "def init_once(device, env):\n"
        "    return common.pick_device(device, env.local_rank) if dist.is_initialized() else make_group(device, env)\n"
        "bertcls.init_distributed, bertcls.destroy_distributed = init_once, lambda: None\n"
        "outcomes = {}\n"
        "for family, argv in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        outcomes[family] = str(bertcls.main(argv))\n"
        "    except Exception as e:  # e.g. DDP's unused-parameter error: record it, go on with the next family\n"
        "        outcomes[family] = f'{type(e).__name__}: {e}'\n"
        "if os.environ['RANK'] == '0':\n"
        "    open(sys.argv[2], 'w').write(json.dumps(outcomes))\n"
        "dist.destroy_process_group()\n", encoding="utf-8")
    result = torchrun([json.dumps({f: [str(a) for a in args] for f, args in argv.items()}), str(root / "out.json")],
                      root, driver)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads((root / "out.json").read_text(encoding="utf-8"))
    return {f: (outcomes[f], root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_under_torchrun(torchrun_runs, family):
    """DDP (2 processes, gloo) works only if each trainable parameter gets a gradient every step."""
    outcome, output_dir = torchrun_runs[family]
    assert outcome == "0"
    [run_dir] = finished_runs(output_dir)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["world_size"] == 2
    metrics = json.loads((run_dir / "test-metrics.json").read_text(encoding="utf-8"))
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 20


def test_luke_cap_matters(family_models, tiny_rows):
    tokenizer = families.load_tokenizer(str(family_models("luke")), log=lambda message: None)
    encoded = data.tokenize_rows(tokenizer, tiny_rows["train"], data.InputSpec(128, False))
    lengths = [len(ids) for ids in encoded["input_ids"]]
    assert max(lengths) > 64  # uncapped, some examples would index past the 66 position embeddings


# ------------------------------------------------------------------------------------- bad names


@pytest.mark.parametrize("name, message", [
    ("nobody/no-such-model", "bertcls.py: error: cannot load model 'nobody/no-such-model': it is neither a local "
                             "directory nor in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"),
    ("./no/such/model", "bertcls.py: error: model directory ./no/such/model not found: "),
])
def test_unknown_model_is_a_one_line_error(tiny_dataset, tmp_path, capsys, name, message):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert bertcls.main(train_args(name, tiny_dataset, tmp_path)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)


def test_unknown_model_type_trains_with_the_auto_classes_and_a_note(tmp_path, tiny_dataset, corpus_texts, capsys):
    from transformers import DistilBertConfig
    model_dir = build_tiny_multilingual_bert(tmp_path / "distilbert", corpus_texts)  # its vocab.txt and config
    vocab_size = len((model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())
    save_tiny_model(model_dir, DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                max_position_embeddings=128))
    assert bertcls.main(train_args(model_dir, tiny_dataset, tmp_path / "out", "--epochs", "1")) == 0
    assert len(finished_runs(tmp_path / "out")) == 1
    notes = [line for line in capsys.readouterr().err.splitlines() if "is not one of the families" in line]
    assert notes == [f"note: {model_dir}: model type 'distilbert' is not one of the families bertcls adapts (bert, "
                     "luke, modernbert, xlm-roberta): loaded with the plain Auto classes and fed its tokenizer's own "
                     "special tokens; no family-specific fix to its tokenizer, segment ids or length limit was checked"]


@pytest.mark.parametrize("family, blocked, package", [("v3", "fugashi", "fugashi"),
                                                      ("v3", "unidic_lite", "unidic-lite"),
                                                      ("v1", "ipadic", "ipadic"),
                                                      ("xlmr", "sentencepiece", "sentencepiece")])
def test_a_missing_package_is_named_in_one_line(family_models, tiny_dataset, tmp_path, capsys, monkeypatch, family,
                                                blocked, package):
    model_dir = family_models(family)
    monkeypatch.setitem(sys.modules, blocked, None)  # import fails as if not installed
    assert bertcls.main(train_args(model_dir, tiny_dataset, tmp_path)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"bertcls.py: error: cannot load the tokenizer of {str(model_dir)!r}: it needs {package}, "
                         f"which is not installed: pip install {package}")
    assert not any("tiktoken" in line for line in lines)  # transformers' misleading fallback is never reached


# ------------------------------------------------------------------------ long-context ModernBERT


def test_modernbert_tokenizers_load_as_the_hub_ships_them(family_models):
    from transformers import AutoConfig
    sbintuitions, llm_jp = family_models("modernbert"), family_models("llm_jp")
    assert {p.name for p in sbintuitions.iterdir()} >= {"tokenizer.json", "tokenizer.model", "special_tokens_map.json"}
    assert not (llm_jp / "tokenizer.model").exists()
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sbintuitions / "tokenizer.model"))
    for model_dir, (first, middle, last) in ((sbintuitions, ([1], [2, 1], [2])), (llm_jp, ([5], [6], [6]))):
        notes = []
        tokenizer = families.load_tokenizer(str(model_dir), log=notes.append)
        config = AutoConfig.from_pretrained(model_dir)
        # tokenizer.json as it is, although the configs name LlamaTokenizer / PreTrainedTokenizerFast
        assert type(tokenizer).__name__ == "TokenizersBackend" and notes == []
        title, body = SENTENCES
        words = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (title, body)]
        if model_dir == sbintuitions:  # the pieces and ids of the sentencepiece model it was trained with
            assert words == [processor.encode(title), processor.encode(body)]
        assert tokenizer(title, body)["input_ids"] == first + words[0] + middle + words[1] + last
        assert (tokenizer.pad_token_id, tokenizer.cls_token_id) == (config.pad_token_id, config.cls_token_id)
        assert not families.uses_token_type_ids(config) and "token_type_ids" not in tokenizer.model_input_names
        assert config.model_type == "modernbert" and families.position_limit(config) == 8192
        assert config.architectures == ["ModernBertForMaskedLM"]


def test_modernbert_max_len_capped_at_its_8192_tokens_with_a_notice(family_models):
    from transformers import AutoConfig
    model_dir = family_models("modernbert")
    notes = []
    tokenizer = families.load_tokenizer(str(model_dir), log=notes.append)
    assert families.effective_max_len(10000, tokenizer, AutoConfig.from_pretrained(model_dir), notes.append) == 8192
    assert notes == ["note: max_seq_len capped at 8192 by the model's position embeddings"]


# ------------------------------------------------------------------------ every family's pair layout


@pytest.mark.parametrize("family", FAMILIES)
def test_an_uncut_example_is_exactly_what_the_tokenizer_makes_of_it(family_models, tiny_rows, family):
    tokenizer = families.load_tokenizer(str(family_models(family)), log=lambda message: None)
    spec = data.InputSpec(10**6, True, "head_tail")
    rows = tiny_rows["train"][:8] + [{"title": "野球", "body": ""}, {"title": "", "body": "映画の公開"}]
    for row in rows:
        expected = tokenizer(row["title"], row["body"], return_token_type_ids=True)
        enc = data.encode_one(tokenizer, row["title"], row["body"], spec)
        assert (enc["input_ids"], enc["token_type_ids"]) == (expected["input_ids"], expected["token_type_ids"])
        assert not enc["title_cut"]
        single = data.encode_one(tokenizer, row["body"], None, spec)
        assert single["input_ids"] == tokenizer(row["body"])["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_title_longer_than_the_budget_keeps_its_start_with_every_family(family_models, family):
    tokenizer = families.load_tokenizer(str(family_models(family)), log=lambda message: None)
    body = "映画の公開が話題になった。" * 10
    uncut = tokenizer(LONG_TITLE, body)["input_ids"]
    title = tokenizer(LONG_TITLE, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # <unk> can be text
    n_special = sum(i in special for i in uncut)
    assert len(title) > 24 - n_special
    for truncation in data.TRUNCATIONS:
        enc = data.encode_one(tokenizer, LONG_TITLE, body, data.InputSpec(24, False, truncation))
        assert len(enc["input_ids"]) == 24 and enc["title_cut"]
        assert [i for i in enc["input_ids"] if i not in special] == title[:24 - n_special]  # no body left
        assert [i for i in enc["input_ids"] if i in special] == [i for i in uncut if i in special]
        assert (enc["input_ids"][0], enc["input_ids"][-1]) == (uncut[0], uncut[-1])


# the fast tokenizers (mBERT, XLM-R and LUKE's XLMRobertaTokenizer) refused such titles; every family end to end
@pytest.mark.parametrize("family", FAMILIES)
def test_over_long_titles_train_and_predict_with_every_family(family_models, tiny_rows, tmp_path, capsys, family):
    import predict
    rows = {split: [dict(r, title=LONG_TITLE) if i % 3 == 0 else r for i, r in enumerate(split_rows)]
            for split, split_rows in tiny_rows.items()}
    dataset = write_dataset(tmp_path / "data", rows)
    out = tmp_path / "out"
    assert bertcls.main(train_args(family_models(family), dataset, out, "--epochs", "1", "--max_seq_len", "24",
                                   "--save_model")) == 0
    [run_dir] = finished_runs(out)
    err = capsys.readouterr().err
    assert "note: 27 of 80 titles were cut to fit" in err and "note: 7 of 20 titles were cut to fit" in err
    predictions = tmp_path / "predictions.jsonl"
    assert predict.main(["--model_dir", str(run_dir / "model"), "--input", str(dataset / "test.jsonl"),
                         "--output", str(predictions)]) == 0
    assert "note: 7 of 20 titles were cut to fit" in capsys.readouterr().err
    expected = [json.loads(line)["predicted"] for line in (run_dir / "test-predictions.jsonl").open(encoding="utf-8")]
    assert [json.loads(line)["label"] for line in predictions.open(encoding="utf-8")] == expected


def test_no_loading_bar_in_a_log_file(tiny_bert, capfd):
    """Off a terminal (nohup, CI, a sweep's child log) transformers' "Loading weights" bar is a run of carriage
    returns: it is left out, and the bars are as before afterwards."""
    from transformers.utils import logging as transformers_logging
    capfd.readouterr()
    families.load_model(str(tiny_bert), {"a": 0, "b": 1, "c": 2}, log=lambda message: None)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "\r" not in err
    assert transformers_logging.is_progress_bar_enabled()


def test_attention_is_sdpa_except_reduced_precision_on_the_cpu():
    import torch
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert families.attention_implementation(cpu, torch.bfloat16) == "eager"  # CPU SDPA would upcast to fp32
    assert families.attention_implementation(cpu, torch.float32) == "sdpa"
    assert families.attention_implementation(cuda, torch.bfloat16) == "sdpa"  # flash kernels
    assert families.attention_implementation(cuda, torch.float16) == "sdpa"


def test_the_attention_a_run_trains_with_is_not_saved_with_the_model(tiny_bert, tmp_path):
    """A model trained with eager attention on the CPU loads with transformers' own default elsewhere."""
    import json
    model = families.load_model(str(tiny_bert), {"a": 0, "b": 1}, log=lambda message: None, attention="eager")
    assert model.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path / "saved")
    assert "eager" not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text(encoding="utf-8")))
