"""README.md stays true: every ``python -m crisp.run`` command in its bash blocks is accepted as typed.

Each command is parsed as Hydra parses the command line and goes through what ``python -m crisp.run`` does
before it writes or trains anything: the config composed (``hydra.mode`` from an experiment included), crisp's
callback on it (a single run's values, its folder, the disk; a grid's launcher built with its settings
checked), and for a grid crisp's sweeper itself, which expands it (a union of grids too), composes every job
and checks its values and its run folder (``ComposeOnceSweeper.checked_jobs``). A local model folder is looked
for as a run looks for it first. Nothing trains and nothing is written outside pytest's tmp_path.

Where a command names a user's file or folder (``data.dir=DIR``, ``data.train_file=reviews/train.csv``,
``model.name_or_path=/path/to/model``) and no such path exists here, a small one of the right kind is written
in tmp_path and the command takes its path instead: the checks read those files as they would read the user's.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shlex
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf

from crisp.core.config import CONF_DIR, register_configs, register_resolvers, scan_plugins
from crisp.sweep.config_errors import is_user_error, one_line
from crisp.sweep.sweeper import expand
from crisp.training.hub import looks_like_a_path, resolve_model
from tests.conftest import ROOT, tiny_config

register_configs()
register_resolvers()
scan_plugins()

README = ROOT / "README.md"
# the python -m crisp.run commands in today's README (a fence broken by an edit must not empty the list)
MIN_COMMANDS = 12
# README commands that this test cannot check, each with the reason (keep it tiny; none today)
NOT_CHECKED: dict[str, str] = {}
# a bigger grid is checked with its first seed, and its first job with every seed (check_command)
MAX_JOBS = 24  # the paper grid is checked whole
# variables that would point the defaults at this machine's folders: the commands are checked as typed
MACHINE_ENV = ("CRISP_SST2_DIR", "CRISP_GLUE_DIR", "CRISP_MINILM_DIR", "CRISP_MPNET_DIR")


# ----------------------------------------------------------------------------------------------
# the README's commands


@dataclass(frozen=True)
class Command:
    line: int  # where it starts in README.md
    env: tuple[tuple[str, str], ...]  # NAME=value words before it
    args: tuple[str, ...]  # what follows ``python -m crisp.run``
    text: str


FENCE = re.compile(r"\s*```\s*([\w-]*)")
SHELLS = ("bash", "sh", "shell")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
PYTHON = re.compile(r"(\S*/)?python(3(\.\d+)?)?")


def shell_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command) of each command in the bash blocks, backslash-continued lines joined. A comment line
    ``# = COMMAND`` (what the command above it runs: ``make reproduce``'s) is a command too."""
    block, start, parts = None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if fence := FENCE.match(line):
            block = (fence.group(1) in SHELLS) if block is None else None
            continue
        if not block:
            continue
        if not parts:
            start = number
            line = re.sub(r"^\s*#\s*=\s+", "", line)
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        yield start, " ".join([*parts, line]).strip()
        parts = []


def crisp_command(number: int, line: str) -> Command | None:
    """The line as a ``python -m crisp.run`` command (after any NAME=value words), or None if it is another one."""
    words = shlex.split(line, comments=True)
    env = []
    while words and ASSIGNMENT.match(words[0]):
        env.append(tuple(words.pop(0).split("=", 1)))
    if words[:1] == ["crisp-run"]:
        return Command(number, tuple(env), tuple(words[1:]), line)
    if len(words) >= 3 and PYTHON.fullmatch(words[0]) and words[1:3] == ["-m", "crisp.run"]:
        return Command(number, tuple(env), tuple(words[3:]), line)
    return None


def readme_commands(text: str) -> list[Command]:
    return [c for number, line in shell_lines(text) if (c := crisp_command(number, line)) is not None]


COMMANDS = readme_commands(README.read_text())


# ----------------------------------------------------------------------------------------------
# what python -m crisp.run checks before it trains


class Refused(Exception):
    """``python -m crisp.run`` refuses the command: its one line (exit code 2)."""


