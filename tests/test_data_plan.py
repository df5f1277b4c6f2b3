"""Plans from shard lengths alone: chunks, the seeded train/test split, and spans cut into buffers."""

from pathlib import Path

import numpy as np
import pytest
from shard_files import dataset, global_ids, make_folder

from sae_sweep.data.plan import BufferPlan, Span, cut_spans, first_rows, make_chunks, seeded_rng, split_chunks
from sae_sweep.data.readers import Shard
from sae_sweep.errors import DataError


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


def test_too_few_chunks_for_a_split_is_refused(tmp_path):
    folder, _ = make_folder(tmp_path, lengths=(50,))
    with pytest.raises(DataError, match="at least 2 chunks"):
        dataset(folder, chunk_tokens=100)


def test_train_chunks_come_in_file_order_and_test_chunks_in_the_seeded_order():
    chunks = make_chunks([Shard(Path(f"s{i}.npy"), 1000, 4, "float32") for i in range(10)], 100)
    train, test = split_chunks(chunks, 0.3, 7, Path("acts"), 100)
    assert train == sorted(train) and len(test) == 30
    assert test != sorted(test)  # evaluating only the first test tokens still reaches all over the data
    assert split_chunks(chunks, 0.3, 7, Path("acts"), 100) == (train, test)


# ----- chunks and spans


def test_shards_are_cut_into_chunks_that_never_cross_a_shard():
    shards = [Shard(Path("a.npy"), 250, 4, "float32"), Shard(Path("b.npy"), 100, 4, "float32")]
    assert make_chunks(shards, 100) == [
        Span(0, 0, 100),
        Span(0, 100, 200),
        Span(0, 200, 250),
        Span(1, 0, 100),
    ]
    assert [c.rows for c in make_chunks(shards, 100)] == [100, 100, 50, 100]


def test_spans_laid_end_to_end_are_cut_every_size_rows_splitting_a_span_across_pieces():
    stream = [Span(0, 0, 100), Span(1, 0, 50), Span(0, 100, 130)]
    assert cut_spans(stream, 70) == [
        [Span(0, 0, 70)],
        [Span(0, 70, 100), Span(1, 0, 40)],
        [Span(1, 40, 50), Span(0, 100, 130)],  # the last piece holds what is left
    ]
    assert [sum(s.rows for s in piece) for piece in cut_spans(stream, 60)] == [60, 60, 60]
    plan = BufferPlan(epoch=0, index=1, first_batch=2, n_batches=1, spans=(Span(0, 70, 100), Span(1, 0, 40)))
    assert plan.n_rows == 70


def test_first_rows_covers_exactly_the_first_tokens_asked_for():
    spans = [Span(2, 0, 100), Span(0, 300, 350), Span(1, 0, 100)]
    assert first_rows(spans, None) == spans
    assert first_rows(spans, 120) == [Span(2, 0, 100), Span(0, 300, 320)]
    assert first_rows(spans, 100) == [Span(2, 0, 100)]
    assert first_rows(spans, 10**6) == spans
    assert first_rows(spans, 0) == []


def test_seeds_may_be_negative_and_each_tag_draws_its_own_stream():
    assert np.array_equal(seeded_rng(-3, 1).permutation(50), seeded_rng(-3, 1).permutation(50))
    assert not np.array_equal(seeded_rng(-3, 1).permutation(50), seeded_rng(3, 1).permutation(50))
    assert not np.array_equal(seeded_rng(-3, 1).permutation(50), seeded_rng(-3, 2).permutation(50))
