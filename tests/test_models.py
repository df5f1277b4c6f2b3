"""Each architecture behind the SAE interface: recipe initialisation, loss conventions, folding, loading."""

import math
from typing import TypeVar

import pytest
import torch

from sae_sweep.models import SAE, build_sae, load_sae, model_config, save_sae
from sae_sweep.models.batchtopk import BatchTopKSAE
from sae_sweep.models.jumprelu import JumpReLUSAE
from sae_sweep.models.topk import TopKSAE, topk_relu

SAEType = TypeVar("SAEType", bound=SAE)

ARCHS = [("relu", None), ("topk", 4), ("batchtopk", 4), ("jumprelu", None)]


def make(name, k, d_in=16, hidden=64, seed=0):
    return build_sae(model_config(name, k=k), d_in, hidden, torch.Generator().manual_seed(seed))


def make_as(cls: type[SAEType], name, k, d_in=16, hidden=64, seed=0) -> SAEType:
    """`make`, typed as the architecture's class (its own attributes: k, thresholds, buffers)."""
    sae = make(name, k, d_in, hidden, seed)
    assert isinstance(sae, cls)
    return sae


def _grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return t.grad


def test_relu_recipe_initialisation():
    sae = make("relu", None)
    assert torch.allclose(sae.dec_norms(), torch.full((64,), 0.1), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0


def test_relu_penalty_is_decoder_norm_weighted_l1_mean_over_tokens():
    sae = make("relu", None)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(1, 3, 64)[:, None])
    x = torch.randn(10, 16)
    out = sae(x)
    with torch.no_grad():
        f = torch.relu(x @ sae.W_enc + sae.b_enc)
        expected_l1 = sum(float((f[t] * sae.W_dec.norm(dim=1)).sum()) for t in range(10)) / 10
        expected_mse = sum(float(((x[t] - out.x_hat[t]) ** 2).sum()) for t in range(10)) / 10
    assert out.sparsity.item() == pytest.approx(expected_l1, rel=1e-5)
    assert out.mse.item() == pytest.approx(expected_mse, rel=1e-5)


@pytest.mark.parametrize("name,k", [("topk", 4), ("batchtopk", 4)])
def test_topk_family_unit_decoder_and_sparsity(name, k):
    sae = make_as(TopKSAE, name, k)
    assert torch.allclose(sae.dec_norms(), torch.ones(64), atol=1e-5)
    x = torch.randn(32, 16)
    if name == "topk":
        l0 = (sae.encode(x) > 0).sum(-1).float()
    else:  # the training latents, from the dense reference of the same model
        sae.sparse_kernels = False
        f = sae(x).f
        assert f is not None
        l0 = (f > 0).sum(-1).float()
        sae.sparse_kernels = True
    out = sae(x)
    assert out.l0.item() == pytest.approx(l0.mean().item())
    if name == "topk":
        assert (l0 <= k).all()
    else:  # batch-wide budget: k per token on average
        assert l0.sum() <= k * 32
    # the step keeps decoder rows unit norm, and the projected gradient has no radial part
    (out.mse + out.aux).backward()
    sae.before_optimizer_step()
    radial = (_grad(sae.W_dec) * sae.W_dec).sum(-1)
    assert radial.abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.add_(0.3 * torch.randn_like(sae.W_dec))
    sae.after_optimizer_step(out.fired_H, 32)
    assert torch.allclose(sae.dec_norms(), torch.ones(64), atol=1e-5)


def test_topk_relu_keeps_k_largest():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-2.0, -1.0, -3.0, 4.0]])
    assert torch.equal(topk_relu(pre, 2), torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 4.0]]))


def test_auxk_reaches_the_encoder_of_dead_latents():
    sae = make_as(TopKSAE, "topk", 2)
    sae.tokens_since_fired.fill_(sae.aux_dead_tokens)  # every latent counts as dead
    out = sae(torch.randn(64, 16) * 3)
    assert out.aux.item() > 0
    out.aux.backward()
    assert _grad(sae.W_enc).abs().sum() > 0


