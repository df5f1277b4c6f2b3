"""Metric definitions against hand-computed values (README "Outputs" defines them); numbers worked out in
comments."""

import io
import math

import pytest
import torch

from sae_sweep.measures import (
    DeadLatentTracker,
    EvalAccumulator,
    F1Accumulator,
    density_histogram,
    match_features,
    mcc,
)


def _t(rows: list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def _eval(x, x_hat, f=None, dec_norms=None) -> dict[str, float]:
    """One-batch evaluation; latents default to a single silent latent when the test ignores them."""
    f = torch.zeros(x.shape[0], 1) if f is None else f
    dec_norms = torch.ones(f.shape[1]) if dec_norms is None else dec_norms
    acc = EvalAccumulator(hidden=f.shape[1])
    acc.update(x, x_hat, f, dec_norms)
    return acc.compute()


# --- reconstruction ------------------------------------------------------------------------------


def test_mse_sums_over_dims_and_averages_over_tokens():
    x = _t([[1, 2], [3, 4]])
    x_hat = _t([[1, 1], [1, 4]])
    # squared errors per token: 0 + 1 = 1 and 4 + 0 = 4 -> mean over tokens 2.5
    # (a batch sum would give 5, an element mean 1.25)
    assert _eval(x, x_hat)["mse"] == pytest.approx(2.5)


def test_fvu_uses_centred_total_variance():
    x = _t([[1, 2], [3, 4]])  # mean (2, 3): centred rows (-1, -1), (1, 1) -> total variance 4
    x_hat = _t([[1, 2.5], [3, 3.5]])  # squared error 0.25 + 0.25 = 0.5
    m = _eval(x, x_hat)
    assert m["fvu"] == pytest.approx(0.5 / 4)
    assert m["fvu"] != pytest.approx(0.5 / 30)  # the uncentred formula: sum ||x||^2 = 1+4+9+16 = 30
    assert m["explained_variance"] == pytest.approx(1 - 0.125)


@pytest.mark.parametrize("value", [0.0, 0.1])
def test_fvu_is_nan_for_constant_x(value):
    x = torch.full((3, 2), value)
    m = _eval(x, x + 0.5)
    assert math.isnan(m["fvu"]) and math.isnan(m["explained_variance"])


def test_cos_sim_and_l2_ratio_skip_zero_rows():
    x = _t([[1, 0], [0, 2], [0, 0]])  # the zero row has no direction or norm to compare against
    x_hat = _t([[1, 1], [0, -1], [1, 0]])
    m = _eval(x, x_hat)
    # cos: 1 / (1 * sqrt 2) and -2 / (2 * 1); norm ratios sqrt 2 / 1 and 1 / 2
    assert m["cos_sim"] == pytest.approx((1 / math.sqrt(2) - 1) / 2)
    assert m["l2_ratio"] == pytest.approx((math.sqrt(2) + 0.5) / 2)


def test_cos_sim_is_nan_when_every_x_is_zero():
    m = _eval(torch.zeros(2, 3), torch.ones(2, 3))
    assert math.isnan(m["cos_sim"]) and math.isnan(m["l2_ratio"])


# --- sparsity ------------------------------------------------------------------------------------


def test_l0_and_l1_weight_by_decoder_norms():
    f = _t([[0, 2, 0.5], [1, 0, 0]])
    dec_norms = _t([[2, 3, 4]])[0]
    m = _eval(torch.randn(2, 4), torch.randn(2, 4), f, dec_norms)
    assert m["l0"] == pytest.approx(1.5)  # 2 and 1 active latents
    # token 0: 2*3 + 0.5*4 = 8; token 1: 1*2 = 2 -> mean 5 (unit norms would give 1.75)
    assert m["l1"] == pytest.approx(5.0)


def test_low_precision_latents_and_inputs():
    f = _t([[0, 2, 0.5], [1, 0, 0]], torch.bfloat16)
    x = _t([[1, 2], [3, 4]], torch.float16)
    m = _eval(x, _t([[1, 1], [1, 4]], torch.float16), f, _t([[2, 3, 4]])[0])
    assert (m["l0"], m["l1"], m["mse"]) == pytest.approx((1.5, 5.0, 2.5))


def test_pct_active_batch_averages_over_batches():
    acc = EvalAccumulator(hidden=4)
    x = torch.randn(2, 3)
    acc.update(x, x, _t([[1, 0, 0, 0], [0, 1, 0, 0]]), torch.ones(4))  # latents 0, 1 fired: 50%
    acc.update(x, x, _t([[0, 0, 0, 3], [0, 0, 0, 0]]), torch.ones(4))  # latent 3 fired: 25%
    assert acc.compute()["pct_active_batch"] == pytest.approx(37.5)


def test_density_and_dense_frac():
    n = 20
    f = torch.zeros(n, 4)
    f[:, 0] = 1  # density 1.0: dense
    f[:2, 1] = 1  # 2/20 = 0.1: exactly the threshold, not dense (> 0.1 is)
    f[5:8, 2] = 1  # 3/20 = 0.15: dense
    acc = EvalAccumulator(hidden=4)
    acc.update(torch.randn(n, 3), torch.randn(n, 3), f, torch.ones(4))
    assert acc.density().tolist() == pytest.approx([1.0, 0.1, 0.15, 0.0])
    m = acc.compute()
    assert m["dense_frac"] == pytest.approx(0.5)
    assert m["n_eval_tokens"] == n


def test_streaming_equals_one_batch():
    gen = torch.Generator().manual_seed(0)
    x = 1e3 + torch.randn(37, 8, generator=gen)  # a large mean makes naive variance formulas lose digits
    x_hat = x + 0.3 * torch.randn(37, 8, generator=gen)
    f = torch.relu(torch.randn(37, 5, generator=gen))
    dec_norms = torch.rand(5, generator=gen) + 0.5

    whole = EvalAccumulator(hidden=5)
    whole.update(x, x_hat, f, dec_norms)
    streamed = EvalAccumulator(hidden=5)
    for sl in (slice(0, 1), slice(1, 20), slice(20, 20), slice(20, 37)):  # incl. 1-token and empty
        streamed.update(x[sl], x_hat[sl], f[sl], dec_norms)

    a, b = whole.compute(), streamed.compute()
    for key in a.keys() - {"pct_active_batch"}:  # the old proxy depends on batching by design
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    x64, err64 = x.double(), (x - x_hat).double()
    centred = ((x64 - x64.mean(0)) ** 2).sum()
    assert b["fvu"] == pytest.approx(((err64**2).sum() / centred).item(), rel=1e-6)


def test_compute_without_data_raises():
    with pytest.raises(ValueError, match="before any"):
        EvalAccumulator(hidden=2).compute()


# --- dead latents --------------------------------------------------------------------------------


def test_dead_tracker_window_larger_than_tokens_seen():
    tr = DeadLatentTracker(hidden=3, window_tokens=100)
    assert tr.dead_frac() == 0.0 and tr.window_used() == 0  # nothing seen: no evidence of death
    tr.update(torch.tensor([True, False, False]), 30)
    tr.update(torch.tensor([False, True, False]), 30)
    # 60 tokens seen < window: dead = silent for all 60 = latent 2 only (silent 30, 0, 60)
    assert tr.window_used() == 60
    assert tr.dead_mask().tolist() == [False, False, True]
    assert tr.dead_frac() == pytest.approx(1 / 3)


def test_dead_tracker_window_smaller_than_tokens_seen():
    tr = DeadLatentTracker(hidden=3, window_tokens=100)
    tr.update(torch.tensor([True, False, False]), 30)
    tr.update(torch.tensor([False, True, False]), 30)
    tr.update(torch.tensor([False, False, False]), 50)  # silent for 80, 50, 110
    assert tr.window_used() == 100
    assert tr.dead_mask().tolist() == [False, False, True]
    tr.update(torch.tensor([False, False, False]), 20)  # silent for 100, 70, 130: 100 = window is dead
    assert tr.dead_mask().tolist() == [True, False, True]


def test_dead_tracker_state_dict_round_trip():
    tr = DeadLatentTracker(hidden=3, window_tokens=100)
    tr.update(torch.tensor([True, False, False]), 70)
    tr.update(torch.tensor([False, True, False]), 40)
    buf = io.BytesIO()
    torch.save(tr.state_dict(), buf)  # as the trainer's checkpoint does
    buf.seek(0)
    resumed = DeadLatentTracker(hidden=3, window_tokens=100)
    resumed.load_state_dict(torch.load(buf))
    for t in (tr, resumed):  # silent for 40, 0, 110 before this; 100, 60, 170 after
        t.update(torch.tensor([False, False, False]), 60)
    assert resumed.window_used() == tr.window_used() == 100
    assert resumed.dead_mask().tolist() == tr.dead_mask().tolist() == [True, False, True]


def test_dead_tracker_rejects_wrong_shapes():
    tr = DeadLatentTracker(hidden=3, window_tokens=10)
    with pytest.raises(ValueError):
        tr.update(torch.ones(4, dtype=torch.bool), 5)
    with pytest.raises(ValueError):
        tr.load_state_dict({"tokens_since_fired": torch.zeros(4, dtype=torch.long), "tokens_seen": 5})


# --- density histogram ---------------------------------------------------------------------------


def test_density_histogram_counts_never_fired_apart():
    density = torch.tensor([0.0, 0.0, 1e-3, 10**-1.5, 10**-0.5, 1.0], dtype=torch.float64)
    h = density_histogram(density, bins=3)  # log10 values -3, -1.5, -0.5, 0 span [-3, 0]
    assert h["never_fired"] == 2
    assert h["edges"] == pytest.approx([-3, -2, -1, 0])
    assert h["counts"] == [1, 1, 2]  # the last bin is closed, as in numpy
    fixed = density_histogram(density, bins=4, range_log10=(-4.0, 0.0))
    assert fixed["edges"] == pytest.approx([-4, -3, -2, -1, 0])
    assert fixed["counts"] == [0, 1, 1, 2] and fixed["never_fired"] == 2


# --- synthetic ground truth: matching, MCC, F1 --------------------------------------------------


def test_mcc_is_one_for_permuted_sign_flipped_scaled_copy():
    gen = torch.Generator().manual_seed(1)
    truth = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=1)
    perm = torch.tensor([2, 0, 3, 1])  # latent j holds true feature perm[j]
    scales = torch.tensor([[0.1], [-3.0], [2.0], [-0.5]])
    extra = torch.randn(2, 8, generator=gen)  # wider SAE: two unmatched latents
    W_dec = torch.cat([truth[perm] * scales, extra])
    assert mcc(truth, W_dec) == pytest.approx(1.0, abs=1e-6)
    true_idx, latent_idx, abs_cos = match_features(truth, W_dec)
    assert true_idx.tolist() == [0, 1, 2, 3]
    assert latent_idx.tolist() == [1, 3, 0, 2]  # the inverse permutation
    assert abs_cos.tolist() == pytest.approx([1.0] * 4, abs=1e-6)


