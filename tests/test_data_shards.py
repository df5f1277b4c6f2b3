"""The activation stream over a folder of shards: seeded, resumable, shuffled across shards and bounded in
memory; evaluation batches, the scale estimate and samples. (The file formats are tested in
test_data_readers.py, chunks and the split in test_data_plan.py.)"""

import itertools
import math
import threading
import weakref

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from shard_files import D, dataset, global_ids, make_folder, one_epoch

from sae_sweep.config import DataConfig
from sae_sweep.data import ActivationDataset, open_dataset
from sae_sweep.data.plan import Span
from sae_sweep.data.readers import Shard
from sae_sweep.errors import DataError


def test_train_split_smaller_than_a_batch_is_refused(tmp_path):
    folder, _ = make_folder(tmp_path, lengths=(50, 50))
    ds = dataset(folder, chunk_tokens=10)
    with pytest.raises(DataError, match="fewer than batch_size=1000"):
        next(ds.train_batches(1000))


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
