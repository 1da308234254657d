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

A new family goes here: how its tokenizer is loaded, what its inputs are, what its length limit is.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

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


def load_tokenizer(model_name: str, mecab_dic: str = "auto", trust_remote_code: bool = False,
                   log=print) -> Any:
    from transformers import AutoTokenizer
    if looks_like_path(model_name) and not Path(model_name).is_dir():
        raise UserError(f"model directory {model_name} not found: pass an existing directory or a hub name "
                        "such as cl-tohoku/bert-base-japanese-v3")
    try:
        kwargs = mecab_override(read_tokenizer_config(model_name), mecab_dic)
        if kwargs:
            log(f"note: {model_name}: BertJapaneseTokenizer with MeCab dictionary "
                f"{kwargs['mecab_kwargs']['mecab_dic']} (--mecab_dic to change)")
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code, **kwargs)
        if fairseq_misnumbered(tokenizer):
            log(f"note: {model_name}: transformers' MLukeTokenizer misnumbers its sentencepiece model; using "
                "XLMRobertaTokenizer on the same model (LUKE's pre-training ids; bertcls passes no entities)")
            tokenizer = xlm_roberta_tokenizer(model_name)
        return tokenizer
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {model_name!r}: {first_line(e)} "
                        "(check the name, your network or HF_HUB_OFFLINE, or pass a local directory)") from None


def load_model(model_name: str, label2id: dict[str, int], trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    id2label = {i: name for name, i in label2id.items()}
    kwargs = dict(num_labels=len(label2id), id2label=id2label, label2id=label2id,
                  trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True)
    try:
        try:
            return AutoModelForSequenceClassification.from_pretrained(model_name, attn_implementation="sdpa", **kwargs)
        except ValueError as e:
            if "sdpa" not in str(e).lower() and "attention" not in str(e).lower():
                raise
            return AutoModelForSequenceClassification.from_pretrained(model_name, **kwargs)
    except pickle.UnpicklingError:  # transformers loads *.bin with torch.load(weights_only=True)
        raise UserError(f"refusing to load model {model_name!r}: its pickled weights hold objects other than "
                        "tensors, which could run code; use a checkpoint with model.safetensors") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {model_name!r}: {first_line(e)} "
                        "(check the name, the directory's weights, your network or HF_HUB_OFFLINE)") from None


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


def uses_token_type_ids(config: Any) -> bool:
    # BERT was pre-trained with segment B = 1; transformers 5 tokenizers no longer return these by default.
    return getattr(config, "type_vocab_size", 0) > 1
