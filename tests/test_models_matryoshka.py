"""Matryoshka BatchTopK: the loss is the sum of the nested prefixes' reconstruction errors; it trains."""

from typing import Any

import pytest
import torch

from sae_sweep.data import open_dataset
from sae_sweep.errors import ConfigError
from sae_sweep.measures import mcc
from sae_sweep.models import build_sae, load_sae, model_config, save_sae
from sae_sweep.train import train

D, H, K = 16, 64, 4


def make(seed: int = 0, **keys) -> Any:
    cfg = model_config("matryoshka_batchtopk", k=K, prefix_fractions=[0.125, 0.5], **keys)
    return build_sae(cfg, D, H, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparse", [True, False])
def test_loss_is_the_sum_of_prefix_losses(sparse):
    torch.manual_seed(0)
    sae = make(aux_k_coef=0.0, sparse_kernels=sparse)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D))
        sae.b_enc.copy_(0.1 * torch.randn(H))
    x = torch.randn(40, D) * 2
    out = sae(x)
    # Direct: BatchTopK keeps the 40 * K largest relu pre-activations of the batch, over all latents;
    # prefix m reconstructs from latents 0..m-1 only.
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    flat = pre.relu().flatten()
    keep = flat.topk(40 * K).indices
    f = torch.zeros_like(flat).index_copy_(0, keep, flat[keep]).view_as(pre)
    losses = [((x - (f[:, :m] @ sae.W_dec[:m] + sae.b_dec)) ** 2).sum(-1).mean() for m in (8, 32, 64)]
    assert sae.prefix_widths == [8, 32, 64]
    torch.testing.assert_close(out.mse, losses[-1])
    torch.testing.assert_close(out.mse + out.aux, sum(losses))
    assert (
        float(out.aux.detach()) > 0 and len({round(float(v.detach()), 3) for v in losses}) == 3
    )  # three distinct terms
    assert out.l0 == pytest.approx(K)


def test_the_narrowest_prefix_ignores_later_latents():
    torch.manual_seed(1)
    x = torch.randn(32, D)
    a, b = make(aux_k_coef=0.0), make(aux_k_coef=0.0)
    with torch.no_grad():
        b.W_dec[8:] += torch.randn(H - 8, D)  # only latents outside the first prefix change
    fa, fb = a.select(a.pre_acts(x)), b.select(b.pre_acts(x))
    torch.testing.assert_close(fa, fb)
    torch.testing.assert_close(a.prefix_reconstructions(fa)[0], b.prefix_reconstructions(fb)[0])
    assert not torch.allclose(a.prefix_reconstructions(fa)[1], b.prefix_reconstructions(fb)[1])


@pytest.mark.parametrize("sparse", [True, False])
def test_gradients_reach_the_first_latents_from_every_prefix(sparse):
    torch.manual_seed(2)
    x = torch.randn(64, D)
    sae = make(aux_k_coef=0.0, sparse_kernels=sparse)
    out = sae(x)
    (g_all,) = torch.autograd.grad(out.mse + out.aux, sae.W_dec)
    (g_full,) = torch.autograd.grad(sae(x).mse, sae.W_dec)
    # the last latents are in the full prefix only; the first are in all three
    torch.testing.assert_close(g_all[32:], g_full[32:])
    assert not torch.allclose(g_all[:8], g_full[:8])


def test_prefix_widths_must_be_distinct():
    with pytest.raises(ConfigError, match="model.prefix_fractions"):
        build_sae(model_config("matryoshka_batchtopk", k=2, prefix_fractions=[0.01, 0.02]), D, H)


def test_inference_uses_the_running_threshold_and_survives_saving(tmp_path):
    sae = make()
    x = torch.randn(256, D)
    sae.train()
    sae(x)  # sets the threshold
    sae.eval()
    with torch.no_grad():
        f = sae.encode(x)
    threshold = float(sae.threshold)
    assert threshold > 0 and bool(((f == 0) | (f > threshold)).all())
    save_sae(sae, tmp_path / "sae.safetensors", scale_factor=1.0, raw_mean_norm=1.0)
    back: Any = load_sae(tmp_path)
    assert back.architecture == "matryoshka_batchtopk" and float(back.threshold) == pytest.approx(threshold)
    torch.testing.assert_close(back.encode(x), f)


def test_trains_and_improves_on_the_small_synthetic_data(make_cfg):
    cfg = make_cfg(model="matryoshka_batchtopk", k=3, tokens=200_000)
    metrics: Any = train(cfg)
    assert metrics["architecture"] == "matryoshka_batchtopk" and metrics["status"] == "completed"
    untrained: Any = build_sae(cfg.model, 32, 128, torch.Generator().manual_seed(0))
    truth: Any = open_dataset(cfg.data, progress=False).ground_truth
    assert truth is not None
    before = mcc(truth.features, untrained.W_dec.detach())  # ~0.46: 128 random directions, 96 features
    assert metrics["mcc"] > before + 0.15, (before, metrics["mcc"])
    assert metrics["explained_variance"] > 0.6
    assert 1.5 < metrics["l0"] < 6  # inference threshold keeps the mean L0 near k = 3
