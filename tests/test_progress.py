"""Progress bars show on a terminal and stay out of logs: a redirected run's stderr has no bar."""

import io
import subprocess
import sys

from sae_sweep import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_shows_on_a_terminal_unless_disabled(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert not progress.progress_bar(total=3).disable
    assert progress.progress_bar(total=3, enabled=False).disable


def test_bar_is_quiet_when_stderr_is_a_file(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert progress.progress_bar(total=3).disable


def test_a_run_with_redirected_output_writes_no_progress_bar(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sae_sweep", "tokens=20000", "hidden_dim=64", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / "metrics.json").exists()
    assert "it/s" not in done.stderr and "step/s" not in done.stderr and "%|" not in done.stderr, done.stderr
