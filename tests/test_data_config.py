"""The data config before anything loads: the keys each source takes, the task it declares, its files, the run_key."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from crisp.core import results
from crisp.core.config import (
    ConfigError,
    register_configs,
    register_resolvers,
    resolved_config,
    validate,
    written_config,
)
from crisp.core.data_config import allowed_keys, source_of
from tests.conftest import ROOT, run_crisp, smoke_overrides

register_configs()
register_resolvers()
CONF = ROOT / "conf"
COMMITTED = ROOT / "multirun" / "results"


def make(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def files(tmp_path):
    """A csv of reviews: train.csv and dev.csv with columns review,sentiment."""
    for name in ("train.csv", "dev.csv"):
        (tmp_path / name).write_text("review,sentiment\ngood film,pos\nbad film,neg\n")
    return tmp_path


def own(files, *extra: str) -> list[str]:
    return ["data=files", f"data.train_file={files / 'train.csv'}", f"data.validation_file={files / 'dev.csv'}",
            "data.text_fields=[review]", "data.label_field=sentiment", *extra]


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(make(*overrides))
    return str(err.value)


def test_every_data_choice_holds_only_the_keys_its_source_takes():
    for path in sorted((CONF / "data").glob("[!_]*.yaml")):
        data = make(f"data={path.stem}").data
        assert set(data) <= set(allowed_keys(source_of(data))), path.name


def test_your_own_files_pass_the_check(files):
    validate(make(*own(files)))
    validate(make(*own(files, "data.labels=[neg,pos]", "data.metric=[f1,acc]")))


@pytest.mark.parametrize("extra", ["+data.text_column=review", "+data.num_train=100"])
def test_an_unknown_data_key_is_refused_with_the_keys_its_choice_takes(files, extra):
    message = refused(*own(files, extra))
    key, value = extra.lstrip("+").split("=")
    assert f"{key}={value!r}" in message or f"{key}={int(value)!r}" in message
    assert "data=files (source files) takes the keys" in message
    assert "train_file, validation_file" in message and "text_fields, label_field" in message


def test_an_unknown_key_under_a_glue_task_or_its_layout_is_refused():
    assert "data.text_column='x' is not allowed: data=rte (source glue) takes the keys" in refused(
        "data=rte", "+data.text_column=x")
    assert "data.glue.delimiter='comma' is not allowed: data.glue takes the keys folder" in refused(
        "data=rte", "+data.glue.delimiter=comma")


@pytest.mark.parametrize(("extra", "needles"), [
    (["data.labels=[neg,pos]", "data.regression=[0,5]"], ["data.regression=[0, 5]", "not both"]),
    (["data.labels=[pos]"], ["data.labels=['pos']", "two or more distinct class names"]),
    (["data.labels=[pos,pos]"], ["data.labels=['pos', 'pos']"]),
    (["data.regression=[5,0]"], ["data.regression=[5, 0]", "low < high"]),
    (["data.regression=[0,inf]"], ["data.regression=[0, inf]", "finite"]),
    (["data.metric=pearson"], ["data.metric='pearson'", "a classification takes acc, f1, mcc"]),
    (["data.regression=[0,5]", "data.metric=f1"], ["data.metric='f1'", "a regression takes pearson, spearman"]),
    (["data.metric=[f1,f1]"], ["data.metric=['f1', 'f1']", "each metric once"]),
    (["data.text_fields=[a,b,c]"], ["data.text_fields=['a', 'b', 'c']", "one column name, or two for a pair"]),
    (["data.label_field=review"], ["data.label_field='review'", "other than the text field"]),
    (["data.source=sheets"], ["data.source='sheets'", "files, hub, disk"]),
])
def test_a_task_declared_wrong_is_refused_by_key(files, extra, needles):
    message = refused(*own(files, *extra))
    for needle in needles:
        assert needle in message


def test_each_file_the_task_names_must_be_there_and_readable(files):
    (files / "empty.csv").write_text("")
    (files / "notes.txt").write_text("text,label\n")
    cases = {
        "data.train_file=null": "data=files needs data.train_file=",
        f"data.train_file={files / 'nope.csv'}": "data.train_file='" + str(files / "nope.csv") + "' is not allowed: "
                                                 "there is no such file",
        f"data.validation_file={files / 'empty.csv'}": "the file is empty (0 bytes)",
        f"data.validation_file={files / 'notes.txt'}": "extension says its format: .csv, .tsv, .json, .jsonl, .parquet",
        f"data.validation_file=[{files / 'dev.csv'},{files / 'nope.jsonl'}]": "data.validation_file='"
                                                                              + str(files / "nope.jsonl"),
        f"data.train_file={files}": "it is a folder",
    }
    for override, needle in cases.items():
        assert needle in refused(*own(files, override)), override


def test_a_saved_folder_must_hold_a_datasetdict_with_the_named_splits(tmp_path):
    import datasets

    assert "data.path='/no/such/folder' is not allowed: there is no such folder" in refused(
        "data=disk", "data.path=/no/such/folder")
    one = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    one.save_to_disk(str(tmp_path / "one"))
    assert "it holds one Dataset, not a DatasetDict" in refused("data=disk", f"data.path={tmp_path / 'one'}")
    datasets.DatasetDict(train=one, test=one).save_to_disk(str(tmp_path / "two"))
    message = refused("data=disk", f"data.path={tmp_path / 'two'}")
    assert "data.validation_split='validation' is not allowed: the folder's splits are train, test" in message
    validate(make("data=disk", f"data.path={tmp_path / 'two'}", "data.validation_split=test"))


def test_a_glue_folder_and_a_hub_folder_are_looked_for_before_anything_loads(tmp_path):
    assert "data.dir='/no/such/RTE' is not a folder (it must hold GLUE RTE's train.tsv and dev.tsv)" in refused(
        "data=rte", "data.dir=/no/such/RTE")
    (tmp_path / "train_matched.tsv").write_text("x")
    (tmp_path / "train.tsv").write_text("x")
    (tmp_path / "dev_matched.tsv").write_text("x")
    assert f"data.dir: missing file {tmp_path / 'dev_mismatched.tsv'} (a GLUE MNLI folder holds train.tsv and " \
           "dev_matched.tsv and dev_mismatched.tsv)" in refused("data=mnli", f"data.dir={tmp_path}")
    assert "data.hub_path='./no/such/folder' is not allowed: there is no such folder" in refused(
        "data=hub", "data.hub_path=./no/such/folder")
    assert "data=hub needs data.hub_path=" in refused("data=hub")
    validate(make("data=hub", "data.hub_path=stanfordnlp/imdb", "data.validation_split=test"))


def test_splits_are_named_one_for_training_and_others_for_validation():
    hub = ["data=hub", "data.hub_path=stanfordnlp/imdb"]
    assert "data.train_split=['train', 'extra'] is not allowed: the training split's name" in refused(
        *hub, "data.train_split=[train,extra]")
    assert "data.validation_split='train' is not allowed: a split other than 'train'" in refused(
        *hub, "data.validation_split=train")
    assert "data.validation_split=['test', 'test'] is not allowed" in refused(*hub, "data.validation_split=[test,test]")
    validate(make(*hub, "data.validation_split=[test,validation]"))


def test_a_missing_file_is_found_at_the_command_before_torch_loads(files):
    """Within a second or two: the config's check refuses it before the heavy imports, writing nothing."""
    out = files / "out"
    command = [*smoke_overrides(out, *own(files)), f"data.train_file={files / 'nope.csv'}"]
    script = ("import runpy, sys; sys.argv = ['crisp.run', *sys.argv[1:]]\n"
              "try:\n    runpy.run_module('crisp.run', run_name='__main__')\n"
              "except SystemExit as end:\n    print('exit', end.code, 'torch' in sys.modules)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *command], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.stdout.strip().splitlines()[-1] == "exit 2 False", proc.stderr[-2000:]
    assert f"crisp: error: data.train_file='{files / 'nope.csv'}' is not allowed: there is no such file" in proc.stderr
    assert not out.exists() and elapsed < 30  # no torch, no minutes: a second or two where the machine is idle


def test_a_missing_file_in_one_job_of_a_grid_stops_the_grid_before_any_run(files):
    out = files / "sweep"
    proc = run_crisp("-m", *smoke_overrides(out, *own(files), sweep=True),
                     f"data.train_file={files / 'train.csv'},{files / 'gone.csv'}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "job 1 of the grid (" in proc.stderr and "gone.csv' is not allowed: there is no such file" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra", ["+data.text_column=x", "+data.labels_file=labels.txt"])
def test_an_unknown_data_key_on_the_command_line_exits_2_naming_it(files, extra):
    out = files / "out"
    proc = run_crisp(*smoke_overrides(out, *own(files)), extra, timeout=120)
    assert proc.returncode == 2
    key, value = extra.lstrip("+").split("=")
    assert f"crisp: error: {key}={value!r} is not allowed: data=files (source files) takes the keys" in proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# run_keys: a GLUE task's own declaration stays out of the hash


def _committed(folder: str) -> list:
    return sorted((COMMITTED / folder).rglob("results.json"))


RECORDS = [*(next(p for p in _committed("glue-minilm-l6") if f"data={task}/" in str(p))
             for task in ("cola", "sst2", "mrpc", "stsb", "rte", "wnli")),
           _committed("paper-minilm-l6-lr-grid")[0], _committed("used-by-grid-auto")[0]]


@pytest.mark.parametrize("path", RECORDS, ids=[str(p.relative_to(COMMITTED).parent) for p in RECORDS])
def test_a_committed_run_composed_today_has_its_recipe_and_run_key(path, monkeypatch, tmp_path):
    """The recipe (the config as written) hashes exactly as recorded; the run_key hashes the resolved config,
    whose two folders were the recording machine's: with today's in their place, the recorded config
    (without any declaration) and today's (with the preset's) hash alike."""
    monkeypatch.setenv("CRISP_MINILM_DIR", str(tmp_path))  # a folder, wherever the model lives
    record = json.loads(path.read_text())
    cfg = make(*record["overrides"])
    assert results.recipe_key(written_config(cfg)) == record["recipe"]
    today = resolved_config(cfg)
    recorded = json.loads(json.dumps(record["config"]))
    recorded["data"]["dir"], recorded["model"]["name_or_path"] = today["data"]["dir"], today["model"]["name_or_path"]
    assert "text_fields" in today["data"] and "text_fields" not in recorded["data"]
    assert results.run_key(today) == results.run_key(recorded)


def test_a_glue_task_declared_otherwise_than_its_preset_is_another_run():
    def key(*overrides):
        return results.run_key(OmegaConf.to_container(make("data=cola", "seed=1", *overrides), resolve=True))

    assert key() == key("data.source=glue", "data.labels=['0','1']")  # as the preset says
    assert len({key(), key("data.metric=[acc]"), key("data.labels=[a,b]"), key("+data.task=cola2")}) == 4


def test_the_committed_glue_study_rebuilds_its_report_row_for_row(tmp_path):
    proc = run_crisp(str(COMMITTED / "glue-minilm-l6"), "--out", str(tmp_path), module="crisp.report", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import pandas as pd

    committed = pd.read_csv(COMMITTED / "glue-minilm-l6" / "report.csv")
    rebuilt = pd.read_csv(tmp_path / "report.csv")
    # the same rows and numbers in every column the committed report has (the report has since gained the
    # sparsifier and dropout columns, empty or topk for these top-k runs)
    pd.testing.assert_frame_equal(rebuilt[committed.columns], committed)
    assert set(rebuilt["sparsifier"].fillna("")) <= {"", "topk"} and rebuilt["dropout"].isna().all()
