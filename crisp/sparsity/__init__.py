"""The sparsifier: exact top-k attention for Hugging Face encoders (the layer everything else builds on).

- :mod:`~crisp.sparsity.registry`: the sparsifiers (topk, random, topp, entmax, yours), their one
  contract and the metadata config checks read (no torch);
- :mod:`~crisp.sparsity.sparsifiers`: the built-in sparsifiers' functions;
- :mod:`~crisp.sparsity.streams`: each run's own random stream, for the sparsifiers that draw;
- :mod:`~crisp.sparsity.topk`: k per row and the kept keys (portable sort path);
- :mod:`~crisp.sparsity.kernels`: the same in one fused Triton launch on GPUs;
- :mod:`~crisp.sparsity.attention`: the attention function, registered with transformers;
- :mod:`~crisp.sparsity.visibility`: which keys each query row may see (masks, causality, shared key/value heads);
- :mod:`~crisp.sparsity.families`: how each encoder family's attention reaches it, and the check that it does
  (with :mod:`~crisp.sparsity.inline`); :mod:`~crisp.sparsity.errors`: the refusal, ``AttentionNotReached``;
- :mod:`~crisp.sparsity.layers`: the model-level API (set_sparsity, set_sparsifier, configure, attention_stats,
  prepare);
- :mod:`~crisp.sparsity.saving`: ``save_pretrained``, and the settings coming back as a saved model loads;
- :mod:`~crisp.sparsity.strategies`: which sparsity each layer gets (uniform, adaptive, ramp), a registry;
- :mod:`~crisp.sparsity.calibration`: a strategy applied to a model (the adaptive one calibrated on it).
"""

# the most sparsity a strategy gives one layer (adaptive, ramp); here, so that config checks read it without torch
MAX_LAYER_SPARSITY = 0.95
