"""The feature browser: static HTML pages that show what an SAE's latents respond to.

    python -m sae_sweep.features RUN_DIR [latents=48] [top_contexts=8] ...   # RUN_DIR/features/index.html

For a trained run (its config.yaml names the data, sae.safetensors the SAE) the SAE is run over the
held-out split and a sample of latents is shown: every alive latent up to `latents`, ordered by
density; beyond that the `extremes` densest and rarest and a seeded random draw of the rest. Each
latent's page has its density and activation histogram and, when the data came from
`python -m sae_sweep.harvest` (token provenance: document, position, token id per row), its
top-activating held-out contexts with every token shaded by the latent's activation, a few contexts
drawn at random among all activating ones, and for a causal LM the tokens its decoder direction
promotes and suppresses through the unembedding: W_dec[i] @ W_U^T, with the final norm's scale folded
into W_U (as TransformerLens folds it), in logits per unit of activation. On data without tokens the
pages keep the density and activation histograms. `features.json` holds the same content for notebooks
(`sae_sweep.features.context_html` renders one context as the pages do). No server, no script: the
files open from disk in any browser.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from sae_sweep import rundir
from sae_sweep.checks import check_device, resolve_device
from sae_sweep.errors import ConfigError, DataError
from sae_sweep.features.page import context_html, write_pages
from sae_sweep.features.scan import ScanResult, encode, read_window, scan, shard_name

__all__ = ["FeaturesConfig", "build_features", "context_html", "FEATURES_DIR"]

FEATURES_DIR = "features"
INDEX = "index.html"
DATA = "features.json"


@dataclass
class FeaturesConfig:
    latents: int = 48  # latents shown: all alive ones up to this many (by density), else a sample
    extremes: int = 8  # when sampling: always include this many of the densest and of the rarest
    top_contexts: int = 8  # highest-activating held-out contexts per latent
    random_contexts: int = 4  # further activating contexts drawn at random (top ones alone mislead)
    before: int = 16  # tokens shown before the activating token (within its document)
    after: int = 4  # tokens shown after it
    logits: int = 10  # promoted / suppressed tokens listed per latent (causal LMs)
    tokens: int = 100_000  # held-out rows scanned (the run's test split, up to this many)
    batch_size: int = 2048  # rows per SAE forward
    seed: int = 0  # the latent sample and the random contexts
    device: str = "cpu"  # where the SAE and the language model run: cpu | cuda | auto
    out: str | None = None  # output folder; null = RUN_DIR/features
    progress: bool = True  # progress bar while scanning


def parse_args(argv: list[str]) -> tuple[Path, FeaturesConfig]:
    from omegaconf.errors import OmegaConfBaseException

    if not argv or "=" in argv[0]:
        raise ConfigError("RUN_DIR", None, "a run directory first (python -m sae_sweep.features RUN_DIR ...)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FeaturesConfig), OmegaConf.from_dotlist(argv[1:]))
        cfg: FeaturesConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", "") or argv[1:])
        raise ConfigError(
            key, None, f"keys of FeaturesConfig with values of their type ({err.msg})"
        ) from None
    for key in ("latents", "top_contexts", "tokens", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(key, getattr(cfg, key), "a positive integer")
    for key in ("extremes", "random_contexts", "before", "after", "logits"):
        if getattr(cfg, key) < 0:
            raise ConfigError(key, getattr(cfg, key), "an integer >= 0")
    check_device(cfg.device)
    return Path(argv[0]), cfg


def _open_run(run_dir: Path, device: str) -> tuple[Any, Any, dict[str, Any]]:
    from sae_sweep.data import open_dataset
    from sae_sweep.models import load_sae

    config = rundir.read_config(run_dir)
    if config is None or not (run_dir / rundir.SAE).is_file():
        allowed = f"a finished run directory ({rundir.CONFIG} and {rundir.SAE})"
        raise ConfigError("RUN_DIR", str(run_dir), allowed)
    sae = load_sae(run_dir, device=_device(device))
    ds = open_dataset(OmegaConf.create(config["data"]), progress=False)
    return sae, ds, config


def _device(name: str) -> str:
    return str(resolve_device(name))


def select_latents(density: torch.Tensor, limit: int, extremes: int, seed: int) -> list[int]:
    """Alive latents, densest first: all of them up to `limit`, else the extremes plus a seeded draw."""
    alive = [int(i) for i in torch.argsort(density, descending=True, stable=True) if density[i] > 0]
    if len(alive) <= limit:
        return alive
    ends = min(extremes, limit // 2)
    keep = set(alive[:ends]) | set(alive[len(alive) - ends :])
    middle = alive[ends : len(alive) - ends]
    rng = np.random.default_rng(seed)
    keep |= {middle[i] for i in rng.choice(len(middle), size=limit - len(keep), replace=False)}
    return [i for i in alive if i in keep]


@dataclass
class _Text:
    """What turns provenance into text: the tokenizer, document names and, for causal LMs, W_U."""

    tokenizer: Any
    doc_names: list[str]
    unembed: torch.Tensor | None  # [vocab, d_in], final norm scale folded in


def _text_side(manifest: dict[str, Any] | None, device: str) -> _Text | None:
    if manifest is None or "provenance" not in manifest:
        return None
    from sae_sweep.harvest.hooks import load_model
    from sae_sweep.harvest.text import resolve_text

    name = manifest.get("model_path") or manifest["model"]
    if not Path(name).exists():
        name = manifest["model"]
    causal = bool(manifest.get("causal_lm"))
    model, tokenizer, _ = load_model(name, causal_lm=causal, dtype="float32", device=_device(device))
    settings = manifest.get("settings", {})
    source = resolve_text(
        manifest["text"], settings.get("text_field", "text"), settings.get("holdout_fraction", 0)
    )
    unembed = unembedding(model) if causal else None
    return _Text(tokenizer, source.names(), unembed)


# Final norms applied just before the LM head, by the attribute paths the common families use.
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm")


def unembedding(model: Any) -> torch.Tensor:
    """W_U [vocab, d_model] of a causal LM with its final norm's elementwise scale folded in."""
    W_U = model.get_output_embeddings().weight.detach().float()
    for path in _FINAL_NORMS:
        try:
            norm = model.get_submodule(path)
        except AttributeError:
            continue
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.shape == (W_U.shape[1],):
            return W_U * weight.detach().float()
    return W_U


