"""Stacked packs (train.stack, forced on CPU here): same-shape members stepped as one batched SAE end
where per-member training ends, to float tolerance, each with its own lr / l1_lambda / k / budget;
members that leave the stack (pruned, diverged, finished) do not disturb the others; checkpoints of
stacked members resume."""

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_sweep.errors import RunStopped, TrainingDiverged
from sae_sweep.train import loop as loop_module
from sae_sweep.train import train
from sae_sweep.train.pack import train_pack
from sae_sweep.train.stack import Stack, stacking_on

STACKED = {"stack": "true", "progress": False, "log_every_tokens": 8192, "dead_window": 100_000}


def _cfgs(make_cfg, root: Path, members, stack: bool):
    train_kw = STACKED if stack else {**STACKED, "stack": "false"}
    return [
        make_cfg(**{"tokens": 60_000, **m, "train": train_kw, "out_dir": str(root / f"m{i}")})
        for i, m in enumerate(members)
    ]


def _close_runs(a: Path, b: Path, atol: float = 1e-4) -> None:
    wa, wb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-3, atol=atol), f"{a.name}: {name}"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["status"] == mb["status"] and ma["steps"] == mb["steps"] and ma["tokens"] == mb["tokens"]
    assert ma["mse"] == pytest.approx(mb["mse"], rel=1e-3)

    def mse(d):
        with open(d / "curves.csv") as fh:
            return [float(r["mse"]) for r in csv.DictReader(fh)]

    assert mse(a) == pytest.approx(mse(b), rel=1e-3)


def _count_stacks(monkeypatch) -> list[int]:
    sizes: list[int] = []

    class Counted(Stack):
        def __init__(self, members):
            sizes.append(len(members))
            super().__init__(members)

    monkeypatch.setattr(loop_module, "Stack", Counted)
    return sizes


# two stacks (relu, topk); each member its own lr / l1_lambda / k / seed / budget
MEMBERS = [
    dict(l1_lambda=1.0),
    dict(l1_lambda=3.0, lr=2e-3, seed=1),
    dict(model="topk", k=3, seed=2),
    dict(model="topk", k=6, seed=3, lr=3e-3, tokens=30_000),
]


def test_stacked_members_train_as_they_do_one_by_one(make_cfg, tmp_path, monkeypatch):
    for cfg in _cfgs(make_cfg, tmp_path / "solo", MEMBERS, stack=False):
        train(cfg)
    sizes = _count_stacks(monkeypatch)
    stacked = _cfgs(make_cfg, tmp_path / "stacked", MEMBERS, stack=True)
    outcomes = train_pack(stacked)
    assert all(not isinstance(o, BaseException) and o["status"] == "completed" for o in outcomes)
    assert sorted(sizes) == [2, 2]  # one relu stack and one topk stack; the short topk run left early
    for i in range(len(MEMBERS)):
        _close_runs(tmp_path / "solo" / f"m{i}", tmp_path / "stacked" / f"m{i}")


def test_members_leaving_the_stack_do_not_disturb_the_others(make_cfg, tmp_path, monkeypatch):
    members = [dict(l1_lambda=1.0), dict(lr=1e30), dict(l1_lambda=2.0), dict(l1_lambda=1.5, seed=1)]

    def prune(row):
        if row["tokens"] >= 20_000:
            raise RunStopped("pruned", "worse than the median")

    sizes = _count_stacks(monkeypatch)
    cfgs = _cfgs(make_cfg, tmp_path / "stacked", members, stack=True)
    outcomes = train_pack(cfgs, [None, None, prune, None])
    assert sizes[0] == 4 and len(sizes) >= 2  # rebuilt as members left
    assert isinstance(outcomes[1], TrainingDiverged)
    assert isinstance(outcomes[2], RunStopped) and outcomes[2].status == "pruned"
    solo = _cfgs(make_cfg, tmp_path / "solo", members, stack=False)
    for i in (0, 3):
        train(solo[i])
        _close_runs(Path(solo[i].out_dir), Path(cfgs[i].out_dir))


def test_an_interrupted_stack_resumes_with_compact_checkpoints(make_cfg, tmp_path, monkeypatch):
    members = MEMBERS[:2]
    real = Stack.step
    calls = {"n": 0}

    def step(self, x):
        calls["n"] += 1
        if calls["n"] == 40:  # a SIGINT mid-step: the pack finishes the batch, then checkpoints
            signal.raise_signal(signal.SIGINT)
        return real(self, x)

    cfgs = _cfgs(make_cfg, tmp_path / "stacked", members, stack=True)
    with monkeypatch.context() as m:
        m.setattr(Stack, "step", step)
        with pytest.raises(KeyboardInterrupt):
            train_pack(cfgs)
    sizes = [(Path(c.out_dir) / "checkpoint.pt").stat().st_size for c in cfgs]
    weights = 4 * 128 * 32 * 2 * 3  # W_enc and W_dec (hidden 128, d_in 32) and their Adam moments, fp32
    assert all(weights < s < 1.5 * weights for s in sizes)  # each its own slice, not the whole stack
    outcomes = train_pack(cfgs)
    assert all(not isinstance(o, BaseException) and o["resumed_from_tokens"] == 40 * 512 for o in outcomes)
    for cfg in _cfgs(make_cfg, tmp_path / "solo", members, stack=False):
        train(cfg)
    for i in range(len(members)):
        _close_runs(tmp_path / "solo" / f"m{i}", tmp_path / "stacked" / f"m{i}")