def test_mcc_is_low_for_random_decoder_in_high_dim():
    gen = torch.Generator().manual_seed(2)
    # random directions in 1024 dims have |cos| ~ 0.025; the best matching of 16 is still small
    assert mcc(torch.randn(16, 1024, generator=gen), torch.randn(16, 1024, generator=gen)) < 0.15


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_hungarian_beats_greedy():
    truth = _t([_unit(0), _unit(60)])
    W_dec = _t([_unit(20), _unit(-40)])
    # |cos| = [[cos 20, cos 40], [cos 40, |cos 100|]] = [[.940, .766], [.766, .174]]
    # greedy takes .940 then is left with .174: mean .557; the optimum pairs crosswise: mean .766
    greedy = (math.cos(math.radians(20)) + abs(math.cos(math.radians(100)))) / 2
    assert mcc(truth, W_dec) == pytest.approx(math.cos(math.radians(40)), abs=1e-6)
    assert mcc(truth, W_dec) > greedy + 0.2
    assert match_features(truth, W_dec)[1].tolist() == [1, 0]


def test_mcc_of_a_narrow_sae_counts_its_unmatched_features_as_zero():
    truth = torch.eye(3)
    W_dec = _t([[2, 0, 0], [0, 0, -1]])
    true_idx, latent_idx, _ = match_features(truth, W_dec)
    assert true_idx.tolist() == [0, 2] and latent_idx.tolist() == [0, 1]
    assert mcc(truth, W_dec) == pytest.approx(2 / 3)  # two perfect matches, one feature unmatched
    wide = torch.cat([torch.eye(3), torch.zeros(2, 3)])
    assert mcc(truth, wide) == pytest.approx(1.0) and mcc(truth, wide) > mcc(truth, W_dec)


