"""Which trials a worker trains together (`train_pack`), and how many.

Trials can share batches when their composed configs agree on the data, batch_size and device (the
"stream key"); they may differ in anything else. A grid point's parameters (and a retry's) are known
before it starts, so its key is computed from them; a search's budget slot gets its parameters from the
sampler only when taken, so slots are packable only when no swept key can change the stream.

How many (`sweep.pack`, null = auto): a pack saves a pass over the data, the data set-up (scale factor,
init sample) and the per-batch work of reading, shuffling and copying, once per member; it costs memory
(every member's weights and Adam state stay resident) and, for a search, the sampler learns from a pack
only once all of it is done, and the median pruner compares with completed trials only. So auto packs up to
8 grid points or 4 search trials, as many as fit in a quarter of the device's memory, no more than the
worker's share of the unfinished trials among the study's live workers (sweep/roster.py), and (with
pruning on) only once the pruner has its `sweep.pruner_startup_trials` completed trials.
benchmarks/sweep_packing.py measures what packing gains.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from sae_sweep.config import resolve_recipe
from sae_sweep.sweep.queue import known_params
from sae_sweep.train.loop import stream_key

AUTO_MAX_GRID = 8
AUTO_MAX_SEARCH = 4
MEMORY_SHARE = 0.25  # of RAM (CPU) or GPU memory that a pack's resident weights and Adam state may use


def data_width(cfg: DictConfig) -> int | None:
    """d_in of the data a config names, from its settings or the first shard's header; None if unreadable
    (the trial itself then reports why)."""
    if cfg.data.kind == "synthetic":
        return int(cfg.data.d_in)
    try:
        from pathlib import Path

        from sae_sweep.data.readers import open_shards

        return open_shards(Path(cfg.data.path))[0].d_in
    except Exception:
        return None


def member_bytes(cfg: DictConfig, d_in: int) -> int:
    """Resident bytes one member adds to a pack: fp32 weights, gradients and two Adam moments."""
    hidden, _, _ = resolve_recipe(cfg.model.name, d_in, cfg.hidden_dim, cfg.l1_lambda, cfg.lr)
    n_params = 2 * d_in * hidden + hidden + d_in + hidden  # W_enc, W_dec, biases, (threshold)
    return 4 * 4 * n_params


def device_memory(device: str) -> int:
    """Total memory of the device trials run on (bytes)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class Packer:
    """Stream keys of a sweep's trials, and the pack size for a first member."""

    def __init__(self, plan: Any, study: Any, compose: Callable[[dict[str, Any]], DictConfig]) -> None:
        self.plan, self.plan_study, self._compose = plan, study, compose
        self._keys: dict[str, str] = {}
        dims = plan.space.dims
        base = {d.name: d.probe_values()[0] for d in dims}
        self.base_key = self.key_of(base)
        # swept keys that change the stream (data.*, batch_size, device, ...), found by composing
        self.stream_dims = [
            d.name
            for d in dims
            if any(self.key_of({**base, d.name: v}) != self.base_key for v in d.probe_values())
        ]

    def key_of(self, params: dict[str, Any]) -> str:
        cache = json.dumps(params, sort_keys=True, default=str)
        if cache not in self._keys:
            self._keys[cache] = stream_key(self._compose(params))
        return self._keys[cache]

    def key_of_waiting(self, t: FrozenTrial) -> str | None:
        """The stream key a WAITING trial will have, or None when its sampler has yet to decide it."""
        if not self.stream_dims:  # no swept key changes the stream: every trial shares it
            return self.base_key
        params = known_params(t)
        return None if params is None else self.key_of(params)

    def limit(self, cfg: DictConfig) -> tuple[int, str]:
        """(most members for a pack led by a trial with config `cfg`, why that many)."""
        setting = self.plan.settings.pack
        if setting is not None:
            return int(setting), f"sweep.pack={setting}"
        if self.plan.pruning:  # the pruner compares with completed trials: a pack of fresh ones has none
            need = int(self.plan.settings.pruner_startup_trials)
            done = len(self.plan_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            if done < need:
                return 1, f"auto: not until the pruner has its {need} completed trials ({done} so far)"
        cap = AUTO_MAX_GRID if self.plan.sampler == "grid" else AUTO_MAX_SEARCH
        why = f"auto: up to {cap} for a {'grid' if cap == AUTO_MAX_GRID else 'search'}"
        d_in = data_width(cfg)
        if d_in is None:
            return 1, "auto: the data could not be read ahead"
        fit = max(1, int(MEMORY_SHARE * device_memory(str(cfg.device)) // member_bytes(cfg, d_in)))
        if fit < cap:
            cap, why = fit, f"auto: {fit} fit in a quarter of the memory"
        return cap, why
