"""train_pack: runs that share data and batch size train on one stream of batches, each with exactly the
result it gets alone, its own directory, checkpoint, curves and stop."""

import csv
import json
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sae_sweep.errors import ConfigError, Released, RunStopped, TrainingDiverged
from sae_sweep.rundir import Metrics
from sae_sweep.train import train
from sae_sweep.train.loop import Outcome
from sae_sweep.train.pack import train_pack
from sae_sweep.train.trainer import Trainer

TIMING = ("tokens_per_s", "train_seconds")

# Members differ in everything a pack allows: architecture, width, l1_lambda, lr, k, seed, budget.
MEMBERS = [
    dict(l1_lambda=1.0),
    dict(l1_lambda=3.0, lr=2e-3, seed=1),
    dict(model="topk", k=3, seed=2),
    dict(model="jumprelu", hidden_dim=64, tokens=60_000),
]


def _cfgs(make_cfg, root: Path, members=MEMBERS, **common):
    return [
        make_cfg(**{"tokens": 100_000, **common, **m, "out_dir": str(root / f"m{i}")})
        for i, m in enumerate(members)
    ]


def _completed(outcomes: list[Outcome]) -> list[Metrics]:
    """The outcomes as metrics, failing the test on any that is an exception."""
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert not errors, errors
    return [o for o in outcomes if not isinstance(o, BaseException)]


def _same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] == wb[name]).all(), f"{a.name}: {name}"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in set(ma) | set(mb):
        if key not in TIMING and key != "resumed_from_tokens":
            assert ma.get(key) == mb.get(key), f"{a.name}: {key}"

    def rows(d):
        with open(d / "curves.csv") as fh:
            return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader(fh)]

    assert rows(a) == rows(b)


def test_each_member_of_a_pack_gets_exactly_its_solo_result(make_cfg, tmp_path):
    solo = _cfgs(make_cfg, tmp_path / "solo")
    for cfg in solo:
        train(cfg)
    packed = _cfgs(make_cfg, tmp_path / "packed")
    outcomes = _completed(train_pack(packed))
    assert all(o["status"] == "completed" for o in outcomes)
    assert outcomes[3]["tokens"] < outcomes[0]["tokens"]  # the shorter budget finished early
    for a, b in zip(solo, packed, strict=True):
        _same_run(Path(a.out_dir), Path(b.out_dir))
        assert not (Path(b.out_dir) / "checkpoint.pt").exists()


def test_a_stopped_member_does_not_stop_the_others(make_cfg, tmp_path):
    members = [dict(l1_lambda=1.0), dict(lr=1e30), dict(l1_lambda=2.0), dict(model="topk", k=999)]
    cfgs = _cfgs(make_cfg, tmp_path, members)
    rows_seen = []

    def prune_late(row):
        rows_seen.append(row["tokens"])
        if row["tokens"] >= 50_000:
            raise RunStopped("pruned", "worse than the median")

    outcomes = train_pack(cfgs, [None, None, prune_late, None])
    assert _completed(outcomes[:1])[0]["status"] == "completed"
    assert isinstance(outcomes[1], TrainingDiverged)
    assert isinstance(outcomes[2], RunStopped) and outcomes[2].status == "pruned"
    assert isinstance(outcomes[3], ConfigError) and "model.k" in str(outcomes[3])
    for i, status in [(1, "diverged"), (2, "pruned")]:
        saved = json.loads((Path(cfgs[i].out_dir) / "metrics.json").read_text())
        assert saved["status"] == status and not (Path(cfgs[i].out_dir) / "sae.safetensors").exists()
    assert max(rows_seen) < 60_000  # the pruned member stopped at its first row past 50k tokens
    # the survivor still gets its solo result
    train(make_cfg(tokens=100_000, l1_lambda=1.0, out_dir=str(tmp_path / "solo")))
    _same_run(tmp_path / "solo", Path(cfgs[0].out_dir))


def _interrupt_after(monkeypatch, n_steps):
    real = Trainer._train_step
    calls = {"n": 0}

    def step(self, x, s):
        calls["n"] += 1
        if calls["n"] == n_steps:  # a SIGINT mid-step: the pack finishes the batch, then checkpoints
            signal.raise_signal(signal.SIGINT)
        return real(self, x, s)

    monkeypatch.setattr(Trainer, "_train_step", step)


