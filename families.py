"""What each model family needs to be fed exactly as it was pre-trained.

A fine-tuned model only works as well as its input matches pre-training: the same word segmentation (the
MeCab dictionary of cl-tohoku's BERTs), the same token ids (LUKE/mLUKE's sentencepiece numbering), segment
ids where the model was pre-trained with them, and no more tokens than its position embeddings hold. This
file knows those differences; bertcls.py, predict.py and bench.py load tokenizers and models only through it.

    load_tokenizer(name)        AutoTokenizer, plus the MeCab dictionary fix and the LUKE/mLUKE numbering fix
    load_model(name, label2id)  AutoModelForSequenceClassification with SDPA attention and a new head
    freeze_unreachable(model)   freeze what the family cannot train from the inputs bertcls gives it (LUKE's entities)
    effective_max_len(...)      --max_seq_len capped by the position embeddings and the tokenizer
    uses_token_type_ids(config) whether the body is fed as segment B
    unknown_family_note(...)    one line for a model type none of the families below

The families (a tiny stand-in of each is built and trained in tests/test_families.py):
    bert         cl-tohoku (BertJapaneseTokenizer + MeCab), bert-base-multilingual-cased: segment ids, 512 positions
    xlm-roberta  xlm-roberta-base/-large: sentencepiece, no segment ids, positions start after padding_idx
    luke         studio-ousia LUKE/mLUKE: XLM-R's sentencepiece numbering, words only (no entities)
    modernbert   sbintuitions/modernbert-ja-*, llm-jp/llm-jp-modernbert-base: 8192 tokens (RoPE, local +
                 global attention), no segment ids; transformers loads their tokenizer.json as it is
                 (TokenizersBackend), whatever tokenizer_class their config names, and bertcls keeps the
                 special tokens that tokenizer puts around (title, body)

A new family goes here: how its tokenizer is loaded, what its inputs are, what its length limit is.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib.util
import logging
import pickle
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import torch

from common import UserError, first_line


def mecab_override(tokenizer_config: dict, mecab_dic: str) -> dict:
    """Tokenizer kwargs that make a BertJapaneseTokenizer segment with the dictionary it was trained with.

    cl-tohoku's v1 models were pre-trained with MeCab + IPAdic, but their tokenizer configs name no
    dictionary, and transformers now defaults MecabTokenizer to unidic-lite: without this they would be
    silently fed a different segmentation.
    """
    is_mecab = (tokenizer_config.get("tokenizer_class") == "BertJapaneseTokenizer"
                and tokenizer_config.get("word_tokenizer_type", "basic") == "mecab")
    if not is_mecab:
        return {}
    if mecab_dic != "auto":
        return {"mecab_kwargs": {**(tokenizer_config.get("mecab_kwargs") or {}), "mecab_dic": mecab_dic}}
    if not tokenizer_config.get("mecab_kwargs"):
        return {"mecab_kwargs": {"mecab_dic": "ipadic"}}
    return {}


def read_tokenizer_config(model_name: str) -> dict:
    """tokenizer_config.json of a local directory or hub model ({} when there is none), with `tokenizer_class`
    taken from config.json when the tokenizer config names none, as AutoTokenizer does: cl-tohoku's v1
    models declare BertJapaneseTokenizer only in config.json."""
    from transformers import PreTrainedConfig
    from transformers.models.auto.tokenization_auto import get_tokenizer_config
    tokenizer_config = dict(get_tokenizer_config(model_name))
    if not tokenizer_config.get("tokenizer_class"):
        try:
            model_config, _ = PreTrainedConfig.get_config_dict(model_name)
        except OSError:  # unreachable or absent: AutoTokenizer reports what is missing
            model_config = {}
        if model_config.get("tokenizer_class"):
            tokenizer_config["tokenizer_class"] = model_config["tokenizer_class"]
    return tokenizer_config


KNOWN_MODEL_TYPES = ("bert", "luke", "modernbert", "xlm-roberta")
MECAB_DICTIONARIES = {"unidic_lite": "unidic-lite", "ipadic": "ipadic", "unidic": "unidic"}  # module: pip package
SENTENCEPIECE_FILES = ("sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "sentencepiece.model")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or an import blocked in sys.modules
        return False


def has_file(model_name: str, filename: str) -> bool:
    from transformers.utils import cached_file
    try:
        return cached_file(model_name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) is not None
    except OSError:
        return False


def missing_packages(model_name: str, tokenizer_config: dict) -> list[str]:
    """pip packages this tokenizer needs that are not installed: fugashi and the MeCab dictionary of a
    BertJapaneseTokenizer, sentencepiece and protobuf to read a sentencepiece model that has no tokenizer.json.
    transformers reports either late or misleadingly (a missing sentencepiece ends in "tiktoken is required")."""
    needed = {}  # module: pip package
    if (tokenizer_config.get("tokenizer_class") == "BertJapaneseTokenizer"
            and tokenizer_config.get("word_tokenizer_type") == "mecab"):
        dictionary = (tokenizer_config.get("mecab_kwargs") or {}).get("mecab_dic") or "unidic_lite"
        needed |= {"fugashi": "fugashi", dictionary: MECAB_DICTIONARIES.get(dictionary, dictionary)}
    spm_missing = not (installed("sentencepiece") and installed("google.protobuf"))
    if spm_missing and not has_file(model_name, "tokenizer.json") \
            and any(has_file(model_name, f) for f in SENTENCEPIECE_FILES):  # looked up only when one is missing
        needed |= {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}
    return sorted({package for module, package in needed.items() if not installed(module)})


def looks_like_path(model_name: str) -> bool:
    """A name that can only be a directory: hub names are `name` or `owner/name`."""
    return model_name.startswith((".", "/")) or model_name.count("/") > 1 or "\\" in model_name


def fairseq_misnumbered(tokenizer: Any) -> bool:
    """True for transformers 5's MLukeTokenizer built from a sentencepiece.bpe.model (how the hub ships LUKE).

    LUKE/mLUKE were pre-trained with XLM-R's fairseq numbering (<s> 0, <pad> 1, </s> 2, <unk> 3, piece =
    sentencepiece id + 1); this MLukeTokenizer keeps the raw sentencepiece ids (every word id off by one) and
    drops sentencepiece's NFKC normalisation. Without entities its word tokenization is XLM-R's.
    """
    return (type(tokenizer).__name__ == "MLukeTokenizer"
            and tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) != [0, 1, 2, 3])


def xlm_roberta_tokenizer(model_name: str) -> Any:
    """XLMRobertaTokenizer from the model's sentencepiece.bpe.model alone: loaded with LUKE's tokenizer config
    it would register the entity tokens ([MASK], [UNK]...) as words, with ids past the word embeddings."""
    from transformers import XLMRobertaTokenizer
    from transformers.utils import cached_file
    with tempfile.TemporaryDirectory() as tmp:
        spm_model = Path(cached_file(model_name, "sentencepiece.bpe.model")).read_bytes()
        (Path(tmp) / "sentencepiece.bpe.model").write_bytes(spm_model)
        return XLMRobertaTokenizer.from_pretrained(tmp)


@functools.lru_cache(maxsize=None)  # one probe per process, however many models a sweep checks
def hub_unreachable(endpoint: str, timeout: float) -> str | None:
    """Why the hub at `endpoint` cannot be reached, in one try within `timeout` seconds; None when it answers.

    Any HTTP answer counts as reachable, and so does a TLS failure (huggingface_hub brings its own certificates):
    only a connection that cannot be made or gets no answer is what huggingface_hub would retry for minutes.
    """
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return None
        return f"no answer in {timeout:g} s" if isinstance(e.reason, TimeoutError) else str(e.reason)
    except TimeoutError:
        return f"no answer in {timeout:g} s"
    except (OSError, http.client.HTTPException) as e:
        return first_line(e)
    except ValueError:
        return f"HF_ENDPOINT {endpoint!r} is not a URL"
    return None


def check_model_source(model_name: str) -> None:
    """Fail in seconds when a model cannot be had, before transformers tries: a directory that is missing or has
    no config.json, a hub model that HF_HUB_OFFLINE=1 forbids downloading and the cache lacks, a hub that does not
    answer (huggingface_hub retries each file about 5 times, ~95 s per run), or a name the hub does not know."""
    path = Path(model_name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"cannot load model {model_name!r}: the directory has no config.json; pass a directory "
                            "written by save_pretrained (config.json, weights and tokenizer files) or a hub name")
        return
    if looks_like_path(model_name):
        raise UserError(f"model directory {model_name} not found: pass an existing directory or a hub name "
                        "such as cl-tohoku/bert-base-japanese-v3")
    from huggingface_hub import constants, try_to_load_from_cache
    from transformers.utils import cached_file
    try:
        cached = isinstance(try_to_load_from_cache(model_name, "config.json"), str)
    except ValueError:  # not a valid hub name: cached_file below says why
        cached = False
    if constants.HF_HUB_OFFLINE and not cached:
        raise UserError(f"cannot load model {model_name!r}: it is neither a local directory nor in the Hugging Face "
                        "cache, and HF_HUB_OFFLINE=1 forbids downloading it: pass a local directory, or download it "
                        "once with HF_HUB_OFFLINE unset")
    if not constants.HF_HUB_OFFLINE:
        problem = hub_unreachable(constants.ENDPOINT, constants.HF_HUB_ETAG_TIMEOUT)
        if problem is not None:
            in_cache = "it is in the cache" if cached else "it is not in the cache yet"
            raise UserError(f"cannot load model {model_name!r}: the Hugging Face Hub at {constants.ENDPOINT} cannot "
                            f"be reached ({problem}); check your network, or work offline with HF_HUB_OFFLINE=1 and "
                            f"a cached model ({in_cache}) or a local directory")
    try:
        cached_file(model_name, "config.json")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {model_name!r}: {first_line(e)}") from None


def missing_files_hint(model_name: str) -> str:
    if Path(model_name).is_dir():
        return ("the directory needs its tokenizer's files as tokenizer.save_pretrained writes them: "
                "tokenizer_config.json with vocab.txt, tokenizer.json or sentencepiece.bpe.model")
    return "check the name"


def load_tokenizer(model_name: str, mecab_dic: str = "auto", trust_remote_code: bool = False,
                   log=print) -> Any:
    from transformers import AutoTokenizer
    check_model_source(model_name)
    try:
        tokenizer_config = read_tokenizer_config(model_name)
        kwargs = mecab_override(tokenizer_config, mecab_dic)
        if missing := missing_packages(model_name, {**tokenizer_config, **kwargs}):
            raise UserError(f"cannot load the tokenizer of {model_name!r}: it needs {', '.join(missing)}, which "
                            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {' '.join(missing)}")
        if kwargs:
            log(f"note: {model_name}: BertJapaneseTokenizer with MeCab dictionary "
                f"{kwargs['mecab_kwargs']['mecab_dic']} (--mecab_dic to change)")
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code, **kwargs)
        if fairseq_misnumbered(tokenizer):
            log(f"note: {model_name}: transformers' MLukeTokenizer misnumbers its sentencepiece model; using "
                "XLMRobertaTokenizer on the same model (LUKE's pre-training ids; bertcls passes no entities)")
            tokenizer = xlm_roberta_tokenizer(model_name)
    except ImportError as e:  # a package none of the checks above knows
        raise UserError(f"cannot load the tokenizer of {model_name!r}: {first_line(e)} (install the package it "
                        "names)") from None
    except (OSError, ValueError, TypeError) as e:  # TypeError: a BertJapaneseTokenizer without its vocab.txt
        detail = "" if isinstance(e, TypeError) else f": {first_line(e)}"
        raise UserError(f"cannot load the tokenizer of {model_name!r}{detail} ({missing_files_hint(model_name)})"
                        ) from None
    # transformers 5 builds an empty tokenizer when the vocabulary files are missing: every word would be [UNK]
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise UserError(f"the tokenizer of {model_name!r} has no vocabulary beyond its {len(tokenizer)} special "
                        f"tokens: {missing_files_hint(model_name)}")
    return tokenizer


@contextlib.contextmanager
def held_load_report() -> Iterator[None]:
    """Hold back transformers' LOAD REPORT table, shown in red on every fine-tuning run because the new head is
    "MISSING"; load_model says what it means in one line instead. The table is shown if loading fails."""
    logger = logging.getLogger("transformers.modeling_utils")  # the logger the report is written to
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield
    except BaseException:
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(hold)


def describe_new_weights(model: torch.nn.Module, info: dict, model_name: str) -> list[str]:
    """One line for the new classification head (what fine-tuning means), a warning for body weights that the
    checkpoint lacks and that start random too."""
    new = set(info.get("missing_keys") or ()) | {k if isinstance(k, str) else k[0]
                                                 for k in info.get("mismatched_keys") or ()}
    body = sorted(k for k in new if k.startswith(f"{model.base_model_prefix}."))
    head = sorted(new - set(body))
    lines = []
    if head:
        lines.append(f"note: {model_name}: a new classification head for {model.config.num_labels} labels "
                     f"({', '.join(head)}) starts from random weights; fine-tuning trains it with the model")
    if body:
        lines.append(f"warning: {model_name}: {len(body)} weights of the model itself are not in its checkpoint "
                     f"and start random ({', '.join(body[:3])}{', ...' if len(body) > 3 else ''})")
    return lines


@contextlib.contextmanager
def transformers_progress_bars(show: bool) -> Iterator[None]:
    """transformers' own progress bars (loading weights, writing shards) shown or not for the block, then as before."""
    from transformers.utils import logging as transformers_logging
    shown = transformers_logging.is_progress_bar_enabled()
    if not show:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown and not show:
            transformers_logging.enable_progress_bar()


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """transformers' attention for a run: SDPA (fused kernels, flash on CUDA), except in bf16/fp16 on the CPU.

    There, with dropout (training), PyTorch's SDPA takes its math fallback, which upcasts bf16 inputs to fp32;
    transformers' eager attention multiplies in bf16 under autocast: 1.2x the examples/s of a 4-layer BERT at 256
    tokens on a CPU with AVX512-BF16 (README, 性能). Evaluation and predict.py use the same one, so their numbers
    agree with training's.
    """
    return "eager" if device.type == "cpu" and dtype != torch.float32 else "sdpa"


