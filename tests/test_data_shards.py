"""Shard reader: every format reads back, bad data is refused by name, and the stream is seeded,
resumable, shuffled across shards and bounded in memory."""

import itertools
import math
import re
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from sae_sweep.config import DataConfig
from sae_sweep.data import ActivationDataset, open_dataset
from sae_sweep.data.plan import Span
from sae_sweep.data.readers import Shard
from sae_sweep.errors import DataError

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


def span_ids(spans):
    return set(itertools.chain.from_iterable(range(s.start, s.stop) for s in spans))


def global_ids(ds, spans):
    return {int(ds.row_offsets[s.shard]) + r for s in spans for r in range(s.start, s.stop)}


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


def test_train_split_smaller_than_a_batch_is_refused(tmp_path):
    folder, _ = make_folder(tmp_path, lengths=(50, 50))
    ds = dataset(folder, chunk_tokens=10)
    with pytest.raises(DataError, match="fewer than batch_size=1000"):
        next(ds.train_batches(1000))


def test_too_few_chunks_for_a_split_is_refused(tmp_path):
    folder, _ = make_folder(tmp_path, lengths=(50,))
    with pytest.raises(DataError, match="at least 2 chunks"):
        dataset(folder, chunk_tokens=100)


# ----- split


def test_split_is_seeded_disjoint_and_covers_everything(tmp_path):
    folder, x = make_folder(tmp_path)
    a, b, c = dataset(folder, seed=1), dataset(folder, seed=1), dataset(folder, seed=2)
    assert a.test_chunks == b.test_chunks and a.train_chunks == b.train_chunks
    assert set(a.test_chunks) != set(c.test_chunks)
    train, test = global_ids(a, a.train_chunks), global_ids(a, a.test_chunks)
    assert not train & test and train | test == set(range(len(x)))
    assert a.n_train_tokens == len(train) and a.n_test_tokens == len(test)
    assert abs(len(test) / len(x) - 0.1) < 0.05
    assert all(s.rows <= 100 for s in a.chunks)


def test_split_keeps_at_least_one_chunk_on_each_side(tmp_path):
    folder, _ = make_folder(tmp_path, lengths=(300,))
    assert len(dataset(folder, test_fraction=0.001).test_chunks) == 1
    assert len(dataset(folder, test_fraction=0.999).train_chunks) == 1


# ----- training stream


def test_one_epoch_visits_train_rows_at_most_once_and_counts_are_fixed(tmp_path):
    folder, _ = make_folder(tmp_path)
    ds = dataset(folder)
    train = global_ids(ds, ds.train_chunks)
    for epoch in (0, 1):
        batches = one_epoch(ds, 32, epoch)
        assert [(e, b) for e, b, _ in batches] == [(epoch, b) for b in range(ds.batches_per_epoch(32))]
        ids = torch.cat([x[:, 0] for *_, x in batches]).long().tolist()
        assert len(ids) == len(set(ids)) == ds.batches_per_epoch(32) * 32 and set(ids) <= train
        assert ds.n_train_tokens - len(ids) < 32  # only the epoch's last partial batch is dropped
        assert all(x.shape == (32, D) and x.dtype == torch.float32 and x.is_contiguous() for *_, x in batches)
    assert sum(p.n_batches for p in ds.epoch_plan(3, 32)) == ds.batches_per_epoch(32)


def test_batches_mix_rows_from_several_shards(tmp_path):
    folder, _ = make_folder(tmp_path)
    ds = dataset(folder, buffer_mb=1)
    shards_per_batch = [len(set(x[:, 1].tolist())) for *_, x in one_epoch(ds, 32)]
    assert min(shards_per_batch) >= 2 and np.mean(shards_per_batch) > 3


