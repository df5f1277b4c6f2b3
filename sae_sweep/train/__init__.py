"""The trainer: train(cfg) runs one SAE to a finished run directory."""

from sae_sweep.train.trainer import train

__all__ = ["train"]
