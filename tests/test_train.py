"""train(cfg): the run directory contract, learning the ground truth, resume, divergence."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sae_sweep.data import open_dataset
from sae_sweep.data.synthetic import GroundTruth
from sae_sweep.errors import ConfigError, RunStopped, TrainingDiverged
from sae_sweep.measures import mcc
from sae_sweep.models import load_sae
from sae_sweep.train import train
from sae_sweep.train import trainer as trainer_module
from sae_sweep.train.trainer import Trainer

SECTION5_METRICS = [
    "mse",
    "fvu",
    "explained_variance",
    "l0",
    "l1",
    "loss",
    "dead_frac",
    "alive_frac",
    "dense_frac",
    "dead_window_tokens",
    "pct_active_batch",
    "cos_sim",
    "l2_ratio",
    "tokens_per_s",
    "mcc",
    "f1",
]


def test_run_directory_contract(make_cfg):
    cfg = make_cfg(tokens=100_000)
    metrics = train(cfg)
    run = Path(cfg.out_dir)
    assert {"config.yaml", "metrics.json", "curves.csv", "sae.safetensors"} <= {p.name for p in run.iterdir()}
    assert not (run / "checkpoint.pt").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in SECTION5_METRICS:
        assert key in saved, key
    assert saved["status"] == "completed" and saved["resumed_from_tokens"] == 0
    assert saved["explained_variance"] == pytest.approx(1 - saved["fvu"])
    with open(run / "curves.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0] == "tokens" and len(rows) > 5
    tokens = [int(r[0]) for r in rows[1:]]
    assert tokens == sorted(tokens) and tokens[-1] == saved["tokens"]
    with safe_open(str(run / "sae.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        shapes = {k: tuple(fh.get_tensor(k).shape) for k in fh.keys()}
    assert shapes == {"W_enc": (32, 128), "b_enc": (128,), "W_dec": (128, 32), "b_dec": (32,)}
    assert meta["architecture"] == "relu" and float(meta["scale_factor"]) == pytest.approx(
        saved["scale_factor"]
    )
    assert float(meta["raw_mean_norm"]) * saved["scale_factor"] == pytest.approx(32**0.5, rel=0.05)
    latents = json.loads((run / "density.json").read_text())
    assert len(latents["density"]) == 128 and sum(latents["histogram"]["counts"]) <= 128
    # per-latent ground-truth scores: each of the 96 true features matched to one latent
    matched = [i for i, f in enumerate(latents["matched_feature"]) if f is not None]
    assert len(matched) == 96 and len({latents["matched_feature"][i] for i in matched}) == 96
    assert saved["f1"] == pytest.approx(sum(latents["f1"][i] for i in matched) / 96, rel=1e-5)


def test_saved_sae_applies_to_raw_activations(make_cfg):
    cfg = make_cfg(tokens=100_000)
    metrics = train(cfg)
    sae = load_sae(cfg.out_dir)
    data = open_dataset(cfg.data, progress=False)
    x_raw = next(iter(data.test_batches(2048)))
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x_raw))
    centred = (x_raw - x_raw.mean(0)).pow(2).sum()
    ev_raw = 1 - float((x_raw - x_hat).pow(2).sum() / centred)
    assert ev_raw == pytest.approx(metrics["explained_variance"], abs=0.05)


@pytest.mark.parametrize(
    "model,k,l1_lambda",
    [("relu", None, 2.0), ("topk", 3, None), ("batchtopk", 3, None), ("jumprelu", None, None)],
)
def test_each_architecture_learns_the_ground_truth(make_cfg, model, k, l1_lambda):
    metrics = train(make_cfg(model=model, k=k, l1_lambda=l1_lambda))
    truth = cast(GroundTruth, open_dataset(make_cfg().data, progress=False).ground_truth)
    random_mcc = mcc(truth.features, torch.randn(128, 32))
    assert metrics.get("mcc", 0.0) > random_mcc + 0.3, (metrics.get("mcc"), random_mcc)
    assert metrics["explained_variance"] > 0.7
    assert metrics["dead_frac"] < 0.5


@pytest.mark.parametrize("l1_lambda", [1.0, 5.0])
def test_relu_recipe_does_not_collapse_at_the_users_settings(make_cfg, l1_lambda):
    # the notes' setting: lr 1e-3 and batch 8192 killed every latent within an epoch
    metrics = train(make_cfg(l1_lambda=l1_lambda, lr=1e-3, batch_size=8192, tokens=1_600_000))
    assert metrics["alive_frac"] > 0.5
    assert metrics["explained_variance"] > 0.2
    assert 0 < metrics["l0"] < 64


def test_l1_lambda_zero_is_a_dense_baseline(make_cfg):
    dense = train(make_cfg(l1_lambda=0.0, tokens=100_000))
    assert dense["l0"] > 10 and dense["explained_variance"] > 0.9


def _stop_after(monkeypatch, n_steps):
    real = Trainer._train_step
    calls = {"n": 0}

    def step(self, x, s):
        calls["n"] += 1
        if calls["n"] == n_steps:  # Ctrl-C arrives mid-step; the loop stops after finishing it
            signal.raise_signal(signal.SIGINT)
        return real(self, x, s)

    monkeypatch.setattr(Trainer, "_train_step", step)


@pytest.mark.parametrize("model,k", [("relu", None), ("topk", 3)])
def test_interrupted_run_resumes_to_the_same_weights(make_cfg, tmp_path, monkeypatch, model, k):
    straight = make_cfg(model=model, k=k, tokens=150_000, out_dir=str(tmp_path / "straight"))
    train(straight)
    resumed = make_cfg(model=model, k=k, tokens=150_000, out_dir=str(tmp_path / "resumed"))
    with monkeypatch.context() as m:
        _stop_after(m, 137)
        with pytest.raises(KeyboardInterrupt):
            train(resumed)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    metrics = train(resumed)
    assert metrics["resumed_from_tokens"] == 137 * 512
    a, b = (
        load_file(str(tmp_path / "straight/sae.safetensors")),
        load_file(str(tmp_path / "resumed/sae.safetensors")),
    )
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # the curves agree too, but for the wall-clock column
    def curves(run):
        with open(tmp_path / run / "curves.csv") as fh:
            return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in csv.DictReader(fh)]

    assert curves("straight") == curves("resumed")


def test_sigkill_mid_run_then_same_command_resumes(make_cfg, tmp_path, data_root):
    args = [
        "data.d_in=32",
        "data.n_features=96",
        "data.n_tokens=120000",
        "data.true_l0=3.0",
        "data.chunk_tokens=1024",
        f"data.path={data_root}",
        "batch_size=256",
        "hidden_dim=128",
        "tokens=1500000",
        "device=cpu",
        "train.progress=false",
        "train.checkpoint_every_s=0.2",
        "train.log_every_tokens=2048",
    ]
    cmd = [sys.executable, "-m", "sae_sweep", *args, f"hydra.run.dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    killed = json.loads((tmp_path / "killed/metrics.json").read_text())
    assert killed["resumed_from_tokens"] > 0
    straight_cmd = cmd[:-1] + [f"hydra.run.dir={tmp_path / 'straight'}"]
    subprocess.run(straight_cmd, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    a, b = (
        load_file(str(tmp_path / "straight/sae.safetensors")),
        load_file(str(tmp_path / "killed/sae.safetensors")),
    )
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_finished_run_is_not_trained_again(make_cfg, monkeypatch):
    cfg = make_cfg(tokens=50_000)
    first = train(cfg)
    monkeypatch.setattr(trainer_module, "run_pack", lambda *a: pytest.fail("trained again"))
    assert train(cfg) == json.loads(json.dumps(first))


def test_a_different_config_in_the_same_directory_is_refused(make_cfg):
    train(make_cfg(tokens=50_000))
    with pytest.raises(ConfigError, match="l1_lambda was None, now 2.0"):
        train(make_cfg(tokens=50_000, l1_lambda=2.0))


def test_divergence_stops_with_a_status_and_no_sae(make_cfg):
    cfg = make_cfg(tokens=50_000, lr=1e30)
    with pytest.raises(TrainingDiverged, match="lower lr"):
        train(cfg)
    run = Path(cfg.out_dir)
    status = json.loads((run / "metrics.json").read_text())
    assert status["status"] == "diverged"
    assert not (run / "sae.safetensors").exists()


def test_k_larger_than_the_default_width_is_refused_before_training(make_cfg):
    with pytest.raises(ConfigError, match=r"'model.k' = 300 .* at most hidden_dim \(256\)"):
        train(make_cfg(model="topk", k=300, hidden_dim=None))  # hidden = 8 * d_in = 256


def test_a_collapsed_run_stops_early_with_its_status(make_cfg):
    cfg = make_cfg(l1_lambda=1000.0, tokens=400_000)
    with pytest.raises(RunStopped, match="collapsed") as info:
        train(cfg)
    status = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
    assert status["status"] == "collapsed" and status["tokens"] < 400_000
    assert info.value.status == "collapsed"
    with pytest.raises(RunStopped, match="collapsed"):  # the same command again says so, without training
        train(cfg)


def test_on_log_sees_every_row_and_can_stop_the_run(make_cfg):
    seen = []

    def pruner(row):
        seen.append(row)
        if row["tokens"] >= 50_000:
            raise RunStopped("pruned", "worse than the median trial")

    cfg = make_cfg(tokens=200_000)
    with pytest.raises(RunStopped, match="pruned"):
        train(cfg, on_log=pruner)
    assert [r["tokens"] for r in seen] == sorted(r["tokens"] for r in seen) and seen[0]["tokens"] == 8192
    status = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
    assert status["status"] == "pruned" and not (Path(cfg.out_dir) / "checkpoint.pt").exists()


def _write_researcher_folder(folder: Path, d_in: int = 48) -> None:
    """Three shards of different lengths in the three formats, like a dumped activation folder."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    features = torch.nn.functional.normalize(torch.randn(4 * d_in, d_in, generator=g), dim=1)

    def acts(n):
        fires = torch.rand(n, 4 * d_in, generator=g) < 0.01
        return (fires * (1 + 3 * torch.rand(n, 4 * d_in, generator=g))) @ features + 0.2

    folder.mkdir()
    import numpy as np

    np.save(folder / "acts_00.npy", acts(30_000).numpy())
    torch.save(acts(20_000).half(), folder / "acts_01.pt")
    save_file({"activations": acts(25_000)}, str(folder / "acts_02.safetensors"))


