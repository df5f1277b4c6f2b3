"""Learning-rate and sparsity-coefficient schedules as functions of the step (no state to checkpoint)."""

from __future__ import annotations


def lr_multiplier(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up from 0, constant, then linear decay to 0 over the last decay_frac of steps."""
    warmup = int(warmup_frac * total_steps)
    decay = int(decay_frac * total_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_start = total_steps - decay
    if decay > 0 and step >= decay_start:
        return max(0.0, (total_steps - step) / decay)
    return 1.0


def sparsity_coefficient(step: int, total_steps: int, l1_lambda: float, warmup_frac: float) -> float:
    """l1_lambda rising linearly from 0 over the first warmup_frac of steps (avoids early collapse)."""
    warmup = int(warmup_frac * total_steps)
    if warmup > 0 and step < warmup:
        return l1_lambda * (step + 1) / warmup
    return l1_lambda