def test_auxk_is_zero_without_dead_latents():
    sae = make("topk", 2)
    out = sae(torch.randn(64, 16))
    assert out.aux.item() == 0


def test_batchtopk_threshold_tracks_kept_activations():
    sae = make_as(BatchTopKSAE, "batchtopk", 4)
    x = torch.randn(256, 16) * 2
    for _ in range(5):
        sae(x)
    kept = torch.relu(sae.pre_acts(x)).flatten().topk(4 * 256).values
    kept_min = kept[kept > 0].min()
    assert float(sae.threshold) == pytest.approx(float(kept_min.detach()), rel=1e-4)
    sae.eval()
    # inference with the threshold gives about the training sparsity
    l0 = (sae.encode(x) > 0).sum(-1).float().mean().item()
    assert 2 <= l0 <= 8


def test_jumprelu_threshold_learns_from_l0_penalty():
    sae = make_as(JumpReLUSAE, "jumprelu", None)
    x = torch.randn(512, 16) * 2
    out = sae(x)
    out.sparsity.backward()
    # penalising L0 pushes thresholds up (negative gradient) where pre-activations sit near them
    g = _grad(sae.log_threshold)
    assert (g <= 0).all() and (g < 0).any()
    assert out.sparsity.item() == pytest.approx(float((out.f != 0).sum(-1).float().mean()), rel=1e-5)


@pytest.mark.parametrize("name,k", ARCHS)
def test_saved_plain_form_reproduces_normalised_reconstruction_on_raw_data(tmp_path, name, k):
    sae = make(name, k)
    with torch.no_grad():  # non-trivial biases so the folding is really exercised
        sae.b_dec.copy_(torch.randn(16) * 0.3)
        sae.b_enc.copy_(torch.randn(64) * 0.1)
    if name == "batchtopk":
        sae(torch.randn(128, 16) * 4)  # sets the inference threshold
    sae.eval()
    scale = 7.5
    x_raw = torch.randn(20, 16) * 0.5 + 0.2
    with torch.no_grad():
        f_norm = sae.encode(x_raw * scale)
        x_hat_raw_expected = sae.decode(f_norm) / scale
    save_sae(sae, tmp_path / "sae.safetensors", scale_factor=scale, raw_mean_norm=math.sqrt(16) / scale)
    loaded = load_sae(tmp_path)
    assert loaded.architecture == name
    with torch.no_grad():
        f_loaded = loaded.encode(x_raw)
        assert torch.allclose(f_loaded, f_norm, atol=1e-4)
        assert torch.allclose(loaded.decode(f_loaded), x_hat_raw_expected, atol=1e-4)
    # and the documented plain formula, with nothing but the saved tensors
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "sae.safetensors"))
    pre = x_raw @ t["W_enc"] + t["b_enc"]
    if name == "relu":
        f = torch.relu(pre)
    elif name == "topk":
        f = topk_relu(pre, k)
    else:
        f = torch.where(pre > t["threshold"], pre, torch.zeros_like(pre))
    assert torch.allclose(f @ t["W_dec"] + t["b_dec"], x_hat_raw_expected, atol=1e-4)


def test_load_sae_refuses_a_foreign_file(tmp_path):
    from safetensors.torch import save_file

    from sae_sweep.errors import DataError

    save_file({"w": torch.zeros(2)}, str(tmp_path / "sae.safetensors"))
    with pytest.raises(DataError, match="architecture"):
        load_sae(tmp_path)
    with pytest.raises(DataError, match="no such SAE file"):
        load_sae(tmp_path / "missing")


def _pair(d_in=24, hidden=96, k=5, seed=3):
    sparse = make_as(TopKSAE, "topk", k, d_in, hidden, seed)
    dense = make_as(TopKSAE, "topk", k, d_in, hidden, seed)
    dense.sparse_kernels = False
    with torch.no_grad():  # non-trivial biases so every gradient path is exercised
        for m in (sparse, dense):
            m.b_dec.copy_(torch.linspace(-0.5, 0.5, d_in))
            m.b_enc.copy_(torch.linspace(-0.2, 0.1, hidden))
    return sparse, dense


