"""Shard folders for the data tests: shards written in every format, rows labelled so reads can be checked.

Shared by test_data_readers.py (the file formats), test_data_plan.py (chunks and the split) and
test_data_shards.py (the stream).
"""

import itertools
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from sae_sweep.data import ActivationDataset

D = 16


def write_shard(path: Path, x: torch.Tensor | np.ndarray, as_dict: bool = False) -> None:
    if path.suffix == ".npy":
        np.save(path, x.numpy() if isinstance(x, torch.Tensor) else x)
    elif path.suffix == ".pt":
        torch.save({"activations": x} if as_dict else x, path)
    else:
        save_file({"activations": torch.as_tensor(x).contiguous()}, path)


def labelled(lengths, d=D, seed=0):
    """Shards whose column 0 is the global row index and column 1 the shard index (exact in float32)."""
    gen = torch.Generator().manual_seed(seed)
    out, first = [], 0
    for i, n in enumerate(lengths):
        x = torch.randn(n, d, generator=gen)
        x[:, 0], x[:, 1] = torch.arange(first, first + n), i
        out.append(x)
        first += n
    return out


def make_folder(tmp_path, lengths=(300, 517, 1000, 183), suffix=".npy", d=D):
    xs = labelled(lengths, d)
    for i, x in enumerate(xs):
        write_shard(tmp_path / f"shard_{i:04d}{suffix}", x)
    return tmp_path, torch.cat(xs)


def dataset(folder, seed=0, chunk_tokens=100, test_fraction=0.1, buffer_mb=0.01):
    return ActivationDataset(
        folder, seed=seed, chunk_tokens=chunk_tokens, test_fraction=test_fraction, buffer_mb=buffer_mb
    )


def one_epoch(ds, batch_size, epoch=0):
    return list(itertools.islice(ds.train_batches(batch_size, epoch), ds.batches_per_epoch(batch_size)))


def global_ids(ds, spans):
    return {int(ds.row_offsets[s.shard]) + r for s in spans for r in range(s.start, s.stop)}
