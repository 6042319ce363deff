"""The Hugging Face encoder and its tokenizer, loaded with crisp attention."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import crisp  # noqa: F401  (registers the "crisp" attention implementation)
from crisp.hub import resolve_model

NUM_LABELS = 2
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on ``texts``: random-init models need no download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tokenizer(cfg: DictConfig, train_texts: list[str]):
    if cfg.tokenizer == "train":
        return train_wordpiece(train_texts, cfg.tokenizer_vocab_size)
    name, local = resolve_model(cfg.tokenizer or cfg.name_or_path)
    return AutoTokenizer.from_pretrained(name, local_files_only=local)


def build_encoder(cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """A sequence classifier whose attention is crisp's, pretrained or (``from_config``) random-init."""
    if cfg.from_config is not None:
        spec = OmegaConf.to_container(cfg.from_config, resolve=True)
        config = AutoConfig.for_model(
            **spec, vocab_size=len(tokenizer), num_labels=NUM_LABELS, pad_token_id=tokenizer.pad_token_id
        )
        return AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp")
    name, local = resolve_model(cfg.name_or_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected when fine-tuning
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=NUM_LABELS, attn_implementation="crisp", dtype=torch.float32, local_files_only=local
        )
    finally:
        hf_logging.set_verbosity(verbosity)
