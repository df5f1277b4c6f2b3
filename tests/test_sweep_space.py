"""Sweep planning: override syntax -> search space, objectives, study names, checks before any work."""

import math

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sae_sweep.compose import Composer
from sae_sweep.errors import ConfigError
from sae_sweep.sweep.objectives import Objective, objective_values, parse_objectives
from sae_sweep.sweep.plan import make_plan
from sae_sweep.sweep.space import format_value, parse_space
from sae_sweep.sweep.store import resolve_store


@pytest.fixture(scope="module")
def composer():
    with Composer() as c:
        yield c


def dims(args):
    return {d.name: d for d in parse_space(args).dims}


def test_comma_lists_and_choice_make_a_grid_over_the_product():
    space = parse_space(["l1_lambda=0,1e-9,1e-5,5", "lr=choice(1e-3,1e-4)", "batch_size=512"])
    assert space.is_grid and space.fixed == ["batch_size=512"]
    points = space.grid()
    assert len(points) == 8 == space.grid_size()
    assert {(p["l1_lambda"], p["lr"]) for p in points} == {
        (a, b) for a in (0, 1e-9, 1e-5, 5) for b in (1e-3, 1e-4)
    }
    assert space.dims[0].distribution() == CategoricalDistribution((0, 1e-9, 1e-5, 5))


def test_a_value_typed_twice_is_one_point():
    assert parse_space(["lr=1e-3,1e-3,1e-4"]).grid_size() == 2


def test_key_order_does_not_change_the_sweep():
    a, b = parse_space(["l1_lambda=0,5", "lr=1e-3,1e-4"]), parse_space(["lr=1e-3,1e-4", "l1_lambda=0,5"])
    assert a.identity() == b.identity() and a.grid() == b.grid()


def test_intervals_and_ranges_are_bayesian_dimensions():
    d = dims(
        [
            "lr=tag(log,interval(1e-5,1e-2))",
            "hidden_dim=interval(32,256)",
            "seed=range(0,10,2)",
            "data.noise_std=range(0.0,0.05,0.01)",
            "optimizer.beta1=interval(0.8,0.99)",
        ]
    )
    assert d["lr"].distribution() == FloatDistribution(1e-5, 1e-2, log=True)
    assert d["hidden_dim"].distribution() == IntDistribution(32, 256)  # the schema says int
    assert d["seed"].distribution() == IntDistribution(0, 8, step=2)
    assert d["data.noise_std"].kind == "float" and d["data.noise_std"].step == pytest.approx(0.01)
    assert d["optimizer.beta1"].distribution() == FloatDistribution(0.8, 0.99)
    assert not parse_space(["lr=tag(log,interval(1e-5,1e-2))"]).is_grid


def test_zero_stays_a_legal_categorical_value_next_to_a_log_range():
    space = parse_space(["l1_lambda=0,1e-9,1e-5,5", "lr=tag(log,interval(1e-5,1e-2))"])
    d = {x.name: x for x in space.dims}
    assert d["l1_lambda"].distribution() == CategoricalDistribution((0, 1e-9, 1e-5, 5))
    with pytest.raises(ConfigError, match="list 0 separately"):
        parse_space(["l1_lambda=tag(log,interval(0,5))"])


