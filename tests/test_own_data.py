"""Your own data: files (csv, tsv, jsonl, parquet), a saved folder or a hub folder, read and checked row by row,
trained as single runs and as grids under every launcher, reported in the task's own metric."""

from __future__ import annotations

import csv
import json
import logging
import random

import pytest
import torch
from hydra import compose, initialize_config_dir

from crisp.core import results
from crisp.core.config import ConfigError, register_configs, register_resolvers, validate
from crisp.core.data_config import CLASSIFICATION_METRICS, REGRESSION_METRICS
from crisp.core.errors import DataError
from crisp.training.data import load
from crisp.training.encoder import train_word_tokenizer
from crisp.training.rows import Split
from crisp.training.synthetic import generate_synthetic
from crisp.training.tasks import METRICS, metrics, task_of
from crisp.training.truncation import check_truncation
from tests.conftest import ROOT, SST2_DIR, run_crisp

register_configs()
register_resolvers()
needs_sst2 = pytest.mark.skipif(not (SST2_DIR / "train.tsv").is_file(), reason=f"no GLUE SST-2 folder at {SST2_DIR}")


def compose_data(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", *overrides])
    validate(cfg)
    return cfg.data


# ----------------------------------------------------------------------------------------------
# the data sets of the acceptance tests, small, each in its own format


def sst2_csv(folder, train: int = 160, dev: int = 64) -> list[str]:
    """SST-2's first rows as a csv with columns text,polarity and labels negative/positive."""
    with open(SST2_DIR / "train.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : 1 + train + dev]
    for name, part in (("train.csv", rows[:train]), ("dev.csv", rows[train:])):
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "polarity"])
            writer.writerows([text.strip(), "positive" if label == "1" else "negative"] for text, label in part)
    return ["data=files", f"data.train_file={folder / 'train.csv'}", f"data.validation_file={folder / 'dev.csv'}",
            "data.label_field=polarity"]


WORDS = "the a film plot cast music story acting script ending pace scene actor director".split()


def _sentence(rng: random.Random, n: int) -> list[str]:
    return rng.sample(WORDS, n)


def pairs_jsonl(folder, train: int = 160, dev: int = 64) -> list[str]:
    """Sentence pairs with a similarity score in [0, 5]: the share of the first's words the second repeats."""
    rng = random.Random(0)
    for name, count in (("train.jsonl", train), ("dev.jsonl", dev)):
        with open(folder / name, "w") as f:
            for _ in range(count):
                first, kept = _sentence(rng, 6), rng.randint(0, 6)
                second = first[:kept] + _sentence(rng, 6 - kept)
                f.write(json.dumps({"first": " ".join(first), "second": " ".join(second),
                                    "similarity": round(5 * kept / 6, 3)}) + "\n")
    return ["data=files", f"data.train_file={folder / 'train.jsonl'}", f"data.validation_file={folder / 'dev.jsonl'}",
            "data.text_fields=[first,second]", "data.label_field=similarity", "data.regression=[0,5]",
            "data.metric=pearson"]


TOPICS = {"sport": "goal match team coach league", "food": "soup bread taste chef dinner",
          "music": "song band guitar album concert"}


