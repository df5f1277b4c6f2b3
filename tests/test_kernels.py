"""The sparse TopK-family path: Triton kernels (interpreted on CPU) against the torch ops, the
variable-per-token BatchTopK selection against a flat top-n, and `model.kernels` validation."""

import pytest
import torch
import torch.nn.functional as F

from sae_sweep.config import Config, validate
from sae_sweep.errors import ConfigError
from sae_sweep.models import build_sae, model_config
from sae_sweep.models.kernels import (
    batch_top_values,
    batch_topk_code,
    kernels_problem,
    resolve_kernels,
    sparse_decode,
    sparse_decode_prefixes,
    topk_code,
)


@pytest.fixture
def interpret(monkeypatch):
    """Triton kernels on CPU tensors, through its interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from sae_sweep.models.kernels import triton_ops

    return triton_ops


def _variable_code(B=9, H=40, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = (
        torch.randn(B, H, generator=g) + torch.linspace(-1, 2, B)[:, None]
    )  # rows differ in how many they keep
    return batch_topk_code(pre, n)


def test_triton_gather_sum_matches_embedding_bag(interpret):
    code = _variable_code()
    W = torch.randn(40, 37)  # D not a power of two: masked columns; block_d 16: several column tiles
    assert (code.bounds.diff() == 0).any() and code.bounds.diff().max() > 3  # empty and long rows
    expected = F.embedding_bag(code.idx, W, code.bounds[:-1], mode="sum", per_sample_weights=code.vals)
    got = interpret.gather_sum(code.idx, code.vals, code.bounds, W, block_d=16)
    assert torch.allclose(got, expected, atol=1e-5)


def test_triton_gather_dot_and_segment_scatter_match_torch(interpret):
    code = _variable_code(seed=1)
    B, H, D = 9, 40, 37
    G, W, src = torch.randn(B, D), torch.randn(H, D), torch.randn(B, D)
    dots = interpret.gather_dot(code.idx, code.rows, G, W, block_d=16)
    assert torch.allclose(dots, (G[code.rows] * W[code.idx]).sum(-1), atol=1e-5)
    w = torch.randn(code.idx.numel())
    got = interpret.segment_scatter(code.idx, code.rows, w, src, H, block_d=16)
    expected = torch.zeros(H, D).index_add_(0, code.idx, w[:, None] * src[code.rows])
    assert torch.allclose(got, expected, atol=1e-5)
    untouched = torch.ones(H, dtype=torch.bool)
    untouched[code.idx] = False
    assert untouched.any() and (got[untouched] == 0).all()  # rows no entry hits are written as zeros


@pytest.mark.parametrize("select", ["topk", "batchtopk"])
def test_triton_decoder_forward_and_backward_match_torch(interpret, select):
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(12, 48, generator=g)
    code = topk_code(pre, 5) if select == "topk" else batch_topk_code(pre, 60)
    W = torch.randn(48, 20, generator=g)
    results = []
    for kernels in ("torch", "triton"):
        vals, W_ = code.vals.clone().requires_grad_(), W.clone().requires_grad_()
        out = sparse_decode(code._replace(vals=vals), W_, kernels)
        (out * torch.linspace(-1, 1, 20)).pow(2).sum().backward()
        results.append((out.detach(), vals.grad, W_.grad))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def _model(name, kernels, k=3, d_in=16, hidden=48, seed=5):
    cfg = model_config(name, k=k, aux_k=4, kernels=kernels)
    sae = build_sae(cfg, d_in, hidden, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial biases so every gradient path is exercised
        sae.b_dec.copy_(torch.linspace(-0.5, 0.5, d_in))
        sae.b_enc.copy_(torch.linspace(-0.2, 0.1, hidden))
    sae.get_buffer("tokens_since_fired")[::3] = cfg.aux_dead_tokens  # a third dead: AuxK runs too
    return sae


def _grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return t.grad


def _train(sae, xs):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    losses = []
    for x in xs:
        out = sae(x)
        loss = out.mse + out.aux
        opt.zero_grad()
        loss.backward()
        sae.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.after_optimizer_step(out.fired_H, x.shape[0])
        losses += [out.mse.item(), out.aux.item(), out.l0.item()]
    return losses


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_triton_model_gradients_and_five_trained_steps_match_torch(interpret, name):
    x = torch.randn(16, 16) * 2 + 0.3
    models = {kernels: _model(name, kernels) for kernels in ("torch", "triton")}
    assert models["triton"].kernels == "triton" and models["torch"].kernels == "torch"
    grads = {}
    for kernels, sae in models.items():
        out = sae(x)
        assert out.aux.item() > 0
        (out.mse + out.aux).backward()
        grads[kernels] = {n: _grad(p).clone() for n, p in sae.named_parameters()}
        sae.zero_grad()
    for n, g in grads["torch"].items():
        assert torch.allclose(grads["triton"][n], g, rtol=1e-4, atol=1e-5), n
    xs = [torch.randn(16, 16) * 2 + 0.3 for _ in range(5)]
    curves = {kernels: _train(sae, xs) for kernels, sae in models.items()}
    assert curves["triton"] == pytest.approx(curves["torch"], rel=1e-4, abs=1e-6)
    for p, q in zip(models["torch"].parameters(), models["triton"].parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)


def test_batchtopk_sparse_path_matches_its_dense_reference():
    x = torch.randn(64, 16) * 2 + 0.3
    sparse, dense = _model("batchtopk", "torch"), _model("batchtopk", "torch")
    setattr(dense, "sparse_kernels", False)  # noqa: B010 (nn.Module's __setattr__ typing wants tensors)
    outs = [m(x) for m in (sparse, dense)]
    assert outs[0].f is None and outs[1].f is not None
    for key in ("mse", "aux", "l0"):
        assert torch.allclose(getattr(outs[0], key), getattr(outs[1], key), rtol=1e-5, atol=1e-6), key
    assert torch.equal(outs[0].fired_H, outs[1].fired_H)
    assert torch.allclose(outs[0].x_hat, outs[1].x_hat, atol=1e-5)
    thresholds = [float(m.get_buffer("threshold")) for m in (sparse, dense)]
    assert thresholds[0] == pytest.approx(thresholds[1])
    for out in outs:
        (out.mse + out.aux).backward()
    for (n, p), q in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert torch.allclose(_grad(p), _grad(q), rtol=1e-4, atol=1e-5), n


def test_batch_top_values_is_the_flat_top_n_even_when_one_row_holds_most_of_it():
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(64, 200, generator=g)
    pre[7] += 10  # row 7 holds the batch's 200 largest values, far beyond its first candidates
    pre[20, :50] += 5
    # shifted down: fewer positive values than n, so the n-th is 0 and every positive one must be found
    for shifted in (pre, pre - 2.5):
        for n in (64, 256, 640):
            vals, flat = batch_top_values(shifted, n)
            ref_vals, ref_flat = torch.relu(shifted).flatten().topk(n)
            assert vals.numel() == n and torch.allclose(vals.sort().values, ref_vals.sort().values)
            # zeros tie: compare the entries that carry a value
            assert torch.equal(flat[vals > 0].sort().values, ref_flat[ref_vals > 0].sort().values), n


def test_batch_top_values_from_a_sampled_threshold_or_its_fallback_is_the_flat_top_n():
    """The sampled threshold is tried first (tokens of very different norms, as real activations
    have); where the sample overrates the batch (its large values sit only at sampled positions) the
    per-row candidates take over; both give the exact flat top n."""
    from sae_sweep.models.kernels.sparse import SAMPLE_STRIDE, _above_sampled_threshold

    g = torch.Generator().manual_seed(0)
    B, H, n = 256, 512, 256 * 8
    norms = torch.rand(B, 1, generator=g) * 4 + 0.1
    varied = torch.randn(B, H, generator=g) * norms
    overrated = torch.randn(B, H, generator=g) * 0.01
    overrated.view(-1)[::SAMPLE_STRIDE][:n] = 5 + torch.rand(n, generator=g)
    for pre, sampled in ((varied, True), (overrated, False)):
        assert (_above_sampled_threshold(pre, n) is not None) == sampled
        vals, flat = batch_top_values(pre, n)
        expected = pre.flatten().topk(n).indices
        assert torch.equal(flat.sort().values, expected.sort().values)
        assert torch.equal(vals, pre.flatten()[flat].clamp_min(0))


def test_batchtopk_code_offsets_are_what_embedding_bag_takes():
    code = _variable_code(seed=4)
    counts = code.bounds.diff()
    assert int(counts.sum()) == code.idx.numel() == 30
    assert torch.equal(code.rows, torch.arange(9).repeat_interleave(counts))
    for b in range(9):  # latents ascending within each token
        row_idx = code.idx[code.bounds[b] : code.bounds[b + 1]]
        assert torch.equal(row_idx, row_idx.sort().values)


def test_kernels_auto_is_torch_until_a_gpu_measured_triton():
    assert resolve_kernels("auto", "cpu") == "torch"
    assert resolve_kernels("auto", "cuda") == "torch"
    assert resolve_kernels("triton", "cpu") == "triton"


def test_kernels_triton_on_cpu_without_the_interpreter_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = Config(model=model_config("topk", k=4, kernels="triton"), device="cpu")
    problem = kernels_problem("triton", "cpu")
    assert problem is not None and ("TRITON_INTERPRET=1" in problem or "not installed" in problem)
    with pytest.raises(ConfigError, match="model.kernels"):
        validate(cfg)
    with pytest.raises(ConfigError, match="one of auto, torch, triton"):
        validate(Config(model=model_config("topk", k=4, kernels="cuda"), device="cpu"))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_prefix_decode_matches_dense_nested_reconstructions_with_gradients(kernels, request):
    if kernels == "triton":
        request.getfixturevalue("interpret")
    g = torch.Generator().manual_seed(6)
    pre = torch.randn(10, 32, generator=g)
    widths = [2, 8, 32]
    W = torch.randn(32, 12, generator=g)
    for code in (topk_code(pre, 6), batch_topk_code(pre, 60)):  # latents unordered, then ordered, per token
        vals, W_s = code.vals.clone().requires_grad_(), W.clone().requires_grad_()
        got = sparse_decode_prefixes(code._replace(vals=vals), W_s, widths, kernels)
        f = torch.zeros(10, 32).index_put((code.rows, code.idx), code.vals, accumulate=True).requires_grad_()
        W_d = W.clone().requires_grad_()
        expected = torch.stack([f[:, :m] @ W_d[:m] for m in widths])
        assert got.shape == (3, 10, 12) and torch.allclose(got, expected, atol=1e-5)
        weights = torch.randn(3, 10, 12, generator=g)
        (got * weights).sum().backward()
        (expected * weights).sum().backward()
        assert torch.allclose(_grad(W_s), _grad(W_d), atol=1e-4)
        assert torch.allclose(_grad(vals), _grad(f)[code.rows, code.idx], atol=1e-4)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")  # the reference product's
def test_transposed_product_is_the_csr_product():
    """The W_dec / W_enc gradient sum (embedding_bag's forward over entries sorted by latent) is the
    CSR x dense product S^T @ src (to rounding); latents no entry selects get zero rows."""
    from sae_sweep.models.kernels.sparse import transposed_product

    g = torch.Generator().manual_seed(0)
    B, H, D, k = 64, 96, 24, 5
    scores_BH = torch.rand(B, H, generator=g)
    scores_BH[:, 7] = -1  # latent 7 is never selected
    idx = scores_BH.topk(k, dim=-1).indices.flatten()
    rows = torch.arange(B).repeat_interleave(k)
    w, src = torch.randn(B * k, generator=g), torch.randn(B, D, generator=g)
    dense_BH = torch.zeros(B, H).index_put_((rows, idx), w, accumulate=True)
    csr_HB = dense_BH.t().to_sparse_csr()
    expected = torch.sparse.mm(csr_HB, src)
    got = transposed_product(idx, rows, w, src, H, "torch")
    torch.testing.assert_close(got, expected)
    assert not got[7].any()
