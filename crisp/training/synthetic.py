"""Sentiment-like sentences generated from a seed: a binary single-sentence task (as SST-2) with no files."""

from __future__ import annotations

import random

from crisp.training.rows import Split

_POSITIVE = ["good", "great", "superb", "charming", "moving", "delightful", "brilliant", "funny", "warm", "fresh",
             "witty", "touching"]
_NEGATIVE = ["bad", "dull", "boring", "awful", "tedious", "bland", "clumsy", "lifeless", "stale", "flat",
             "tiresome", "messy"]
_FILLER = (
    "the a film movie story plot cast it is was this that and but with of its director actors scenes "
    "script ending music pace feels seems quite rather very often sometimes"
).split()


def generate_synthetic(num: int, seed: int) -> Split:
    """Sentences of filler words with a majority of sentiment words of their label's polarity."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num):
        label = rng.randint(0, 1)
        same, other = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
        words = rng.choices(_FILLER, k=rng.randint(4, 16))
        cues = rng.choices(same, k=rng.randint(2, 3)) + rng.choices(other, k=rng.randint(0, 1))
        for cue in cues:
            words.insert(rng.randint(0, len(words)), cue)
        texts.append(" ".join(words))
        labels.append(label)
    return Split(texts, labels)
