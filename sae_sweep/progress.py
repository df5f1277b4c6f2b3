"""Progress bars: shown while someone watches (a terminal or a notebook), quiet in logs and pipes.

Every long loop (harvest, synthetic data, training, feature scans, collecting a sweep) makes its bar
here, so `progress=false` and output redirected to a file both silence them the same way.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm  # not tqdm.auto: it warns on import in notebooks without ipywidgets


def watched() -> bool:
    """Whether a person sees stderr: it is a terminal, or this runs in a Jupyter kernel."""
    return "ipykernel" in sys.modules or sys.stderr.isatty()


def progress_bar(*, enabled: bool = True, **tqdm_kwargs: Any) -> tqdm:
    """A tqdm bar, disabled unless `enabled` and watched()."""
    return tqdm(disable=not (enabled and watched()), **tqdm_kwargs)
