"""A folder of activation shards -> a seeded held-out split and shuffled batches in bounded memory.

Every shard (.npy, .pt or .safetensors holding one 2-D float tensor [tokens, d_in]) is checked from its
header when the folder is opened, and cut into chunks of `chunk_tokens` rows; a seeded set of whole
chunks is held out for evaluation. Each training epoch permutes the train chunks, lays them end to end
and cuts that stream into buffers of a fixed row count (the most whole batches that fit in
`buffer_mb`). Fixed-size buffers make the batch count the same every epoch and let any (epoch, batch)
position be reached by computing the plan instead of reading what comes before it. One background
thread reads the next buffer while the current one is served, so at most two buffers are in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from safetensors import safe_open

from sae_sweep.errors import DataError

SHARD_SUFFIXES = (".npy", ".pt", ".safetensors")
RESERVED_NAMES = ("ground_truth.safetensors",)  # written beside synthetic shards; never a shard
TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAFETENSORS_FLOATS = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
MIB = 2**20
BYTES_PER_VALUE = 4  # buffers hold float32 whatever the shard's dtype

# Tags that keep the random streams of the split, epochs, buffers, scale and sample independent.
_SPLIT, _EPOCH, _ROWS, _SCALE, _SAMPLE = range(1, 6)

T = TypeVar("T")


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


# ---------------------------------------------------------------------------------------------------
# Shards: one small reader per format, each checked from its header only


@dataclass(frozen=True)
class Shard:
    """One file of the folder. Reads convert to float32 and refuse NaN/inf, naming file and rows."""

    path: Path
    n_rows: int
    d_in: int
    dtype: str

    def read_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Fill `out` (float32 [stop - start, d_in], contiguous) with rows [start, stop)."""
        self._read_into(start, stop, out)
        _require_finite(self.path, out, np.arange(start, stop))

    def read_rows(self, rows: np.ndarray) -> torch.Tensor:
        """The given (sorted) rows as float32 [len(rows), d_in]."""
        x = self._read_rows(rows).to(torch.float32).contiguous()
        _require_finite(self.path, x, rows)
        return x

    def _read_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _read_rows(self, rows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class NpyShard(Shard):
    offset: int  # bytes before the data
    np_dtype: np.dtype
    fortran_order: bool

    @classmethod
    def open(cls, path: Path) -> NpyShard:
        arr = np.load(path, mmap_mode="r")  # parses the header and checks the file is long enough
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):  # either byte order
            raise DataError(path, f"has dtype {arr.dtype}; {_FLOATS_ALLOWED}")
        n_rows, d_in = _check_shape(path, arr.shape)
        fortran = not arr.flags.c_contiguous
        return cls(path, n_rows, d_in, str(arr.dtype), arr.offset, arr.dtype, fortran)

    def _read_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        if self.fortran_order:  # rows are not contiguous on disk: let numpy gather them
            np.copyto(out.numpy(), np.load(self.path, mmap_mode="r")[start:stop], casting="same_kind")
            return
        # Plain reads into the buffer (no mmap): one copy from the page cache, and nothing stays mapped,
        # so the process's resident memory is the buffers, not the files.
        direct = self.np_dtype == np.float32
        dest = out.numpy() if direct else np.empty((stop - start, self.d_in), self.np_dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start * self.d_in * self.np_dtype.itemsize)
            _read_exact(f, dest, self.path)
        if not direct:
            with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused just after
                np.copyto(out.numpy(), dest, casting="same_kind")

    def _read_rows(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.load(self.path, mmap_mode="r")[rows]))


@dataclass(frozen=True)
class PtShard(Shard):
    key: str | None  # the dict key holding the tensor, or None when the file is a bare tensor

    @classmethod
    def open(cls, path: Path) -> PtShard:
        obj = torch.load(path, mmap=True, weights_only=True)  # maps the storage; reads no data
        key = None
        if isinstance(obj, dict):
            tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1 or len(obj) != 1:
                raise DataError(
                    path,
                    f"holds a dict with keys {sorted(map(str, obj))}; a .pt shard must be "
                    "a tensor or a dict holding exactly one tensor",
                )
            key = tensors[0]
            tensor = obj[key]
        elif isinstance(obj, torch.Tensor):
            tensor = obj
        else:
            raise DataError(
                path,
                f"holds a {type(obj).__name__}; a .pt shard must be a tensor or a dict "
                "holding exactly one tensor",
            )
        if tensor.dtype not in TORCH_FLOATS:
            raise DataError(path, f"has dtype {tensor.dtype}; {_FLOATS_ALLOWED}")
        n_rows, d_in = _check_shape(path, tuple(tensor.shape))
        return cls(path, n_rows, d_in, str(tensor.dtype).removeprefix("torch."), key)

    def _tensor(self) -> torch.Tensor:
        # Mapped afresh on each read and dropped after: pages read do not stay in resident memory.
        obj = torch.load(self.path, mmap=True, weights_only=True)
        return obj if self.key is None else obj[self.key]

    def _read_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        out.copy_(self._tensor()[start:stop])

    def _read_rows(self, rows: np.ndarray) -> torch.Tensor:
        return self._tensor()[torch.from_numpy(rows)]


