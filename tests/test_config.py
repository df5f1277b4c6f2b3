"""Config surface: Hydra composition, shorthands, and one clear line for every bad value."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sae_sweep.config import Config, DataConfig, ModelConfig, validate
from sae_sweep.errors import ConfigError


def cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sae_sweep", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def compose_cfg(overrides):
    from sae_sweep.config import register_configs

    register_configs()
    with initialize_config_module(config_module="sae_sweep.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg.out_dir = "unused"
    return cfg


def test_defaults_compose_to_relu_on_synthetic():
    cfg = compose_cfg([])
    assert cfg.model.name == "relu" and cfg.data.kind == "synthetic" and cfg.optimizer.name == "adam"
    validate(cfg)


def test_shorthands_and_groups_override():
    cfg = compose_cfg(
        ["model=topk", "model.k=8", "lr=1e-3", "batch_size=512", "hidden_dim=256", "tokens=1000"]
    )
    assert (cfg.model.name, cfg.model.k, cfg.lr, cfg.batch_size, cfg.hidden_dim, cfg.tokens) == (
        "topk",
        8,
        1e-3,
        512,
        256,
        1000,
    )
    validate(cfg)


def test_l1_lambda_zero_is_legal():
    validate(compose_cfg(["l1_lambda=0"]))


@pytest.mark.parametrize(
    "overrides,key,fragment",
    [
        (["lr=-1e-3"], "lr", "positive"),
        (["lr=0"], "lr", "positive"),
        (["l1_lambda=-1"], "l1_lambda", ">= 0"),
        (["model=topk", "l1_lambda=5"], "l1_lambda", "model.k"),
        (["model=batchtopk", "l1_lambda=0"], "l1_lambda", "model.k"),
        (["model=topk", "model.k=64", "hidden_dim=32"], "model.k", "at most hidden_dim"),
        (["model=topk", "model.k=0"], "model.k", "positive"),
        (["+model.k=4"], "model.k", "a key of model=relu"),
        (
            ["model=matryoshka_batchtopk", "model.prefix_fractions=[0.5,0.25]"],
            "model.prefix_fractions",
            "increasing",
        ),
        (["data=shards"], "data.path", "folder"),
        (["data=shards", "data.path=/no/such/dir"], "data.path", "existing folder"),
        (["batch_size=0"], "batch_size", "positive"),
        (["tokens=100", "epochs=1"], "tokens", "one training budget"),
        (["device=tpu"], "device", "auto, cpu, cuda"),
        (["data.test_fraction=1.5"], "data.test_fraction", "(0, 1)"),
        (
            ["optimizer.lr_warmup_frac=0.9", "optimizer.lr_decay_frac=0.5"],
            "optimizer.lr_decay_frac",
            "at most",
        ),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(overrides))
    msg = str(info.value)
    assert f"'{key}'" in msg and fragment in msg
    assert "\n" not in msg


def test_structured_dataclass_validates_too():
    cfg = OmegaConf.structured(Config(model=ModelConfig(name="relu"), data=DataConfig(), out_dir="x"))
    validate(cfg)
    cfg.model.name = "gated"
    with pytest.raises(ConfigError, match="one of relu, topk, batchtopk, jumprelu"):
        validate(cfg)


def test_cli_bad_value_is_one_line_no_traceback(tmp_path):
    res = cli(["model=topk", "l1_lambda=5"], tmp_path)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "l1_lambda" in lines[0] and "5" in lines[0] and "Traceback" not in res.stderr


def test_cli_missing_data_path_names_the_folder(tmp_path):
    res = cli(["data=shards", f"data.path={tmp_path / 'nope'}"], tmp_path)
    assert res.returncode == 2
    assert "data.path" in res.stderr and "nope" in res.stderr and "Traceback" not in res.stderr


def test_cli_key_of_another_architecture_lists_the_chosen_ones(tmp_path):
    res = cli(["model.k=4"], tmp_path)  # k is a topk key; relu's schema (model=relu) has none
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "'model.k'" in lines[0] and "keys of model: dec_init_norm, name" in lines[0]
    res = cli(["model=topk", "model.jump_bandwidth=1"], tmp_path)
    assert res.returncode == 2 and "keys of model: aux_dead_tokens, aux_k, aux_k_coef, k," in res.stderr


def test_cli_unknown_model_lists_choices(tmp_path):
    res = cli(["model=gated"], tmp_path)
    assert res.returncode != 0
    assert "relu" in res.stderr and "topk" in res.stderr and "Traceback" not in res.stderr


def test_cli_cfg_job_and_help(tmp_path):
    res = cli(["--cfg", "job", "l1_lambda=3"], tmp_path)
    assert res.returncode == 0 and "l1_lambda: 3" in res.stdout
    res = cli(["--help"], tmp_path)
    assert (
        res.returncode == 0 and "model: batchtopk, jumprelu, matryoshka_batchtopk, relu, topk" in res.stdout
    )


def _user_groups(root):
    """A user's config folder adding a data option and an optimizer option to the shipped groups."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "tiny.yaml").write_text("kind: synthetic\nd_in: 24\nn_features: 48\n")
    (root / "optimizer").mkdir()
    (root / "optimizer" / "slow.yaml").write_text("name: adam\nbeta2: 0.99\n")
    return f"hydra.searchpath=[file://{root}]"


def test_user_config_groups_from_a_searchpath_reach_cli_python_and_sweeps(tmp_path):
    from sae_sweep import compose_config
    from sae_sweep.compose import Composer
    from sae_sweep.sweep.plan import make_plan

    searchpath = _user_groups(tmp_path / "myconf")
    res = cli(["data=tiny", "optimizer=slow", searchpath, "--cfg", "job"], tmp_path)
    assert res.returncode == 0, res.stderr
    job = OmegaConf.create(res.stdout)
    assert (job.data.d_in, job.data.n_features, job.optimizer.beta2) == (24, 48, 0.99)
    assert job.model.name == "relu"  # the shipped groups are all still there

    cfg = compose_config(["data=tiny", "optimizer=slow", searchpath], out_dir=tmp_path / "run")
    assert (cfg.data.d_in, cfg.optimizer.beta2) == (24, 0.99)

    with Composer() as composer:
        plan = make_plan(["data=tiny", searchpath, "l1_lambda=1,3"], composer)
        trial = composer.compose(plan.space.overrides({"l1_lambda": 3.0}))
    assert (trial.data.d_in, trial.l1_lambda) == (24, 3.0)
    assert not plan.space.ignored