def test_cli_trains_on_a_researchers_shard_folder(tmp_path):
    _write_researcher_folder(tmp_path / "activations_data")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_sweep",
            "data=shards",
            "data.path=activations_data",
            "model=relu",
            "l1_lambda=5",
            "hidden_dim=256",
            "epochs=2",
            "batch_size=1024",
            "train.progress=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / res.stdout.split("run directory: ")[1].splitlines()[0]
    assert run_dir.parent == tmp_path / "outputs/runs"  # named after the overrides: same command, same run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["d_in"] == 48 and metrics["hidden_dim"] == 256
    assert metrics["explained_variance"] > 0.3 and metrics["alive_frac"] > 0.5
    assert "mcc" not in metrics  # no ground truth for a researcher's folder
    assert "explained_variance=" in res.stdout.splitlines()[-1]


def test_cli_refuses_a_shard_with_nan_naming_the_file(tmp_path):
    import numpy as np

    folder = tmp_path / "acts"
    folder.mkdir()
    good = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float32)
    bad = good.copy()
    bad[123, 4] = np.nan
    np.save(folder / "a.npy", good)
    np.save(folder / "b.npy", bad)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_sweep",
            "data=shards",
            f"data.path={folder}",
            "train.progress=false",
            "batch_size=256",
            "data.chunk_tokens=512",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard; a refusal takes seconds, but a thrashing machine can stall the start
    )
    assert res.returncode == 2
    assert (
        "b.npy" in res.stderr and "NaN" in res.stderr.replace("nan", "NaN") and "Traceback" not in res.stderr
    )


@pytest.mark.parametrize("model,k", [("relu", None), ("topk", 3), ("batchtopk", 3), ("jumprelu", None)])
def test_bf16_autocast_path_trains_close_to_fp32(make_cfg, tmp_path, model, k):
    # the CUDA default (bf16 autocast) run through CPU autocast: same recipe, fp32 weights, close results
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = make_cfg(
            model=model, k=k, tokens=60_000, out_dir=str(tmp_path / precision), train={"precision": precision}
        )
        runs[precision] = train(cfg)
    weights = load_file(str(tmp_path / "bf16" / "sae.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16["explained_variance"] == pytest.approx(fp32["explained_variance"], abs=0.05)
    assert bf16["l0"] == pytest.approx(fp32["l0"], rel=0.25, abs=1.0)
    assert runs["fp32"]["mse"] != runs["bf16"]["mse"]  # bf16 really ran
