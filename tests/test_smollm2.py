"""A real causal LM end to end: SmolLM2-135M-Instruct from its GGUF file (Llama blocks, d_model 576).

Harvest layer 15 over pydoc (one session fixture), check the hooks against the model's own hidden
states, train a small TopK SAE on the activations (norms ~170 with outlier dimensions), score it by
the LM's loss with the SAE spliced in, and build its feature browser.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SMOLLM2, SMOLLM2_HARVEST
from omegaconf import OmegaConf

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from sae_sweep.config import Config, DataConfig, TrainConfig  # noqa: E402
from sae_sweep.errors import ConfigError  # noqa: E402
from sae_sweep.features import FeaturesConfig, build_features  # noqa: E402
from sae_sweep.harvest import read_manifest, read_provenance  # noqa: E402
from sae_sweep.harvest.hooks import capture, find_site, load_model, resolve_model  # noqa: E402
from sae_sweep.harvest.text import batches, framing, resolve_text  # noqa: E402
from sae_sweep.lm_eval import LMEvalConfig, lm_eval_metrics  # noqa: E402
from sae_sweep.models import build_sae, load_sae, model_config  # noqa: E402
from sae_sweep.train import train  # noqa: E402

D = 576
LM = LMEvalConfig(enabled=True, tokens=512, batch_size=8, device="cpu")


def _manifest(folder: Path) -> dict[str, Any]:
    m = read_manifest(folder)
    assert m is not None, f"{folder}: no manifest.json"
    return m


def _provenance(folder: Path) -> np.ndarray:
    """Every shard's provenance rows, in shard order."""
    parts = [read_provenance(folder, s["file"]) for s in _manifest(folder)["shards"]]
    assert all(p is not None for p in parts), f"{folder}: a shard without provenance"
    return np.concatenate([p for p in parts if p is not None])