def three_parquet(folder, train: int = 180, dev: int = 60) -> list[str]:
    """Three classes, each sentence holding its topic's words among filler."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1)
    for name, count in (("train.parquet", train), ("dev.parquet", dev)):
        topics = [rng.choice(sorted(TOPICS)) for _ in range(count)]
        texts = [" ".join(rng.sample(TOPICS[t].split(), 3) + _sentence(rng, 4)) for t in topics]
        pq.write_table(pa.table({"body": texts, "topic": topics}), folder / name)
    return ["data=files", f"data.train_file={folder / 'train.parquet'}",
            f"data.validation_file={folder / 'dev.parquet'}", "data.text_fields=[body]", "data.label_field=topic",
            "data.metric=f1"]


def saved_folder(folder, train: int = 160, dev: int = 64) -> list[str]:
    """A DatasetDict saved to disk, its labels a ClassLabel (neg, pos)."""
    import datasets

    label = datasets.ClassLabel(names=["neg", "pos"])

    def part(split: Split):
        features = datasets.Features({"text": datasets.Value("string"), "label": label})
        return datasets.Dataset.from_dict({"text": split.texts, "label": split.labels}, features=features)

    saved = datasets.DatasetDict(train=part(generate_synthetic(train, 3)), validation=part(generate_synthetic(dev, 4)))
    saved.save_to_disk(str(folder / "saved"))
    return ["data=disk", f"data.path={folder / 'saved'}"]


def own_tsv(folder, train: int = 160, dev: int = 64) -> list[str]:
    """A tsv with its own column names (and a column the task does not use), labels yes/no."""
    for name, (count, seed) in (("train.tsv", (train, 5)), ("dev.tsv", (dev, 6))):
        split = generate_synthetic(count, seed)
        lines = ["id\tutterance\tliked"] + [f"{i}\t{t}\t{'yes' if y else 'no'}"
                                           for i, (t, y) in enumerate(zip(split.texts, split.labels, strict=True))]
        (folder / name).write_text("\n".join(lines) + "\n")
    return ["data=files", f"data.train_file={folder / 'train.tsv'}", f"data.validation_file={folder / 'dev.tsv'}",
            "data.text_fields=[utterance]", "data.label_field=liked", "data.labels=[no,yes]", "data.metric=mcc"]


# what each reads as: its metric, its label names (None: a regression), a pair or not
DATASETS = {
    "csv": (sst2_csv, "val_acc", ["negative", "positive"], False),
    "jsonl pairs regression": (pairs_jsonl, "val_pearson", None, True),
    "parquet three classes": (three_parquet, "val_f1", ["food", "music", "sport"], False),
    "save_to_disk": (saved_folder, "val_acc", ["neg", "pos"], False),
    "tsv own columns": (own_tsv, "val_mcc", ["no", "yes"], False),
}
HEADERS = {"val_acc": "accuracy (%) final", "val_pearson": "Pearson r (%) final", "val_f1": "F1 (%) final",
           "val_mcc": "Matthews corr. (%) final"}


def make_dataset(kind: str, folder) -> list[str]:
    if kind == "csv" and not (SST2_DIR / "train.tsv").is_file():
        pytest.skip(f"no GLUE SST-2 folder at {SST2_DIR}")
    folder.mkdir(parents=True, exist_ok=True)
    return DATASETS[kind][0](folder)


@pytest.mark.parametrize("kind", list(DATASETS))
def test_each_format_reads_as_its_declared_task(kind, tmp_path):
    _, metric, labels, pair = DATASETS[kind]
    task, splits = load(compose_data(*make_dataset(kind, tmp_path)))
    assert task.primary == metric and (list(task.labels) if task.labels else None) == labels
    assert task.pair == pair and task.regression == (labels is None)
    assert list(splits) == ["train", "validation"] and len(splits["train"].texts) >= 160
    assert all(isinstance(y, float if labels is None else int) for y in splits["validation"].labels)
    if labels:
        assert set(splits["train"].labels) == set(range(len(labels)))


def test_string_labels_are_read_sorted_from_the_training_file_unless_declared(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,pos\nb,neg\nc,neutral\n")
    (tmp_path / "dev.csv").write_text("text,label\nd,neutral\n")
    files = ["data=files", f"data.train_file={tmp_path / 'train.csv'}", f"data.validation_file={tmp_path / 'dev.csv'}"]
    task, splits = load(compose_data(*files))
    assert task.labels == ("neg", "neutral", "pos") and splits["train"].labels == [2, 0, 1]
    task, splits = load(compose_data(*files, "data.labels=[pos,neutral,neg]"))
    assert task.labels == ("pos", "neutral", "neg") and splits["train"].labels == [0, 2, 1]


def test_integer_labels_sort_as_numbers_and_class_ids_take_declared_names(tmp_path):
    rows = [{"text": f"t{i}", "label": y} for i, y in enumerate([10, 2, 1, 2])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = ["data=files", f"data.train_file={tmp_path / 'train.jsonl'}",
             f"data.validation_file={tmp_path / 'train.jsonl'}"]
    task, splits = load(compose_data(*files))
    assert task.labels == ("1", "2", "10") and splits["train"].labels == [2, 1, 0, 1]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(4)))
    ids = ["data=files", f"data.train_file={tmp_path / 'ids.jsonl'}", f"data.validation_file={tmp_path / 'ids.jsonl'}"]
    task, splits = load(compose_data(*ids, "data.labels=[neg,pos]"))  # 0 and 1 are ids, HF's way
    assert splits["train"].labels == [0, 1, 0, 1]


def test_scores_read_as_class_names_are_refused_unless_declared(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,0.5\nb,3.8\nc,1\n")
    file = tmp_path / "train.csv"
    files = ["data=files", f"data.train_file={file}", f"data.validation_file={file}"]
    with pytest.raises(DataError, match=r"train.csv: the labels \(column 'label'\) are numbers such as '0.5', not "
                                        r"class names: a score needs data.regression=\[low,high\]"):
        load(compose_data(*files))
    task, splits = load(compose_data(*files, "data.regression=[0,5]"))
    assert task.regression and splits["train"].labels == [0.5, 3.8, 1.0]


def test_a_hub_dataset_can_be_a_local_folder_of_data_files(tmp_path):
    three_parquet(tmp_path)
    (tmp_path / "train.parquet").rename(tmp_path / "train-00000.parquet")
    (tmp_path / "dev.parquet").rename(tmp_path / "validation-00000.parquet")
    task, splits = load(compose_data("data=hub", f"data.hub_path={tmp_path}", "data.text_fields=[body]",
                                     "data.label_field=topic"))
    assert task.name == tmp_path.name and task.labels == ("food", "music", "sport")
    assert len(splits["train"].texts) == 180 and len(splits["validation"].texts) == 60


def test_datasets_reads_local_files_without_asking_the_hub(tmp_path, monkeypatch):
    import datasets

    asked, load_dataset = [], datasets.load_dataset

    def spy(*args, **kwargs):
        asked.append(datasets.config.HF_HUB_OFFLINE)
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", spy)
    load(compose_data(*pairs_jsonl(tmp_path)))
    assert asked == [True, True] and datasets.config.HF_HUB_OFFLINE is False  # offline for each file, then as it was


def test_lines_of_a_csv_are_counted_through_quoted_line_breaks(tmp_path):
    (tmp_path / "train.csv").write_text('text,label\n"good\nfilm",pos\n"bad, film",neg\n,pos\n')
    with pytest.raises(DataError, match=r"train.csv:5: text='' is not allowed: every example needs its text "
                                        r"\(column 'text'\)"):
        load(compose_data("data=files", f"data.train_file={tmp_path / 'train.csv'}",
                          f"data.validation_file={tmp_path / 'train.csv'}"))


# ----------------------------------------------------------------------------------------------
# bad rows and bad files: one line, with the file, its line (or row), the column and the value

HEADER = "id\tfirst\tsecond\tscore"
GOOD = [f"{i}\ta b {i}\tc d\t{i % 5}.5" for i in range(8)]
REGRESSION = ["data.text_fields=[first,second]", "data.label_field=score", "data.regression=[0,5]"]
STSB = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


def _write(path, rows: list[str] | bytes, header: str = HEADER) -> str:
    path.write_bytes(rows if isinstance(rows, bytes) else ("\n".join([header, *rows]) + "\n").encode())
    return str(path)


def _scores(folder, rows: list[str] | bytes, header: str = HEADER) -> list[str]:
    """A regression on files: train.tsv holds ``rows``, dev.tsv good ones."""
    return ["data=files", f"data.train_file={_write(folder / 'train.tsv', rows, header)}",
            f"data.validation_file={_write(folder / 'dev.tsv', GOOD)}", *REGRESSION]


def _reviews(folder, train: list[str], dev: list[str], *extra: str) -> list[str]:
    return ["data=files", f"data.train_file={_write(folder / 'reviews.tsv', train, 'text' + chr(9) + 'label')}",
            f"data.validation_file={_write(folder / 'dev.tsv', dev, 'text' + chr(9) + 'label')}", *extra]


def bad_case(name: str, folder) -> tuple[list[str], str]:
    """A run's overrides with one bad row or file (written into ``folder``), and the line its error must print."""
    train, dev, reviews = folder / "train.tsv", folder / "dev.tsv", folder / "reviews.tsv"
    if name == "nan score":
        return _scores(folder, [*GOOD, "8\ta\tb\tnan"]), (
            f"{train}:10: label='nan' is not allowed: it must be a number in [0, 5] (data.regression; column 'score')")
    if name == "inf score":
        return _scores(folder, ["0\ta\tb\tinf", *GOOD]), f"{train}:2: label='inf' is not allowed: it must be a number"
    if name == "score out of range":
        return _scores(folder, [*GOOD[:3], "3\ta\tb\t7.5"]), (
            f"{train}:5: label='7.5' is not allowed: it must be a number in [0, 5]")
    if name == "label outside the declared names":
        return _reviews(folder, ["a\tpos", "b\tmeh"], ["c\tneg"], "data.labels=[neg,pos]"), (
            f"{reviews}:3: label='meh' is not allowed: labels must be neg or pos (column 'label')")
    if name == "label outside the training file's names":
        return _reviews(folder, ["a\tpos", "b\tneg"], ["c\tneg", "d\tmeh"]), (
            f"{dev}:3: label='meh' is not allowed: labels must be neg or pos, those of {reviews}, or declared in "
            "data.labels (column 'label')")
    if name == "empty text":
        return _scores(folder, [*GOOD[:2], "2\t \tb\t1"]), (
            f"{train}:4: text=' ' is not allowed: every example needs its text (column 'first')")
    if name == "missing column":
        return _scores(folder, GOOD, "id\tfirst\tsecond\tsimilarity"), (
            f"{train}: header ['id', 'first', 'second', 'similarity'] lacks the column(s) 'score' "
            "(data.text_fields and data.label_field name the columns)")
    if name == "non-UTF-8 bytes":
        return _scores(folder, f"{HEADER}\n0\ta\tb\t1\n1\tcaf\xe9 au lait\tb\t2\n".encode("latin-1")), (
            f"{train}:3: b'caf\\xe9 au lait' is not allowed: its bytes b'\\xe9' are not UTF-8, and the file must be "
            "UTF-8 text (column 'first')")
    if name == "header-only file":
        return _scores(folder, []), f"{train}: no examples (the split is empty)"
    if name == "empty file":
        return _scores(folder, b""), f"data.train_file='{train}' is not allowed: the file is empty (0 bytes)"
    if name == "missing file":
        return ["data=files", f"data.train_file={folder / 'gone.tsv'}",
                f"data.validation_file={_write(dev, GOOD)}", *REGRESSION], (
            f"data.train_file='{folder / 'gone.tsv'}' is not allowed: there is no such file")
    assert name == "nan score in a GLUE STS-B dev file"
    rows = [f"{i}\tg\tf\t2012\t{i}\ts\ts\ta b\tc d\t{score}" for i, score in enumerate(["1.0", "nan", "2.5"])]
    _write(train, [rows[0], rows[2]], STSB)
    _write(dev, rows, STSB)
    return ["data=stsb", f"data.dir={folder}"], (
        f"{dev}:3: label='nan' is not allowed: it must be a number in [0, 5] (data.regression; column 'score')")


