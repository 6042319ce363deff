"""Every GLUE task: its files read as GLUE writes them, its errors clear, its metrics its own, end to end."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from crisp.core import results
from crisp.core.errors import DataError
from crisp.training.data import Split, load_local, read_glue_tsv, tokenize
from crisp.training.encoder import train_word_tokenizer
from crisp.training.tasks import TASKS, metrics
from tests.conftest import GLUE_DIR, SST2_DIR, run_crisp

SHARED = ("CoLA", "MRPC", "STS-B", "RTE", "WNLI")
needs_glue = pytest.mark.skipif(not all((GLUE_DIR / f).is_dir() for f in SHARED),
                                reason=f"no GLUE folders in {GLUE_DIR}")


def write_glue(folder, task: str, rows: int = 40) -> None:
    """A GLUE-format folder for ``task`` in its own layout, header, BOM and all (for the tasks that are not
    on this machine, and for every task where the shared files are not beside the checkout)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = "the a film plot question answer good bad why is it was very not".split()
    labels = TASKS[task].labels or [f"{i % 6 * 0.8:.1f}" for i in range(6)]  # STS-B: scores 0-4

    def text(i: int, j: int) -> str:
        return " ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(3 + (i + j) % 5))

    pair = ("index\tsentence1\tsentence2\tlabel", lambda i, y: f"{i}\t{text(i, 0)}\t{text(i, 1)}\t{y}")
    layouts = {
        "cola": (None, lambda i, y: f"src{i}\t{y}\t\t{text(i, 0)}"),
        "sst2": ("sentence\tlabel", lambda i, y: f"{text(i, 0)} \t{y}"),
        "mrpc": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                 lambda i, y: f"{y}\t{i}\t{i + 1}\t{text(i, 0)}\t{text(i, 1)}"),
        "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                 lambda i, y: f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{text(i, 0)}\t{text(i, 1)}\t{y}"),
        "rte": pair, "wnli": pair,
        "qnli": ("index\tquestion\tsentence\tlabel", lambda i, y: f"{i}\t{text(i, 0)} ?\t{text(i, 1)}\t{y}"),
        "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                lambda i, y: f"{i}\t{2 * i}\t{2 * i + 1}\t{text(i, 0)} ?\t{text(i, 2)} ?\t{y}"),
        "mnli": ("\t".join(["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]),
                 lambda i, y: "\t".join([str(i), str(i), f"{i}e", "fiction", "(x)", "(y)", "(x)", "(y)", text(i, 0),
                                         text(i, 1), y, y])),
    }
    header, row = layouts[task]
    for file in ["train.tsv", *(file for _, file in TASKS[task].validation)]:
        lines = ([header] if header else []) + [row(i, labels[i % len(labels)]) for i in range(rows)]
        (folder / file).write_text("\n".join(lines) + "\n", encoding="utf-8")


def glue_folders(root, rows: int = 48) -> None:
    """$CRISP_GLUE_DIR for every task: the shared files' first rows where they are beside the checkout,
    files written in each task's layout otherwise (QNLI, QQP and MNLI always)."""
    shared = {**{f: GLUE_DIR / f for f in SHARED}, "SST-2": SST2_DIR}
    for task in TASKS.values():
        source = shared.get(task.folder)
        if source is None or not (source / "train.tsv").is_file():
            write_glue(root / task.folder, task.name, rows)
            continue
        (root / task.folder).mkdir(parents=True)
        for file in ("train.tsv", "dev.tsv"):
            lines = (source / file).read_bytes().split(b"\n")
            keep = rows + (0 if task.folder == "CoLA" else 1)  # CoLA has no header
            kept = lines[: keep if file == "train.tsv" else keep // 2]
            (root / task.folder / file).write_bytes(b"\n".join(kept) + b"\n")


@pytest.fixture
def glue(tmp_path):
    root = tmp_path / "glue"
    glue_folders(root)
    return root


@needs_glue
@pytest.mark.parametrize(("task", "train", "first_label"), [
    ("cola", 8551, 1), ("mrpc", 3668, 1), ("stsb", 5749, 5.0), ("rte", 2490, 1), ("wnli", 635, 1)])
def test_reads_the_canonical_glue_files(task, train, first_label):
    splits = load_local(OmegaConf.create({"dir": str(GLUE_DIR / TASKS[task].folder)}), TASKS[task])
    assert len(splits["train"].texts) == train
    assert splits["train"].labels[0] == first_label
    assert (splits["train"].pairs is not None) == TASKS[task].pair
    assert not any('"' in t and "\t" in t for t in splits["train"].texts)  # quotes did not merge rows


@needs_glue
def test_mrpc_header_bom_and_colas_missing_header_and_final_newline():
    mrpc = load_local(OmegaConf.create({"dir": str(GLUE_DIR / "MRPC")}), TASKS["mrpc"])
    assert len(mrpc["validation"].texts) == 408 and sum(mrpc["train"].labels) == 2474
    cola = load_local(OmegaConf.create({"dir": str(GLUE_DIR / "CoLA")}), TASKS["cola"])
    assert len(cola["validation"].texts) == 1043 and sum(cola["train"].labels) == 6023


def test_mnli_validates_on_matched_and_mismatched(tmp_path):
    write_glue(tmp_path, "mnli")
    splits = load_local(OmegaConf.create({"dir": str(tmp_path)}), TASKS["mnli"])
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    assert set(splits["train"].labels) == {0, 1, 2}
    preds = torch.tensor([0, 1, 2, 2])
    assert metrics(TASKS["mnli"], preds, torch.tensor([0, 1, 2, 0]), "_mismatched") == {"val_acc_mismatched": 0.75}


@pytest.mark.parametrize(("content", "message"), [
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n",
     r"train.tsv:2: label='maybe' is not allowed: labels must be entailment or not_entailment"),
    ("index\tsentence1\tlabel\n0\ta\tentailment\n", r"train.tsv: header .* lacks the column\(s\) 'sentence2'"),
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tentailment\n",
     r"train.tsv:3: expected 4 tab-separated fields, got 3"),
])
def test_a_malformed_glue_file_is_named_with_its_line(tmp_path, content, message):
    (tmp_path / "train.tsv").write_text(content)
    with pytest.raises(DataError, match=message):
        read_glue_tsv(tmp_path / "train.tsv", TASKS["rte"])


