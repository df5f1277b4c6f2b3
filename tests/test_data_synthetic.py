"""Synthetic ground-truth data: the statistics it promises, the cache, and determinism."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sae_sweep.config import DataConfig
from sae_sweep.data import synthetic
from sae_sweep.data.synthetic import GroundTruth, ensure_synthetic, load_ground_truth
from sae_sweep.errors import ConfigError, DataError

# Small shards and chunks so a few tens of thousands of tokens still span several of each.
SMALL_LAYOUT = {"SHARD_ROWS": 16384, "CHUNK_TOKENS": 4096}
SMALL = dict(d_in=32, n_features=256, n_tokens=50_000, true_l0=6.0, correlation=0.5, hierarchy_frac=0.2)


def small_cfg(root: Path, **overrides: object):
    return OmegaConf.structured(DataConfig(path=str(root), **{**SMALL, **overrides}))


@pytest.fixture(autouse=True)
def small_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SMALL_LAYOUT.items():
        monkeypatch.setattr(synthetic, name, value)


def make(root: Path, **overrides: object) -> tuple[Path, GroundTruth]:
    folder = ensure_synthetic(small_cfg(root, **overrides), progress=False)
    return folder, load_ground_truth(folder)


def read_all(folder: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(folder.glob("shard_*.npy"))])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SMALL_LAYOUT.items():
            mp.setattr(synthetic, name, value)
        return make(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def mask(data: tuple[Path, GroundTruth]) -> torch.Tensor:
    gt = data[1]
    return gt.active_mask(torch.arange(gt.n_tokens))


def test_folder_layout(data: tuple[Path, GroundTruth]) -> None:
    folder, gt = data
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = sorted(folder.glob("shard_*.npy"))
    assert [s["file"] for s in manifest["shards"]] == [p.name for p in shards]
    assert [s["rows"] for s in manifest["shards"]] == [16384, 16384, 16384, 848]  # last one shorter
    x = read_all(folder)
    assert x.shape == (50_000, 32) and x.dtype == np.float32 and np.isfinite(x).all()
    assert manifest["n_tokens"] == gt.n_tokens == 50_000
    assert manifest["generator_version"] == synthetic.GENERATOR_VERSION
    assert gt.params["true_l0"] == "6.0" and gt.params["data_seed"] == "0"
    assert gt.active_indptr.dtype == torch.int64 and gt.active_indices.dtype == torch.int32
    assert gt.parent.dtype == torch.int64 and gt.features.dtype == torch.float32


def test_features_are_unit_and_in_superposition(data: tuple[Path, GroundTruth]) -> None:
    gt = data[1]
    assert gt.features.shape == (256, 32)
    torch.testing.assert_close(gt.features.norm(dim=1), torch.ones(256))
    cos = gt.features @ gt.features.T - torch.eye(256)
    assert cos.abs().max() > 0.5  # 256 directions in 32 dims cannot be near-orthogonal
    assert gt.bias.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_mean_l0_matches_true_l0(data: tuple[Path, GroundTruth]) -> None:
    gt = data[1]
    assert gt.firing_prob.sum().item() == pytest.approx(6.0, rel=1e-5)
    assert gt.active_indices.numel() / gt.n_tokens == pytest.approx(6.0, rel=0.1)


def test_firing_rates_track_firing_prob(data: tuple[Path, GroundTruth]) -> None:
    gt = data[1]
    rate = torch.bincount(gt.active_indices.long(), minlength=256).double() / gt.n_tokens
    prob = gt.firing_prob.double()
    assert (prob <= 0.9).all() and (prob[:-1] >= prob[1:]).all()  # Zipf: falls with the index
    assert torch.corrcoef(torch.stack([rate, prob]))[0, 1] > 0.95
    assert ((rate - prob).abs() <= 0.25 * prob + 0.003).all()
    assert rate[:64].mean() > 2 * rate[-64:].mean()  # frequent features fire more


def test_children_fire_only_with_their_parent(data: tuple[Path, GroundTruth], mask: torch.Tensor) -> None:
    gt = data[1]
    children = (gt.parent >= 0).nonzero().squeeze(1)
    assert len(children) == round(0.2 * 256)
    parents = gt.parent[children]
    assert (gt.parent[parents] == -1).all()  # one level
    assert (gt.firing_prob[parents] >= gt.firing_prob[children]).all()
    assert not (mask[:, children] & ~mask[:, parents]).any()
    assert mask[:, children].any(0).all()  # and they do fire


def cofiring(mask: torch.Tensor, top: int = 64) -> tuple[float, float]:
    """Mean pairwise correlation of the top features, and Var(L0) relative to independent firing."""
    m = mask[:, :top].float()
    corr = torch.corrcoef(m.T)[~torch.eye(top, dtype=torch.bool)].mean().item()
    rate = mask.float().mean(0)
    return corr, mask.sum(1).float().var().item() / (rate * (1 - rate)).sum().item()


def test_correlation_gives_cofiring(tmp_path: Path) -> None:
    # No hierarchy, so any co-firing comes from the copula.
    _, independent = make(tmp_path, correlation=0.0, hierarchy_frac=0.0, n_tokens=20_000)
    _, correlated = make(tmp_path, correlation=0.5, hierarchy_frac=0.0, n_tokens=20_000)
    corr0, var0 = cofiring(independent.active_mask(torch.arange(20_000)))
    corr1, var1 = cofiring(correlated.active_mask(torch.arange(20_000)))
    assert abs(corr0) < 0.01 and var0 == pytest.approx(1.0, abs=0.1)
    assert corr1 > 0.02 and var1 > 2


def test_activations_carry_the_active_features(data: tuple[Path, GroundTruth], mask: torch.Tensor) -> None:
    folder, gt = data
    proj = (torch.from_numpy(read_all(folder)) - gt.bias) @ gt.features.T
    active = mask.float()
    assert torch.corrcoef(torch.stack([proj.flatten(), active.flatten()]))[0, 1] > 0.25
    assert proj[mask].mean() > proj[~mask].mean() + 0.5  # magnitude_mean = 1
    # Tokens with nothing firing are just bias + noise.
    empty = proj[mask.sum(1) == 0]
    assert empty.numel() > 0 and empty.abs().max() < 0.2


def test_same_params_reuse_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = make(tmp_path)
    stamp = (folder / "manifest.json").stat().st_mtime_ns

    def fail(*args: object) -> None:
        raise AssertionError("regenerated a complete folder")

    monkeypatch.setattr(synthetic, "_generate", fail)
    assert ensure_synthetic(small_cfg(tmp_path), progress=False) == folder
    # A plain dataclass with an int where a float is declared names the same data set.
    plain = DataConfig(path=str(tmp_path), **{**SMALL, "true_l0": 6})
    assert ensure_synthetic(plain, progress=False) == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind


@pytest.mark.parametrize("change", [{"data_seed": 1}, {"noise_std": 0.02}, {"n_tokens": 49_999}])
def test_changed_param_gives_another_folder(tmp_path: Path, change: dict[str, object]) -> None:
    first = synthetic.SyntheticParams.from_config(small_cfg(tmp_path)).digest()
    assert synthetic.SyntheticParams.from_config(small_cfg(tmp_path, **change)).digest() != first


def test_deterministic_across_roots(tmp_path: Path) -> None:
    a, gt_a = make(tmp_path / "a", n_tokens=10_000)
    b, gt_b = make(tmp_path / "b", n_tokens=10_000)
    assert a.name == b.name
    for name in ("features", "bias", "firing_prob", "parent", "active_indptr", "active_indices"):
        assert torch.equal(getattr(gt_a, name), getattr(gt_b, name)), name
    assert np.array_equal(read_all(a), read_all(b))
    c, _ = make(tmp_path / "c", n_tokens=10_000, data_seed=1)
    assert not np.array_equal(read_all(a), read_all(c))


def test_active_mask_matches_csr(data: tuple[Path, GroundTruth]) -> None:
    gt = data[1]
    rows = torch.tensor([49_999, 0, 16_383, 16_384, 123, 123, 40_000])  # any order, repeats, shard edges
    got = gt.active_mask(rows)
    assert got.shape == (len(rows), 256) and got.dtype == torch.bool
    for i, r in enumerate(rows.tolist()):
        ids = gt.active_indices[gt.active_indptr[r] : gt.active_indptr[r + 1]].long()
        expected = torch.zeros(256, dtype=torch.bool)
        expected[ids] = True
        assert torch.equal(got[i], expected)
    assert gt.active_mask(torch.tensor([], dtype=torch.int64)).shape == (0, 256)


def test_concurrent_callers_share_one_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate = synthetic._generate
    both_generated = threading.Barrier(2, timeout=30)

    def generate_then_wait(*args: Any) -> None:
        generate(*args)
        both_generated.wait()  # both finish before either publishes: one must lose the rename

    monkeypatch.setattr(synthetic, "_generate", generate_then_wait)
    results: list[Path] = []
    cfg = small_cfg(tmp_path, n_tokens=5000)
    threads = [threading.Thread(target=lambda: results.append(ensure_synthetic(cfg))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
    assert load_ground_truth(results[0]).n_tokens == 5000


def test_incomplete_folder_is_an_error(tmp_path: Path) -> None:
    folder, _ = make(tmp_path, n_tokens=5000)
    (folder / "manifest.json").unlink()
    with pytest.raises(DataError, match="incomplete"):
        ensure_synthetic(small_cfg(tmp_path, n_tokens=5000), progress=False)


def test_unreachable_l0_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.true_l0"):
        ensure_synthetic(small_cfg(tmp_path, n_features=10, true_l0=9.5), progress=False)


def test_progress_off_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make(tmp_path, n_tokens=5000)
    assert capsys.readouterr() == ("", "")


# --- the parameters added for the quality suite -----------------------------------------------------


def test_new_params_at_their_defaults_keep_the_old_digest(tmp_path: Path) -> None:
    """Data sets made before correlation_rank / feature_magnitude_spread existed keep their folder."""
    import hashlib
    from dataclasses import asdict

    params = synthetic.SyntheticParams.from_config(small_cfg(tmp_path))
    old_fields = {k: v for k, v in asdict(params).items() if k not in synthetic.NEW_PARAM_DEFAULTS}
    blob = json.dumps({"generator_version": synthetic.GENERATOR_VERSION, **old_fields}, sort_keys=True)
    assert params.digest() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    for key, value in (("correlation_rank", 2), ("feature_magnitude_spread", 0.5)):
        changed = synthetic.SyntheticParams.from_config(small_cfg(tmp_path, **{key: value}))
        assert changed.digest() != params.digest()


def offdiag_top_share(mask: torch.Tensor, top: int, rank: int) -> float:
    """Share of the off-diagonal firing-correlation energy of the top features in its first `rank`
    eigen-directions: near 1 when co-firing comes from `rank` shared factors."""
    corr = torch.corrcoef(mask[:, :top].double().T)
    corr.fill_diagonal_(0)
    eig = torch.linalg.eigvalsh(corr).abs().sort(descending=True).values
    return (eig[:rank].pow(2).sum() / eig.pow(2).sum()).item()


def test_correlation_rank_sets_the_rank_of_cofiring(tmp_path: Path) -> None:
    common = dict(correlation=0.9, hierarchy_frac=0.0, n_tokens=40_000, true_l0=12.0, zipf_exponent=0.3)
    _, rank1 = make(tmp_path, correlation_rank=1, **common)
    _, rank8 = make(tmp_path, correlation_rank=8, **common)
    share1 = offdiag_top_share(rank1.active_mask(torch.arange(40_000)), 64, 1)
    share8 = offdiag_top_share(rank8.active_mask(torch.arange(40_000)), 64, 1)
    # One factor: co-firing is (nearly) one direction; eight: the first direction holds far less of it.
    assert share1 > 0.9 and share8 < 0.7
    assert offdiag_top_share(rank8.active_mask(torch.arange(40_000)), 64, 8) > 0.8


@pytest.mark.parametrize(
    "shape",
    [
        dict(d_in=16, n_features=512, true_l0=2.0, zipf_exponent=1.0),
        dict(d_in=16, n_features=512, true_l0=40.0, zipf_exponent=0.2, correlation=0.6, correlation_rank=2),
        dict(d_in=16, n_features=128, true_l0=20.0, zipf_exponent=1.2, hierarchy_frac=0.4),
    ],
)
def test_true_l0_is_met_across_shapes(tmp_path: Path, shape: dict[str, object]) -> None:
    _, gt = make(tmp_path, **{"n_tokens": 20_000, **shape})
    assert gt.firing_prob.sum().item() == pytest.approx(shape["true_l0"], rel=1e-5)
    assert gt.active_indices.numel() / gt.n_tokens == pytest.approx(shape["true_l0"], rel=0.05)


def test_feature_magnitude_spread_gives_each_feature_its_own_loudness(tmp_path: Path) -> None:
    folder, gt = make(tmp_path, feature_magnitude_spread=1.0, magnitude_std=0.05, noise_std=0.001)
    assert gt.magnitude is not None and gt.magnitude.shape == (256,)
    assert gt.magnitude.log().std().item() == pytest.approx(1.0, rel=0.15)  # log-normal sigma
    # A token where exactly one feature fires is bias + a_i f_i: its norm is that feature's magnitude.
    lone = (gt.active_indptr[1:] - gt.active_indptr[:-1] == 1).nonzero().squeeze(1)
    assert lone.numel() > 100
    feature = gt.active_indices[gt.active_indptr[lone]].long()
    norm = (torch.from_numpy(read_all(folder))[lone] - gt.bias).norm(dim=1)
    ratio = norm / gt.magnitude[feature]
    assert ratio.median().item() == pytest.approx(1.0, abs=0.05)
    # Without the spread every feature has the same mean and no magnitude tensor is stored.
    assert make(tmp_path)[1].magnitude is None


def test_wide_data_sets_generate_in_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "MAX_CHUNK_ELEMENTS", 4096 * 64)
    params = synthetic.SyntheticParams.from_config(small_cfg(tmp_path, n_features=256, n_tokens=10_000))
    assert params.chunk_tokens == 1024 and params.identity()["chunk_tokens"] == 1024
    _, gt = make(tmp_path, n_features=256, n_tokens=10_000)
    assert gt.active_indices.numel() / gt.n_tokens == pytest.approx(6.0, rel=0.1)


def test_bad_correlation_rank_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.correlation_rank"):
        ensure_synthetic(small_cfg(tmp_path, correlation_rank=0), progress=False)