def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, latents: list[int], k: int) -> list[dict[str, Any]]:
    """Per latent: the k token ids its decoder row raises most and lowers most, with the logit change."""
    effects = W_dec[latents].float().to(W_U.device) @ W_U.T  # [n, vocab]
    up, down = effects.topk(k, dim=1), effects.topk(k, dim=1, largest=False)
    return [
        {
            "promotes": list(zip(up.indices[i].tolist(), up.values[i].tolist(), strict=True)),
            "suppresses": list(zip(down.indices[i].tolist(), down.values[i].tolist(), strict=True)),
        }
        for i in range(len(latents))
    ]


def _contexts(
    sae: Any, ds: Any, result: ScanResult, latent: int, rows: list[int], cfg: FeaturesConfig, folder: Path
) -> list[dict[str, Any]]:
    from sae_sweep.harvest import read_provenance

    out = []
    for row in rows:
        j, at = result.locate(row)
        span = result.spans[j]
        prov = read_provenance(folder, shard_name(ds, span))
        if prov is None:
            continue
        tokens = np.asarray(prov[span.start : span.stop])
        a, b = max(0, at - cfg.before), min(span.rows, at + cfg.after + 1)
        same = tokens[a:b, 0] == tokens[at, 0]  # stay inside the activating token's document
        first = a + int(np.argmax(same))
        last = b - int(np.argmax(same[::-1]))
        acts = encode(sae, read_window(ds, span, first, last))[:, latent]
        out.append(
            {
                "row": row,
                "shard": shard_name(ds, span),
                "shard_row": span.start + at,
                "doc": int(tokens[at, 0]),
                "pos": int(tokens[at, 1]),
                "center": at - first,
                "token_ids": tokens[first:last, 2].tolist(),
                "acts": acts.tolist(),
            }
        )
    return out


