"""Shard files: every format reads back (as float32), and a bad file is refused by name, at open from its
header or, for NaN/inf values, when its rows are read."""

import itertools
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from shard_files import D, dataset, labelled, one_epoch, write_shard

from sae_sweep.data.readers import open_shard
from sae_sweep.errors import DataError

# ----- formats


@pytest.mark.parametrize(
    "suffix,as_dict", [(".npy", False), (".pt", False), (".pt", True), (".safetensors", False)]
)
def test_every_format_reads_back_exactly(tmp_path, suffix, as_dict):
    xs = labelled((300, 517, 1000))
    for i, x in enumerate(xs):
        write_shard(tmp_path / f"s{i}{suffix}", x, as_dict)
    ds = dataset(tmp_path)
    assert ds.d_in == D and [s.n_rows for s in ds.shards] == [300, 517, 1000]
    for shard, x in zip(ds.shards, xs, strict=True):
        out = torch.empty(shard.n_rows, D)
        shard.read_into(0, shard.n_rows, out)
        assert torch.equal(out, x)
        assert torch.equal(shard.read_rows(np.array([0, 5, 299])), x[[0, 5, 299]])
    # Batch size 1 drops nothing: one epoch plus the test split is every row exactly once.
    seen = torch.cat([x for *_, x in one_epoch(ds, 1)] + list(ds.test_batches(64)))
    assert torch.equal(seen[seen[:, 0].argsort()], torch.cat(xs))


@pytest.mark.parametrize(
    "suffix,dtype",
    [
        (".npy", torch.float16),
        (".npy", torch.float64),
        (".pt", torch.bfloat16),
        (".safetensors", torch.float16),
        (".safetensors", torch.bfloat16),
    ],
)
def test_half_and_double_are_read_as_float32(tmp_path, suffix, dtype):
    x = torch.randn(250, D).to(dtype)
    write_shard(tmp_path / f"a{suffix}", x)
    write_shard(tmp_path / f"b{suffix}", x[:120])
    ds = dataset(tmp_path)
    out = torch.empty(250, D)
    ds.shards[0].read_into(0, 250, out)
    assert out.dtype == torch.float32 and torch.equal(out, x.float())


@pytest.mark.parametrize("layout", ["fortran", "big-endian"])
def test_unusual_npy_layouts_read_back(tmp_path, layout):
    x = torch.randn(230, D).numpy()
    np.save(tmp_path / "a.npy", np.asfortranarray(x) if layout == "fortran" else x.astype(">f4"))
    np.save(tmp_path / "b.npy", x[:50])
    ds = dataset(tmp_path)
    out = torch.empty(130, D)
    ds.shards[0].read_into(100, 230, out)
    assert np.array_equal(out.numpy(), x[100:])


def test_other_files_are_ignored_and_formats_mix(tmp_path):
    xs = labelled((200, 150, 120))
    write_shard(tmp_path / "a.npy", xs[0])
    write_shard(tmp_path / "b.pt", xs[1])
    write_shard(tmp_path / "c.safetensors", xs[2])
    save_file({"features": torch.randn(3, 7)}, tmp_path / "ground_truth.safetensors")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "README").write_text("activations")
    (tmp_path / "sub.npy").mkdir()
    ds = dataset(tmp_path)
    assert [s.path.name for s in ds.shards] == ["a.npy", "b.pt", "c.safetensors"]
    assert ds.n_train_tokens + ds.n_test_tokens == 470


# ----- refusals


def _save_int(path):
    write_shard(path, torch.arange(400, dtype=torch.int32).reshape(100, 4))


