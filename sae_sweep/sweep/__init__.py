"""Sweeps: `python -m sae_sweep -m key=a,b ...` runs `train(cfg)` for every trial of an Optuna study.

Hydra parses the overrides and composes each trial's config; Optuna holds the study (the queue of trials,
their parameters, states and metrics) in SQLite, PostgreSQL/MySQL or a journal file, shared by every
worker and every re-run of the command. The flow is in driver.py; the usage in README "Sweeps".
"""
