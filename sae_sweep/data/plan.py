"""Plans: chunks, the train/test split and epoch buffers, computed from shard lengths alone.

Every shard is cut into chunks of `chunk_tokens` rows; a seeded set of whole chunks is held out. An
epoch lays the permuted train chunks end to end and cuts the stream into fixed-size buffers, so any
(epoch, batch) position is reached by computing its plan instead of reading what comes before it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sae_sweep.data.readers import Shard
from sae_sweep.errors import DataError

# Tags that keep the random streams of the split, epochs, buffers, scale and sample independent.
SPLIT, EPOCH, ROWS, SCALE, SAMPLE = range(1, 6)


class Span(NamedTuple):
    """Rows [start, stop) of shard number `shard`: a chunk, or the part of one that falls in a buffer."""

    shard: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class BufferPlan:
    """One shuffle buffer of an epoch: which rows it reads and which batches of the epoch it serves."""

    epoch: int
    index: int  # buffer number within the epoch
    first_batch: int  # index within the epoch of this buffer's first batch
    n_batches: int
    spans: tuple[Span, ...]

    @property
    def n_rows(self) -> int:
        return sum(s.rows for s in self.spans)


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k % 2**64 for k in key])  # seeds may be negative


def make_chunks(shards: list[Shard], chunk_tokens: int) -> list[Span]:
    return [
        Span(i, a, min(a + chunk_tokens, s.n_rows))
        for i, s in enumerate(shards)
        for a in range(0, s.n_rows, chunk_tokens)
    ]


def split_chunks(
    chunks: list[Span], test_fraction: float, seed: int, folder: Path, chunk_tokens: int
) -> tuple[list[Span], list[Span]]:
    """(train, test): a seeded set of whole chunks holding about test_fraction of the tokens is test.

    Train comes in file order (each epoch permutes it); test in the seeded order, so evaluating only
    the first tokens of the test split still samples chunks from all over the data.
    """
    total = sum(c.rows for c in chunks)
    if len(chunks) < 2:
        raise DataError(
            folder,
            f"holds {total} tokens = 1 chunk of data.chunk_tokens={chunk_tokens}; the "
            "train/test split needs at least 2 chunks (lower data.chunk_tokens)",
        )
    order = seeded_rng(seed, SPLIT).permutation(len(chunks))
    covered = np.cumsum([chunks[i].rows for i in order])
    n_test = int(np.argmin(np.abs(covered - test_fraction * total))) + 1
    n_test = min(max(n_test, 1), len(chunks) - 1)
    test = [chunks[i] for i in order[:n_test]]
    train = sorted(chunks[i] for i in order[n_test:])
    return train, test


def cut_spans(stream: Iterable[Span], size: int) -> list[list[Span]]:
    """Lay spans end to end and cut every `size` rows (a span may be split across two pieces)."""
    pieces: list[list[Span]] = []
    current: list[Span] = []
    filled = 0
    for span in stream:
        start = span.start
        while start < span.stop:
            take = min(span.stop - start, size - filled)
            current.append(Span(span.shard, start, start + take))
            filled, start = filled + take, start + take
            if filled == size:
                pieces.append(current)
                current, filled = [], 0
    if current:
        pieces.append(current)
    return pieces


def first_rows(spans: Iterable[Span], max_tokens: int | None) -> list[Span]:
    """The spans covering the first max_tokens rows (all when None), the last one cut short."""
    if max_tokens is None:
        return list(spans)
    cut = cut_spans(spans, max_tokens) if max_tokens > 0 else []
    return cut[0] if cut else []
