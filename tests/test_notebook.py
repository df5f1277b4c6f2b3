"""notebooks/explore_sweep.ipynb runs end to end on a small sweep: table, frontier, a Pareto SAE's latents."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_report import build_sweep

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_sweep.ipynb"


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory, data_root) -> Path:
    # The same directory test_report.py builds: whichever module runs first builds it.
    return build_sweep(tmp_path_factory.getbasetemp() / "report-sweep" / "small", data_root)


def test_notebook_runs_on_a_sweep(small_sweep, monkeypatch):
    monkeypatch.setenv("SAE_SWEEP_DIR", str(small_sweep))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it cleared"
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "\n".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert f"{small_sweep}: 12 trials; swept: l1_lambda, lr" in text
    assert "held-out tokens" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 2  # the frontier and the picked trial's density
    tables = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any("expl. var." in t for t in tables) and any("top tokens" in t for t in tables)
