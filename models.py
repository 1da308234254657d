"""The model families: each tokenizer and model loaded so that it is fed exactly as it was pre-trained.

    bert         cl-tohoku (BertJapaneseTokenizer + MeCab), bert-base-multilingual-cased: segment ids, 512 positions
    xlm-roberta  xlm-roberta-base/-large: sentencepiece, no segment ids, positions start after padding_idx
    luke         studio-ousia LUKE/mLUKE: XLM-R's sentencepiece numbering, words only (no entities)
    modernbert   sbintuitions/modernbert-ja-*, llm-jp/llm-jp-modernbert-base: 8192 tokens, no segment ids

Other model types run with the plain Auto classes. A new family goes here.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from common import UserError, first_line

KNOWN_MODEL_TYPES = ("bert", "luke", "modernbert", "xlm-roberta")
ROBERTA_STYLE_POSITIONS = ("roberta", "xlm-roberta", "camembert", "luke", "xmod", "data2vec-text")
# LUKE's parts only entity inputs (never given) train: frozen, so DDP needs no find_unused_parameters
NEEDS_ENTITIES = {"entity_embeddings", "w2e_query", "e2w_query", "e2e_query"}
COMPILED_SDPA = "bertcls_sdpa"


def tokenizer_kwargs(model_name: str, mecab_dic: str) -> dict:
    """The MeCab dictionary of a BertJapaneseTokenizer: cl-tohoku's v1 models were pre-trained with IPAdic but name
    none (transformers' default: unidic-lite). As AutoTokenizer, finds tokenizer_class in config.json too."""
    from transformers import PreTrainedConfig
    from transformers.models.auto.tokenization_auto import get_tokenizer_config
    config = dict(get_tokenizer_config(model_name))
    if not config.get("tokenizer_class"):
        with contextlib.suppress(OSError):
            config["tokenizer_class"] = PreTrainedConfig.get_config_dict(model_name)[0].get("tokenizer_class")
    if config.get("tokenizer_class") != "BertJapaneseTokenizer" or config.get("word_tokenizer_type") != "mecab":
        return {}
    if mecab_dic != "auto":
        return {"mecab_kwargs": {**(config.get("mecab_kwargs") or {}), "mecab_dic": mecab_dic}}
    return {} if config.get("mecab_kwargs") else {"mecab_kwargs": {"mecab_dic": "ipadic"}}


def luke_word_tokenizer(tokenizer: Any, model_name: str, log: Callable[[str], None]) -> Any:
    """For LUKE, XLMRobertaTokenizer on the sentencepiece model alone (LUKE's config would add entities as words):
    transformers 5's MLukeTokenizer numbers words one off from the fairseq ids LUKE learnt, and skips NFKC."""
    if (type(tokenizer).__name__ != "MLukeTokenizer"
            or tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]):
        return tokenizer
    log(f"note: {model_name}: using XLMRobertaTokenizer on its sentencepiece model (MLukeTokenizer misnumbers it)")
    from transformers import XLMRobertaTokenizer
    from transformers.utils import cached_file
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(cached_file(model_name, "sentencepiece.bpe.model"), Path(tmp) / "sentencepiece.bpe.model")
        return XLMRobertaTokenizer.from_pretrained(tmp)


def load_tokenizer(model_name: str, mecab_dic: str = "auto", trust_remote_code: bool = False,
                   log: Callable[[str], None] = print) -> Any:
    from transformers import AutoTokenizer
    try:
        kwargs = tokenizer_kwargs(model_name, mecab_dic)
        if kwargs:
            log(f"note: {model_name}: BertJapaneseTokenizer with MeCab dictionary "
                f"{kwargs['mecab_kwargs']['mecab_dic']} (--mecab_dic to change)")
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code, **kwargs)
        tokenizer = luke_word_tokenizer(tokenizer, model_name, log)
    except (ImportError, OSError, ValueError, TypeError, RuntimeError) as e:
        # a missing package or vocabulary file (TypeError from BertJapaneseTokenizer), an unknown name, no hub
        raise UserError(f"cannot load the tokenizer of {model_name!r}: {first_line(e)} (check the name, and "
                        "`pip install -r requirements.txt`)") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers 5 makes an empty one from nothing
        raise UserError(f"the tokenizer of {model_name!r} has no vocabulary beyond its special tokens: the "
                        "directory needs what tokenizer.save_pretrained writes")
    return tokenizer


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hold back transformers' LOAD REPORT (the new head as MISSING; load_model notes it) and, off a terminal, bars."""
    from transformers.utils import logging as hf_logging
    logger = logging.getLogger("transformers.modeling_utils")
    report = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731
    bars = hf_logging.is_progress_bar_enabled()
    logger.addFilter(report)
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(report)
        if bars:
            hf_logging.enable_progress_bar()


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """SDPA, except in bf16/fp16 on the CPU, where with dropout it falls back to fp32 math: eager is 1.2x as fast."""
    return "eager" if device.type == "cpu" and dtype != torch.float32 else "sdpa"