def load_model(model_name: str, label2id: dict[str, int], trust_remote_code: bool = False,
               log=print, attention: str = "sdpa") -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    id2label = {i: name for name, i in label2id.items()}
    kwargs = dict(num_labels=len(label2id), id2label=id2label, label2id=label2id,
                  trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True, output_loading_info=True)
    try:
        # a "Loading weights" bar in a log file (nohup, CI, a sweep's child) is a run of carriage returns
        with held_load_report(), transformers_progress_bars(show=sys.stderr.isatty()):
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    model_name, attn_implementation=attention, **kwargs)
            except ValueError as e:  # a model without this attention: its own default
                if attention not in str(e).lower() and "attention" not in str(e).lower():
                    raise
                model, info = AutoModelForSequenceClassification.from_pretrained(model_name, **kwargs)
    except pickle.UnpicklingError:  # transformers loads *.bin with torch.load(weights_only=True)
        raise UserError(f"refusing to load model {model_name!r}: its pickled weights hold objects other than "
                        "tensors, which could run code; use a checkpoint with model.safetensors") from None
    except (OSError, ValueError, KeyError) as e:
        hint = ("the directory needs config.json and model.safetensors, as save_pretrained writes them"
                if Path(model_name).is_dir() else "check the name")
        raise UserError(f"cannot load model {model_name!r}: {first_line(e)} ({hint})") from None
    for line in describe_new_weights(model, info, model_name):
        log(line)
    return model