BAD = ["nan score", "inf score", "score out of range", "label outside the declared names",
       "label outside the training file's names", "empty text", "missing column", "non-UTF-8 bytes", "header-only file",
       "empty file", "missing file", "nan score in a GLUE STS-B dev file"]
AT_THE_COMMAND = ("empty file", "missing file")  # found by the config's check, before anything loads


@pytest.mark.parametrize("name", BAD)
def test_a_bad_row_or_file_is_named_by_file_line_column_and_value(name, tmp_path):
    overrides, line = bad_case(name, tmp_path)
    error = ConfigError if name in AT_THE_COMMAND else DataError
    with pytest.raises(error) as err:
        load(compose_data(*overrides))
    assert line in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD)
def test_a_bad_row_or_file_stops_the_run_before_training_with_exit_2_and_one_line(name, tmp_path):
    overrides, line = bad_case(name, tmp_path)
    out = tmp_path / "run"
    proc = run_crisp("experiment=smoke", *overrides, f"hydra.run.dir={out}", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"crisp: error: {line}" in proc.stderr
    assert "Epoch 0" not in proc.stderr + proc.stdout  # stopped before training
    record = results.read(out)
    assert record is None if name in AT_THE_COMMAND else record["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["auto", "basic"])
def test_a_bad_row_stops_a_grid_with_exit_2_its_one_line_and_no_completed_run(launcher, tmp_path):
    overrides, line = bad_case("score out of range", tmp_path)
    sweep = tmp_path / "sweep"
    proc = run_crisp("-m", "experiment=smoke", *overrides, "sparsity=0,0.8", "seed=1,2", f"hydra/launcher={launcher}",
                     f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"crisp: error: {line}" in proc.stderr and "crisp: 4 run(s) failed" in proc.stderr
    found = [results.read(p) for p in results.find_all(sweep)]
    assert len(found) == 4 and {r["status"] for r in found} == {"failed"}
    assert {r["error"]["type"] for r in found} == {"DataError"}


# ----------------------------------------------------------------------------------------------
# truncation that hides the data, and the metrics a task may declare


def test_a_max_length_that_keeps_only_special_tokens_is_refused_with_the_numbers():
    split = Split([f"a good film number {i}" for i in range(50)], [i % 2 for i in range(50)])
    tokenizer = train_word_tokenizer(split.texts, 60)
    with pytest.raises(ConfigError, match=r"data.max_length=2 is not allowed: it leaves no token of text in 50 of 50 "
                                          r"train examples, only their 2 special tokens; it must be more than 2 "
                                          r"\(data.max_length=7 keeps 9 in 10 whole\)"):
        check_truncation(tokenizer, split, 2, "train")


def test_a_max_length_that_cuts_most_of_many_examples_is_said(caplog):
    split = Split(["good film"] * 30 + ["a very long and winding film about a film about films"] * 20, [0, 1] * 25)
    tokenizer = train_word_tokenizer(split.texts, 60)
    with caplog.at_level(logging.WARNING, logger="crisp"):
        check_truncation(tokenizer, split, 6, "validation")
    assert "data.max_length=6 cuts more than half the tokens of 20 of 50 validation examples (40%)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crisp"):
        check_truncation(tokenizer, split, 64, "validation")
    assert not caplog.text


def test_every_declarable_metric_is_computed_for_any_label_count():
    assert set(METRICS) == {*CLASSIFICATION_METRICS, *REGRESSION_METRICS}
    from torchmetrics import functional as M

    three = _declared(labels=["a", "b", "c"], metric=["mcc", "f1"])
    preds, target = torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([0, 1, 2, 1, 1, 2])
    found = metrics(three, preds, target)
    assert list(found) == ["val_mcc", "val_f1", "val_acc"]  # declared first, then accuracy (F1 only when binary)
    assert found["val_f1"] == pytest.approx(M.classification.multiclass_f1_score(preds, target, 3, average="macro"))
    assert found["val_mcc"] == pytest.approx(M.classification.multiclass_matthews_corrcoef(preds, target, 3))
    scores = _declared(regression=[0, 5], metric=["kendall", "r2", "spearman"])
    preds, target = torch.tensor([0.5, 2.0, 3.5, 4.0]), torch.tensor([1.0, 2.0, 3.0, 5.0])
    found = metrics(scores, preds, target)
    assert list(found) == ["val_kendall", "val_r2", "val_spearman"] and found["val_kendall"] == pytest.approx(1.0)
    assert found["val_r2"] == pytest.approx(M.r2_score(preds.double(), target.double()).item())


def _declared(**task):
    from omegaconf import OmegaConf

    base = {"source": "files", "name": "files", "train_file": "t.csv", "validation_file": "d.csv",
            "text_fields": ["text"], "label_field": "label", "labels": None, "regression": None, "metric": None}
    return task_of(OmegaConf.create({**base, **task}))


# ----------------------------------------------------------------------------------------------
# end to end: a single run, and grids under the default launcher (lockstep) and Hydra's basic one


def test_a_single_run_on_a_pair_regression_records_its_task(tmp_path):
    overrides = make_dataset("jsonl pairs regression", tmp_path / "data")
    out = tmp_path / "run"
    proc = run_crisp(*overrides, "experiment=smoke", "trainer.max_epochs=1", f"hydra.run.dir={out}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = results.read(out)
    assert record["status"] == "completed" and record["task"] == "data"  # the folder of train.jsonl
    assert record["metric"] == "val_pearson" and record["labels"] is None and record["regression"] == [0, 5]
    assert set(record["final"]) == {"val_loss", "val_pearson", "epoch"}  # the declared metric; no accuracy
    assert "train_acc" not in record["history"][0]
    assert record["config"]["data"]["train_file"] == ".../train.jsonl"  # no machine's path in results


GRIDS = [(kind, launcher) for kind in DATASETS for launcher in ("auto", "basic")]
GRIDS.append(("jsonl pairs regression", "parallel"))  # a worker process per run


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "launcher"), GRIDS)
def test_a_grid_on_your_own_data_ends_in_a_report_in_its_metric(kind, launcher, tmp_path):
    _, metric, labels, _ = DATASETS[kind]
    overrides = make_dataset(kind, tmp_path / "data")
    sweep = tmp_path / "sweep"
    proc = run_crisp("-m", "experiment=smoke", *overrides, "trainer.max_epochs=1", "sparsity=0,0.8", "seed=1,2",
                     f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [results.read(p) for p in results.find_all(sweep)]
    assert len(found) == 4 and {r["status"] for r in found} == {"completed"}
    assert {r["metric"] for r in found} == {metric} and all(r["labels"] == labels for r in found)
    if launcher == "auto":
        assert all(r["timing"]["lockstep"]["runs"] == 4 for r in found)  # one fused model
    report = (sweep / "report.md").read_text()
    assert HEADERS[metric] in report and f"## {found[0]['task']} ({found[0]['data']})" in report
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert {r["metric"] for r in rows} == {metric} and sorted(r["sparsity"] for r in rows) == ["0.0", "0.8"]
