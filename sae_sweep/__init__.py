"""sae_sweep: find good sparse autoencoders by sweeping their hyperparameters."""

__version__ = "0.1.0"
