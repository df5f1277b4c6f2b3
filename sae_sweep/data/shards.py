"""A folder of activation shards -> a seeded held-out split and shuffled batches in bounded memory.

Every shard (.npy, .pt or .safetensors holding one 2-D float tensor [tokens, d_in]) is checked from its
header when the folder is opened, and cut into chunks of `chunk_tokens` rows; a seeded set of whole
chunks is held out for evaluation. Each training epoch permutes the train chunks, lays them end to end
and cuts that stream into buffers of a fixed row count (the most whole batches that fit in
`buffer_mb`). Fixed-size buffers make the batch count the same every epoch and let any (epoch, batch)
position be reached by computing the plan instead of reading what comes before it. One background
thread reads the next buffer while the current one is served, so at most two buffers are in memory.

The file formats are read in data/readers.py; the chunk, split and buffer plans live in data/plan.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from sae_sweep.data.plan import (
    EPOCH,
    ROWS,
    SAMPLE,
    SCALE,
    BufferPlan,
    Span,
    cut_spans,
    first_rows,
    make_chunks,
    seeded_rng,
    split_chunks,
)
from sae_sweep.data.readers import open_shards
from sae_sweep.errors import DataError

MIB = 2**20
BYTES_PER_VALUE = 4  # buffers hold float32 whatever the shard's dtype

T = TypeVar("T")


def prefetched(jobs: Iterable[Callable[[], T]]) -> Iterator[T]:
    """Each job's result, with the next job already running in a background thread.

    At most two results are alive (the one in use and the one being made) as long as the caller drops
    its reference before asking for the next.
    """
    jobs = iter(jobs)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae-sweep-data") as pool:
        pending = _submit_next(pool, jobs)
        try:
            while pending is not None:
                result = pending.result()
                pending = _submit_next(pool, jobs)
                yield result
                del result
        finally:
            if pending is not None:
                pending.cancel()


def _submit_next(pool: ThreadPoolExecutor, jobs: Iterator[Callable[[], T]]) -> Future[T] | None:
    job = next(jobs, None)
    return None if job is None else pool.submit(job)


class ActivationDataset:
    """A checked folder of shards with its seeded split; every read is streamed and bounded."""

    def __init__(
        self,
        path: str | Path,
        *,
        seed: int,
        chunk_tokens: int = 4096,
        test_fraction: float = 0.01,
        buffer_mb: float = 512,
        ground_truth: object | None = None,
    ) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens}")
        self.path = Path(path)
        self.seed, self.chunk_tokens, self.buffer_mb = seed, chunk_tokens, buffer_mb
        self.ground_truth = ground_truth
        self.shards = open_shards(self.path)
        self.d_in = self.shards[0].d_in
        # Global row = row index across the shards in name order (what ground truth is indexed by).
        self.row_offsets = np.concatenate([[0], np.cumsum([s.n_rows for s in self.shards])[:-1]])
        self.chunks = make_chunks(self.shards, chunk_tokens)
        self.train_chunks, self.test_chunks = split_chunks(
            self.chunks, test_fraction, seed, self.path, chunk_tokens
        )
        self.n_train_tokens = sum(c.rows for c in self.train_chunks)
        self.n_test_tokens = sum(c.rows for c in self.test_chunks)

    def __repr__(self) -> str:
        return (
            f"ActivationDataset('{self.path}', {len(self.shards)} shards, d_in={self.d_in}, "
            f"train={self.n_train_tokens}, test={self.n_test_tokens} tokens)"
        )

    # ----- training stream

    def buffer_rows(self, batch_size: int) -> int:
        """Rows per shuffle buffer: the most whole batches that fit in buffer_mb (at least one batch)."""
        fit = int(self.buffer_mb * MIB) // (BYTES_PER_VALUE * self.d_in)
        return max(1, fit // batch_size) * batch_size

    def batches_per_epoch(self, batch_size: int) -> int:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if self.n_train_tokens < batch_size:
            raise DataError(
                self.path,
                f"the train split has {self.n_train_tokens} tokens, fewer than "
                f"batch_size={batch_size}: lower batch_size or add data",
            )
        # Every buffer but the last holds whole batches, so only the epoch's last < batch_size rows drop.
        return self.n_train_tokens // batch_size

    def epoch_plan(self, epoch: int, batch_size: int) -> list[BufferPlan]:
        """The buffers of one epoch, computed from shard lengths alone (nothing is read)."""
        self.batches_per_epoch(batch_size)  # validates batch_size against the split
        order = seeded_rng(self.seed, EPOCH, epoch).permutation(len(self.train_chunks))
        size = self.buffer_rows(batch_size)
        plans = []
        for index, spans in enumerate(cut_spans((self.train_chunks[i] for i in order), size)):
            n_batches = sum(s.rows for s in spans) // batch_size
            if n_batches:  # only the last buffer can be too short for a batch: never read it
                plans.append(BufferPlan(epoch, index, index * (size // batch_size), n_batches, tuple(spans)))
        return plans

    def train_batches(
        self, batch_size: int, start_epoch: int = 0, start_batch: int = 0
    ) -> Generator[tuple[int, int, torch.Tensor], None, None]:  # close() ends its prefetch early
        """Endless (epoch, batch index within the epoch, x raw float32 [batch_size, d_in]).

        Deterministic from (seed, epoch): starting at (e, b) yields exactly what an uninterrupted
        iterator yields from there, reading only the buffers from b's on.
        """
        per_epoch = self.batches_per_epoch(batch_size)
        start_epoch, start_batch = start_epoch + start_batch // per_epoch, start_batch % per_epoch
        jobs = (
            partial(self._load_buffer, plan, skip)
            for plan, skip in self._plans_from(batch_size, start_epoch, start_batch)
        )
        for plan, skip, buf, order in prefetched(jobs):
            for b in range(skip, plan.n_batches):
                rows = order[b * batch_size : (b + 1) * batch_size]
                yield plan.epoch, plan.first_batch + b, buf.index_select(0, rows)
            del buf, order  # before the next buffer is awaited: at most two buffers alive

    def _plans_from(self, batch_size: int, epoch: int, batch: int) -> Iterator[tuple[BufferPlan, int]]:
        """Endless (buffer plan, batches to skip in it) from a position on."""
        while True:
            for plan in self.epoch_plan(epoch, batch_size):
                if plan.first_batch + plan.n_batches > batch:
                    yield plan, max(0, batch - plan.first_batch)
            epoch, batch = epoch + 1, 0

    def _load_buffer(self, plan: BufferPlan, skip: int) -> tuple[BufferPlan, int, torch.Tensor, torch.Tensor]:
        buf = torch.empty(plan.n_rows, self.d_in, dtype=torch.float32)
        at = 0
        for span in plan.spans:
            self.shards[span.shard].read_into(span.start, span.stop, buf[at : at + span.rows])
            at += span.rows
        # Row order within the buffer mixes the chunks (and so the shards) it holds.
        order = torch.from_numpy(seeded_rng(self.seed, ROWS, plan.epoch, plan.index).permutation(plan.n_rows))
        return plan, skip, buf, order

    # ----- evaluation, scale and samples

    def test_batches(
        self, batch_size: int, max_tokens: int | None = None, with_truth: bool = False
    ) -> Iterator[Any]:
        """Held-out x raw float32 [<= batch_size, d_in] in a fixed order (all full but the last).

        with_truth=True yields (x, active_mask [rows, n_features]) from the synthetic ground truth.
        """
        if with_truth and self.ground_truth is None:
            raise DataError(self.path, "has no ground truth: with_truth needs data.kind=synthetic")
        spans = first_rows(self.test_chunks, max_tokens)
        for x, rows in _rebatch(prefetched(partial(self._read_span, s) for s in spans), batch_size):
            yield (x, self.ground_truth.active_mask(rows)) if with_truth else x  # type: ignore[union-attr]

    def estimate_scale(self, max_tokens: int) -> tuple[float, float]:
        """(sqrt(d_in) / mean ||x||, mean ||x||) over up to max_tokens train tokens (whole chunks in a
        seeded order, the last one cut short)."""
        order = seeded_rng(self.seed, SCALE).permutation(len(self.train_chunks))
        spans = first_rows((self.train_chunks[i] for i in order), max_tokens)
        norm_sum, count = 0.0, 0
        for x, _ in prefetched(partial(self._read_span, s) for s in spans):
            norm_sum += torch.linalg.vector_norm(x, dim=1).double().sum().item()
            count += len(x)
        mean_norm = norm_sum / max(count, 1)
        if not mean_norm > 0:
            raise DataError(
                self.path,
                f"the {count} train tokens read all have norm 0: cannot estimate a "
                "scale factor (set data.scale_factor)",
            )
        return math.sqrt(self.d_in) / mean_norm, mean_norm

    def sample(self, n_tokens: int) -> torch.Tensor:
        """min(n_tokens, n_train_tokens) train tokens drawn at random (seeded), raw float32, in file order."""
        n = min(n_tokens, self.n_train_tokens)
        picks = np.sort(seeded_rng(self.seed, SAMPLE).choice(self.n_train_tokens, size=n, replace=False))
        lengths = np.array([c.rows for c in self.train_chunks])
        ends = np.cumsum(lengths)
        which = np.searchsorted(ends, picks, side="right")
        shard_ids = np.array([c.shard for c in self.train_chunks])[which]
        rows = np.array([c.start for c in self.train_chunks])[which] + picks - (ends - lengths)[which]
        parts = [self.shards[s].read_rows(rows[shard_ids == s]) for s in np.unique(shard_ids)]
        return torch.cat(parts) if parts else torch.empty(0, self.d_in)

    def _read_span(self, span: Span) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of one span as float32, with their global row indices."""
        x = torch.empty(span.rows, self.d_in, dtype=torch.float32)
        self.shards[span.shard].read_into(span.start, span.stop, x)
        first = int(self.row_offsets[span.shard]) + span.start
        return x, torch.arange(first, first + span.rows)


def _rebatch(
    pieces: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Regroup (x, rows) pieces into batches of exactly `size` rows, the last one possibly shorter."""
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    filled = 0
    for x, rows in pieces:
        while len(x):
            take = min(size - filled, len(x))
            held.append((x[:take], rows[:take]))
            x, rows, filled = x[take:], rows[take:], filled + take
            if filled == size:
                yield _concat(held)
                held, filled = [], 0
    if held:
        yield _concat(held)


def _concat(held: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(held) == 1:
        return held[0]
    return torch.cat([x for x, _ in held]), torch.cat([r for _, r in held])
