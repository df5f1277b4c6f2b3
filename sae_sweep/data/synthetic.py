"""Synthetic activations with known ground truth: the built-in default data set (README "The built-in data").

Each token is x = sum_i a_i f_i + bias + noise over n_features unit directions f_i in d_in dims
(superposition: n_features >> d_in). Feature i fires with a Zipf-like marginal probability p_i,
co-fires through a Gaussian copula with `correlation_rank` shared "context" factors (so the latent
correlation matrix is correlation * L L^T off its diagonal, of rank correlation_rank), may only fire
with its parent (hierarchy), and fires with a positive magnitude a_i around its own mean m_i
(m_i = magnitude_mean, or log-normal around it with `feature_magnitude_spread`).

Parameters added after the first data sets were published (correlation_rank,
feature_magnitude_spread) enter the digest and the metadata only when they differ from their
defaults (NEW_PARAM_DEFAULTS), so every data set made before keeps its folder name and its bytes.

The data set is cached on disk under `<data.path or outputs/data>/synthetic-<digest>/`, keyed by every
generation parameter, and is bit-identical for the same parameters:

    shard_0000.npy ...          float32 [rows, d_in], about 2^18 rows each (the last may be shorter)
    ground_truth.safetensors    features, bias, firing_prob, parent, and the true firing pattern as
                                CSR over global rows (active_indptr, active_indices); magnitude (per
                                feature) when feature_magnitude_spread > 0; parameters in the metadata
    manifest.json               parameters, shard list, generator version; written last
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_sweep import rundir
from sae_sweep.errors import ConfigError, DataError
from sae_sweep.progress import progress_bar

__all__ = ["GENERATOR_VERSION", "GroundTruth", "SyntheticParams", "ensure_synthetic", "load_ground_truth"]

# Bump whenever the generated data would change for the same parameters (it is part of the digest).
GENERATOR_VERSION = 1
CHUNK_TOKENS = 1 << 16  # tokens generated at once: bounds the dense [tokens, n_features] working set
SHARD_ROWS = 1 << 18  # rows per shard file
# Later parameters and their defaults, at which the data (and the digest) is what it was before they existed.
NEW_PARAM_DEFAULTS: dict[str, int | float] = {"correlation_rank": 8, "feature_magnitude_spread": 0.0}
# Largest dense [tokens, n_features] block generated at once (float32 elements: 512 MB). Data sets with
# n_features <= 2048 keep CHUNK_TOKENS per chunk; wider ones use fewer tokens per chunk.
MAX_CHUNK_ELEMENTS = 1 << 27
MAX_FIRING_PROB = 0.9  # no feature fires on (nearly) every token
MANIFEST = "manifest.json"
GROUND_TRUTH = "ground_truth.safetensors"


@dataclass(frozen=True)
class SyntheticParams:
    """Every parameter the generated data depends on, with canonical types (so 8 and 8.0 hash alike)."""

    d_in: int
    n_features: int
    n_tokens: int
    true_l0: float
    zipf_exponent: float
    correlation: float
    hierarchy_frac: float
    magnitude_mean: float
    magnitude_std: float
    bias_norm: float
    noise_std: float
    data_seed: int
    correlation_rank: int = 8
    feature_magnitude_spread: float = 0.0

    @classmethod
    def from_config(cls, data_cfg: Any) -> SyntheticParams:
        """From a DataConfig or its DictConfig; checks what config validation cannot see."""
        params = cls(**{f.name: _coerce(f.type, getattr(data_cfg, f.name)) for f in fields(cls)})
        if params.true_l0 > MAX_FIRING_PROB * params.n_features:
            raise ConfigError(
                "data.true_l0",
                params.true_l0,
                f"at most {MAX_FIRING_PROB} * data.n_features ({MAX_FIRING_PROB * params.n_features:g})",
            )
        if params.correlation_rank < 1:
            raise ConfigError("data.correlation_rank", params.correlation_rank, "a positive integer")
        return params

    @property
    def chunk_tokens(self) -> int:
        """Tokens generated per chunk (each chunk has its own random stream, so this shapes the data)."""
        return max(1, min(CHUNK_TOKENS, MAX_CHUNK_ELEMENTS // self.n_features))

    def identity(self) -> dict[str, int | float]:
        """What the data depends on: every parameter, less the later ones left at their defaults (so the
        digest and metadata of older data sets do not change), plus a non-standard chunk size."""
        ident = {k: v for k, v in asdict(self).items() if NEW_PARAM_DEFAULTS.get(k, None) != v}
        if self.chunk_tokens != CHUNK_TOKENS:
            ident["chunk_tokens"] = self.chunk_tokens
        return ident

    def digest(self) -> str:
        blob = json.dumps({"generator_version": GENERATOR_VERSION, **self.identity()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _coerce(type_name: object, value: Any) -> Any:  # field types are strings (postponed annotations)
    return int(value) if type_name == "int" else float(value)


@dataclass
class GroundTruth:
    """The true generative model of a synthetic data set, for scoring a trained SAE against it."""

    features: Tensor  # [n_features, d_in] float32, unit rows
    bias: Tensor  # [d_in] constant offset of every token
    firing_prob: Tensor  # [n_features] marginal firing probabilities
    parent: Tensor  # [n_features] int64, parent feature id or -1
    active_indptr: Tensor  # [n_tokens + 1] int64: CSR row pointer over global rows
    active_indices: Tensor  # [nnz] int32: ids of the features firing on each row
    params: dict[str, str]  # generation parameters (safetensors metadata)
    magnitude: Tensor | None = None  # [n_features] mean magnitude per feature (feature_magnitude_spread > 0)

    @property
    def n_tokens(self) -> int:
        return self.active_indptr.numel() - 1

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    def active_mask(self, global_rows: Tensor) -> Tensor:
        """bool [len(rows), n_features]: which true features fire on those global rows."""
        rows = torch.as_tensor(global_rows, dtype=torch.int64).reshape(-1)
        starts = self.active_indptr[rows]
        counts = self.active_indptr[rows + 1] - starts
        owner = torch.repeat_interleave(torch.arange(rows.numel()), counts)
        # Position of each entry inside its row, so entries can be gathered from the CSR in one go.
        within = torch.arange(owner.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        cols = self.active_indices[starts[owner] + within].long()
        mask = torch.zeros(rows.numel(), self.n_features, dtype=torch.bool)
        mask[owner, cols] = True
        return mask


def load_ground_truth(folder: str | os.PathLike[str]) -> GroundTruth:
    path = Path(folder) / GROUND_TRUTH
    if not path.is_file():
        raise DataError(path, "missing: not a synthetic data folder made by sae_sweep")
    with safe_open(str(path), framework="pt") as f:
        params = dict(f.metadata() or {})
    t = load_file(path)
    return GroundTruth(
        features=t["features"],
        bias=t["bias"],
        firing_prob=t["firing_prob"],
        parent=t["parent"],
        active_indptr=t["active_indptr"],
        active_indices=t["active_indices"],
        params=params,
        magnitude=t.get("magnitude"),
    )


# --- the cache -------------------------------------------------------------------------------------


def ensure_synthetic(data_cfg: Any, progress: bool = True) -> Path:
    """The folder holding the synthetic data set for data_cfg, generating it first if needed.

    Safe against concurrent callers: data is generated into a private temporary sibling and renamed
    into place atomically, so the final folder only ever exists complete; a caller that loses the
    rename race uses the winner's folder.
    """
    params = SyntheticParams.from_config(data_cfg)
    root = Path(data_cfg.path or "outputs/data")
    folder = root / f"synthetic-{params.digest()}"
    if _is_complete(folder):
        return folder
    if folder.exists():
        raise DataError(folder, f"incomplete synthetic data folder (no {MANIFEST}): delete it to regenerate")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
    try:
        _generate(params, tmp, progress)
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _is_complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished folder into place; its files reach the disk first, so a power cut never
    leaves a folder whose manifest says complete over shards that are not."""
    for path in tmp.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    rundir.fsync_dir(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not _is_complete(folder):  # not a lost race: something else is wrong
            raise
    rundir.fsync_dir(folder.parent)


# --- the generative model --------------------------------------------------------------------------


@dataclass
class _Model:
    """Everything drawn once from data_seed, before any token."""

    features: Tensor  # [F, D] unit rows
    bias: Tensor  # [D]
    firing_prob: Tensor  # [F] float64 marginals
    parent: Tensor  # [F] int64, -1 for none
    threshold: Tensor  # [F] feature i's latent must exceed this (children: given the parent fired)
    loadings: Tensor  # [F, R] copula factor loadings, already scaled by sqrt(correlation)
    noise_scale: Tensor  # [F] keeps every latent at unit variance
    magnitude: Tensor  # [F] mean magnitude of each feature when it fires


def _generator(seed: int, *key: int) -> torch.Generator:
    """Independent, well-mixed streams for the model and for each chunk (chunks could run anywhere)."""
    state = np.random.SeedSequence(seed % 2**64, spawn_key=key).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _firing_probs(p: SyntheticParams) -> Tensor:
    """Zipf-like marginals summing to true_l0, clipped at MAX_FIRING_PROB with the mass moved to the rest."""
    prob = (torch.arange(p.n_features, dtype=torch.float64) + 1) ** -p.zipf_exponent
    prob *= p.true_l0 / prob.sum()
    while (over := prob > MAX_FIRING_PROB).any():
        prob[over] = MAX_FIRING_PROB
        free = prob < MAX_FIRING_PROB
        prob[free] *= (p.true_l0 - prob[~free].sum()) / prob[free].sum()
    return prob


def _hierarchy(p: SyntheticParams, gen: torch.Generator) -> Tensor:
    """Parent of each feature: children drawn from the less frequent half, parents from the more frequent.

    Since probabilities fall with the index, a parent always fires at least as often as its child, so
    the child's conditional probability p_child / p_parent is at most 1 and the child keeps its marginal.
    """
    n_children = min(round(p.hierarchy_frac * p.n_features), p.n_features - 1)
    first_child = min(p.n_features // 2, p.n_features - n_children)
    children = first_child + torch.randperm(p.n_features - first_child, generator=gen)[:n_children]
    parent = torch.full((p.n_features,), -1, dtype=torch.int64)
    if n_children == 0:
        return parent
    parent[children] = torch.randint(0, first_child, (n_children,), generator=gen)
    return parent


def _build_model(p: SyntheticParams) -> _Model:
    gen = _generator(p.data_seed)
    features = torch.randn(p.n_features, p.d_in, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    bias = torch.randn(p.d_in, generator=gen)
    bias *= p.bias_norm / bias.norm()
    prob = _firing_probs(p)
    parent = _hierarchy(p, gen)
    is_child = parent >= 0
    conditional = prob.clone()
    conditional[is_child] = prob[is_child] / prob[parent[is_child]]
    # Non-negative, heavy-tailed loadings: each feature leans on one or two shared contexts, so
    # correlation means co-firing (as in text, where a topic turns on many features), not anti-firing.
    loadings = torch.randn(p.n_features, p.correlation_rank, generator=gen).abs() ** 3
    loadings /= loadings.norm(dim=1, keepdim=True)
    # Children take their correlation from the parent they depend on; their own draw stays independent
    # so their marginal is exactly p_parent * conditional.
    loadings[is_child] = 0
    loading_var = p.correlation * loadings.pow(2).sum(1)
    magnitude = torch.full((p.n_features,), p.magnitude_mean)
    if p.feature_magnitude_spread > 0:
        # Its own stream, so that the draws above (and the default data) do not depend on it. Log-normal
        # with mean magnitude_mean: a few features much louder than most, as in real activations.
        s = p.feature_magnitude_spread
        z = torch.randn(p.n_features, generator=_generator(p.data_seed, 0, 1), dtype=torch.float64)
        magnitude = (p.magnitude_mean * torch.exp(s * z - s * s / 2)).float()
    return _Model(
        features=features,
        bias=bias,
        firing_prob=prob,
        parent=parent,
        threshold=torch.special.ndtri(1 - conditional).float(),
        loadings=(p.correlation**0.5 * loadings).float(),
        noise_scale=(1 - loading_var).clamp(min=0).sqrt().float(),  # correlation = 1 may round below 0
        magnitude=magnitude,
    )


def _sample_chunk(
    model: _Model, p: SyntheticParams, n: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """n tokens: activations [n, D] float32, and per-row counts [n] and column ids of the firing features."""
    context = torch.randn(n, p.correlation_rank, generator=gen)
    latent = torch.randn(n, p.n_features, generator=gen)
    latent.mul_(model.noise_scale)
    if p.correlation > 0:
        latent.addmm_(context, model.loadings.T)
    fire = latent > model.threshold
    children = (model.parent >= 0).nonzero().squeeze(1)
    fire[:, children] &= fire[:, model.parent[children]]
    rows, cols = fire.nonzero(as_tuple=True)  # row-major: already CSR order
    if p.feature_magnitude_spread > 0:  # each feature around its own mean, the spread relative to it
        relative = p.magnitude_std / p.magnitude_mean
        magnitude = (model.magnitude[cols] * (1 + relative * torch.randn(rows.numel(), generator=gen))).abs_()
    else:  # the original arithmetic, kept bit for bit
        magnitude = (p.magnitude_mean + p.magnitude_std * torch.randn(rows.numel(), generator=gen)).abs_()
    dense = latent.zero_()  # reuse the latent buffer: one dense [n, F] block at a time
    dense[rows, cols] = magnitude
    x = torch.randn(n, p.d_in, generator=gen).mul_(p.noise_std).add_(model.bias)
    x.addmm_(dense, model.features)
    return x, torch.bincount(rows, minlength=n), cols.int()  # bincount: far faster than a bool sum


def _shard_plan(n_tokens: int) -> list[tuple[str, int]]:
    """(file name, rows) of each shard; names sort in row order."""
    sizes = [min(SHARD_ROWS, n_tokens - start) for start in range(0, n_tokens, SHARD_ROWS)]
    width = max(4, len(str(len(sizes) - 1)))
    return [(f"shard_{i:0{width}d}.npy", rows) for i, rows in enumerate(sizes)]


def _write_shards(
    model: _Model, p: SyntheticParams, folder: Path, plan: list[tuple[str, int]], progress: bool
) -> tuple[Tensor, Tensor]:
    """Generate chunk by chunk straight into the shard files; returns the CSR (indptr, indices)."""
    counts: list[Tensor] = []
    indices: list[Tensor] = []
    chunk_index = 0
    bar = progress_bar(total=p.n_tokens, unit="tok", unit_scale=True, desc="synthetic data", enabled=progress)
    with bar:
        for name, rows in plan:
            shard = np.lib.format.open_memmap(folder / name, "w+", np.float32, (rows, p.d_in))
            for start in range(0, rows, p.chunk_tokens):
                n = min(p.chunk_tokens, rows - start)
                x, row_counts, cols = _sample_chunk(model, p, n, _generator(p.data_seed, chunk_index + 1))
                shard[start : start + n] = x.numpy()
                counts.append(row_counts)
                indices.append(cols)
                chunk_index += 1
                bar.update(n)
            shard.flush()
            del shard
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(counts).cumsum(0)])
    return indptr, torch.cat(indices)


def _generate(p: SyntheticParams, folder: Path, progress: bool) -> None:
    """Write shards, ground truth and (last) the manifest of data set p into folder."""
    model = _build_model(p)
    plan = _shard_plan(p.n_tokens)
    indptr, indices = _write_shards(model, p, folder, plan, progress)
    tensors = {
        "features": model.features,
        "bias": model.bias,
        "firing_prob": model.firing_prob.float(),
        "parent": model.parent,
        "active_indptr": indptr,
        "active_indices": indices,
    }
    if p.feature_magnitude_spread > 0:  # only then, so the default ground truth keeps its tensors
        tensors["magnitude"] = model.magnitude
    metadata = {"generator_version": str(GENERATOR_VERSION), **{k: str(v) for k, v in p.identity().items()}}
    save_file(tensors, folder / GROUND_TRUTH, metadata=metadata)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "params": p.identity(),
        "n_tokens": p.n_tokens,
        "d_in": p.d_in,
        "mean_l0": int(indptr[-1]) / p.n_tokens,
        "shards": [{"file": name, "rows": rows} for name, rows in plan],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
