"""The package list: every sae_sweep.* package found, plus the top-level conf/ shipped as sae_sweep.conf.

(The rest of the metadata is in pyproject.toml.)
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["sae_sweep", "sae_sweep.*"]), "sae_sweep.conf"],
    package_dir={"sae_sweep.conf": "conf"},
)
