"""The command line trains tiny folders of other families sparse, and refuses one crisp cannot reach with exit 2:
``python -m crisp.run model.name_or_path=<folder> sparsity=0.8`` as a user types it, one process per run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from crisp.training.data import generate_synthetic
from crisp.training.encoder import train_word_tokenizer
from tests.conftest import run_crisp, smoke_overrides

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
         "max_position_embeddings": 128}
FAMILIES = {
    "roberta": {},
    "electra": {"embedding_size": 32},
    "deberta-v2": {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 32,
                   "share_att_key": True, "position_biased_input": False, "norm_rel_ebd": "layer_norm"},
    "modernbert": {"local_attention": 8, "global_attn_every_n_layers": 2},  # layer 1 sees 4 keys either side
    "llama": {"num_key_value_heads": 2},  # causal and grouped-query
}


def tiny_folder(tmp_path, model_type: str, **extra):
    """A random-init model of ``model_type`` and a word tokenizer over the synthetic task's words, saved."""
    tokenizer = train_word_tokenizer(generate_synthetic(200, 0).texts, 200)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
           "eos_token_id": tokenizer.sep_token_id, "cls_token_id": tokenizer.cls_token_id,
           "sep_token_id": tokenizer.sep_token_id}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **SIZES, **extra)
    for name, value in ids.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    folder = tmp_path / model_type
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_tiny_folder_of_each_family_trains_sparse_through_the_command_line(model_type, tmp_path):
    folder = tiny_folder(tmp_path, model_type, **FAMILIES[model_type])
    out = tmp_path / "run"
    proc = run_crisp(*smoke_overrides(out, "model=distilbert", f"model.name_or_path={folder}", "sparsity=0.8"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    achieved = result["layers"]["achieved_val"]
    assert result["status"] == "completed" and len(achieved) == 2
    assert sum(achieved) / len(achieved) >= 0.7, achieved
    # named as what trained: the folder's class and the folder, not the distilbert choice it was given to
    trained = result["trained_model"]
    assert trained["class"] == type(AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(folder))).__name__
    assert trained["name_or_path"] == f"{tmp_path.name}/{model_type}"
    assert trained["label"] == f"{trained['class']} from {tmp_path.name}/{model_type}"


@pytest.mark.slow
def test_a_folder_crisp_cannot_reach_exits_2_before_training_with_one_line(tmp_path):
    folder = tiny_folder(tmp_path, "deberta")  # DeBERTa (v1): its attention is inline, with no adapter
    out = tmp_path / "run"
    proc = run_crisp(*smoke_overrides(out, "model=distilbert", f"model.name_or_path={folder}", "sparsity=0.8"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("crisp: error: crisp's attention does not run in DebertaForSequenceClassification (")
    assert "crisp supports the families" in last and "Traceback" not in proc.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["status"] == "failed" and result["error"]["type"] == "AttentionNotReached"
    assert not result.get("history")  # nothing trained
