"""``trainer.save_weights=true``: a run's fine-tuned model as a folder that transformers loads back sparse.

``<run>/model/`` holds what :func:`crisp.save_pretrained` writes: config.json with crisp's settings (per-layer
sparsity, the sparsifier and its keys, ``apply_in_eval``), the weights (``model.safetensors``) and the run's
tokenizer. After ``import crisp``, ``AutoModelForSequenceClassification.from_pretrained("<run>/model")`` is the
model as it was validated last, sparse as it trained. A run trained alone saves its own model; a run of a
lockstep group saves a model of its own built from the group's config and its slice of the fused weights
(:func:`run_model`), so the two folders are alike file for file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoModelForSequenceClassification
from transformers.initialization import no_init_weights

import crisp
from crisp.training.builder import use_sparsifier

MODEL_DIR = "model"


def save_model(output_dir: Path, model: torch.nn.Module, tokenizer: Any) -> Path:
    """Save ``model`` (with ``tokenizer``) into ``<output_dir>/model``, statistics on for whoever loads it."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the model
    crisp.configure(model, track_stats=True)  # a training step may have left them off in some layers
    return crisp.save_pretrained(model, Path(output_dir) / MODEL_DIR, tokenizer)


def run_model(config, state: dict[str, torch.Tensor], layer_sparsity: list[float],
              sparsifier: DictConfig) -> torch.nn.Module:
    """A model of ``config`` (the run's, as its builder made it) holding the parameters ``state``, with the run's
    per-layer sparsity and sparsifier: what the run's own model would be after training alone."""
    with no_init_weights():  # every parameter is the run's: no time spent drawing random ones first
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="crisp")
    # strict: every tensor the model saves is the run's (a persistent buffer would be missing here, not saved unset)
    model.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, strict=True)
    crisp.set_sparsity(model, layer_sparsity)
    use_sparsifier(model, sparsifier)
    return model.eval()
