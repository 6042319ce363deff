"""Shared fixtures: tiny random-init encoders (each with its own config object) and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig, MPNetConfig

import crisp  # noqa: F401  (registers the "crisp" attention implementation)

ROOT = Path(__file__).resolve().parents[1]
SST2_DIR = Path(os.environ.get("CRISP_SST2_DIR", ROOT.parent / "shared" / "data" / "sst2"))
GLUE_DIR = Path(os.environ.get("CRISP_GLUE_DIR", ROOT.parent / "shared" / "data" / "glue"))
VOCAB = 64


def tiny_config(arch: str):
    """A fresh config per call: transformers mutates the config object a model is built from."""
    if arch == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                                max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
                                seq_classif_dropout=0.0)
    if arch == "bert":
        return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=128,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if arch == "mpnet":
        return MPNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=130,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raise ValueError(arch)


def tiny_model(arch: str, attn: str = "crisp", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(arch), attn_implementation=attn).eval()


@pytest.fixture(params=["distilbert", "bert", "mpnet"])
def arch(request):
    return request.param


def run_crisp(*overrides: str, module: str = "crisp.run", timeout: float = 600, env: dict | None = None):
    """``python -m crisp.run OVERRIDES`` in a fresh process, as a user types it."""
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset it
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def smoke_overrides(out: Path, *extra: str, sweep: bool = False) -> list[str]:
    """The smoke experiment, smaller still, writing into ``out`` (fewer generated sentences, unless ``extra``
    chooses other data: only generated data has their keys)."""
    where = f"hydra.sweep.dir={out}" if sweep else f"hydra.run.dir={out}"
    sizes = [] if any(e.startswith("data=") for e in extra) else ["data.num_train=256", "data.num_val=128"]
    return ["experiment=smoke", *sizes, "trainer.max_epochs=1", where, *extra]
