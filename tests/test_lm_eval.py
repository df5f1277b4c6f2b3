"""The LM-loss score: an SAE's reconstruction spliced into a (tiny, random, causal) GPT-2's forward pass."""

import math
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")

from test_harvest import MINILM, make_tiny_gpt2  # noqa: E402

from sae_sweep.errors import ConfigError  # noqa: E402
from sae_sweep.harvest import harvest, parse_args  # noqa: E402
from sae_sweep.harvest.hooks import load_model  # noqa: E402
from sae_sweep.harvest.text import batches, framing, resolve_text  # noqa: E402
from sae_sweep.lm_eval import LMEvalConfig, check_lm_eval, lm_eval_metrics, main  # noqa: E402
from sae_sweep.models import build_sae, load_sae, model_config, save_sae  # noqa: E402

D = 64  # the tiny GPT-2's width


@pytest.fixture(scope="module")
def gpt2_harvest(tmp_path_factory):
    model_dir = make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))
    out = tmp_path_factory.mktemp("gpt2-acts")
    harvest(
        parse_args(
            [
                f"model={model_dir}",
                "layer=0",
                "context_length=64",
                "tokens=500",
                "progress=false",
                f"out={out}",
            ]
        )
    )
    return model_dir, out


def _sae(W_enc, W_dec, arch="relu"):
    sae = build_sae(model_config(arch), W_enc.shape[0], W_enc.shape[1])
    sae.load_plain(
        {"W_enc": W_enc, "b_enc": torch.zeros(W_enc.shape[1]), "W_dec": W_dec, "b_dec": torch.zeros(D)}
    )
    return sae.eval()


def identity_sae():
    """relu(x) - relu(-x) = x exactly: a 'perfect' SAE with 2 * d_in latents."""
    eye = torch.eye(D)
    return _sae(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0))


def zero_sae():
    return _sae(torch.randn(D, 2 * D), torch.zeros(2 * D, D))


CFG = LMEvalConfig(enabled=True, tokens=1500, batch_size=8, device="cpu")


