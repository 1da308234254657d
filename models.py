"""The model families: load each tokenizer and model so that it is fed exactly as it was pre-trained.

A fine-tuned model works only as well as its input matches pre-training: the same word segmentation (the MeCab
dictionary of cl-tohoku's BERTs), the same token ids (LUKE/mLUKE's sentencepiece numbering), segment ids where the
model was pre-trained with them, and no more tokens than its position embeddings hold.

    bert         cl-tohoku (BertJapaneseTokenizer + MeCab), bert-base-multilingual-cased: segment ids, 512 positions
    xlm-roberta  xlm-roberta-base/-large: sentencepiece, no segment ids, positions start after padding_idx
    luke         studio-ousia LUKE/mLUKE: XLM-R's sentencepiece numbering, words only (no entities)
    modernbert   sbintuitions/modernbert-ja-*, llm-jp/llm-jp-modernbert-base: 8192 tokens, no segment ids, the
                 tokenizer.json as shipped (transformers reads it as it is, whatever tokenizer_class says)

Any other model type runs with the plain Auto classes and a one-line note. A new family goes here.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from common import UserError, first_line

KNOWN_MODEL_TYPES = ("bert", "luke", "modernbert", "xlm-roberta")
ROBERTA_STYLE_POSITIONS = ("roberta", "xlm-roberta", "camembert", "luke", "xmod", "data2vec-text")
# LUKE/mLUKE learn these only from entity inputs, which bertcls does not give: frozen, so DDP needs no
# find_unused_parameters (an extra pass over the graph every step)
NEEDS_ENTITIES = {"entity_embeddings", "w2e_query", "e2w_query", "e2e_query"}
COMPILED_SDPA = "bertcls_sdpa"  # see compile_layers


def tokenizer_kwargs(model_name: str, mecab_dic: str) -> dict:
    """The MeCab dictionary a BertJapaneseTokenizer was trained with. cl-tohoku's v1 models were pre-trained with
    IPAdic, but their configs name no dictionary and transformers defaults to unidic-lite: without this they would
    be fed another segmentation. AutoTokenizer reads tokenizer_class from config.json when the tokenizer config
    names none (v1 declares it only there), and so does this."""
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


def luke_misnumbered(tokenizer: Any) -> bool:
    """transformers 5's MLukeTokenizer built from sentencepiece.bpe.model (how the hub ships LUKE) keeps raw
    sentencepiece ids, every word off by one from the fairseq numbering LUKE was pre-trained with (<s> 0, <pad> 1,
    </s> 2, <unk> 3), and skips sentencepiece's NFKC. Without entities its word tokenization is XLM-R's."""
    return (type(tokenizer).__name__ == "MLukeTokenizer"
            and tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) != [0, 1, 2, 3])


def xlm_roberta_tokenizer(model_name: str) -> Any:
    """XLMRobertaTokenizer from the sentencepiece model alone (with LUKE's tokenizer config it would add the
    entity tokens as words, with ids past the embeddings)."""
    from transformers import XLMRobertaTokenizer
    from transformers.utils import cached_file
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sentencepiece.bpe.model").write_bytes(Path(cached_file(model_name, "sentencepiece.bpe.model"))
                                                           .read_bytes())
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
        if luke_misnumbered(tokenizer):
            log(f"note: {model_name}: using XLMRobertaTokenizer on its sentencepiece model (transformers' "
                "MLukeTokenizer misnumbers it; bertcls passes no entities)")
            tokenizer = xlm_roberta_tokenizer(model_name)
    except (ImportError, OSError, ValueError, TypeError, RuntimeError) as e:
        # a missing package (MeCab dictionary, sentencepiece: transformers then asks for "tiktoken"), a missing
        # vocabulary file (TypeError from BertJapaneseTokenizer), an unknown name, an unreachable hub
        raise UserError(f"cannot load the tokenizer of {model_name!r}: {first_line(e)} (check the name or directory, "
                        "and that `pip install -r requirements.txt` went through)") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers 5 makes an empty one from nothing
        raise UserError(f"the tokenizer of {model_name!r} has no vocabulary beyond its special tokens: the directory "
                        "needs the files tokenizer.save_pretrained writes (vocab.txt, tokenizer.json or a "
                        "sentencepiece model)")
    return tokenizer


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hold back transformers' red LOAD REPORT (the new head shows as MISSING on every fine-tuning run: load_model
    says what it means in one line) and its "Loading weights" bar off a terminal (a log full of carriage returns)."""
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
    """SDPA (fused kernels), except in bf16/fp16 on the CPU: there, with dropout, SDPA takes its math fallback, which
    upcasts to fp32, while eager attention multiplies in bf16 (1.2x the examples/s, docs/benchmarks.md)."""
    return "eager" if device.type == "cpu" and dtype != torch.float32 else "sdpa"