BAD_FILES = {
    "1-D": lambda p: write_shard(p.with_suffix(".npy"), np.zeros(100, np.float32)),
    "3-D": lambda p: write_shard(p.with_suffix(".pt"), torch.zeros(10, 4, 4)),
    "zero rows": lambda p: write_shard(p.with_suffix(".safetensors"), torch.zeros(0, 4)),
    "int npy": lambda p: _save_int(p.with_suffix(".npy")),
    "int pt": lambda p: _save_int(p.with_suffix(".pt")),
    "int safetensors": lambda p: _save_int(p.with_suffix(".safetensors")),
    "corrupt npy": lambda p: p.with_suffix(".npy").write_bytes(b"\x93NUMPY garbage" * 10),
    "corrupt pt": lambda p: p.with_suffix(".pt").write_bytes(b"not a zip" * 10),
    "corrupt safetensors": lambda p: p.with_suffix(".safetensors").write_bytes(b"\x08" + b"\x00" * 20),
    "truncated npy": lambda p: (
        write_shard(p.with_suffix(".npy"), np.zeros((100, 4), np.float32)),
        p.with_suffix(".npy").write_bytes(p.with_suffix(".npy").read_bytes()[:-40]),
    ),
    "two tensors": lambda p: save_file(
        {"a": torch.zeros(4, 4), "b": torch.zeros(4, 4)}, p.with_suffix(".safetensors")
    ),
    "dict of two": lambda p: torch.save(
        {"a": torch.zeros(4, 4), "b": torch.zeros(4, 4)}, p.with_suffix(".pt")
    ),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_refused_at_open_naming_it(tmp_path, kind):
    write_shard(tmp_path / "a_good.npy", torch.randn(100, 4))
    BAD_FILES[kind](tmp_path / "b_bad")
    with pytest.raises(DataError, match="b_bad") as err:
        dataset(tmp_path, chunk_tokens=10)
    assert "a_good" not in str(err.value)


def test_mixed_d_in_names_both_widths_and_the_file(tmp_path):
    write_shard(tmp_path / "a.npy", torch.randn(100, 8))
    write_shard(tmp_path / "b.pt", torch.randn(100, 12))
    with pytest.raises(DataError, match=r"b\.pt.*d_in 12 but a\.npy has d_in 8"):
        dataset(tmp_path)


def test_folder_without_shards_lists_allowed_suffixes(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match=r"no shard files.*\.npy, \.pt, \.safetensors") as err:
        dataset(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="not a folder"):
        dataset(tmp_path / "missing")


@pytest.mark.parametrize(
    "bad,suffix", [(math.nan, ".npy"), (math.inf, ".pt"), (-math.inf, ".safetensors"), (1e300, ".npy")]
)
def test_nan_and_inf_are_refused_when_their_chunk_is_read(tmp_path, bad, suffix):
    x = torch.randn(400, D, dtype=torch.float64 if bad == 1e300 else torch.float32)
    x[237, 3] = bad  # 1e300 is finite in float64 but inf once converted to float32
    write_shard(tmp_path / f"bad{suffix}", x)
    write_shard(tmp_path / "good.npy", torch.randn(400, D))
    ds = dataset(tmp_path)  # the header is fine: the values are checked as chunks are read
    with pytest.raises(DataError, match=rf"bad\{suffix}.*first at row 237") as err:
        for _ in itertools.islice(ds.train_batches(16), ds.batches_per_epoch(16)):
            pass
        list(ds.test_batches(16))
    span = re.search(r"rows (\d+)-(\d+)", str(err.value))
    assert span, err.value
    first, last = map(int, span.groups())
    assert first <= 237 <= last and last - first < 100  # the range read: a chunk or its part in a buffer


def test_huge_finite_values_are_not_mistaken_for_inf(tmp_path):
    x = torch.randn(300, D)
    x[10, :4] = 3e38  # finite, but the row sums to inf
    write_shard(tmp_path / "a.npy", x)
    out = torch.empty(300, D)
    dataset(tmp_path).shards[0].read_into(0, 300, out)
    assert torch.equal(out, x)


def test_chosen_rows_with_nan_are_refused_naming_the_file_and_row(tmp_path):
    x = torch.randn(50, D)
    x[31, 2] = math.nan
    write_shard(tmp_path / "a.pt", x)
    shard = open_shard(tmp_path / "a.pt")
    assert torch.equal(shard.read_rows(np.array([3, 30, 32])), x[[3, 30, 32]])
    with pytest.raises(DataError, match=r"a\.pt.*first at row 31"):
        shard.read_rows(np.array([3, 31, 40]))