def test_identity_sae_scores_one_and_a_zero_output_scores_zero(gpt2_harvest):
    _, acts = gpt2_harvest
    perfect = lm_eval_metrics(identity_sae(), CFG, harvest_dir=acts)
    assert perfect["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["lm_eval_tokens"] >= 1500
    ablated = lm_eval_metrics(zero_sae(), CFG, harvest_dir=acts)
    assert ablated["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert ablated["ce_loss_sae"] == pytest.approx(ablated["ce_loss_zero_ablation"], abs=1e-6)
    assert ablated["ce_loss_zero_ablation"] != perfect["ce_loss_clean"]
    # Reconstructing only half the dimensions scores neither as the perfect nor as the empty SAE.
    half = torch.eye(D)[:, : D // 2]
    partial = lm_eval_metrics(_sae(torch.cat([half, -half], 1), torch.cat([half.T, -half.T], 0)), CFG, acts)
    assert partial["ce_loss_score"] not in (pytest.approx(0.0), pytest.approx(1.0))


def test_clean_loss_is_the_models_own_next_token_loss_on_heldout_text(gpt2_harvest):
    model_dir, acts = gpt2_harvest
    metrics = lm_eval_metrics(identity_sae(), CFG, harvest_dir=acts)
    model, tokenizer, _ = load_model(str(model_dir), causal_lm=True, dtype="float32", device="cpu")
    total, count = 0.0, 0
    held = resolve_text("pydoc", holdout_fraction=0.05).indexed("heldout")
    for batch in batches(held, tokenizer, framing(tokenizer, True), 64, 8, drop_bos=True):
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        with torch.inference_mode():
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
        if count >= CFG.tokens:
            break
    assert count == metrics["lm_eval_tokens"]
    assert metrics["ce_loss_clean"] == pytest.approx(total / count, rel=1e-5)
    assert math.isclose(metrics["ce_loss_clean"], math.log(512), rel_tol=0.05)  # random model: ~uniform


def test_settings_can_come_from_lm_cfg_without_a_manifest(gpt2_harvest):
    model_dir, _ = gpt2_harvest
    cfg = LMEvalConfig(model=str(model_dir), layer=1, hook="mlp_out", tokens=300, device="cpu")
    sae = identity_sae()
    assert lm_eval_metrics(sae, cfg)["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)


def test_a_non_causal_model_is_refused_in_one_line():
    cfg = LMEvalConfig(model=MINILM, layer=3, tokens=100, device="cpu")
    with pytest.raises(ConfigError, match="a causal language model") as err:
        lm_eval_metrics(identity_sae(), cfg)
    assert err.value.key == "eval.lm.model"


def test_missing_model_is_refused():
    with pytest.raises(ConfigError) as err:
        lm_eval_metrics(identity_sae(), LMEvalConfig())
    assert err.value.key == "eval.lm.model"


def test_cli_on_a_run_directory(gpt2_harvest, tmp_path, capsys):
    _, acts = gpt2_harvest
    (tmp_path / "config.yaml").write_text(f"data:\n  path: {acts}\n")
    save_sae(identity_sae(), tmp_path / "sae.safetensors", scale_factor=1.0, raw_mean_norm=1.0)
    assert main([str(tmp_path), "tokens=200", "device=cpu"]) == 0
    assert '"ce_loss_score": 1.0' in capsys.readouterr().out


def test_a_model_in_training_scored_with_its_scale_matches_its_saved_form(gpt2_harvest, tmp_path):
    _, acts = gpt2_harvest
    torch.manual_seed(0)
    sae = build_sae(model_config("topk", k=8), D, 4 * D).eval()  # subtracts b_dec before encoding
    with torch.no_grad():
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "sae.safetensors", scale_factor=0.37, raw_mean_norm=1.0)
    in_training = lm_eval_metrics(sae, CFG, acts, input_scale=0.37)
    saved = lm_eval_metrics(load_sae(tmp_path), CFG, acts)
    assert in_training["ce_loss_score"] == pytest.approx(saved["ce_loss_score"], abs=1e-4)


def test_check_lm_eval_fails_before_any_model_loads(gpt2_harvest):
    _, acts = gpt2_harvest
    check_lm_eval(CFG, acts)
    with pytest.raises(ConfigError) as err:
        check_lm_eval(LMEvalConfig(model="no-such-org/no-such-model", layer=0), None)
    assert err.value.key == "model"
    with pytest.raises(ConfigError, match="eval.lm.harvest"):
        check_lm_eval(CFG, "/no/such/harvest")


def test_a_run_with_eval_lm_enabled_records_the_lm_scores(gpt2_harvest, tmp_path):
    import json

    from omegaconf import OmegaConf

    from sae_sweep.config import Config, DataConfig, EvalConfig, TrainConfig
    from sae_sweep.train import train

    _, acts = gpt2_harvest
    cfg = Config(
        model=model_config("relu"),
        data=DataConfig(kind="shards", path=str(acts), chunk_tokens=50, test_fraction=0.1),
        train=TrainConfig(progress=False, log_every_tokens=256),
        eval=EvalConfig(lm=LMEvalConfig(enabled=True, tokens=256, batch_size=4)),
        batch_size=64,
        hidden_dim=128,
        tokens=5_000,
        l1_lambda=1.0,
        device="cpu",
        out_dir=str(tmp_path / "run"),
    )
    metrics = train(OmegaConf.structured(cfg))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("ce_loss_score", "delta_lm_loss", "ce_loss_clean", "ce_loss_sae", "ce_loss_zero_ablation"):
        assert math.isfinite(saved[key]) and saved[key] == pytest.approx(metrics.get(key))
    assert saved["delta_lm_loss"] == pytest.approx(saved["ce_loss_sae"] - saved["ce_loss_clean"])