def test_config_groups_sweep_too(composer):
    assert dims(["model=relu,topk"])["model"].choices == ("relu", "topk")
    space = parse_space(["model=glob(*)"], composer.group_options)
    assert set(space.dims[0].choices) == {"relu", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"}


@pytest.mark.parametrize(
    "args,key,fragment",
    [
        (["sweep.n_trials=1,2"], "sweep.n_trials", "not swept"),
        (["out_dir=x"], "out_dir", "trials/<number>"),
        (["lr=interval(1e-2,1e-5)"], "lr", "lower end is below"),
        (["lr=1e-3,1e-4", "lr=1,2"], "lr", "given twice"),
        (["x=[1,2],[3]"], "x", "cannot be swept"),
        (["hydra.sweep.dir=a,b"], "hydra.sweep.dir", "one directory"),
        (["lr=(1,"], "lr", "Hydra syntax"),
    ],
)
def test_bad_sweep_syntax_is_one_clear_line(args, key, fragment):
    with pytest.raises(ConfigError) as info:
        parse_space(args)
    assert f"'{key}'" in str(info.value) and fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "value", [0, 5, 1e-9, 1e-3, -1e30, 0.1, math.inf, True, None, "topk", "5", "a b", "1e-3"]
)
def test_values_round_trip_through_override_syntax(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(f"k={format_value(value)}").value()
    parsed = getattr(parsed, "text", parsed)
    assert type(parsed) is type(value) and parsed == value


def test_objectives_default_and_explicit():
    assert parse_objectives(["fvu", "l0"], "synthetic") == [
        Objective("fvu", "minimize"),
        Objective("l0", "minimize"),
    ]
    assert parse_objectives(["mcc", "l2_ratio:max"], "synthetic") == [
        Objective("mcc", "maximize"),
        Objective("l2_ratio", "maximize"),
    ]
    for specs, fragment in (
        (["nope"], "metric names"),
        (["l2_ratio"], "a direction"),
        (["fvu:up"], "fvu:minimize"),
        (["mcc"], "ground truth"),
    ):
        with pytest.raises(ConfigError, match=fragment):
            parse_objectives(specs, "shards" if specs == ["mcc"] else "synthetic")
    assert objective_values([Objective("fvu", "minimize")], {"fvu": float("nan")})[0] is None


def test_storage_urls(tmp_path):
    assert resolve_store(None, tmp_path, 30, 120).url == f"sqlite:///{tmp_path / 'study.db'}"
    assert resolve_store("postgresql+psycopg2://u@h/db", tmp_path, 30, 120).kind == "server"
    assert resolve_store(str(tmp_path / "s.journal"), tmp_path, 30, 120).kind == "journal"
    with pytest.raises(ConfigError, match="sweep.storage"):
        resolve_store("study.txt", tmp_path, 30, 120)


def test_plan_study_name_is_derived_from_the_command(composer):
    a = make_plan(["l1_lambda=0,5", "lr=1e-3,1e-4", "tokens=1000"], composer)
    b = make_plan(["lr=1e-3,1e-4", "tokens=1000", "l1_lambda=0,5", "sweep.workers=3", "device=cpu"], composer)
    c = make_plan(["l1_lambda=0,5", "lr=1e-3,1e-4", "tokens=2000"], composer)
    assert a.study_name == b.study_name != c.study_name
    assert a.study_name.startswith("l1_lambda-lr_")
    assert a.sweep_dir.name == a.study_name and a.sweep_dir.parent.name == "outputs"
    assert a.sampler == "grid" and not a.pruning and a.n_trials is None
    bayes = make_plan(["lr=tag(log,interval(1e-5,1e-2))", "sweep.n_trials=7"], composer)
    assert bayes.sampler == "tpe" and bayes.pruning and bayes.n_trials == 7
    assert make_plan(["lr=1e-3,1e-4", "sweep=nsga2"], composer).sampler == "nsga2"
    assert (
        make_plan(["lr=1e-3", "sweep.study_name=mine", "hydra.sweep.dir=/tmp/x"], composer).sweep_dir.name
        == "x"
    )


@pytest.mark.parametrize(
    "args,key,fragment",
    [
        (["l1_lambda=0,1", "model=relu,topk"], "l1_lambda", "model.k"),  # a grid point the model ignores
        (["lr=1e-3,-1"], "lr", "positive"),
        (["lr=tag(log,interval(1e-5,1e-2))", "sweep=grid"], "lr", "sweep=tpe"),
        (["lr=1e-3,1e-4", "sweep.launcher=slurm"], "sweep.storage", "journal file"),
        (["lr=1e-3", "sweep.workers=0"], "sweep.workers", "positive"),
        (["lr=1e-3", "sweep.objectives=[nope]"], "sweep.objectives", "metric names"),
        (["lr=1e-3", "nokey=1"], "nokey", "a known key (top-level keys"),
        (["lr=1e-3", "sweep.study_name=data"], "sweep.study_name", "other than"),
    ],
)
def test_bad_values_stop_the_plan_before_any_work(composer, args, key, fragment):
    with pytest.raises(ConfigError) as info:
        make_plan(args, composer)
    assert f"'{key}'" in str(info.value) and fragment in str(info.value)