def test_an_interrupted_pack_resumes_every_member(make_cfg, tmp_path, monkeypatch):
    packed = _cfgs(make_cfg, tmp_path / "packed")
    with monkeypatch.context() as m:
        _interrupt_after(m, 4 * 60 + 2)
        with pytest.raises(KeyboardInterrupt):
            train_pack(packed)
    assert all((Path(c.out_dir) / "checkpoint.pt").is_file() for c in packed)
    outcomes = _completed(train_pack(packed))
    resumed = [o["resumed_from_tokens"] for o in outcomes]
    # members step through a window of batches in turn, so they stop at different points
    assert all(0 < r < o["tokens"] for r, o in zip(resumed, outcomes, strict=True))
    assert len(set(resumed)) > 1
    for cfg in _cfgs(make_cfg, tmp_path / "solo"):
        train(cfg)
    for i in range(4):
        _same_run(tmp_path / "solo" / f"m{i}", tmp_path / "packed" / f"m{i}")


def test_members_resumed_at_different_points_share_the_rest_of_the_stream(make_cfg, tmp_path, monkeypatch):
    # m0 was interrupted alone at step 40; m1 never started; m2 already finished
    cfgs = _cfgs(make_cfg, tmp_path / "packed", MEMBERS[:3])
    with monkeypatch.context() as m:
        _interrupt_after(m, 40)
        with pytest.raises(KeyboardInterrupt):
            train(cfgs[0])
    done = train(cfgs[2])
    outcomes = _completed(train_pack(cfgs))
    assert outcomes[0]["resumed_from_tokens"] == 40 * 512
    assert outcomes[1]["resumed_from_tokens"] == 0
    assert outcomes[2] == json.loads(json.dumps(done))  # not trained again
    for cfg in _cfgs(make_cfg, tmp_path / "solo", MEMBERS[:2]):
        train(cfg)
    for i in range(2):
        _same_run(tmp_path / "solo" / f"m{i}", tmp_path / "packed" / f"m{i}")


def test_configs_that_cannot_share_batches_are_refused(make_cfg, tmp_path):
    cfgs = [
        make_cfg(out_dir=str(tmp_path / "a")),
        make_cfg(batch_size=256, out_dir=str(tmp_path / "b")),
    ]
    with pytest.raises(ValueError, match="cannot share batches"):
        train_pack(cfgs)


class _LetGo:
    """A release hook that lets members `which` go at its `at`-th window boundary."""

    def __init__(self, which: list[int], at: int, cfgs) -> None:
        self.which, self.at, self.cfgs = which, at, cfgs
        self.calls = 0
        self.released: list[int] = []
        self.checkpointed: list[bool] = []

    def choose(self, active: list[int]) -> list[int]:
        self.calls += 1
        return [i for i in self.which if i in active] if self.calls == self.at else []

    def done(self, released: list[int]) -> None:
        self.released += released  # by now each has its checkpoint on disk (another worker resumes it)
        self.checkpointed += [(Path(self.cfgs[i].out_dir) / "checkpoint.pt").is_file() for i in released]


def test_members_let_go_mid_pack_resume_elsewhere_with_their_solo_result(make_cfg, tmp_path):
    """A sweep worker shrinks its pack when another joins: members let go at a window boundary end
    Released with a checkpoint; resumed in another pack they end exactly as trained alone."""
    packed = _cfgs(make_cfg, tmp_path / "packed")
    hook = _LetGo([1, 3], at=3, cfgs=packed)
    outcomes = train_pack(packed, release=hook)
    assert hook.released == [1, 3] and hook.checkpointed == [True, True]
    assert isinstance(outcomes[1], Released) and isinstance(outcomes[3], Released)
    kept = _completed([outcomes[0], outcomes[2]])
    assert all(o["status"] == "completed" for o in kept)
    assert not (Path(packed[1].out_dir) / "metrics.json").exists()  # nothing recorded for a released run
    elsewhere = _completed(train_pack([packed[3], packed[1]]))  # another worker's pack, in another order
    assert all(o["resumed_from_tokens"] > 0 for o in elsewhere)
    for cfg in _cfgs(make_cfg, tmp_path / "solo"):
        train(cfg)
    for i in range(4):
        _same_run(tmp_path / "solo" / f"m{i}", tmp_path / "packed" / f"m{i}")


def test_the_last_member_of_a_pack_is_never_let_go(make_cfg, tmp_path):
    cfgs = _cfgs(make_cfg, tmp_path, MEMBERS[:2])
    hook = _LetGo([0, 1], at=2, cfgs=cfgs)
    outcomes = train_pack(cfgs, release=hook)
    assert len(hook.released) == 1 and isinstance(outcomes[hook.released[0]], Released)
    assert _completed([outcomes[1 - hook.released[0]]])[0]["status"] == "completed"
