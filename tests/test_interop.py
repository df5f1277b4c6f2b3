"""SAELens layout: export loads in SAELens (checked against SAELens itself when it is installed, and
always against its documented format and semantics), import folds SAELens's options exactly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_sweep.errors import DataError
from sae_sweep.interop.saelens import export_saelens, import_saelens, main
from sae_sweep.models import build_sae, load_sae, model_config, save_sae

D, H = 24, 72
ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")
# What sae_lens 6.54.12 wrote for TopKSAE(...).save_model(): the layout import must read.
SAELENS_TOPK_CFG = {
    "d_in": D, "d_sae": H, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
    "normalize_activations": "none", "reshape_activations": "none",
    "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "model_name": "m",
                 "hook_name": "blocks.0.hook_resid_post"},
    "k": 5, "rescale_acts_by_decoder_norm": True, "architecture": "topk",
}  # fmt: skip


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


@pytest.fixture
def harvest_dir(tmp_path) -> Path:
    folder = tmp_path / "acts"
    folder.mkdir()
    manifest = {"model": "gpt2", "hook_name": "blocks.5.hook_resid_post", "context_length": 128,
                "prefix_ids": [50256], "text": "pydoc", "settings": {}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def make_run(tmp_path: Path, arch: str, harvest_dir: Path) -> Path:
    torch.manual_seed(0)
    sae = build_sae(model_config(arch, k=4 if "topk" in arch else None), D, H)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if arch in ("batchtopk", "matryoshka_batchtopk"):
            sae.get_buffer("threshold").fill_(0.2)
    run = tmp_path / f"run-{arch}"
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  path: {harvest_dir}\n")
    save_sae(sae, run / "sae.safetensors", scale_factor=0.7, raw_mean_norm=9.0)
    return run


def saelens_forward(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6's inference as documented (encode/decode of standard, topk and jumprelu SAEs)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    t, _ = _tensors(folder / "sae_weights.safetensors")
    sae_in = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if cfg["architecture"] == "standard":
        f = torch.relu(pre)
    elif cfg["architecture"] == "topk":
        pre = pre * norms if rescale else pre
        values, idx = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    else:
        f = torch.relu(pre) * (pre > t["threshold"])
    x_hat = ((f / norms) if rescale else f) @ t["W_dec"] + t["b_dec"]
    return f, x_hat


@pytest.mark.parametrize("arch", ARCHS)
def test_export_follows_the_saelens_6_layout(arch, tmp_path, harvest_dir):
    run = make_run(tmp_path, arch, harvest_dir)
    out = export_saelens(run, tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    expected_arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}.get(
        arch,
        "jumprelu",  # matryoshka_batchtopk: SAELens saves its own Matryoshka BatchTopK SAEs so too
    )
    assert cfg["architecture"] == expected_arch and (cfg["d_in"], cfg["d_sae"]) == (D, H)
    assert (cfg["dtype"], cfg["device"], cfg["apply_b_dec_to_input"]) == ("float32", "cpu", False)
    assert (cfg["normalize_activations"], cfg["reshape_activations"]) == ("none", "none")
    meta = cfg["metadata"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else SAELens converts it as a pre-6 config
    assert (meta["model_name"], meta["hook_name"], meta["context_size"], meta["prepend_bos"]) == (
        "gpt2", "blocks.5.hook_resid_post", 128, True,
    )  # fmt: skip
    if arch == "topk":
        assert (cfg["k"], cfg["rescale_acts_by_decoder_norm"]) == (4, False)
    weights, _ = _tensors(out / "sae_weights.safetensors")
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    expected = {"W_enc": (D, H), "b_enc": (H,), "W_dec": (H, D), "b_dec": (D,)}
    if expected_arch == "jumprelu":
        expected["threshold"] = (H,)
    assert shapes == expected and all(v.dtype == torch.float32 for v in weights.values())
    # SAELens's documented forward on the exported files computes what sae_sweep computes.
    x = 3 * torch.randn(50, D) + 1
    sae = load_sae(run)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    f_sl, x_hat_sl = saelens_forward(out, x)
    assert torch.equal(f > 0, f_sl > 0)
    torch.testing.assert_close(f_sl, f)
    torch.testing.assert_close(x_hat_sl, x_hat)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_then_import_gives_back_the_same_file(arch, tmp_path, harvest_dir):
    run = make_run(tmp_path, arch, harvest_dir)
    back = import_saelens(export_saelens(run, tmp_path / "sl"), tmp_path / "back")
    original, meta = _tensors(run / "sae.safetensors")
    returned, meta_back = _tensors(back / "sae.safetensors")
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)
    for key in ("architecture", "d_in", "hidden", "scale_factor", "raw_mean_norm", "hyperparameters"):
        assert meta_back[key] == meta[key]
    assert meta_back["hook_name"] == "blocks.5.hook_resid_post"
    assert load_sae(back).architecture == arch


def test_import_folds_b_dec_subtraction_and_decoder_norm_rescaling(tmp_path):
    src = tmp_path / "saelens"
    src.mkdir()
    (src / "cfg.json").write_text(json.dumps(SAELENS_TOPK_CFG))
    torch.manual_seed(1)
    weights = {"W_enc": torch.randn(D, H), "b_enc": 0.1 * torch.randn(H), "W_dec": torch.randn(H, D),
               "b_dec": torch.randn(D)}  # fmt: skip
    save_file(weights, str(src / "sae_weights.safetensors"))
    sae = load_sae(import_saelens(src, tmp_path / "run"))
    x = torch.randn(40, D)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    f_sl, x_hat_sl = saelens_forward(src, x)
    assert sae.architecture == "topk" and sae.k == 5
    assert torch.equal(f > 0, f_sl > 0)
    # f differs by the folded norms (SAELens rescales pre-activations); the reconstruction is the same.
    torch.testing.assert_close(x_hat, x_hat_sl, atol=1e-4, rtol=1e-4)


def test_import_reads_a_pre_6_config(tmp_path):
    src = tmp_path / "old"
    src.mkdir()
    old = {"d_in": D, "d_sae": H, "hook_point": "blocks.2.hook_resid_pre", "model_name": "gpt2-small",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "dtype": "float32"}  # fmt: skip
    (src / "cfg.json").write_text(json.dumps(old))
    weights = {
        "W_enc": torch.randn(D, H),
        "b_enc": torch.zeros(H),
        "W_dec": torch.randn(H, D),
        "b_dec": torch.randn(D),
    }
    save_file(weights, str(src / "sae_weights.safetensors"))
    run = import_saelens(src, tmp_path / "run")
    sae = load_sae(run)
    x = torch.randn(8, D)
    with torch.no_grad():
        f = sae.encode(x)
    expected = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    assert sae.architecture == "topk" and (f > 0).sum(-1).max() <= 3
    torch.testing.assert_close(f.max(-1).values, expected.max(-1).values, atol=1e-5, rtol=1e-5)
    assert _tensors(run / "sae.safetensors")[1]["hook_name"] == "blocks.2.hook_resid_pre"


@pytest.mark.parametrize(
    "change, says",
    [
        ({"normalize_activations": "layer_norm"}, "run-time normalisation"),
        ({"architecture": "gated"}, "importable: standard, topk, jumprelu"),
    ],
)
def test_import_refuses_what_fixed_weights_cannot_express(change, says, tmp_path):
    src = tmp_path / "sl"
    src.mkdir()
    (src / "cfg.json").write_text(json.dumps({**SAELENS_TOPK_CFG, **change}))
    save_file({"W_enc": torch.zeros(D, H)}, str(src / "sae_weights.safetensors"))
    with pytest.raises(DataError, match=says):
        import_saelens(src, tmp_path / "run")


def test_real_saelens_loads_the_export(tmp_path, harvest_dir):
    sae_lens = pytest.importorskip("sae_lens")
    for arch in ARCHS:
        run = make_run(tmp_path, arch, harvest_dir)
        out = export_saelens(run, tmp_path / f"sl-{arch}")
        theirs = sae_lens.SAE.load_from_disk(str(out))
        ours = load_sae(run)
        x = torch.randn(30, D)
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), ours.encode(x))
            torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x)))
        assert theirs.cfg.metadata.hook_name == "blocks.5.hook_resid_post"


def test_cli_export_and_import(tmp_path, harvest_dir, capsys):
    run = make_run(tmp_path, "topk", harvest_dir)
    assert main(["export", str(run), str(tmp_path / "sl"), "--model-name", "my-model"]) == 0
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]["model_name"] == "my-model"
    assert main(["import", str(tmp_path / "sl"), str(tmp_path / "back")]) == 0
    assert main(["import", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "cfg.json" in capsys.readouterr().err