# Per model_type: modules that learn only from inputs bertcls does not give (it passes words, segments and masks),
# and why. LUKE and mLUKE (both model_type "luke") learn their entity embeddings and the word-to-entity,
# entity-to-word and entity-to-entity attention queries from entity inputs only: without entities these get no
# gradient, and DistributedDataParallel stops at the second step waiting for their gradients.
NEEDS_EXTRA_INPUTS = {
    "luke": ({"entity_embeddings", "w2e_query", "e2w_query", "e2e_query"},
             "entity embeddings and entity-attention queries, which learn only from entity inputs"),
}


def unreachable_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that get no gradient from the inputs bertcls gives this model's family."""
    modules, _ = NEEDS_EXTRA_INPUTS.get(getattr(model.config, "model_type", None), (set(), ""))
    return [name for name, _ in model.named_parameters() if modules & set(name.split("."))]


def freeze_unreachable(model: torch.nn.Module, log=print) -> None:
    """Freeze unreachable_parameters(model), saying so: they keep their pre-trained values, the optimizer skips
    them, and DDP needs no find_unused_parameters (an extra pass over the graph every step, for every model)."""
    names = set(unreachable_parameters(model))
    if not names:
        return
    frozen = [p.requires_grad_(False) for name, p in model.named_parameters() if name in names]
    _, why = NEEDS_EXTRA_INPUTS[model.config.model_type]
    log(f"note: {model.config.model_type}: {sum(p.numel() for p in frozen) / 1e6:.2f}M parameters frozen ({why}; "
        "bertcls passes none)")