def test_epochs_differ_and_same_seed_repeats(tmp_path):
    folder, _ = make_folder(tmp_path)
    first = [x for *_, x in one_epoch(dataset(folder), 32)]
    again = [x for *_, x in one_epoch(dataset(folder), 32)]
    other = [x for *_, x in one_epoch(dataset(folder), 32, epoch=1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path):
    folder, _ = make_folder(tmp_path)
    ds = dataset(folder)
    per_epoch = ds.batches_per_epoch(32)
    straight = list(itertools.islice(ds.train_batches(32), 3 * per_epoch))
    starts = [(0, 0), (0, 3), (0, 5), (0, per_epoch - 1), (1, 0), (1, 7), (2, per_epoch - 2), (0, 47)]
    for epoch, batch in starts:
        start = epoch * per_epoch + batch
        resumed = list(itertools.islice(ds.train_batches(32, epoch, batch), 3 * per_epoch - start))
        assert [(e, b) for e, b, _ in resumed] == [(e, b) for e, b, _ in straight[start:]]
        assert all(torch.equal(r[2], s[2]) for r, s in zip(resumed, straight[start:], strict=True))


def test_resume_reads_nothing_before_its_buffer(tmp_path, monkeypatch):
    folder, _ = make_folder(tmp_path)
    ds = dataset(folder)
    reads, lock = [], threading.Lock()
    original = Shard.read_into

    def recording(self, start, stop, out):
        with lock:
            reads.append(Span(ds.shards.index(self), start, stop))
        original(self, start, stop, out)

    monkeypatch.setattr(Shard, "read_into", recording)
    *_, target, following = ds.epoch_plan(0, 32)
    batches = ds.train_batches(32, 0, target.first_batch + 1)  # mid-buffer, late in the epoch
    assert next(batches)[:2] == (0, target.first_batch + 1)
    batches.close()
    assert reads[: len(target.spans)] == list(target.spans)
    assert len(reads) <= len(target.spans) + len(following.spans)  # at most the prefetch of the next buffer


def test_buffers_respect_the_memory_bound(tmp_path, monkeypatch):
    folder, _ = make_folder(tmp_path)
    ds = dataset(folder, buffer_mb=0.01)
    bound_rows = 0.01 * 2**20 // (4 * D)
    plans = ds.epoch_plan(0, 32)
    assert len(plans) > 3 and all(p.n_rows <= bound_rows for p in plans)
    assert all(p.n_rows == ds.buffer_rows(32) for p in plans[:-1])
    assert max(p.n_rows for p in ds.epoch_plan(0, 500)) == 500  # a batch larger than the bound: one batch

    # The prefetching stream holds at most two buffers at any time.
    alive, original = [], ds._load_buffer

    def tracked(plan, skip):
        result = original(plan, skip)
        alive.append(weakref.ref(result[2]))
        return result

    monkeypatch.setattr(ds, "_load_buffer", tracked)
    peak = 0
    for _ in itertools.islice(ds.train_batches(32), 2 * ds.batches_per_epoch(32)):
        peak = max(peak, sum(r() is not None for r in alive))
    assert len(alive) > 10 and peak <= 2


# ----- evaluation, scale, sample


def test_test_batches_have_fixed_order_and_cover_the_test_split(tmp_path):
    folder, _ = make_folder(tmp_path)
    ds = dataset(folder, test_fraction=0.2)
    batches = list(ds.test_batches(64))
    assert all(len(x) == 64 for x in batches[:-1]) and 0 < len(batches[-1]) <= 64
    ids = torch.cat(batches)[:, 0].long().tolist()
    assert len(ids) == len(set(ids)) and set(ids) == global_ids(ds, ds.test_chunks)
    assert all(torch.equal(a, b) for a, b in zip(batches, ds.test_batches(64), strict=True))
    capped = torch.cat(list(ds.test_batches(64, max_tokens=150)))
    assert torch.equal(capped, torch.cat(batches)[:150])
    with pytest.raises(DataError, match="no ground truth"):
        next(ds.test_batches(64, with_truth=True))


def test_test_batches_pass_global_rows_to_the_ground_truth(tmp_path):
    folder, _ = make_folder(tmp_path)

    class RowTruth:  # stands in for synthetic.GroundTruth: the mask is the global row, one-hot
        def active_mask(self, rows):
            return torch.nn.functional.one_hot(rows, 3000).bool()

    ds = ActivationDataset(folder, seed=0, chunk_tokens=100, test_fraction=0.1, ground_truth=RowTruth())
    for x, mask in ds.test_batches(64, with_truth=True):
        assert torch.equal(mask.float().argmax(1), x[:, 0].long())


def test_estimate_scale_matches_a_hand_computation(tmp_path):
    folder, x = make_folder(tmp_path, d=64)
    ds = dataset(folder)
    train = torch.tensor(sorted(global_ids(ds, ds.train_chunks)))
    mean_norm = x[train].double().norm(dim=1).mean().item()
    scale, raw = ds.estimate_scale(10**9)
    assert raw == pytest.approx(mean_norm, rel=1e-6)
    assert scale == pytest.approx(math.sqrt(64) / mean_norm, rel=1e-6)
    assert ds.estimate_scale(250) == ds.estimate_scale(250) != (scale, raw)


def test_sample_is_seeded_distinct_and_from_train(tmp_path):
    folder, x = make_folder(tmp_path)
    ds = dataset(folder)
    s = ds.sample(400)
    ids = s[:, 0].long()
    assert s.shape == (400, D) and len(set(ids.tolist())) == 400
    assert set(ids.tolist()) <= global_ids(ds, ds.train_chunks) and torch.equal(s, x[ids])
    assert torch.equal(s, dataset(folder).sample(400))
    assert not torch.equal(s, dataset(folder, seed=5).sample(400))
    assert len(ds.sample(10**9)) == ds.n_train_tokens


@pytest.mark.parametrize("as_dictconfig", [False, True])
def test_open_dataset_reads_a_shards_config(tmp_path, as_dictconfig):
    folder, _ = make_folder(tmp_path)
    cfg = DataConfig(kind="shards", path=str(folder), chunk_tokens=100, test_fraction=0.1, shuffle_seed=3)
    ds = open_dataset(OmegaConf.structured(cfg) if as_dictconfig else cfg)
    assert ds.ground_truth is None and ds.test_chunks == dataset(folder, seed=3).test_chunks
