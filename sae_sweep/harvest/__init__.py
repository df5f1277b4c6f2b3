"""Harvest: a transformers or GGUF model + text -> a folder of activation shards that `data=shards` reads.

    python -m sae_sweep.harvest model=PATH_OR_NAME layer=3 text=pydoc tokens=100000 out=DIR

The model runs over the text in batches; a hook captures one layer's output and stops the forward
pass there. Padding (and by option the BOS/CLS token) is dropped and the remaining rows are written
as `shard_NNNNN.npy` files of `shard_tokens` rows, each written to a temporary name and renamed when
complete, so an interrupted harvest resumes from its last whole shard when the command is run again
(the text is re-tokenized to find the place; only the model's work is skipped). `manifest.json`
records the model, layer, hook, token count, width, text source and tokenizer, and is what
`sae_sweep.lm_eval`, the feature browser and the SAELens export read.

Token provenance: `tokens/shard_NNNNN.npy` (int32 [rows, 3], written before its shard) holds, for
row r of shard NNNNN, the document number (TextSource.indexed), the position among that document's
tokens (-1 for a special token kept with drop_bos=false) and the token id. It sits in a sub-folder,
so the shard reader (which lists only the folder's own files) never opens it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from sae_sweep import rundir
from sae_sweep._version import __version__
from sae_sweep.data.readers import open_shard
from sae_sweep.errors import ConfigError
from sae_sweep.harvest.config import HarvestConfig, parse_args
from sae_sweep.harvest.hooks import capture, find_site, is_causal_lm, load_model, tokenizer_record
from sae_sweep.harvest.text import batches, framing, resolve_text
from sae_sweep.progress import progress_bar

__all__ = ["HarvestConfig", "harvest", "parse_args", "read_manifest", "read_provenance", "MANIFEST"]

MANIFEST = "manifest.json"
FORMAT = "sae_sweep.harvest/2"  # 2: token provenance (tokens/) and the tokenizer in the manifest
PROVENANCE_DIR = "tokens"
PROVENANCE_COLUMNS = ("doc", "pos", "token_id")
# Settings that decide which rows land in which shard: a re-run must match them to resume.
SAME_RUN_KEYS = (
    "model", "layer", "hook", "text", "text_field", "holdout_fraction",
    "context_length", "dtype", "drop_bos", "prepend_bos", "shard_tokens",
)  # fmt: skip
_SHARD_NAME = re.compile(r"shard_(\d{5})\.(npy|safetensors)$")


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _existing_shards(out: Path) -> list[tuple[str, int]]:
    """(file name, rows) of the whole shards already written, in order; leftovers of a kill removed."""
    for tmp in [*out.glob("shard_*.tmp"), *out.glob(f"{PROVENANCE_DIR}/shard_*.tmp")]:
        tmp.unlink()
    names = sorted(p.name for p in out.iterdir() if _SHARD_NAME.match(p.name))
    return [(name, open_shard(out / name).n_rows) for name in names]


def provenance_path(folder: str | Path, shard_file: str) -> Path:
    """The token provenance file of one shard (int32 [rows, 3]: doc, pos, token id)."""
    return Path(folder) / PROVENANCE_DIR / (shard_file.split(".")[0] + ".npy")


def read_provenance(folder: str | Path, shard_file: str) -> np.ndarray | None:
    """A shard's provenance, memory-mapped; None for a harvest written before provenance existed."""
    path = provenance_path(folder, shard_file)
    return np.load(path, mmap_mode="r") if path.is_file() else None


def _write_provenance(out: Path, index: int, tokens: torch.Tensor) -> None:
    path = provenance_path(out, f"shard_{index:05d}")
    path.parent.mkdir(exist_ok=True)
    rundir.atomic_write(path, lambda fh: np.save(fh, tokens.numpy().astype(np.int32)))


def _write_shard(out: Path, index: int, rows: torch.Tensor, tokens: torch.Tensor) -> tuple[str, int]:
    # The provenance goes first: a kill in between leaves a provenance file that the re-run rewrites.
    _write_provenance(out, index, tokens)
    # numpy has no bfloat16: those shards are .safetensors (the reader takes both)
    suffix = "safetensors" if rows.dtype == torch.bfloat16 else "npy"
    name = f"shard_{index:05d}.{suffix}"
    if suffix == "npy":
        rundir.atomic_write(out / name, lambda fh: np.save(fh, rows.numpy()))
    else:
        rundir.write_bytes(out / name, safetensors_bytes({"activations": rows.contiguous()}))
    return name, len(rows)


def _check_same_harvest(out: Path, cfg: HarvestConfig) -> dict[str, Any] | None:
    manifest = read_manifest(out)
    if manifest is None:
        if out.is_dir() and any(_SHARD_NAME.match(p.name) for p in out.iterdir()):
            allowed = "a new folder or an earlier harvest's (this one has shards but no manifest.json)"
            raise ConfigError("out", str(out), allowed)
        return None
    old = manifest.get("settings", {})
    for key in SAME_RUN_KEYS:
        if old.get(key) != getattr(cfg, key):
            raise ConfigError(
                "out", str(out),
                f"a new folder, or one harvested with the same settings to resume it ({key} was "
                f"{old.get(key)!r}, now {getattr(cfg, key)!r})",
            )  # fmt: skip
    return manifest