ROBERTA_STYLE_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "luke", "xmod",
                           "roberta-prelayernorm", "data2vec-text")


def position_limit(config: Any) -> int:
    """Tokens the position embeddings can take; RoBERTa-style models reserve padding_idx + 1 positions."""
    limit = getattr(config, "max_position_embeddings", None) or 10**9
    if config.model_type in ROBERTA_STYLE_POSITIONS:  # positions start at padding_idx + 1 (create_position_ids)
        limit -= (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    return limit


def effective_max_len(requested: int, tokenizer: Any, config: Any, log=print) -> int:
    limits = {"--max_seq_len": requested, "the model's position embeddings": position_limit(config)}
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 10**6:  # transformers uses a huge sentinel for "no limit"
        limits["the tokenizer's model_max_length"] = tokenizer_limit
    source = min(limits, key=limits.get)
    if limits[source] < requested:
        log(f"note: max_seq_len capped at {limits[source]} by {source}")
    return limits[source]


def unknown_family_note(model_name: str, config: Any) -> str | None:
    """One line for a model type none of KNOWN_MODEL_TYPES: what bertcls did and did not adapt for it."""
    if config.model_type in KNOWN_MODEL_TYPES:
        return None
    return (f"note: {model_name}: model type {config.model_type!r} is not one of the families bertcls adapts "
            f"({', '.join(KNOWN_MODEL_TYPES)}): loaded with the plain Auto classes and fed its tokenizer's own "
            "special tokens; no family-specific fix to its tokenizer, segment ids or length limit was checked")


def uses_token_type_ids(config: Any) -> bool:
    # BERT was pre-trained with segment B = 1; transformers 5 tokenizers no longer return these by default.
    return getattr(config, "type_vocab_size", 0) > 1
