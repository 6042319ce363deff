"""The Hugging Face encoder and its tokenizer, loaded with crisp attention in every layer.

Every encoder is built with as many outputs as its task has labels (one for a regression) and goes
through :func:`crisp.prepare` before it trains: its family's adapter is installed and a dry forward
proves that crisp's attention runs in every layer.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import crisp
from crisp.core.errors import ConfigError
from crisp.sparsity.families import dropout_attributes
from crisp.training.hub import resolve_model
from crisp.training.tasks import Task

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_word_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer over the ``vocab_size`` most frequent words of ``texts``.

    Random-init models need no download. Built in Python with ties broken alphabetically, so the
    same texts always give the same ids (the tokenizers library's trainers order ties by hash).
    """
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max(0, vocab_size - len(_SPECIALS))]
    vocab = {token: i for i, token in enumerate([*_SPECIALS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tokenizer(cfg: DictConfig, train_texts: list[str]):
    """The model's own tokenizer, or (``tokenizer: train``) a word-level one over the training texts."""
    if cfg.tokenizer == "train":
        return train_word_tokenizer(train_texts, cfg.tokenizer_vocab_size)
    name, local = resolve_model(cfg.tokenizer or cfg.name_or_path)
    return AutoTokenizer.from_pretrained(name, local_files_only=local)


def dropout_overrides(config, dropout: DictConfig | dict | None) -> dict[str, float]:
    """The attributes of the model config ``config`` that ``dropout`` (crisp's keys: hidden, attention,
    classifier) sets (:func:`crisp.sparsity.families.dropout_attributes`)."""
    attributes = dropout_attributes(config)
    overrides = {}
    for role, value in ({} if dropout is None else dict(dropout)).items():
        if value is None:
            continue
        if role not in attributes:
            allowed = ", ".join(f"dropout.{r}" for r in attributes) or "none"
            raise ConfigError(f"dropout.{role}={value!r} is not allowed: a {config.model_type} model has no such "
                              f"dropout (its keys: {allowed}; null keeps the model's own)")
        overrides[attributes[role]] = float(value)
    return overrides


def build_encoder(cfg: DictConfig, tokenizer, task: Task, dropout: DictConfig | None = None) -> torch.nn.Module:
    """A sequence classifier whose attention is crisp's, pretrained or (``from_config``) random-init,
    with the ``dropout`` probabilities that are set (see conf/config.yaml)."""
    if cfg.from_config is not None:
        spec = OmegaConf.to_container(cfg.from_config, resolve=True)
        config = AutoConfig.for_model(
            **spec, vocab_size=len(tokenizer), num_labels=task.num_labels, pad_token_id=tokenizer.pad_token_id
        )
        for key, value in dropout_overrides(config, dropout).items():
            setattr(config, key, value)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp")
    else:
        name, local = resolve_model(cfg.name_or_path)
        config = AutoConfig.from_pretrained(name, num_labels=task.num_labels, local_files_only=local)
        for key, value in dropout_overrides(config, dropout).items():
            setattr(config, key, value)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected when fine-tuning
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                name, config=config, attn_implementation="crisp", dtype=torch.float32, local_files_only=local,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    crisp.prepare(model)
    return model