def harvest(cfg: HarvestConfig) -> dict[str, Any]:
    """Write (or finish) the harvest described by cfg; returns the manifest."""
    out = Path(cfg.out)
    previous = _check_same_harvest(out, cfg)
    source = resolve_text(cfg.text, cfg.text_field, cfg.holdout_fraction)
    out.mkdir(parents=True, exist_ok=True)
    shards = _existing_shards(out)
    done = sum(n for _, n in shards)
    exhausted = previous is not None and previous.get("complete") and previous.get("text_exhausted")
    if previous is not None and (exhausted or done >= cfg.tokens):
        # Nothing to add (a kill between the last shard and its manifest update is caught up here).
        _update(previous, shards, done, 0, 0.0)
        previous["d_in"] = previous.get("d_in") or open_shard(out / shards[0][0]).d_in
        previous["complete"] = True
        rundir.write_json(out / MANIFEST, previous)
        return previous

    model, tokenizer, source_path = load_model(cfg.model, causal_lm=False, dtype=cfg.dtype, device=cfg.device)
    site = find_site(model, cfg.layer, cfg.hook)
    config = model.config
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_positions and cfg.context_length > max_positions:
        allowed = f"at most {max_positions} (the model's positions)"
        raise ConfigError("context_length", cfg.context_length, allowed)
    frame = framing(tokenizer, cfg.prepend_bos and is_causal_lm(model.config))
    device = next(model.parameters()).device
    import transformers

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "model": cfg.model,
        "model_path": str(source_path.resolve()),
        "model_class": type(model).__name__,
        "causal_lm": is_causal_lm(model.config),
        "layer": cfg.layer,
        "hook": cfg.hook,
        "hook_name": site.hook_name,
        "module": site.module_name,
        "d_in": None,
        "dtype": cfg.dtype,
        "tokens": done,
        "tokens_requested": cfg.tokens,
        "complete": False,
        "text_exhausted": False,
        "text": cfg.text,
        "text_source": source.describe(),
        "context_length": cfg.context_length,
        "prefix_ids": list(frame.prefix),
        "suffix_ids": list(frame.suffix),
        "drop_bos": cfg.drop_bos,
        "tokenizer": tokenizer_record(tokenizer, source_path),
        "provenance": {"folder": PROVENANCE_DIR, "columns": list(PROVENANCE_COLUMNS), "dtype": "int32"},
        "shards": [{"file": name, "tokens": n} for name, n in shards],
        "settings": {k: v for k, v in asdict(cfg).items() if k in SAME_RUN_KEYS},
        "versions": {"sae_sweep": __version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }  # fmt: skip

    rundir.write_json(out / MANIFEST, manifest)  # before any shard, so shards never exist without one
    pending: list[torch.Tensor] = []
    pending_tokens: list[torch.Tensor] = []
    n_pending, seen, model_s, computed = 0, 0, 0.0, 0
    bar = progress_bar(total=cfg.tokens, initial=done, unit="tok", enabled=cfg.progress, desc="harvest")
    docs = source.indexed("train")
    for batch in batches(docs, tokenizer, frame, cfg.context_length, cfg.batch_size, cfg.drop_bos):
        n_keep = batch.n_keep
        if seen + n_keep <= done + n_pending:  # rows already in a shard (resuming): skip the model's work
            seen += n_keep
            continue
        start = time.perf_counter()
        inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
        acts = capture(model, site, inputs)[batch.keep.to(device)].detach().to("cpu")
        model_s += time.perf_counter() - start
        computed += n_keep
        manifest["d_in"] = int(acts.shape[-1])
        # the part of a batch that straddles the resume point, then what the budget leaves
        part = slice(done + n_pending - seen, done + n_pending - seen + cfg.tokens - done - n_pending)
        seen += n_keep
        acts, tokens = acts[part], batch.provenance()[part]
        pending.append(acts)
        pending_tokens.append(tokens)
        n_pending += len(acts)
        bar.update(len(acts))
        while n_pending >= cfg.shard_tokens or (n_pending and done + n_pending >= cfg.tokens):
            rows, row_tokens = torch.cat(pending), torch.cat(pending_tokens)
            n = cfg.shard_tokens
            shards.append(_write_shard(out, len(shards), rows[:n], row_tokens[:n]))
            done += len(rows[:n])
            pending = [rows[n:]] if len(rows) > n else []
            pending_tokens = [row_tokens[n:]] if len(rows) > n else []
            n_pending = len(rows[n:])
            _update(manifest, shards, done, computed, model_s)
            rundir.write_json(out / MANIFEST, manifest)
        if done >= cfg.tokens:
            break
    else:
        if n_pending:
            shards.append(_write_shard(out, len(shards), torch.cat(pending), torch.cat(pending_tokens)))
            done += n_pending
        manifest["text_exhausted"] = True
    bar.close()
    if not shards:
        allowed = "text that yields tokens for the shards (none left after the held-out part)"
        raise ConfigError("text", cfg.text, allowed)
    if manifest["d_in"] is None:  # everything was already written: read the width back
        manifest["d_in"] = open_shard(out / shards[0][0]).d_in
    _update(manifest, shards, done, computed, model_s)
    manifest["complete"] = True
    rundir.write_json(out / MANIFEST, manifest)
    return manifest


def _update(
    manifest: dict[str, Any], shards: list[tuple[str, int]], done: int, computed: int, model_s: float
) -> None:
    manifest["tokens"] = done
    manifest["shards"] = [{"file": name, "tokens": n} for name, n in shards]
    if model_s > 0:  # a resume that only caught up keeps the last measurement
        manifest["tokens_per_s"] = round(computed / model_s, 1)
