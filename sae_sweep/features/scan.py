"""One pass of an SAE over held-out rows: per-latent density, activation histogram, top and random rows.

Rows are the run's held-out split (whole chunks of consecutive shard rows, so a row's neighbours in its
chunk are the tokens around it in its document). For every latent the pass keeps the `top` rows where
it fires hardest and `random` rows drawn uniformly among the rows where it fires at all (each firing
gets a random key; the smallest keys are kept), so a page can show typical contexts, not only extremes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_sweep.data.plan import Span, first_rows
from sae_sweep.data.shards import ActivationDataset
from sae_sweep.models.base import SAE
from sae_sweep.progress import progress_bar

# Activation histograms: log10 of positive activations in fixed bins, so pages and runs compare.
HIST_LO, HIST_HI, HIST_BINS = -3.0, 4.0, 56


@dataclass
class ScanResult:
    spans: list[Span]  # the scanned rows: held-out chunks in the split's order
    offsets: np.ndarray  # scan row of each span's first row
    n_rows: int
    counts: torch.Tensor  # [H] rows where the latent fired (> 0)
    hist: torch.Tensor  # [H, HIST_BINS] counts of log10(activation)
    top_values: torch.Tensor  # [K, H] descending; -inf where fewer rows fired
    top_rows: torch.Tensor  # [K, H] scan row of each, -1 where none
    random_rows: torch.Tensor  # [R, H] scan rows drawn among the firing ones, -1 where none

    @property
    def density(self) -> torch.Tensor:
        return self.counts.double() / max(self.n_rows, 1)

    def locate(self, row: int) -> tuple[int, int]:
        """(span index, offset within the span) of a scan row."""
        j = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return j, row - int(self.offsets[j])


def encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return sae.encode(x.to(next(sae.parameters()).device)).float().cpu()


def scan(
    sae: SAE,
    ds: ActivationDataset,
    *,
    max_tokens: int,
    top: int,
    random: int,
    batch_size: int,
    seed: int,
    progress: bool,
) -> ScanResult:
    spans = first_rows(ds.test_chunks, max_tokens)
    hidden = int(sae.W_dec.shape[0])
    counts = torch.zeros(hidden, dtype=torch.long)
    hist = torch.zeros(hidden * HIST_BINS, dtype=torch.long)
    top_values = torch.full((top, hidden), -torch.inf)
    top_rows = torch.full((top, hidden), -1, dtype=torch.long)
    keys = torch.full((random, hidden), torch.inf)
    random_rows = torch.full((random, hidden), -1, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    offsets = np.concatenate([[0], np.cumsum([s.rows for s in spans])[:-1]]).astype(np.int64)
    n_rows = int(sum(s.rows for s in spans))
    bar = progress_bar(total=n_rows, unit="tok", desc="features", enabled=progress)
    for span, offset in zip(spans, offsets, strict=True):
        x = torch.empty(span.rows, ds.d_in)
        ds.shards[span.shard].read_into(span.start, span.stop, x)
        for a in range(0, span.rows, batch_size):
            f = encode(sae, x[a : a + batch_size])
            rows = torch.arange(len(f)) + int(offset) + a
            fired = f > 0
            counts += fired.sum(0)
            r, c = fired.nonzero(as_tuple=True)
            bins = ((f[r, c].log10() - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS).long()
            hist.index_add_(0, c * HIST_BINS + bins.clamp(0, HIST_BINS - 1), torch.ones_like(c))
            top_values, top_rows = _keep_largest(top_values, top_rows, f, rows, top)
            key = torch.where(fired, torch.rand(f.shape, generator=gen), torch.inf)
            neg, random_rows = _keep_largest(-keys, random_rows, -key, rows, random)
            keys = -neg
            bar.update(len(f))
    bar.close()
    top_rows[~torch.isfinite(top_values)] = -1
    random_rows[~torch.isfinite(keys)] = -1
    return ScanResult(
        spans, offsets, n_rows, counts, hist.view(hidden, HIST_BINS), top_values, top_rows, random_rows
    )


def _keep_largest(
    values: torch.Tensor, rows: torch.Tensor, new: torch.Tensor, new_rows: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the k largest of the kept values and a new batch's, with their rows."""
    both = torch.cat([values, new])
    best, at = both.topk(min(k, len(both)), dim=0)
    all_rows = torch.cat([rows, new_rows[:, None].expand_as(new)])
    return best, all_rows.gather(0, at)


def read_window(ds: ActivationDataset, span: Span, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a span (offsets within it) as float32."""
    x = torch.empty(stop - start, ds.d_in)
    ds.shards[span.shard].read_into(span.start + start, span.start + stop, x)
    return x


def shard_name(ds: ActivationDataset, span: Span) -> str:
    return Path(ds.shards[span.shard].path).name
