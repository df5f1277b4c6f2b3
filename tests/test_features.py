"""The feature browser on a tiny random GPT-2's harvest (fast), on data without tokens, and in the report.

SmolLM2 (the real causal LM) is exercised in test_smollm2.py; these tests check the browser's numbers
against direct computations: densities and top rows by brute force over the held-out split, each
context's tokens against the document re-tokenized at the recorded position, activations against the
SAE run on those rows, logit effects against W_dec @ (W_U * ln_f)^T.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")

from test_harvest import make_tiny_gpt2  # noqa: E402

from sae_sweep.config import Config, DataConfig, TrainConfig  # noqa: E402
from sae_sweep.data import open_dataset  # noqa: E402
from sae_sweep.errors import ConfigError  # noqa: E402
from sae_sweep.features import FeaturesConfig, build_features, parse_args  # noqa: E402
from sae_sweep.features.__main__ import main as features_main  # noqa: E402
from sae_sweep.features.page import latent_file  # noqa: E402
from sae_sweep.harvest import harvest  # noqa: E402
from sae_sweep.harvest import parse_args as harvest_args  # noqa: E402
from sae_sweep.harvest.hooks import load_model  # noqa: E402
from sae_sweep.harvest.text import resolve_text  # noqa: E402
from sae_sweep.models import load_sae, model_config  # noqa: E402
from sae_sweep.train import train  # noqa: E402

FAST = FeaturesConfig(latents=12, extremes=3, top_contexts=5, random_contexts=3, logits=5, progress=False)


def train_run(acts: Path, out: Path, k: int = 4, hidden: int = 128, tokens: int = 20_000, **data) -> Path:
    cfg = Config(
        model=model_config("topk", k=k),
        data=DataConfig(kind="shards", path=str(acts), chunk_tokens=256, test_fraction=0.25, **data),
        train=TrainConfig(progress=False, log_every_tokens=4096),
        batch_size=256,
        hidden_dim=hidden,
        tokens=tokens,
        lr=3e-3,
        device="cpu",
        out_dir=str(out),
    )
    train(OmegaConf.structured(cfg))
    return out


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("features-gpt2")
    model_dir = make_tiny_gpt2(root / "model")
    acts = root / "acts"
    harvest(
        harvest_args([f"model={model_dir}", "layer=1", "context_length=64", "tokens=4000",
                      "shard_tokens=1500", "progress=false", f"out={acts}"])
    )  # fmt: skip
    run = train_run(acts, root / "run")
    build_features(run, FAST)
    return model_dir, run


def _summary(run: Path) -> dict:
    return json.loads((run / "features" / "features.json").read_text())


def _heldout(run: Path) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
    """(rows, latents, (shard file, row) of each) of the held-out split, computed directly."""
    ds = open_dataset(OmegaConf.load(run / "config.yaml").data, progress=False)
    xs, where = [], []
    for span in ds.test_chunks:
        x = torch.empty(span.rows, ds.d_in)
        ds.shards[span.shard].read_into(span.start, span.stop, x)
        xs.append(x)
        where += [(ds.shards[span.shard].path.name, r) for r in range(span.start, span.stop)]
    x = torch.cat(xs)
    with torch.no_grad():
        f = load_sae(run).encode(x)
    return x, f, where


def test_density_and_top_activations_match_a_brute_force_pass(gpt2_run):
    _, run = gpt2_run
    s = _summary(run)
    _, f, where = _heldout(run)
    assert s["rows_scanned"] == len(f) and s["alive"] == int((f > 0).any(0).sum())
    density = (f > 0).double().mean(0)
    shown = [r["latent"] for r in s["latents"]]
    assert len(shown) == FAST.latents and shown == sorted(shown, key=lambda i: -density[i])
    alive_by_density = [
        int(i) for i in torch.argsort(density, descending=True, stable=True) if density[i] > 0
    ]
    assert alive_by_density[: FAST.extremes] == shown[: FAST.extremes]  # the densest
    assert alive_by_density[-FAST.extremes :] == shown[-FAST.extremes :]  # and the rarest
    for r in s["latents"]:
        i = r["latent"]
        assert r["density"] == pytest.approx(float(density[i]))
        best = f[:, i].topk(len(r["top"])).values
        torch.testing.assert_close(
            torch.tensor([c["acts"][c["center"]] for c in r["top"]]), best, atol=1e-4, rtol=1e-4
        )
        assert r["max_act"] == pytest.approx(float(best[0]), rel=1e-4)
        for c in r["random"]:  # drawn among the activating rows, apart from the top ones
            assert c["acts"][c["center"]] > 0
            assert (c["shard"], c["shard_row"]) not in {(t["shard"], t["shard_row"]) for t in r["top"]}


def test_each_context_is_the_text_at_its_row(gpt2_run):
    """Provenance alignment: a context's tokens are its document's tokens around the recorded
    position, and its activations are the SAE's on exactly those shard rows."""
    model_dir, run = gpt2_run
    s = _summary(run)
    _, tokenizer, _ = load_model(str(model_dir), causal_lm=True, dtype="float32", device="cpu")
    source = resolve_text("pydoc")
    x, f, where = _heldout(run)
    row_of = {w: n for n, w in enumerate(where)}
    checked = 0
    for r in s["latents"]:
        for c in [*r["top"], *r["random"]]:
            doc_ids = tokenizer(source.document(c["doc"]), add_special_tokens=False)["input_ids"]
            first = c["pos"] - c["center"]
            assert c["token_ids"] == doc_ids[first : first + len(c["token_ids"])]
            assert s["doc_names"][str(c["doc"])] == source.names()[c["doc"]]
            n = row_of[(c["shard"], c["shard_row"])]
            acts = f[n - c["center"] : n - c["center"] + len(c["acts"]), r["latent"]]
            torch.testing.assert_close(torch.tensor(c["acts"]), acts, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 3 * FAST.latents
    page = (run / "features" / latent_file(s["latents"][0]["latent"])).read_text()
    top = s["latents"][0]["top"][0]
    words = [s["vocab"][str(t)] for t in top["token_ids"]]
    assert all(w in page for w in words if w.isalnum())


def test_logit_effects_equal_the_decoder_direction_through_the_unembedding(gpt2_run):
    model_dir, run = gpt2_run
    s = _summary(run)
    model, _, _ = load_model(str(model_dir), causal_lm=True, dtype="float32", device="cpu")
    # the unembedding with the final norm's scale folded in
    W_U = (
        model.get_parameter("lm_head.weight").detach()
        * model.get_parameter("transformer.ln_f.weight").detach()
    )
    W_dec = load_sae(run).W_dec.detach()
    for r in s["latents"]:
        effect = W_dec[r["latent"]] @ W_U.T
        up, down = effect.topk(FAST.logits), effect.topk(FAST.logits, largest=False)
        assert [t for t, _ in r["promotes"]] == up.indices.tolist()
        assert [t for t, _ in r["suppresses"]] == down.indices.tolist()
        np.testing.assert_allclose([v for _, v in r["promotes"]], up.values.numpy(), rtol=1e-4, atol=1e-5)


def test_pages_link_every_latent_and_show_contexts(gpt2_run):
    _, run = gpt2_run
    s = _summary(run)
    index = (run / "features" / "index.html").read_text()
    for r in s["latents"]:
        page = run / "features" / latent_file(r["latent"])
        assert f'href="{latent_file(r["latent"])}"' in index and page.is_file()
        text = page.read_text()
        assert "Top activations" in text and "Random activating contexts" in text and "promotes:" in text
        assert text.count('class="c"') == len(r["top"]) + len(r["random"])  # one boxed token per context
    assert "http" not in index and "<script" not in index  # opens offline from disk


def test_data_without_tokens_gets_density_and_activation_histograms(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg("topk", k=4, tokens=60_000))
    index = build_features(run, FeaturesConfig(latents=5, progress=False))
    s = _summary(run)
    assert not s["has_text"] and len(s["latents"]) == 5
    assert "no token provenance" in index.read_text()
    page = (run / "features" / latent_file(s["latents"][0]["latent"])).read_text()
    assert "<svg" in page and "Top activations" not in page
    assert sum(s["latents"][0]["hist"]) == s["latents"][0]["count"]


def test_bad_arguments_fail_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="latents"):
        parse_args([str(tmp_path), "latents=0"])
    with pytest.raises(ConfigError, match="lat"):
        parse_args([str(tmp_path), "lat=3"])
    assert features_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RUN_DIR" in err and "sae.safetensors" in err