@pytest.mark.parametrize("dead", ["none", "some", "all"])
def test_sparse_topk_path_matches_dense_loss_and_gradients(dead):
    sparse, dense = _pair()
    for m in (sparse, dense):
        if dead == "some":
            m.tokens_since_fired[::3] = m.aux_dead_tokens
        elif dead == "all":
            m.tokens_since_fired.fill_(m.aux_dead_tokens)
    x = torch.randn(64, 24) * 2 + 0.3
    outs = [m(x) for m in (sparse, dense)]
    assert outs[0].f is None and outs[1].f is not None
    for name in ("mse", "aux", "l0"):
        assert torch.allclose(getattr(outs[0], name), getattr(outs[1], name), rtol=1e-5, atol=1e-6), name
    assert torch.equal(outs[0].fired_H, outs[1].fired_H)
    assert torch.allclose(outs[0].x_hat, outs[1].x_hat, atol=1e-5)
    if dead != "none":
        assert outs[0].aux.item() > 0
    for out in outs:
        (out.mse + out.aux).backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        g_sparse, g_dense = _grad(getattr(sparse, name)), _grad(getattr(dense, name))
        assert torch.allclose(g_sparse, g_dense, rtol=1e-4, atol=1e-5), name


def test_sparse_topk_trains_to_the_same_weights_as_dense():
    sparse, dense = _pair()
    x = torch.randn(256, 24) * 2
    for m in (sparse, dense):
        m.tokens_since_fired[::4] = m.aux_dead_tokens
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for step in range(5):
            out = m(x[step * 48 : (step + 1) * 48])
            opt.zero_grad()
            (out.mse + out.aux).backward()
            m.before_optimizer_step()
            opt.step()
            m.after_optimizer_step(out.fired_H, 48)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(sparse, name), getattr(dense, name), atol=1e-5), name
    assert torch.equal(sparse.tokens_since_fired, dense.tokens_since_fired)


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_the_decoder_gradient_projection_leaves_no_autograd_history(name):
    # It once ran with grad on: the gradient kept a graph through W_dec every step, ~10 MB a step at
    # d_in 384 x hidden 3072 (a 4-trial MiniLM pack reached 24 GB).
    sae = make(name, 4)
    x = torch.randn(32, 16)
    out = sae(x)
    (out.mse + out.aux).backward()
    sae.before_optimizer_step()
    grad = sae.W_dec.grad
    assert grad is not None and grad.grad_fn is None and not grad.requires_grad
    radial = (grad * sae.W_dec.detach()).sum(-1)  # the part along each unit row is gone
    assert torch.allclose(radial, torch.zeros_like(radial), atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 24), (3, 64, 24)])
def test_mse_per_token_is_autograds_chain_bit_for_bit(shape):
    """The fused squared error (one value per leading index for stacked [N, B, D] inputs) gives the
    loss and both gradients of (x - x_hat).pow(2).sum(-1).mean(-1) exactly."""
    from sae_sweep.models.base import mse_per_token

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).requires_grad_()
    x_hat = torch.randn(*shape, generator=g).requires_grad_()
    weights = torch.rand(shape[:-2], generator=g)
    fused = mse_per_token(x, x_hat)
    grads = torch.autograd.grad((fused * weights).sum(), (x, x_hat))
    chain = (x - x_hat).pow(2).sum(-1).mean(-1)
    chain_grads = torch.autograd.grad((chain * weights).sum(), (x, x_hat))
    assert fused.shape == chain.shape and torch.equal(fused, chain)
    assert all(torch.equal(a, b) for a, b in zip(grads, chain_grads, strict=True))


def test_removing_the_radial_part_leaves_each_rows_gradient_orthogonal_to_it():
    from sae_sweep.models.topk import remove_radial_part

    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 32, 16, generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    grad = torch.randn(2, 32, 16, generator=g)
    expected = grad - (grad * W).sum(-1, keepdim=True) * W
    remove_radial_part(grad, W)
    torch.testing.assert_close(grad, expected)
    assert (grad * W).sum(-1).abs().max() < 1e-5