def test_a_stack_trains_under_bf16_autocast_as_on_cuda(make_cfg, tmp_path):
    # on CUDA precision=auto is bf16 autocast, so stacked steps run under it there by default
    members = [{**m, "tokens": 20_000} for m in MEMBERS[1:3]] + [dict(model="topk", k=4, tokens=20_000)]
    runs = {}
    for stack in (False, True):
        cfgs = _cfgs(make_cfg, tmp_path / str(stack), members, stack=stack)
        for cfg in cfgs:
            cfg.train.precision = "bf16"
        outcomes = train_pack(cfgs)
        runs[stack] = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(runs[True]) == len(members)
    for solo, stacked in zip(runs[False], runs[True], strict=True):
        assert stacked["status"] == "completed"
        assert stacked["mse"] == pytest.approx(solo["mse"], rel=0.05)


def test_stacking_is_automatic_on_cuda_only():
    assert not stacking_on("auto", torch.device("cpu"))
    assert stacking_on("auto", torch.device("cuda"))
    assert stacking_on("true", torch.device("cpu")) and stacking_on(True, torch.device("cpu"))
    assert not stacking_on("false", torch.device("cuda"))


class _LetGoAt:
    """A release hook (a sweep worker shrinking its pack) that lets `which` go at its `at`-th call."""

    def __init__(self, which: list[int], at: int) -> None:
        self.which, self.at, self.calls, self.released = which, at, 0, []

    def choose(self, active: list[int]) -> list[int]:
        self.calls += 1
        return [i for i in self.which if i in active] if self.calls == self.at else []

    def done(self, released: list[int]) -> None:
        self.released += released


def test_a_stacked_member_let_go_leaves_the_stack_and_resumes_elsewhere(make_cfg, tmp_path, monkeypatch):
    members = [dict(l1_lambda=1.0), dict(l1_lambda=1.5, seed=1), dict(l1_lambda=3.0, lr=2e-3, seed=1)]
    sizes = _count_stacks(monkeypatch)
    cfgs = _cfgs(make_cfg, tmp_path / "stacked", members, stack=True)
    hook = _LetGoAt([1], at=3)
    outcomes = train_pack(cfgs, release=hook)
    assert hook.released == [1] and sizes[:2] == [3, 2]  # the stack was rebuilt without it
    assert (Path(cfgs[1].out_dir) / "checkpoint.pt").is_file()
    assert all(not isinstance(outcomes[i], BaseException) for i in (0, 2))
    resumed = train_pack([cfgs[1]])[0]  # another worker resumes it from its checkpoint
    assert not isinstance(resumed, BaseException) and resumed["resumed_from_tokens"] > 0
    solo = _cfgs(make_cfg, tmp_path / "solo", members, stack=False)
    for i in range(3):
        train(solo[i])
        _close_runs(Path(solo[i].out_dir), Path(cfgs[i].out_dir))


def test_batchtopk_and_matryoshka_members_stack_and_train_as_one_by_one(make_cfg, tmp_path, monkeypatch):
    # BatchTopK keeps the batch's top batch_size * k and a running inference threshold (saved with the
    # SAE); Matryoshka adds its prefixes' errors; members differ in k, lr, seed and budget
    members = [
        dict(model="batchtopk", k=3),
        dict(model="batchtopk", k=6, seed=1, lr=3e-3, tokens=30_000),
        dict(model="matryoshka_batchtopk", k=4, seed=2),
        dict(model="matryoshka_batchtopk", k=8, seed=3, lr=2e-3),
    ]
    for cfg in _cfgs(make_cfg, tmp_path / "solo", members, stack=False):
        train(cfg)
    sizes = _count_stacks(monkeypatch)
    outcomes = train_pack(_cfgs(make_cfg, tmp_path / "stacked", members, stack=True))
    assert all(not isinstance(o, BaseException) and o["status"] == "completed" for o in outcomes)
    assert sorted(sizes) == [2, 2]
    for i in range(len(members)):
        _close_runs(tmp_path / "solo" / f"m{i}", tmp_path / "stacked" / f"m{i}")
        threshold = load_file(str(tmp_path / "stacked" / f"m{i}" / "sae.safetensors"))["threshold"]
        assert float(threshold.min()) > 0  # the inference threshold was learnt while stacked
