"""evaluate_sae: the trainer's held-out pass, callable on any SAE (a loaded sae.safetensors included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_sweep.data import open_dataset
from sae_sweep.models import load_sae
from sae_sweep.train import evaluate_sae, train


def test_a_loaded_sae_scores_what_its_run_recorded(make_cfg):
    cfg = make_cfg(tokens=60_000)
    recorded = train(cfg)
    run_dir = Path(cfg.out_dir)
    sae = load_sae(run_dir)  # plain form: applies to raw activations, scale factor folded in
    result = evaluate_sae(sae, open_dataset(cfg.data, progress=False), max_tokens=cfg.train.eval_tokens)
    assert "mcc" in recorded and "f1" in recorded  # synthetic data: ground-truth scores too
    for key in ("explained_variance", "fvu", "l0", "mcc", "f1", "dense_frac"):
        assert result.metrics[key] == pytest.approx(recorded.get(key), rel=1e-4, abs=1e-6), key
    # scale-dependent ones differ by the scale factor squared (the run measured scaled activations)
    assert result.metrics["mse"] * recorded["scale_factor"] ** 2 == pytest.approx(recorded["mse"], rel=1e-4)
    density = json.loads((run_dir / "density.json").read_text())
    assert torch.allclose(result.density, torch.tensor(density["density"], dtype=result.density.dtype))
    assert result.latents["matched_feature"] == density["matched_feature"]


def test_leaves_the_model_in_the_mode_it_found(make_cfg):
    cfg = make_cfg(tokens=20_000)
    train(cfg)
    sae = load_sae(cfg.out_dir)
    data = open_dataset(cfg.data, progress=False)
    sae.train()
    evaluate_sae(sae, data, max_tokens=4096)
    assert sae.training
    sae.eval()
    result = evaluate_sae(sae, data, max_tokens=4096)
    assert not sae.training
    assert result.density.shape == (sae.hidden,)