def check_command(argv: Sequence[str], max_jobs: int = MAX_JOBS) -> list[DictConfig]:
    """The configs ``python -m crisp.run ARGV`` would train (one, or every job of its grid), each composed and
    checked as the command checks it before it writes or trains anything (Hydra's ``_run_hydra`` and
    ``Hydra.run``/``Hydra.multirun`` up to the launch, with crisp's callback and sweeper). Refused with crisp's
    one line where the command would exit 2; any other error (a bug) is raised as it is.

    A grid of more than ``max_jobs`` jobs is checked as two grids of the same sweeper: with its first seed only
    (every other combination), and its first job with every seed. Jobs that differ only in the seed differ only
    in ``seed`` and the run's name, and Hydra composes each job from scratch: ``experiment=glue``'s 480 jobs
    would take some 40 s on 2 cores."""
    try:
        with contextlib.redirect_stderr(io.StringIO()) as said:
            configs = _composed_and_checked(argv, max_jobs)
        for cfg in configs:  # a local model folder is what a run looks for first (crisp.training.builder.check_hub)
            for name in {cfg.model.get("name_or_path"), cfg.model.get("tokenizer")}:
                if isinstance(name, str) and looks_like_a_path(name):
                    resolve_model(name)
        return configs
    except SystemExit as exit:
        if exit.code == 2:
            raise Refused(said.getvalue().strip()) from None
        raise
    except Exception as err:
        if is_user_error(err):
            raise Refused(f"crisp: error: {one_line(err)}") from None
        raise


def _composed_and_checked(argv: Sequence[str], max_jobs: int) -> list[DictConfig]:
    args = get_args_parser().parse_args(list(argv))
    assert not (args.cfg or args.help or args.hydra_help or args.info or args.shell_completion), \
        f"{argv}: only runs and grids are checked here"
    overrides = list(args.overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="run"):
        hydra = GlobalHydra.instance().hydra
        mode = hydra.get_mode(config_name="config", overrides=overrides)  # as hydra._internal.utils._run_app
        if mode is None or (args.multirun and mode == RunMode.RUN):
            mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
            overrides.append(f"hydra.mode={mode.name}")
        cfg = hydra.compose_config("config", overrides, run_mode=mode, with_log_configuration=False)
        callbacks = Callbacks(cfg)
        if mode == RunMode.RUN:
            _callback(callbacks.on_run_start, cfg)
            return [cfg]
        _callback(callbacks.on_multirun_start, cfg)
        sweeper = Plugins.instance().instantiate_sweeper(
            config=cfg, hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
            task_function=_never_trains)
        arguments = OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)
        if not hasattr(sweeper, "checked_jobs"):  # a sweeper of its own (Optuna) picks each trial's values:
            # what the command fixes is checked as one run of it would be
            parsed = OverridesParser.create().parse_overrides(arguments)
            fixed = [a for a, o in zip(arguments, parsed, strict=True) if not o.is_sweep_override()]
            job = hydra.compose_config("config", [*fixed, "hydra.mode=RUN"], run_mode=RunMode.RUN,
                                       with_log_configuration=False)
            _callback(callbacks.on_run_start, job)
            return [job]
        grid = [job for batch in expand(sweeper, arguments) for job in batch]
        seed = [o for o in grid[0] if o.startswith("seed=")]  # later overrides of a key win in Hydra's sweeper
        if len(grid) <= max_jobs or not seed:
            return [job.config for job in sweeper.checked_jobs(arguments)[1]]
        first = [o for o in grid[0] if not o.startswith(("seed=", "hydra."))]
        return [job.config for narrowed in ([*arguments, *seed], [*arguments, *first])
                for job in sweeper.checked_jobs(narrowed)[1]]


def _callback(hook, cfg: DictConfig) -> None:
    """Hydra turns a callback's exception into a warning and goes on: here it fails the check."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hook(config=cfg, config_name="config")
    raised = [str(w.message) for w in caught if str(w.message).startswith("Callback ")]
    assert not raised, raised


def _never_trains(cfg: DictConfig) -> None:
    raise AssertionError("the README's commands are checked, never trained")


# ----------------------------------------------------------------------------------------------
# a user's files, where a command names one that is not here

PATH_KEYS = ("data.dir", "data.train_file", "data.validation_file", "data.path", "data.hub_path",
             "model.name_or_path", "model.tokenizer")
ALWAYS_PATHS = ("data.dir", "data.train_file", "data.validation_file", "data.path")  # the others may be hub names


def with_user_files(args: Sequence[str], where: Path) -> list[str]:
    """``args`` with each path that a user would have and this machine has not replaced by a small example of its
    kind written under ``where`` (paths that exist, as typed from the checkout, are kept)."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        key = key.lstrip("+")
        if not eq or key not in PATH_KEYS:
            out.append(arg)
            continue
        listed = value.startswith("[") and value.endswith("]")
        paths = [p.strip() for p in value.strip("[]").split(",")]
        made = [p if Path(p).expanduser().exists() or (key not in ALWAYS_PATHS and not looks_like_a_path(p))
                else str(_example(key, p, args, where / p.lstrip("./~"))) for p in paths]
        out.append(f"{arg.partition('=')[0]}={'[' if listed else ''}{','.join(made)}{']' if listed else ''}")
    return out