def build_features(run_dir: str | Path, cfg: FeaturesConfig | None = None) -> Path:
    """Write the browser of one run; returns the path of its index.html."""
    from sae_sweep.harvest import read_manifest

    cfg = cfg or FeaturesConfig()
    run_dir = Path(run_dir)
    sae, ds, config = _open_run(run_dir, cfg.device)
    if not ds.test_chunks:
        raise DataError(ds.path, "has no held-out split to show contexts from")
    result = scan(
        sae, ds, max_tokens=cfg.tokens, top=cfg.top_contexts, random=cfg.random_contexts,
        batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress,
    )  # fmt: skip
    latents = select_latents(result.density, cfg.latents, cfg.extremes, cfg.seed)
    manifest = read_manifest(ds.path) if config["data"].get("kind") == "shards" else None
    text = _text_side(manifest, cfg.device)
    effects = (
        logit_effects(sae.W_dec.detach(), text.unembed, latents, cfg.logits)
        if text and text.unembed is not None
        else None
    )
    records = []
    for n, latent in enumerate(latents):
        record: dict[str, Any] = {
            "latent": latent,
            "density": float(result.density[latent]),
            "count": int(result.counts[latent]),
            "max_act": float(result.top_values[0, latent]),
            "hist": result.hist[latent].tolist(),
        }
        if text is not None:
            top_rows = [int(r) for r in result.top_rows[:, latent] if r >= 0]
            random_rows = [int(r) for r in result.random_rows[:, latent] if r >= 0 and int(r) not in top_rows]
            record["top"] = _contexts(sae, ds, result, latent, top_rows, cfg, ds.path)
            record["random"] = _contexts(sae, ds, result, latent, random_rows, cfg, ds.path)
        if effects is not None:
            record.update(effects[n])
        records.append(record)
    out = Path(cfg.out) if cfg.out else run_dir / FEATURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    metrics = rundir.read_metrics(run_dir) or {}
    summary = {
        "run_dir": str(run_dir.resolve()),
        "data": str(ds.path),
        "architecture": sae.metadata.get("architecture"),  # type: ignore[union-attr]
        "d_in": ds.d_in,
        "hidden": int(sae.W_dec.shape[0]),
        "rows_scanned": result.n_rows,
        "alive": int((result.counts > 0).sum()),
        "metrics": {
            k: metrics[k]
            for k in ("l0", "explained_variance", "dead_frac", "ce_loss_score", "delta_lm_loss")
            if k in metrics
        },
        "model": manifest.get("model") if manifest else None,
        "hook_name": manifest.get("hook_name") if manifest else None,
        "has_text": text is not None,
        "density_hist": _density_hist(result.density),
        "latents": records,
    }
    if text is not None:
        ids = {t for r in records for c in (*r["top"], *r["random"]) for t in c["token_ids"]}
        ids |= {t for r in records for t, _ in (*r.get("promotes", []), *r.get("suppresses", []))}
        summary["vocab"] = {str(t): text.tokenizer.decode([t]) for t in sorted(ids)}
        summary["doc_names"] = {
            str(d): text.doc_names[d] for d in {c["doc"] for r in records for c in (*r["top"], *r["random"])}
        }
    rundir.write_json(out / DATA, summary)
    write_pages(summary, out)
    return out / INDEX


def _density_hist(density: torch.Tensor) -> dict[str, Any]:
    """log10 density of the alive latents in 0.25-wide bins from 1e-6, plus the dead count."""
    alive = density[density > 0]
    edges = np.arange(-6.0, 0.01, 0.25)
    counts, _ = np.histogram(np.clip(np.log10(alive.numpy()), -6, 0), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "dead": int((density == 0).sum())}