def test_a_missing_file_and_a_regression_label_that_is_no_number(tmp_path):
    (tmp_path / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match=r"missing file .*dev.tsv \(a GLUE RTE folder holds train.tsv and dev.tsv\)"):
        load_local(OmegaConf.create({"dir": str(tmp_path)}), TASKS["rte"])
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    (tmp_path / "train.tsv").write_text(f"{header}\n0\tg\tf\ty\t0\ts\ts\ta\tb\thigh\n")
    with pytest.raises(DataError, match=r"train.tsv:2: label='high' is not allowed: it must be a number"):
        read_glue_tsv(tmp_path / "train.tsv", TASKS["stsb"])


def test_a_pair_is_one_sequence_with_its_token_types_where_the_encoder_reads_them(tmp_path, monkeypatch):
    monkeypatch.setattr("crisp.training.data.CACHE_DIR", tmp_path)
    split = Split(["good film", "bad"], [1.5, 0.5], ["a plot", "plot twist here"])
    tokenizer = train_word_tokenizer(split.texts + split.pairs, 50)
    typed = tokenize(tokenizer, split, 32, token_types=True)
    plain = tokenize(tokenizer, split, 32)
    assert typed.labels.dtype == torch.float32  # a regression keeps its scores
    assert typed.lengths.tolist() == [7, 7]  # [CLS] a [SEP] b [SEP]
    assert typed.token_type_ids[0, :7].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert plain.token_type_ids is None and torch.equal(plain.input_ids, typed.input_ids)
    assert set(typed.__getitems__([0, 1])) == {"input_ids", "attention_mask", "token_type_ids", "labels"}