def _data(args: Sequence[str]) -> DictConfig:
    """The data config that ``args`` choose (the first choice of a sweep), for the columns of an example."""
    declares = ("data=", "data.text_fields=", "data.label_field=", "data.labels=", "data.regression=",
                "data.glue.", "data.train_split=", "data.validation_split=")
    chosen = [a.split(",")[0] if a.startswith("data=") else a for a in args if a.lstrip("+").startswith(declares)]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=chosen).data


def _rows(data: DictConfig) -> list[dict[str, str]]:
    """Four examples of the task: text in each text field, each label twice."""
    fields, label = list(data.text_fields), data.label_field
    labels = [str(v) for v in data.labels] if data.get("labels") else \
        [str(v) for v in data.regression] if data.get("regression") else ["negative", "positive"]
    sentences = ["a gripping , beautifully acted film", "dull and far too long", "it works", "nothing happens"]
    return [{**{f: f"{s} ({f})" for f in fields}, label: labels[i % len(labels)]} for i, s in enumerate(sentences)]


def _write_table(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = path.suffix.lower()
    if kind in (".csv", ".tsv"):
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, list(rows[0]), delimiter="\t" if kind == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif kind in (".json", ".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("")  # a file of no known format: the checks say so, as they would for the user's


def _example(key: str, value: str, args: Sequence[str], path: Path) -> Path:
    data = _data(args)
    if key == "data.dir":  # a GLUE-format folder, laid out as the task's data.glue says
        layout = data.glue
        path.mkdir(parents=True, exist_ok=True)
        columns = [*layout.text_columns, layout.label_column]  # names under a header, else positions
        order = columns if layout.header else range(max(columns) + 1)
        for file in ["train.tsv", *layout.validation_files]:
            lines = ["\t".join(map(str, columns))] if layout.header else []
            for row in _rows(data):
                cells = dict(zip(columns, [*(row[f] for f in data.text_fields), row[data.label_field]], strict=True))
                lines.append("\t".join(str(cells.get(column, "x")) for column in order))
            (path / file).write_text("\n".join(lines) + "\n")
    elif key in ("data.train_file", "data.validation_file"):
        _write_table(path, _rows(data))
    elif key == "data.hub_path":  # a local folder of data files, one per split
        for split in ("train", "validation"):
            _write_table(path / f"{split}.csv", _rows(data))
    elif key == "data.path":  # what DatasetDict.save_to_disk writes
        from datasets import Dataset, DatasetDict

        splits = [data.train_split, *([data.validation_split] if isinstance(data.validation_split, str)
                                      else data.validation_split)]
        DatasetDict({s: Dataset.from_list(_rows(data)) for s in splits}).save_to_disk(str(path))
    else:  # a model folder: a tiny DistilBERT's config
        tiny_config("distilbert").save_pretrained(str(path))
    return path


# ----------------------------------------------------------------------------------------------
# the tests


@pytest.fixture
def as_typed(monkeypatch):
    """From the checkout, with none of this machine's data or model variables set."""
    monkeypatch.chdir(ROOT)
    for name in MACHINE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_readme_has_its_crisp_run_commands_in_bash_blocks():
    assert len(COMMANDS) >= MIN_COMMANDS, [c.text for c in COMMANDS]


@pytest.mark.parametrize("command", COMMANDS, ids=[f"README.md:{c.line}" for c in COMMANDS])
def test_every_readme_command_composes_and_passes_the_checks_of_python_m_crisp_run(command, as_typed, tmp_path):
    if command.text in NOT_CHECKED:
        pytest.skip(NOT_CHECKED[command.text])
    for name, value in command.env:
        as_typed.setenv(name, value)
    try:
        configs = check_command(with_user_files(command.args, tmp_path))
    except Refused as refused:
        pytest.fail(f"README.md:{command.line}: {command.text}\n{refused}")
    assert configs


def test_a_grid_is_checked_job_by_job_a_union_of_grids_included(as_typed):
    assert len(check_command(["-m", "sparsity=0,0.8", "seed=1,2,3"])) == 6
    assert len(check_command(["experiment=paper", "seed=1"])) == 8  # a grid by its experiment, without -m
    controls = check_command(["experiment=controls", "seed=1"])  # top-k and random x 3 sparsities, entmax, dropout x 2
    assert len(controls) == 6 + 1 + 2
    assert {c.sparsifier.name for c in controls} == {"topk", "random", "entmax"}


def test_a_big_grid_is_checked_with_its_first_seed_and_its_first_job_with_every_seed(as_typed):
    configs = check_command(["experiment=paper", "strategy=uniform"], max_jobs=10)  # 4 sparsities x 3 seeds
    checked = [(c.sparsity, c.seed) for c in configs]
    assert checked == [(0, 1), (0.6, 1), (0.7, 1), (0.8, 1), (0, 1), (0, 2), (0, 3)]


@pytest.mark.parametrize("args", [
    ["data=files", "data.train_file=reviews/train.csv", "data.validation_file=reviews/dev.csv",
     "data.text_fields=[review]", "data.label_field=sentiment"],
    ["-m", "data=files", "data.train_file=train.jsonl", "data.validation_file=[dev.json,test.parquet]", "seed=1,2"],
    ["data=disk", "data.path=my_dataset"],
    ["data=hub", "data.hub_path=./my_folder"],
    ["data=cola", "data.dir=DIR"],  # no header: columns by position
    ["-m", "data=rte", "data.dir=glue/RTE", "seed=1,2"],
    ["model=distilbert", "model.name_or_path=/path/to/model"],
], ids=["files", "files-grid", "disk", "hub-folder", "glue-by-position", "glue-pairs", "model-folder"])
def test_a_command_that_names_a_users_files_is_checked_against_written_examples(args, as_typed, tmp_path):
    with pytest.raises(Refused, match="no such|not a folder|is not allowed"):
        check_command(args)  # the checks read the files: without them the command is refused
    written = with_user_files(args, tmp_path)
    assert written != args and all(check_command(written))


@pytest.mark.parametrize(("args", "named"), [
    (["sparsity=2"], "sparsity=2"),
    (["trainer.max_epoch=3"], "trainer.max_epoch"),
    (["-m", "sparsity=0,1.5"], "job 1 of the grid .*sparsity=1.5"),
    (["experiment=paper", "strategy=unifrom"], "strategy=unifrom"),
    (["-m", "seed=1,2", "hydra/launcher=lockstep", "hydra.launcher.max_runs_per_group=0"], "max_runs_per_group=0"),
    (["experiment=paper", "hydra/launcher=slurm", "hydra.launcher.poll_s=0"], "poll_s=0"),
    (["experiment=paper", "sweep.mps=true", "hydra/launcher=basic"], "sweep.mps=true"),  # the callback, on a grid
    (["data=sst2_local"], "data.dir"),
    (["model.name_or_path=./no/such/model"], "there is no such folder"),
])
def test_the_same_check_refuses_a_wrong_command(args, named, as_typed):
    with pytest.raises(Refused, match=f"^crisp: error: .*{named}"):
        check_command(args)


def test_commands_are_found_in_bash_blocks_only_joined_and_without_comments():
    text = "\n".join([
        "python -m crisp.run seed=9            # prose, not a block", "```python", "python -m crisp.run seed=8",
        "```", "```bash", "make smoke", "python -m crisp.run -m seed=1,2 \\", "  sparsity=0,0.8   # a grid",
        "CRISP_MINILM_DIR=/m .venv/bin/python3 -m crisp.run model=minilm-l6", "python -m crisp.report multirun/x",
        "# = python3 -m crisp.run 'optim={lr:1e-5}'", "# python -m crisp.run seed=7", "```"])
    assert [(c.line, c.env, c.args) for c in readme_commands(text)] == [
        (7, (), ("-m", "seed=1,2", "sparsity=0,0.8")),
        (9, (("CRISP_MINILM_DIR", "/m"),), ("model=minilm-l6",)),
        (11, (), ("optim={lr:1e-5}",))]


def test_the_readmes_encoder_counts_are_those_docs_encoders_md_was_made_with():
    """The README's sentence on how many sequence classifiers crisp makes sparse follows the generated table."""
    table = (ROOT / "docs" / "encoders.md").read_text()
    version, = re.search(r"in transformers (\S+), built tiny", table).groups()
    sparse, refused, unbuilt = map(int, re.search(r"(\d+) sparse, (\d+) refused, (\d+) not built", table).groups())
    said = re.search(r"Of the (\d+)\s+sequence classifiers of transformers (\S+), (\d+) are sparse and exact.*?"
                     r"and (\d+) are refused", " ".join(README.read_text().split()))
    assert said, "README.md no longer says how many sequence classifiers are sparse"
    total, readme_version, readme_sparse, readme_refused = said.groups()
    assert version.startswith(readme_version)
    assert (int(total), int(readme_sparse), int(readme_refused)) == (sparse + refused + unbuilt, sparse, refused)