def _model():
    return load_model(SMOLLM2, causal_lm=True, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def smollm2_run(smollm2_acts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-run") / "run"
    cfg = Config(
        model=model_config("topk", k=32),
        data=DataConfig(kind="shards", path=str(smollm2_acts), chunk_tokens=256, test_fraction=0.25),
        train=TrainConfig(progress=False, log_every_tokens=4096),
        batch_size=256,
        hidden_dim=1024,
        tokens=30_000,
        lr=2e-3,
        device="cpu",
        out_dir=str(out),
    )
    train(OmegaConf.structured(cfg))
    return out


def test_a_gguf_file_its_folder_and_the_packaged_name_are_one_model(tmp_path):
    path = resolve_model(SMOLLM2)
    assert path.suffix == ".gguf" and path.is_file()
    assert resolve_model(str(path.parent)) == path and resolve_model(str(path)) == path
    (tmp_path / "weights.bin").write_bytes(b"")
    for bad in (tmp_path, tmp_path / "weights.bin"):
        with pytest.raises(ConfigError, match="gguf") as err:
            resolve_model(str(bad))
        assert err.value.key == "model" and "\n" not in str(err.value)


def test_harvest_manifest_names_the_model_tokenizer_and_prepended_bos(smollm2_acts):
    m = _manifest(smollm2_acts)
    assert (m["model_class"], m["causal_lm"], m["hook_name"], m["d_in"]) == (
        "LlamaForCausalLM", True, "blocks.15.hook_resid_post", D,
    )  # fmt: skip
    assert m["tokens"] == SMOLLM2_HARVEST["tokens"] and m["model_path"].endswith(".gguf")
    # The GGUF tokenizer adds no BOS: the harvest puts it first in each window and drops its row.
    assert m["prefix_ids"] == [1] and m["drop_bos"] and m["suffix_ids"] == []
    assert m["tokenizer"]["gguf_file"] == Path(m["model_path"]).name and m["tokenizer"]["vocab_size"] == 49152
    prov = _provenance(smollm2_acts)
    assert len(prov) == m["tokens"] and (prov[:, 1] >= 0).all() and not (prov[:, 2] == 1).any()


def test_hooks_match_the_models_hidden_states(smollm2_acts):
    """resid_post of block 15 is hidden_states[16]; Llama adds attn_out and mlp_out to the stream."""
    model, tokenizer, _ = _model()
    frame = framing(tokenizer, prepend_bos=True)
    first = next(batches(resolve_text("pydoc").indexed("train"), tokenizer, frame, 64, 2, drop_bos=True))
    inputs = {"input_ids": first.input_ids, "attention_mask": first.attention_mask}
    with torch.inference_mode():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    got = {
        hook: capture(model, find_site(model, 15, hook), inputs)[first.keep]
        for hook in ("resid_post", "mlp_out", "attn_out")
    }
    torch.testing.assert_close(got["resid_post"], hidden[16][first.keep], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(
        hidden[15][first.keep] + got["attn_out"] + got["mlp_out"], got["resid_post"], atol=1e-3, rtol=1e-4
    )
    shards = _manifest(smollm2_acts)["shards"]
    n = int(first.keep[0].sum())  # the harvest's first window is longer, but starts the same (causal)
    harvested = torch.from_numpy(np.load(smollm2_acts / shards[0]["file"])[:n])
    torch.testing.assert_close(harvested, got["resid_post"][:n], atol=1e-3, rtol=1e-4)


def test_recipe_copes_with_large_norms_and_outlier_dimensions(smollm2_acts, smollm2_run):
    x = torch.from_numpy(np.load(smollm2_acts / "shard_00000.npy"))
    mean_norm = float(x.norm(dim=1).mean())
    assert 100 < mean_norm < 300  # Llama residual streams are large...
    per_dim = x.abs().mean(0)
    assert float(per_dim.max() / per_dim.median()) > 20  # ...and a few dimensions dominate
    metrics = json.loads((smollm2_run / "metrics.json").read_text())
    assert metrics["scale_factor"] == pytest.approx(math.sqrt(D) / metrics["raw_mean_norm"], rel=0.05)
    assert metrics["explained_variance"] > 0.5 and metrics["dead_frac"] < 0.5


def _identity_sae():
    eye = torch.eye(D)
    sae = build_sae(model_config("relu"), D, 2 * D)
    sae.load_plain({"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * D),
                    "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(D)})  # fmt: skip
    return sae.eval()


def test_lm_loss_scores_on_heldout_pydoc(smollm2_acts, smollm2_run):
    exact = lm_eval_metrics(_identity_sae(), LM, smollm2_acts)
    assert 2.0 < exact["ce_loss_clean"] < 4.5 and exact["ce_loss_zero_ablation"] > exact["ce_loss_clean"] + 3
    assert exact["ce_loss_score"] == pytest.approx(1.0, abs=1e-3) and abs(exact["delta_lm_loss"]) < 1e-3
    assert exact["lm_eval_tokens"] >= LM.tokens
    trained = lm_eval_metrics(load_sae(smollm2_run), LM, smollm2_acts)
    assert 0.0 < trained["ce_loss_score"] < 1.0 and trained["delta_lm_loss"] > 0
    # (that the clean loss is the model's own next-token loss is checked on GPT-2 in test_lm_eval)


def test_starting_at_the_hooked_block_changes_nothing(smollm2_acts, smollm2_run):
    import sae_sweep.lm_eval as lm_eval

    sae = load_sae(smollm2_run)
    fast = lm_eval_metrics(sae, LM, smollm2_acts)
    (held,) = lm_eval._HELDOUT.values()
    assert held.block_inputs is not None  # Llama blocks return bare tensors: the skip is in use
    kept, held.block_inputs = held.block_inputs, None
    try:
        full = lm_eval_metrics(sae, LM, smollm2_acts)
    finally:
        held.block_inputs = kept
    assert fast["ce_loss_sae"] == pytest.approx(full["ce_loss_sae"], abs=1e-4)


def test_feature_browser_shows_pydoc_text_and_unembedding_effects(smollm2_run):
    cfg = FeaturesConfig(latents=6, extremes=2, top_contexts=3, random_contexts=2, logits=5, progress=False)
    index = build_features(smollm2_run, cfg)
    s = json.loads((index.parent / "features.json").read_text())
    assert s["has_text"] and s["model"] == SMOLLM2 and len(s["latents"]) == 6
    source = resolve_text("pydoc")
    docs = source.names()
    for r in s["latents"]:
        for c in r["top"]:
            text = "".join(s["vocab"][str(t)] for t in c["token_ids"])
            assert text.strip() and text in source.document(c["doc"])  # the real text at that place
            assert s["doc_names"][str(c["doc"])] == docs[c["doc"]]
    model, _, _ = _model()
    W_U = model.get_parameter("lm_head.weight").detach() * model.get_parameter("model.norm.weight").detach()
    W_dec = load_sae(smollm2_run).W_dec.detach()
    r = s["latents"][0]
    assert [t for t, _ in r["promotes"]] == (W_dec[r["latent"]] @ W_U.T).topk(5).indices.tolist()


def test_lm_eval_cost_benchmark_scores_runs_as_a_worker_does(smollm2_acts, smollm2_run, capsys):
    from benchmarks import lm_eval_cost

    # the same eval.lm settings as LM, so the loaded model and its baselines are reused
    same_as_lm = [f"tokens={LM.tokens}", f"batch_size={LM.batch_size}", f"device={LM.device}"]
    lm_eval_cost.main([str(smollm2_run), str(smollm2_run), *same_as_lm])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runs, (summary,) = rows[:-1], rows[-1:]
    assert [r["bench"] for r in runs] == ["lm_eval", "lm_eval"] and summary["bench"] == "lm_eval_cost"
    direct = lm_eval_metrics(load_sae(smollm2_run), LM, smollm2_acts)
    assert all(r["ce_loss_score"] == pytest.approx(direct["ce_loss_score"], abs=1e-4) for r in runs)
    assert summary["first_call_s"] > 0 and summary["per_trial_s"] > 0