@pytest.fixture(scope="module")
def gpt2_sweep(gpt2_run, tmp_path_factory) -> Path:
    """Two trials on the GPT-2 harvest, laid out as a sweep, with its report written."""
    from sae_sweep.report import write_report

    _, run = gpt2_run
    sweep = tmp_path_factory.mktemp("features-sweep") / "sweep"
    for n, k in enumerate((2, 8)):
        train_run(Path(_summary(run)["data"]), sweep / "trials" / str(n), k=k, tokens=8000)
    write_report(sweep, progress=False)
    return sweep


def test_a_sweep_report_links_each_pareto_point_to_its_browser(gpt2_sweep, tmp_path):
    from sae_sweep.report import collect, write_report

    page = gpt2_sweep / "report" / "index.html"
    html = page.read_text()
    front = collect(gpt2_sweep, progress=False).query("pareto")["trial"].tolist()
    assert front
    for n in front:
        link = f"../trials/{n}/features/index.html"
        assert html.count(f'href="{link}"') == 3  # the front list, the point and its label in the SVG
        assert (page.parent / link).resolve().is_file()
    assert 'id="frontier-links"' in html
    other = tmp_path / "copy"
    shutil.copytree(gpt2_sweep, other, ignore=shutil.ignore_patterns("report", "features"))
    assert write_report(other, progress=False, features=False).read_text().count("features</a>") == 0


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _chromium(url: str, profile: Path, *args: str) -> str:
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1200,1500", *args, url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chromium_renders_the_report_and_a_feature_page_from_disk(gpt2_sweep, tmp_path):
    """A real browser opens the files from disk (no server): the DOM holds the table, the linked
    frontier and the shaded contexts, and the screenshots show them (orange shading on the page)."""
    import matplotlib.image

    report = (gpt2_sweep / "report" / "index.html").resolve()
    dom = _chromium(report.as_uri(), tmp_path / "profile", "--dump-dom")
    assert "<table>" in dom and dom.count("<tr") >= 3 and 'id="frontier-links"' in dom
    link = re.search(r'href="(\.\./trials/\d+/features/index\.html)"', dom)
    assert link, "no link to a trial's feature browser in the report page"
    index = (report.parent / link.group(1)).resolve()
    s = json.loads((index.parent / "features.json").read_text())
    latent = s["latents"][0]
    page = index.parent / latent_file(latent["latent"])
    dom = _chromium(page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert dom.count('class="ctx"') == len(latent["top"]) + len(latent["random"])
    assert "Top activations" in dom and "promotes:" in dom
    shots = {}
    for name, url in (("report", report), ("latent", page)):
        shot = tmp_path / f"{name}.png"
        _chromium(url.as_uri(), tmp_path / "profile", f"--screenshot={shot}")
        shots[name] = matplotlib.image.imread(shot)[..., :3]
    assert shots["report"].std() > 0.05  # not a blank page
    r, g, b = (shots["latent"][..., i] for i in range(3))
    shaded = (r > 0.9) & (g > 0.5) & (g < 0.85) & (b < 0.6)  # the contexts' orange
    assert shaded.sum() > 200


def test_the_notebook_shows_a_latents_contexts_as_the_pages_do(gpt2_sweep, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "explore_sweep.ipynb"
    monkeypatch.setenv("SAE_SWEEP_DIR", str(gpt2_sweep))
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
    ).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    shown = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    contexts = [h for h in shown if 'class="ctx"' in h]
    assert len(contexts) == 1 and contexts[0].count('class="c"') >= FAST.top_contexts