def load_model(model_name: str, label2id: dict[str, int], trust_remote_code: bool = False,
               log: Callable[[str], None] = print, attention: str = "sdpa") -> torch.nn.Module:
    """AutoModelForSequenceClassification with a new head for label2id; notes what is random."""
    from transformers import AutoModelForSequenceClassification
    kwargs = dict(id2label={i: n for n, i in label2id.items()}, label2id=label2id, trust_remote_code=trust_remote_code,
                  ignore_mismatched_sizes=True, output_loading_info=True)
    try:
        with quiet_loading():
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    model_name, attn_implementation=attention, **kwargs)
            except ValueError:  # LUKE has no SDPA: its own (any other error comes again)
                model, info = AutoModelForSequenceClassification.from_pretrained(model_name, **kwargs)
    except pickle.UnpicklingError:  # transformers reads *.bin with torch.load(weights_only=True)
        raise UserError(f"refusing to load model {model_name!r}: its pickled weights hold non-tensors, which "
                        "could run code; use model.safetensors") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {model_name!r}: {first_line(e)} (a directory needs config.json and "
                        "model.safetensors)") from None
    new = set(info["missing_keys"]) | {k[0] for k in info["mismatched_keys"]}
    body = sorted(k for k in new if k.startswith(f"{model.base_model_prefix}."))
    if head := sorted(new - set(body)):
        log(f"note: {model_name}: a new classification head for {len(label2id)} labels ({', '.join(head)}) starts "
            "from random weights; fine-tuning trains it")
    if body:
        log(f"warning: {model_name}: {len(body)} weights of the model itself are not in its checkpoint and start "
            f"random ({', '.join(body[:3])}{', ...' if len(body) > 3 else ''})")
    if model.config.model_type not in KNOWN_MODEL_TYPES:
        log(f"note: {model_name}: model type {model.config.model_type!r} is none of the families bertcls adapts "
            f"({', '.join(KNOWN_MODEL_TYPES)}): loaded with the Auto classes, no family-specific fix checked")
    frozen = [p.requires_grad_(False) for name, p in model.named_parameters() if NEEDS_ENTITIES & set(name.split("."))]
    if frozen:
        log(f"note: luke: {sum(p.numel() for p in frozen) / 1e6:.2f}M parameters frozen (entity embeddings and "
            "queries: only entity inputs train them)")
    return model


def max_length(requested: int, tokenizer: Any, config: Any, log: Callable[[str], None] = print) -> int:
    """--max_seq_len capped by the position embeddings (RoBERTa's start after padding_idx) and model_max_length."""
    positions = getattr(config, "max_position_embeddings", None) or 10**9
    if config.model_type in ROBERTA_STYLE_POSITIONS:
        positions -= (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    limits = {"--max_seq_len": requested, "the model's position embeddings": positions,
              "the tokenizer's model_max_length": getattr(tokenizer, "model_max_length", None) or 10**9}
    source = min(limits, key=limits.get)  # the first of equals
    if limits[source] < requested:
        log(f"note: max_seq_len capped at {limits[source]} by {source}")
    return limits[source]


def uses_token_type_ids(config: Any) -> bool:
    """BERT was pre-trained with the second text as segment B (transformers 5 tokenizers no longer say so)."""
    return getattr(config, "type_vocab_size", 0) > 1


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each encoder layer in place (one graph for all; names unchanged); returns how many. SDPA stays
    eager: traced, it became fp32 softmax + matmuls, not fused kernels (docs/benchmarks.md)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register(COMPILED_SDPA, torch.compiler.disable(sdpa_attention_forward, recursive=False))
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(COMPILED_SDPA)
    torch._dynamo.config.recompile_limit = 64  # length buckets x (padded or not) x (training or evaluating)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    layers = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=[])
    for layer in layers:
        layer.compile(dynamic=False)  # static shapes per length bucket: see data.compile_buckets
    return len(layers)