def test_mcc_is_nan_for_diverged_decoder():
    assert math.isnan(mcc(torch.eye(2), torch.full((2, 2), float("nan"))))


def test_f1_hand_computed_and_streamed():
    # pairs: feature 0 <-> latent 2, feature 1 <-> latent 0, feature 2 <-> latent 1
    acc = F1Accumulator(torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]))
    true_active = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    f = _t([[1, 0, 1], [0, 0, 0], [1, 0, 2], [1, 0, 0]])
    for sl in (slice(0, 1), slice(1, 4)):
        acc.update(f[sl], true_active[sl])
    out = acc.compute()
    # feature 0 fires on tokens 0, 1; latent 2 on 0, 2: tp 1, fp 1, fn 1 -> P .5, R .5, F1 .5
    # feature 1 fires on 0, 2; latent 0 on 0, 2, 3: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 4/5
    # feature 2 and latent 1 never fire: no positives at all -> 0, not a division error
    assert out["f1"].tolist() == pytest.approx([0.5, 0.8, 0.0])
    assert out["precision"].tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert out["recall"].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert out["f1_mean"] == pytest.approx(1.3 / 3)
    assert out["precision_mean"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert out["recall_mean"] == pytest.approx(0.5)


# --- the registry ------------------------------------------------------------------------------------
