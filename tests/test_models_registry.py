"""The architecture registry: what each class declares, and an architecture from outside the package
registered in Python and, through an entry point, trained from the command line."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_DATA
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sae_sweep.config import resolve_recipe
from sae_sweep.errors import ConfigError
from sae_sweep.models import (
    SAE,
    architecture,
    architectures,
    build_sae,
    model_config,
    register_architecture,
    registry,
)
from sae_sweep.models.base import FAMILIES, ModelConfig
from sae_sweep.models.relu import ReluSAE


def readme_example() -> str:
    """The README's example architecture module (one file: its class and config, own key b_enc_init)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Architectures, and adding your own") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


PLUGIN = readme_example()


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test stay in it (the registry and Hydra's config store are global)."""
    before = dict(registry._REGISTRY)
    monkeypatch.setattr(registry, "_REGISTRY", dict(before))
    yield
    group = ConfigStore.instance().repo.get("model", {})
    for name in set(registry._REGISTRY) - set(before):
        group.pop(f"{name}.yaml", None)


def test_every_architecture_declares_its_recipe_and_builds_from_its_config():
    assert set(architectures()) >= {"relu", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"}
    for name, cls in architectures().items():
        assert cls.architecture == name and cls.family in FAMILIES
        cfg = cls.config_class()
        assert isinstance(cfg, ModelConfig) and cfg.name == name
        hidden, coef, lr = resolve_recipe(name, 64, None, None, None)
        assert hidden == 8 * 64 and lr == cls.default_lr(64, hidden) and lr > 0
        if cls.family == "penalty":  # the loss has a coefficient on a sparsity metric
            assert coef == cls.default_coef and cls.sparsity_metric in ("l1", "l0")
        else:
            assert coef is None and cfg.k >= 1  # type: ignore[attr-defined]
        assert resolve_recipe(name, 64, 100, 0.5, 1e-3) == (100, None if coef is None else 0.5, 1e-3)
        sae = build_sae(cfg, 16, 64, torch.Generator().manual_seed(0))
        assert type(sae) is cls and (sae.d_in, sae.hidden) == (16, 64)
        assert math.isfinite(float(sae(torch.randn(32, 16)).mse.detach()))


def test_lr_rules_and_decoder_init_are_the_classes():
    assert architecture("topk").default_lr(128, 2**14) == pytest.approx(2e-4)  # Gao et al.
    assert architecture("relu").default_lr(128, 1024) == pytest.approx(1e-3)
    assert architecture("relu").default_lr(512, 1024) == pytest.approx(5e-4)  # 1/sqrt(d_in)
    norms = build_sae(model_config("relu"), 16, 64).dec_norms()
    assert torch.allclose(norms, torch.full_like(norms, 0.1))  # April-2024 recipe
    norms = build_sae(model_config("relu", dec_init_norm=0.3), 16, 64).dec_norms()
    assert torch.allclose(norms, torch.full_like(norms, 0.3))


def test_model_config_refuses_a_key_the_architecture_lacks():
    assert dataclasses.asdict(model_config("relu", k=None)) == {"name": "relu", "dec_init_norm": None}
    with pytest.raises(ConfigError, match="'model.k'.*a key of model=relu"):
        model_config("relu", k=4)
    with pytest.raises(ConfigError, match="'model'.*one of relu, topk"):
        model_config("gated")


def test_register_in_python_then_compose_and_build(scratch_registry, tmp_path):
    namespace: dict = {}
    exec(compile(PLUGIN, "shifted_relu_plugin.py", "exec"), namespace)
    cls = register_architecture(namespace["ShiftedReluSAE"])
    assert register_architecture(cls) is cls  # again: nothing happens
    from sae_sweep.compose import Composer

    with Composer() as composer:
        cfg = composer.compose(["model=shifted_relu", "model.b_enc_init=-0.3"])
        assert "shifted_relu" in composer.group_options("model")
    assert OmegaConf.to_container(cfg.model) == {"name": "shifted_relu", "b_enc_init": -0.3}
    sae = build_sae(cfg.model, 8, 16)
    assert type(sae) is cls and bool((sae.b_enc == -0.3).all())
    assert resolve_recipe("shifted_relu", 8, None, None, None)[1] == 2.0  # its default coefficient


def test_registration_refuses_a_taken_name_or_an_incomplete_class(scratch_registry):
    class Impostor(ReluSAE):
        pass

    with pytest.raises(ValueError, match="'relu' is already registered by sae_sweep.models.relu.ReluSAE"):
        register_architecture(Impostor)

    class NoConfig(SAE):
        architecture = "no_config"

    with pytest.raises(TypeError, match="config_class"):
        register_architecture(NoConfig)


def test_an_entry_point_architecture_trains_from_the_command_line(tmp_path, data_root):
    # The layout `pip install` leaves for a package whose pyproject.toml declares (as the README says)
    #   [project.entry-points."sae_sweep.architectures"]  shifted_relu = "shifted_relu_plugin:ShiftedReluSAE"
    site = tmp_path / "site"
    (site / "shifted_relu_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "shifted_relu_plugin.py").write_text(PLUGIN)
    info = site / "shifted_relu_plugin-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shifted-relu-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[sae_sweep.architectures]\nshifted_relu = shifted_relu_plugin:ShiftedReluSAE\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    data = [f"data.{k}={v}" for k, v in SMALL_DATA.items()] + [f"data.path={data_root}"]
    run = tmp_path / "run"
    args = ["model=shifted_relu", "model.b_enc_init=-0.05", "hidden_dim=64", "tokens=60000", "batch_size=512"]
    res = subprocess.run(
        [sys.executable, "-m", "sae_sweep", *args, *data, "device=cpu", "train.progress=false"]
        + [f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "run directory: run\n" in res.stdout  # relative to the working directory (tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["architecture"] == "shifted_relu" and metrics["status"] == "completed"
    assert metrics["l1_lambda"] == 2.0  # the class's default coefficient
    assert metrics["explained_variance"] > 0.3
    assert OmegaConf.load(run / "config.yaml").model.b_enc_init == -0.05
    # any process with the package installed loads the saved SAE as that class
    load = f"from sae_sweep.models import load_sae; print(type(load_sae({str(run)!r})).__name__)"
    res = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "ShiftedReluSAE", res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "sae_sweep", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert "model.b_enc_init" in res.stdout and "shifted_relu" in res.stdout


def test_a_broken_entry_point_is_one_line_naming_it(tmp_path):
    site = tmp_path / "site"
    info = site / "broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sae_sweep.architectures]\nbroken = no_such_module:Nope\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run(
        [sys.executable, "-m", "sae_sweep", "tokens=10"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert (
        len(lines) == 1 and "sae_sweep.architectures:broken" in lines[0] and "no_such_module" in lines[0]
    ), res.stderr


def test_no_architecture_name_is_compared_outside_models():
    root = Path(__file__).parents[1] / "sae_sweep"
    names = [n for n in architectures() if n != "topk"]  # "topk" is also a SAELens name
    for path in root.rglob("*.py"):
        if {"models", "interop"} & set(path.relative_to(root).parts):  # interop maps SAELens's names
            continue
        text = path.read_text()
        for name in names:
            for quoted in (f'"{name}"', f"'{name}'"):
                assert quoted not in text, f"{path.relative_to(root)} names architecture {quoted}"
