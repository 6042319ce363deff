"""Data sources, their errors, and batches."""

from __future__ import annotations

import signal

import pytest
import torch
from omegaconf import OmegaConf

from crisp.training.data import (
    _POSITIVE,
    DataError,
    Split,
    TokenizedSplit,
    generate_synthetic,
    load_local,
    read_glue_tsv,
    tokenize,
)
from crisp.training.encoder import train_word_tokenizer
from tests.conftest import SST2_DIR


def write_tsv(path, rows, header="sentence\tlabel"):
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.skipif(not SST2_DIR.is_dir(), reason=f"no GLUE SST-2 folder at {SST2_DIR}")
def test_reads_the_canonical_sst2_tsvs():
    splits = load_local(OmegaConf.create({"dir": str(SST2_DIR)}))
    assert (len(splits["train"].texts), len(splits["validation"].texts)) == (67349, 872)
    assert splits["validation"].texts[:2] == ["it 's a charming and often affecting journey .",
                                              "unflinchingly bleak and desperate"]
    assert splits["validation"].labels[:2] == [1, 0]
    assert sum(splits["train"].labels) == 37569


def test_quotes_are_plain_characters(tmp_path):
    split = read_glue_tsv(write_tsv(tmp_path / "dev.tsv", ['a "quoted word ,\t1', "'s fine \t0"]))
    assert split.texts == ['a "quoted word ,', "'s fine"] and split.labels == [1, 0]


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (["good\t2"], "sentence\tlabel", r"dev.tsv:2: label='2' is not allowed"),
        (["good\t1"], "text\tlabel", "lacks the column"),
        ([], "sentence\tlabel", "the split is empty"),
        (["good"], "sentence\tlabel", "expected 2 tab-separated fields"),
    ],
)
def test_bad_tsv_errors(tmp_path, rows, header, message):
    with pytest.raises(DataError, match=message):
        read_glue_tsv(write_tsv(tmp_path / "dev.tsv", rows, header))


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="data.dir=.*is not a folder"):
        load_local(OmegaConf.create({"dir": str(tmp_path / "nope")}))
    write_tsv(tmp_path / "train.tsv", ["good\t1"])
    with pytest.raises(DataError, match="missing file .*dev.tsv"):
        load_local(OmegaConf.create({"dir": str(tmp_path)}))


def test_synthetic_is_deterministic_and_learnable_by_its_cues():
    a, b = generate_synthetic(500, seed=3), generate_synthetic(500, seed=3)
    assert a == b and a != generate_synthetic(500, seed=4)
    assert 0.4 < sum(a.labels) / 500 < 0.6
    # the majority polarity of the cue words gives the label
    positive = set(_POSITIVE)
    votes = [sum(w in positive for w in t.split()) for t in a.texts]
    assert all((v >= 2) == bool(y) for v, y in zip(votes, a.labels, strict=True))


def test_batches_are_dynamically_padded(tmp_path, monkeypatch):
    monkeypatch.setattr("crisp.training.data.CACHE_DIR", tmp_path)
    split = Split(["a b c d e f", "a", "b c"], [1, 0, 1])
    tokenizer = train_word_tokenizer(split.texts, 50)
    data = tokenize(tokenizer, split, max_length=16)
    assert list(tmp_path.rglob("*.pt"))  # cached
    cached = tokenize(tokenizer, split, max_length=16)
    assert torch.equal(cached.input_ids, data.input_ids)
    batch = data.__getitems__([1, 2])
    assert batch["input_ids"].shape == (2, 4)  # [CLS] b c [SEP]: the longest in the batch
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]
    assert isinstance(data, TokenizedSplit) and len(data) == 3


def test_padding_to_a_multiple_bounds_the_batch_shapes():
    lengths = torch.tensor([3, 9, 17, 20])
    ids = (torch.arange(20) < lengths[:, None]).long() * 7
    data = TokenizedSplit(ids.clone(), lengths, torch.tensor([0, 1, 0, 1])).pad_to_multiple_of(8, limit=22)
    widths = {tuple(data.__getitems__(i)["input_ids"].shape) for i in ([0], [0, 1], [1], [2], [3], [0, 3])}
    # 3 -> 8, 9 -> 16, 17 and 20 -> 22 (a multiple of 8 would pass max_length)
    assert widths == {(1, 8), (2, 16), (1, 16), (1, 22), (2, 22)}
    batch = data.__getitems__([0, 3])
    assert batch["attention_mask"].sum(1).tolist() == [3, 20]  # the extra columns are masked
    assert torch.equal(batch["input_ids"][:, :20], ids[[0, 3]])


class _WorkerSignal(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN


def test_loader_workers_leave_slurms_time_limit_warning_to_the_training_process():
    from crisp.training.data import loader_worker_init

    previous = signal.signal(signal.SIGUSR2, lambda *_: None)  # as submitit's requeue handler
    try:
        loader = torch.utils.data.DataLoader(_WorkerSignal(), num_workers=1, worker_init_fn=loader_worker_init)
        assert [bool(ignored) for ignored in loader] == [True, True]
        assert signal.getsignal(signal.SIGUSR2) not in (signal.SIG_IGN, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGUSR2, previous)
