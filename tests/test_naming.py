"""What trained is what is named: a folder next to a model built from its config is refused before anything is
written, and results.json and the report name the class and the source of the model that actually trained."""

from __future__ import annotations

import json

from crisp.core import results
from crisp.report import write_report
from tests.conftest import run_crisp, smoke_overrides
from tests.test_report import write_run


def test_a_folder_next_to_a_model_built_from_its_config_is_refused_in_one_line_before_anything_is_written(tmp_path):
    """``experiment=smoke`` builds the tiny random DistilBERT from ``model.from_config``: the folder would not load."""
    folder = tmp_path / "roberta"
    folder.mkdir()
    out = tmp_path / "run"
    proc = run_crisp(*smoke_overrides(out, f"model.name_or_path={folder}"), timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"crisp: error: model.name_or_path='{folder}' is not allowed: this model choice builds a "
                    "random-init distilbert from model.from_config and would not load it; to fine-tune it, choose a "
                    "model that loads one (model=distilbert model.name_or_path=..., with its own tokenizer), or leave "
                    "model.name_or_path unset to train the random-init model")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_grid_that_names_a_folder_next_to_a_model_built_from_its_config_stops_before_any_run(tmp_path):
    folder = tmp_path / "roberta"
    folder.mkdir()
    proc = run_crisp("-m", *smoke_overrides(tmp_path / "sweep", f"model.name_or_path={folder}", sweep=True),
                     "seed=1,2", timeout=120)
    assert proc.returncode == 2
    assert "job 0 of the grid" in proc.stderr and f"model.name_or_path='{folder}' is not allowed" in proc.stderr
    assert not results.find_all(tmp_path)


def test_results_name_the_class_and_the_source_of_the_model_that_trained(tmp_path):
    folder = tmp_path / "models" / "my-roberta"
    folder.mkdir(parents=True)
    assert results.trained_model("RobertaForSequenceClassification", str(folder)) == {
        "class": "RobertaForSequenceClassification", "name_or_path": "models/my-roberta",
        "label": "RobertaForSequenceClassification from models/my-roberta"}  # a folder: never the machine's path
    assert results.trained_model("DebertaV2ForSequenceClassification", "microsoft/deberta-v3-base")["label"] == \
        "DebertaV2ForSequenceClassification from microsoft/deberta-v3-base"  # a hub name as given
    assert results.trained_model("DistilBertForSequenceClassification", None) == {
        "class": "DistilBertForSequenceClassification", "name_or_path": None,
        "label": "random init, DistilBertForSequenceClassification"}


def test_the_report_names_the_model_that_trained_beside_its_label(tmp_path):
    for seed in (1, 2):
        path = write_run(tmp_path, f"dense_seed{seed}", strategy="dense", sparsity=0.0, seed=seed, model="my-roberta")
        record = json.loads(path.read_text())
        record["trained_model"] = results.trained_model("RobertaForSequenceClassification", "runs/my-roberta")
        path.write_text(json.dumps(record))
    write_report([tmp_path])
    report = (tmp_path / "report.md").read_text()
    assert "Model: my-roberta (RobertaForSequenceClassification from runs/my-roberta) on sst2." in report


def test_the_smoke_run_names_the_random_tiny_distilbert_it_trained(tmp_path):
    proc = run_crisp(*smoke_overrides(tmp_path, "data.num_train=64", "data.num_val=32"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = results.read(tmp_path)
    assert record["model"] == "tiny DistilBERT, random init"  # the config's label, as before
    assert record["trained_model"] == {"class": "DistilBertForSequenceClassification", "name_or_path": None,
                                       "label": "random init, DistilBertForSequenceClassification"}
