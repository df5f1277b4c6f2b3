"""`python -m benchmarks.gpu`: refuses cleanly without CUDA, and every piece runs at toy sizes on CPU."""

import json

import pytest
import torch

from benchmarks import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the command would run")
def test_gpu_benchmark_without_cuda_says_so_in_one_line(tmp_path, capsys):
    assert gpu.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--device cpu --tiny" in err
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_benchmark_pieces_run_on_cpu_at_toy_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it too)
    pytest.importorskip("triton")
    monkeypatch.chdir(tmp_path)
    assert gpu.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    rows = result["rows"]
    pieces = {r["piece"] for r in rows}
    assert pieces == set(gpu.PIECES)
    topk = [r for r in rows if r["piece"] == "topk" and "kernels" in r]
    assert [r["kernels"] for r in topk] == ["torch", "triton"] and all(r["tokens_per_s"] > 0 for r in topk)
    assert [r["trials"] for r in rows if "stacked_over_one_by_one" in r] == [2, 3]
    assert all(r["ok"] for r in rows if r["piece"] == "cli")
    table = (tmp_path / "out" / "gpu.md").read_text()
    assert "kernels=triton" in table and "CLI packed_sweep | | ok" in table