@dataclass(frozen=True)
class SafetensorsShard(Shard):
    name: str

    @classmethod
    def open(cls, path: Path) -> SafetensorsShard:
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
            if len(names) != 1:
                raise DataError(
                    path,
                    f"holds {len(names)} tensors {names[:5]}; a .safetensors shard must hold exactly one",
                )
            view = f.get_slice(names[0])
            dtype, shape = view.get_dtype(), tuple(view.get_shape())
        if dtype not in SAFETENSORS_FLOATS:
            raise DataError(path, f"has dtype {dtype}; {_FLOATS_ALLOWED}")
        n_rows, d_in = _check_shape(path, shape)
        return cls(path, n_rows, d_in, str(SAFETENSORS_FLOATS[dtype]).removeprefix("torch."), names[0])

    def _read_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        with safe_open(self.path, framework="pt") as f:
            out.copy_(f.get_slice(self.name)[start:stop])

    def _read_rows(self, rows: np.ndarray) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            view = f.get_slice(self.name)
            return torch.cat([view[r : r + 1] for r in rows.tolist()])


_FLOATS_ALLOWED = "shards must hold floats (float16, bfloat16, float32 or float64)"
_OPENERS: dict[str, Callable[[Path], Shard]] = {
    ".npy": NpyShard.open,
    ".pt": PtShard.open,
    ".safetensors": SafetensorsShard.open,
}


def _check_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise DataError(path, f"has shape {list(shape)} ({len(shape)}-D); a shard must be 2-D [tokens, d_in]")
    if shape[0] == 0:
        raise DataError(path, "has zero rows (shape [0, ...]); remove it or write some tokens into it")
    if shape[1] == 0:
        raise DataError(path, "has zero columns (d_in = 0)")
    return int(shape[0]), int(shape[1])


def _read_exact(f: Any, dest: np.ndarray, path: Path) -> None:
    view = dest.data.cast("B")  # the array's own buffer: readinto fills it in place
    while len(view):
        n = f.readinto(view)
        if not n:
            raise DataError(path, "ends before the rows its header announces (truncated file?)")
        view = view[n:]


def _require_finite(path: Path, x: torch.Tensor, rows: np.ndarray) -> None:
    """Refuse NaN/inf (also values too large for float32) before anything trains on them."""
    # Row sums carry any NaN/inf and allocate one value per row (torch.isfinite would allocate x.abs());
    # a sum that merely overflows sends us to the exact check below, which then passes.
    if bool(torch.isfinite(x.sum(dim=1)).all()):
        return
    finite = torch.isfinite(x).all(dim=1)
    if bool(finite.all()):
        return
    bad = rows[(~finite).nonzero().flatten().numpy()]
    raise DataError(
        path,
        f"rows {rows[0]}-{rows[-1]} hold NaN or inf values (bad rows: {len(bad)}, first at "
        f"row {bad[0]}); clean or drop them: training on them would poison the SAE",
    )


def open_shard(path: Path) -> Shard:
    """Check one file from its header; any failure becomes a DataError naming the file."""
    try:
        return _OPENERS[path.suffix.lower()](path)
    except DataError:
        raise
    except Exception as err:  # each library has its own errors for corrupt files
        problem = f"cannot be read as a {path.suffix} shard ({type(err).__name__}: {err})"
        raise DataError(path, problem) from err


def shard_files(folder: Path) -> list[Path]:
    """The shard files of a folder, sorted by name (other files are ignored)."""
    if not folder.is_dir():
        raise DataError(folder, "is not a folder (data.path must be a folder of activation shards)")
    files = sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in SHARD_SUFFIXES and p.name not in RESERVED_NAMES
        ),
        key=lambda p: p.name,
    )
    if not files:
        raise DataError(
            folder,
            f"holds no shard files: expected files ending in {', '.join(SHARD_SUFFIXES)} "
            f"({', '.join(RESERVED_NAMES)} is not a shard)",
        )
    return files


def open_shards(folder: Path) -> list[Shard]:
    shards = [open_shard(p) for p in shard_files(folder)]
    first = shards[0]
    for shard in shards[1:]:
        if shard.d_in != first.d_in:
            raise DataError(
                shard.path,
                f"has d_in {shard.d_in} but {first.path.name} has d_in {first.d_in}: "
                "every shard must have the same width",
            )
    return shards


# ---------------------------------------------------------------------------------------------------
# Plans: chunks, the split and epoch buffers are computed from shard lengths alone


def _rng(*key: int) -> np.random.Generator:
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
    order = _rng(seed, _SPLIT).permutation(len(chunks))
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


# ---------------------------------------------------------------------------------------------------
# The dataset


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
        order = _rng(self.seed, _EPOCH, epoch).permutation(len(self.train_chunks))
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
        order = torch.from_numpy(_rng(self.seed, _ROWS, plan.epoch, plan.index).permutation(plan.n_rows))
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
        order = _rng(self.seed, _SCALE).permutation(len(self.train_chunks))
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
        picks = np.sort(_rng(self.seed, _SAMPLE).choice(self.n_train_tokens, size=n, replace=False))
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
