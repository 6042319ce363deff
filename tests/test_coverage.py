"""Every sequence classifier of the installed transformers is sparse and exact or refused before it trains, and
docs/encoders.md says which (tests/encoder_coverage.py: how each type is built tiny and checked).

A sparse type's lockstep column is checked too: where it says "fuses", two runs fused in lockstep compute each
run's own logits. The types crisp promises run on every test run; the whole sweep (every type in transformers' auto
mapping, about 80 s on two cores) is marked slow. A row of the committed table is checked when the installed
transformers is the one the table was made with (``python -m tests.encoder_coverage`` makes it again).
"""

from __future__ import annotations

import pytest
import transformers

from tests.encoder_coverage import NOT_BUILT, REFUSED, SPARSE, committed, examine, model_types

# encoders crisp has trained sparse from the start, and the decoders, DeBERTa and ModernBERT this table added
PROMISED = ("bert", "distilbert", "mpnet", "roberta", "xlm-roberta", "electra", "albert", "deberta-v2", "modernbert",
            "llama", "qwen2", "mistral", "gpt2", "gpt_bigcode", "gpt_neo")
VERSION, ROWS = committed()
SAME_TRANSFORMERS = transformers.__version__ == VERSION


def checked(model_type: str):
    """The type's outcome (an AssertionError where it has neither), and the committed table's row agreeing."""
    outcome = examine(model_type)
    if SAME_TRANSFORMERS:
        found = (outcome.kind, outcome.notes, outcome.lockstep)
        assert ROWS.get(model_type) == found, (
            f"docs/encoders.md says {ROWS.get(model_type)} for {model_type}, the check finds {found}: make it again "
            "with python -m tests.encoder_coverage")
    return outcome


@pytest.mark.parametrize("model_type", PROMISED)
def test_the_promised_encoders_and_decoders_are_sparse_and_exact(model_type):
    assert checked(model_type).kind == SPARSE


@pytest.mark.parametrize("model_type", ["deberta", "rembert", "gpt_oss"])
def test_a_model_crisp_cannot_reach_is_refused_and_as_loaded_never_runs_a_wrong_mask(model_type):
    assert checked(model_type).kind == REFUSED  # examine also ran it as loaded: eager's numbers, or a refusal


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [t for t in model_types() if t not in PROMISED])
def test_every_sequence_classifier_is_sparse_and_exact_or_refused(model_type):
    outcome = checked(model_type)
    if outcome.kind == NOT_BUILT:
        pytest.skip(f"{model_type} cannot be built tiny here: {outcome.notes}")


def test_the_committed_table_lists_every_sequence_classifier_of_its_transformers():
    if not SAME_TRANSFORMERS:
        pytest.skip(f"docs/encoders.md was made with transformers {VERSION}, this is {transformers.__version__}")
    assert sorted(ROWS) == model_types()
    assert {kind for kind, _, _ in ROWS.values()} <= {SPARSE, REFUSED, NOT_BUILT}
