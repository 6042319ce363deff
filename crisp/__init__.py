"""crisp: top-k attention sparsity as a regularizer for Hugging Face encoders.

``import crisp`` registers the ``"crisp"`` attention implementation with transformers::

    model = AutoModelForSequenceClassification.from_pretrained(name, attn_implementation="crisp")
    crisp.set_sparsity(model, 0.8)
"""

from crisp.attention import LayerStats, attention_stats, configure, get_sparsity, register, set_sparsity
from crisp.strategies import STRATEGIES, apply_strategy, register_strategy

register()

__version__ = "0.1.0"
__all__ = [
    "LayerStats",
    "STRATEGIES",
    "apply_strategy",
    "attention_stats",
    "configure",
    "get_sparsity",
    "register_strategy",
    "set_sparsity",
]
