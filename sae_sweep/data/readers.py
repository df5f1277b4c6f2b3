"""Shard files: one small reader per format (.npy, .pt, .safetensors), each checked from its header.

A shard holds one 2-D float tensor [tokens, d_in]. Opening a folder reads only the headers: a file of
another shape, dtype or width is refused there, naming it. Reads convert to float32 and refuse
NaN/inf, naming the file and the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
