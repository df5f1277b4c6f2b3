"""Score an SAE by the language model's own loss: splice its reconstruction into the forward pass.

On held-out text (the documents a harvest kept out of its shards) a causal LM is run three ways:
clean; with the hooked layer's output replaced by zeros (zero ablation); and replaced by the SAE's
reconstruction. Only the positions the SAE was trained on are replaced (padding and a dropped BOS keep
their clean values), so the three differ exactly where the SAE is responsible. Then

    ce_loss_score = (CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean)   (1 = lossless)
    delta_lm_loss = CE_sae - CE_clean                                             (nats per token)

with CE the mean next-token cross-entropy over real (non-padding) tokens. The SAE applies to raw
activations as saved (`sae.safetensors` folds the scale in). The clean and zero-ablation losses do
not depend on the SAE and are computed once per process for each setting, so a sweep pays for them
once per worker.

    python -m sae_sweep.lm_eval RUN_DIR [harvest=DIR] [tokens=N] [batch_size=N] [device=cpu]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from sae_sweep import rundir
from sae_sweep.config import LMEvalConfig
from sae_sweep.errors import ConfigError, SaeSweepError
from sae_sweep.harvest import read_manifest
from sae_sweep.harvest.config import HOOKS, HarvestConfig
from sae_sweep.harvest.hooks import (
    LayerSite,
    find_blocks,
    find_site,
    hooked,
    is_causal_lm,
    load_model,
    resolve_model,
)
from sae_sweep.harvest.text import Batch, Framing, batches, framing, resolve_text
from sae_sweep.models import load_sae
from sae_sweep.models.base import SAE

__all__ = ["LMEvalConfig", "check_lm_eval", "lm_eval_metrics", "main"]


@dataclass(frozen=True)
class _Settings:
    """Everything that decides which tokens are evaluated, and how."""

    model: str
    layer: int
    hook: str
    text: str
    text_field: str
    holdout_fraction: float
    context_length: int
    dtype: str
    drop_bos: bool
    prepend_bos: bool
    tokens: int
    batch_size: int
    device: str


def _settings(lm_cfg: Any, harvest_dir: str | Path | None) -> _Settings:
    """lm_cfg's values, the harvest manifest's where lm_cfg leaves them null, then harvest defaults."""

    folder = getattr(lm_cfg, "harvest", None) or harvest_dir
    manifest = read_manifest(folder) if folder else None
    if folder and manifest is None and not getattr(lm_cfg, "model", None):
        allowed = "a harvest folder holding manifest.json (from python -m sae_sweep.harvest)"
        raise ConfigError("eval.lm.harvest", str(folder), allowed)
    from_manifest = dict((manifest or {}).get("settings", {}))
    defaults = asdict(HarvestConfig(model="", layer=0, out=""))
    values: dict[str, Any] = {}
    for f in fields(_Settings):
        given = getattr(lm_cfg, f.name, None)
        values[f.name] = given if given is not None else from_manifest.get(f.name, defaults.get(f.name))
    for key in ("model", "layer"):
        if values[key] in (None, ""):
            allowed = "a value, or a harvest folder (eval.lm.harvest) whose manifest names it"
            raise ConfigError(f"eval.lm.{key}", None, allowed)
    return _Settings(**values)


@dataclass
class _Heldout:
    """The held-out batches of one setting, their clean and zero-ablation losses, and each batch's input
    to the hooked block (so an SAE's pass starts there instead of at the embeddings)."""

    batches: list[Batch]
    block_inputs: list[Tensor] | None  # None when the blocks do not return bare tensors (then no skip)
    ce_clean: float
    ce_zero: float
    n: int


# Baselines per setting: a sweep worker scores many SAEs against the same model and text.
_HELDOUT: dict[_Settings, _Heldout] = {}


def _model(s: _Settings) -> tuple[nn.Module, Any]:

    model, tokenizer, _ = load_model(s.model, causal_lm=True, dtype=s.dtype, device=s.device)
    if not is_causal_lm(model.config):
        archs = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        raise ConfigError("eval.lm.model", s.model, f"a causal language model (this one is {archs})")
    return model, tokenizer


def _heldout_batches(s: _Settings, tokenizer: Any, frame: Framing) -> list[Batch]:

    source = resolve_text(s.text, s.text_field, s.holdout_fraction)
    out, n = [], 0
    docs = source.indexed("heldout")
    for batch in batches(docs, tokenizer, frame, s.context_length, s.batch_size, s.drop_bos):
        out.append(batch)
        n += int(_targets(batch.attention_mask).sum())
        if n >= s.tokens:
            break
    if not out:
        allowed = "text with held-out documents (harvest with holdout_fraction > 0 over more documents)"
        raise ConfigError("eval.lm.text", s.text, allowed)
    return out


def _targets(mask: Tensor) -> Tensor:
    """[B, T-1]: positions whose next token is real (both it and the next are not padding)."""
    return mask[:, 1:].bool() & mask[:, :-1].bool()


class _PassThrough(nn.Module):
    """Stands in for a block before the hooked one: its work is replaced by the cached result."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@contextmanager
def _start_at(model: nn.Module, layer: int, block_input: Tensor | None) -> Iterator[None]:
    """Run blocks `layer`.. only, block `layer` reading block_input (its clean input) instead."""

    if block_input is None or layer == 0:
        yield
        return
    _, blocks = find_blocks(model)
    skipped = [blocks[i] for i in range(layer)]
    handle = blocks[layer].register_forward_pre_hook(lambda _m, args: (block_input, *args[1:]))
    try:
        for i in range(layer):
            blocks[i] = _PassThrough()
        yield
    finally:
        handle.remove()
        for i, block in enumerate(skipped):
            blocks[i] = block


def _ce_sum(
    model: nn.Module,
    site: LayerSite,
    batch: Batch,
    replace: Callable[[Tensor], Tensor] | None,
    start: tuple[int, Tensor | None] = (0, None),
) -> tuple[float, int]:
    """(summed next-token cross-entropy, token count) with the site's output optionally replaced.

    start: (block index, that block's clean input for this batch) to skip the blocks before it.
    """

    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    keep = batch.keep.to(device)[..., None]
    splice = None if replace is None else (lambda out: torch.where(keep, replace(out), out))
    with (
        hooked(site.module, splice) if splice else nullcontext(),
        _start_at(model, *start),
        torch.inference_mode(),
    ):
        logits = model(input_ids=ids, attention_mask=mask).logits
    valid = _targets(mask)
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return float(losses[valid.flatten()].sum()), int(valid.sum())


def _clean_pass(
    model: nn.Module, site: LayerSite, layer: int, batch: Batch
) -> tuple[float, int, Tensor | None]:
    """The clean loss of one batch, and the hooked block's input when its blocks return bare tensors."""

    _, blocks = find_blocks(model)
    seen: dict[str, Any] = {}

    def grab_input(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen["input"] = args[0] if args and isinstance(args[0], Tensor) else None

    def grab_output(_m: nn.Module, _args: Any, out: Any) -> None:
        seen["bare"] = isinstance(out, Tensor)

    handles = [blocks[layer].register_forward_pre_hook(grab_input)]
    handles.append(blocks[max(layer - 1, 0)].register_forward_hook(grab_output))
    try:
        ce, n = _ce_sum(model, site, batch, None)
    finally:
        for h in handles:
            h.remove()
    return ce, n, seen.get("input") if seen.get("bare") else None


def _heldout(s: _Settings, model: nn.Module, tokenizer: Any, site: LayerSite) -> _Heldout:

    if s not in _HELDOUT:
        held = _heldout_batches(s, tokenizer, framing(tokenizer, s.prepend_bos))
        clean = [_clean_pass(model, site, s.layer, b) for b in held]
        inputs = [c[2] for c in clean]
        block_inputs = None if any(x is None for x in inputs) else [x for x in inputs if x is not None]
        zero = [_ce_sum(model, site, b, torch.zeros_like) for b in held]
        n = sum(c[1] for c in clean)
        ce_clean, ce_zero = sum(c[0] for c in clean) / n, sum(v for v, _ in zero) / n
        _HELDOUT.clear()  # one setting at a time: its block inputs are held in memory
        _HELDOUT[s] = _Heldout(held, block_inputs, ce_clean, ce_zero, n)
    return _HELDOUT[s]


def _reconstruct(sae: SAE, input_scale: float) -> Callable[[Tensor], Tensor]:
    sae_device = next(sae.parameters()).device

    def run(out: Tensor) -> Tensor:
        x = out.to(sae_device, torch.float32) * input_scale
        return (sae.decode(sae.encode(x)) / input_scale).to(out.device, out.dtype)

    return run


def check_lm_eval(lm_cfg: Any, harvest_dir: str | Path | None = None) -> None:
    """Fail before training, without loading the model: settings, model location and text must resolve."""

    s = _settings(lm_cfg, harvest_dir)
    resolve_model(s.model)
    resolve_text(s.text, s.text_field, s.holdout_fraction)
    if s.hook not in HOOKS:
        raise ConfigError("eval.lm.hook", s.hook, "one of " + ", ".join(HOOKS))
    if s.tokens < 1 or s.batch_size < 1:
        raise ConfigError("eval.lm.tokens", s.tokens, "tokens and batch_size positive integers")


def lm_eval_metrics(
    sae: SAE, lm_cfg: Any, harvest_dir: str | Path | None = None, input_scale: float = 1.0
) -> dict[str, float]:
    """ce_loss_score, delta_lm_loss and the three losses for an SAE with encode/decode.

    lm_cfg: an LMEvalConfig (or any object/DictConfig with its fields); harvest_dir: the harvest folder
    to read model/layer/hook/text from when lm_cfg.harvest is null (the trainer passes data.path).
    input_scale: 1 for a saved SAE (load_sae: raw activations); the scale factor for a model still in
    training, which works on raw activations * scale (its reconstruction is divided by it again).
    """

    s = _settings(lm_cfg, harvest_dir)
    model, tokenizer = _model(s)
    site = find_site(model, s.layer, s.hook)
    held = _heldout(s, model, tokenizer, site)
    ce_clean, ce_zero, n = held.ce_clean, held.ce_zero, held.n
    recon = _reconstruct(sae, input_scale)
    starts = held.block_inputs or [None] * len(held.batches)
    ce_sae = (
        sum(
            _ce_sum(model, site, b, recon, (s.layer, x))[0] for b, x in zip(held.batches, starts, strict=True)
        )
        / n
    )
    span = ce_zero - ce_clean
    return {
        "ce_loss_score": (ce_zero - ce_sae) / span if span != 0 else float("nan"),
        "delta_lm_loss": ce_sae - ce_clean,
        "ce_loss_clean": ce_clean,
        "ce_loss_sae": ce_sae,
        "ce_loss_zero_ablation": ce_zero,
        "lm_eval_tokens": n,
    }


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print((__doc__ or "").split("\n\n")[-1].strip())
        return 0

    run_dir = Path(argv[0])
    try:
        overrides = OmegaConf.from_dotlist(argv[1:])
        lm_cfg = OmegaConf.merge(OmegaConf.structured(LMEvalConfig), overrides)
        harvest_dir = ((rundir.read_config(run_dir) or {}).get("data") or {}).get("path")
        metrics = lm_eval_metrics(load_sae(run_dir), lm_cfg, harvest_dir)
    except (SaeSweepError, OmegaConfBaseException) as err:
        print(f"sae_sweep.lm_eval: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
