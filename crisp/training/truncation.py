"""Whether ``data.max_length`` leaves the examples their text, measured before they are tokenized for training.

A length that leaves no room for text next to each example's special tokens (``[CLS] ... [SEP]``) would
train on those alone and finish at chance: refused. A length that cuts more than half the tokens of a
set share of the examples (:data:`WARN_SHARE`) is said, with the numbers and the length that would
keep most of them whole. Measured on an even sample of each split (:data:`SAMPLE` examples at most):
one tokenizer pass over it, without truncation.
"""

from __future__ import annotations

import logging

from crisp.core.errors import ConfigError
from crisp.training.rows import Split

log = logging.getLogger("crisp")
SAMPLE = 2000
WARN_SHARE = 0.1  # of the examples, each losing more than half its tokens


def check_truncation(tokenizer, split: Split, max_length: int, name: str) -> None:
    """Refuse a ``max_length`` that keeps no text of most examples; warn when many lose most of theirs."""
    step = max(1, len(split.texts) // SAMPLE)
    rows = range(0, len(split.texts), step)[:SAMPLE]
    texts = [split.texts[i] for i in rows]
    args = (texts,) if split.pairs is None else (texts, [split.pairs[i] for i in rows])
    lengths = sorted(len(ids) for ids in tokenizer(*args, add_special_tokens=False, verbose=False)["input_ids"])
    if not lengths:
        return
    special = tokenizer.num_special_tokens_to_add(pair=split.pairs is not None)
    room = max_length - special
    kept_none = sum(length > 0 for length in lengths) if room <= 0 else 0
    halved = sum(min(length, max(room, 0)) < length / 2 for length in lengths)
    whole = lengths[int(0.9 * (len(lengths) - 1))] + special  # keeps 9 examples in 10 whole
    sampled = f"{len(lengths):,} {name} examples" + (" (an even sample)" if step > 1 else "")
    if kept_none > len(lengths) / 2:
        raise ConfigError(
            f"data.max_length={max_length} is not allowed: it leaves no token of text in {kept_none} of {sampled}, "
            f"only their {special} special tokens; it must be more than {special} (data.max_length={whole} keeps "
            "9 in 10 whole)")
    if halved >= WARN_SHARE * len(lengths):
        log.warning("data.max_length=%d cuts more than half the tokens of %d of %s (%.0f%%): median %d tokens of "
                    "text and %d special; data.max_length=%d keeps 9 in 10 whole", max_length, halved, sampled,
                    100 * halved / len(lengths), lengths[len(lengths) // 2], special, whole)