@pytest.mark.slow
def test_every_task_trains_and_records_its_own_metrics(glue, tmp_path):
    """One short run per task (a slice of its shared files, or files written in its format)."""
    tasks = list(TASKS)
    proc = run_crisp("-m", "model=tiny", "trainer=cpu", "logger=none", "trainer.max_epochs=1", "data.max_length=64",
                     f"data={','.join(tasks)}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     env={"CRISP_GLUE_DIR": str(glue), "CRISP_SST2_DIR": None}, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {r["task"]: r for r in (results.read(p) for p in results.find_all(tmp_path / "sweep"))}
    assert sorted(found) == sorted(tasks)
    expected = {"cola": "val_mcc", "sst2": "val_acc", "mrpc": "val_f1", "stsb": "val_pearson", "qqp": "val_f1",
                "mnli": "val_acc", "qnli": "val_acc", "rte": "val_acc", "wnli": "val_acc"}
    for task, record in found.items():
        assert record["status"] == "completed" and record["metric"] == expected[task], task
        assert set(record["metrics"]) <= set(record["final"]), task
        assert record["output_dir"] == f"data={task}/dense_seed1"  # a folder of its own per task
    assert {"val_acc", "val_acc_mismatched", "val_loss_mismatched"} <= set(found["mnli"]["final"])
    assert {"val_pearson", "val_spearman"} <= set(found["stsb"]["final"])
    assert "train_acc" not in found["stsb"]["history"][0]  # a regression has no accuracy
    assert {"val_mcc", "val_acc"} <= set(found["cola"]["final"])
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "## cola · tiny DistilBERT, random init" in report and "Matthews corr. (%) final" in report


@pytest.mark.slow
def test_a_malformed_file_fails_its_run_with_the_file_and_line_and_no_completed_record(tmp_path):
    folder = tmp_path / "RTE"
    folder.mkdir()
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta b\tc\tentailment\n1\td\tfoo\n")
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    out = tmp_path / "run"
    proc = run_crisp("model=tiny", "trainer=cpu", "logger=none", "data=rte", f"data.dir={folder}",
                     f"hydra.run.dir={out}", timeout=300)
    assert proc.returncode == 2
    assert f"{folder / 'train.tsv'}:3: expected 4 tab-separated fields, got 3" in proc.stderr
    assert results.read(out)["status"] == "failed"


def test_the_hub_gives_each_task_its_fields_labels_and_validation_splits(monkeypatch):
    """nyu-mll/glue through datasets (faked here: no hub): MNLI's premise and hypothesis, both dev splits."""
    from crisp.training import data

    def column(n, value):
        return [value(i) for i in range(n)]

    fake = {split: {"premise": column(4, lambda i: f" p{i} "), "hypothesis": column(4, lambda i: f"h{i}"),
                    "label": column(4, lambda i: i % 3)}
            for split in ("train", "validation_matched", "validation_mismatched")}
    monkeypatch.setattr(data, "load_hub_dataset", lambda path, config: fake if (path, config) == ("nyu-mll/glue",
                                                                                                   "mnli") else None)
    splits = data.load_hub(OmegaConf.create({"hub_path": "nyu-mll/glue", "hub_config": "mnli"}), TASKS["mnli"])
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    train = splits["train"]
    assert train.texts[0] == "p0" and train.pairs[1] == "h1" and train.labels == [0, 1, 2, 0]
    fake_stsb = {s: {"sentence1": ["a"], "sentence2": ["b"], "label": [3.8]} for s in ("train", "validation")}
    monkeypatch.setattr(data, "load_hub_dataset", lambda path, config: fake_stsb)
    assert data.load_hub(OmegaConf.create({"hub_path": "nyu-mll/glue", "hub_config": "stsb"}),
                         TASKS["stsb"])["validation"].labels == [3.8]


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_reads_its_own_layout(tmp_path, task):
    write_glue(tmp_path, task, rows=6)
    splits = load_local(OmegaConf.create({"dir": str(tmp_path)}), TASKS[task])
    assert list(splits) == ["train", *(hub for hub, _ in TASKS[task].validation)]
    assert all(len(split.texts) == 6 and (split.pairs is not None) == TASKS[task].pair for split in splits.values())


def test_a_byte_order_mark_is_no_part_of_the_header(tmp_path):
    (tmp_path / "dev.tsv").write_bytes("\ufeffsentence\tlabel\ngood film \t1\n".encode())
    split = read_glue_tsv(tmp_path / "dev.tsv")
    assert split.texts == ["good film"] and split.labels == [1]