def load_model(model_name: str, label2id: dict[str, int], trust_remote_code: bool = False,
               log: Callable[[str], None] = print, attention: str = "sdpa") -> torch.nn.Module:
    """AutoModelForSequenceClassification with a new head for label2id; says in one line what starts random."""
    from transformers import AutoModelForSequenceClassification
    kwargs = dict(num_labels=len(label2id), id2label={i: n for n, i in label2id.items()}, label2id=label2id,
                  trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True, output_loading_info=True)
    try:
        with quiet_loading():
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    model_name, attn_implementation=attention, **kwargs)
            except ValueError as e:  # a family without that attention (LUKE): its own
                if "attention" not in str(e).lower():
                    raise
                model, info = AutoModelForSequenceClassification.from_pretrained(model_name, **kwargs)
    except pickle.UnpicklingError:  # transformers reads *.bin with torch.load(weights_only=True)
        raise UserError(f"refusing to load model {model_name!r}: its pickled weights hold objects other than tensors, "
                        "which could run code; use a checkpoint with model.safetensors") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {model_name!r}: {first_line(e)} (a directory needs config.json and "
                        "model.safetensors, as save_pretrained writes them)") from None
    new = set(info.get("missing_keys") or ()) | {k if isinstance(k, str) else k[0]
                                                 for k in info.get("mismatched_keys") or ()}
    body = sorted(k for k in new if k.startswith(f"{model.base_model_prefix}."))
    if new - set(body):
        log(f"note: {model_name}: a new classification head for {len(label2id)} labels "
            f"({', '.join(sorted(new - set(body)))}) starts from random weights; fine-tuning trains it")
    if body:
        log(f"warning: {model_name}: {len(body)} weights of the model itself are not in its checkpoint and start "
            f"random ({', '.join(body[:3])}{', ...' if len(body) > 3 else ''})")
    if model.config.model_type not in KNOWN_MODEL_TYPES:
        log(f"note: {model_name}: model type {model.config.model_type!r} is none of the families bertcls adapts "
            f"({', '.join(KNOWN_MODEL_TYPES)}): loaded with the Auto classes, no family-specific fix checked")
    frozen = [p.requires_grad_(False) for name, p in model.named_parameters() if NEEDS_ENTITIES & set(name.split("."))]
    if frozen:
        log(f"note: luke: {sum(p.numel() for p in frozen) / 1e6:.2f}M parameters frozen (entity embeddings and "
            "entity-attention queries learn only from entity inputs, which bertcls does not pass)")
    return model


def max_length(requested: int, tokenizer: Any, config: Any, log: Callable[[str], None] = print) -> int:
    """--max_seq_len capped by the position embeddings (RoBERTa-style ones start after padding_idx) and the
    tokenizer's model_max_length, with a note when capped."""
    positions = getattr(config, "max_position_embeddings", None) or 10**9
    if config.model_type in ROBERTA_STYLE_POSITIONS:
        positions -= (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    limits = {"--max_seq_len": requested, "the model's position embeddings": positions}
    if (tokenizer_limit := getattr(tokenizer, "model_max_length", None) or 10**9) < 10**6:  # 10**30: no limit
        limits["the tokenizer's model_max_length"] = tokenizer_limit
    source = min(limits, key=limits.get)
    if limits[source] < requested:
        log(f"note: max_seq_len capped at {limits[source]} by {source}")
    return limits[source]


def uses_token_type_ids(config: Any) -> bool:
    """BERT was pre-trained with the second text as segment B (transformers 5 tokenizers no longer return it)."""
    return getattr(config, "type_vocab_size", 0) > 1


def compile_layers(model: torch.nn.Module) -> int:
    """Regional compilation: torch.compile each layer of the encoder stack in place; returns how many.

    The layers share their code, so one compiled graph serves them all (compiling is fast and repeats per input
    shape, not per layer), and embeddings, masks and head stay eager. Attention runs outside the compiled graphs
    (a graph break, COMPILED_SDPA): traced by the compiler, SDPA was decomposed into softmax + matmuls in fp32 instead
    of running the fused flash/cuDNN kernels that eager picks (docs/benchmarks.md). Parameter names are unchanged, so
    state dicts, DDP and checkpoints see the same model.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register(COMPILED_SDPA, torch.compiler.disable(sdpa_attention_forward, recursive=False))
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(COMPILED_SDPA)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    layers = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=[])
    for layer in layers:
        layer.compile(dynamic=False)  # static shapes per length bucket: see bertcls.compile_buckets
    return len(layers)
