"""Saved sweep definitions: YAML files under sweeps/ holding a list of overrides, runnable by name.

    python -m sae_sweep -m notes_grid                    # sweeps/notes_grid.yaml
    python -m sae_sweep -m sweeps/notes_grid.yaml hidden_dim=1024 tokens=1000000

A key given on the command line replaces the file's value for that key (shrink a grid for a CPU).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from sae_sweep.errors import ConfigError, DataError

# Looked up by bare name: the working directory's sweeps/, then the checkout this package runs from.
SEARCH_DIRS = (Path("sweeps"), Path(__file__).resolve().parents[2] / "sweeps")


def available() -> list[str]:
    names = {p.stem for d in SEARCH_DIRS if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


def find(arg: str) -> Path | None:
    """The definition file an argument names (a .yaml path or a bare name), or None for an override."""
    if "=" in arg:
        return None
    if arg.endswith((".yaml", ".yml")):
        path = Path(arg)
        if not path.is_file():
            raise DataError(path, "no such sweep definition file")
        return path
    for folder in SEARCH_DIRS:
        if (folder / f"{arg}.yaml").is_file():
            return folder / f"{arg}.yaml"
    raise ConfigError(
        "sweep definition",
        arg,
        "a key=value override, a .yaml file, or one of: "
        + (", ".join(available()) or "(no sweeps/ folder here)"),
    )


def load_overrides(path: Path) -> list[str]:
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # yaml errors come in several types
        raise DataError(path, f"is not readable YAML ({err})") from err
    overrides = spec.get("overrides") if isinstance(spec, dict) else None
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise DataError(path, "needs an `overrides:` list of key=value strings")
    return overrides


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand(args: list[str]) -> list[str]:
    """Replace saved-sweep arguments by their overrides; later keys (the command line) win."""
    merged: dict[str, str] = {}
    for arg in args:
        path = find(arg)
        for override in load_overrides(path) if path else [arg]:
            merged.pop(_key(override), None)  # re-insert so the winner keeps the later position
            merged[_key(override)] = override
    return list(merged.values())
