"""Recipe values that depend on the training budget, and a check on coefficients carried over.

`budget_lr`: the learning rate a run uses when `lr` is null. The architectures' own rules (Gao et
al.'s 2e-4 / sqrt(hidden / 2^14) for the TopK family; 1e-3 x sqrt(128 / d_in) for relu and jumprelu)
are long-budget rules: tens of thousands of optimizer steps. A run of a few hundred steps needs a
larger lr to get anywhere, so below LONG_BUDGET_STEPS (TopK family and relu) the rule is scaled up
(see `budget_lr` for the rule and benchmarks/README.md, "Quality", for the measurements it comes
from). `lr` set by the user is always used as given; `lr_scale` multiplies the recipe's value (what
`-m lr_check` sweeps).

`budget_batch_size`: the batch size a run uses when `batch_size` is null. At a fixed token budget
more, smaller steps trained better SAEs at every lr measured, so the batch starts at
DEFAULT_BATCH_SIZE and halves while the budget allows fewer than the architecture's
`budget_min_steps` steps (TopK family: 400; relu: 800), down to MIN_BUDGET_BATCH_SIZE; jumprelu
keeps DEFAULT_BATCH_SIZE (not measured at short budgets).

`l1_lambda_note`: sae_sweep's relu loss is MSE summed over the input dimensions plus l1_lambda x L1
(sum_i f_i ||W_dec,i||), both averaged over tokens. Code that averages the MSE over the dimensions
and sums the L1 over the batch (the researcher's notes did) has a coefficient d_in x batch_size times
stronger per unit, so its values (1e-9, 1e-5) do nothing here. Such a value gets one line before
training with its equivalent under this convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_sweep.models.registry import architecture

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "L1_NEGLIGIBLE",
    "LONG_BUDGET_STEPS",
    "budget_batch_size",
    "budget_lr",
    "config_note",
    "l1_lambda_note",
    "notes_equivalent",
]

# Below this, relu's L1 term changes nothing measurable on normalised inputs (E||x|| = sqrt(d_in)):
# l1_lambda 1e-3 trains to the same L0 and FVU as 0 on the built-in data (benchmarks/README.md).
L1_NEGLIGIBLE = 1e-2

# Steps at and beyond which an architecture's long-budget lr rule applies unchanged (Gao et al.'s runs
# are of this order); below, the rule is scaled up to the architecture's budget_lr_cap.
LONG_BUDGET_STEPS = 80_000


def budget_lr(base_lr: float, arch: str, d_in: int, hidden: int, k: int | None, steps: int) -> float:
    """The recipe lr for a run of `steps` optimizer steps, from the architecture's long-budget `base_lr`.

    TopK family: base_lr x sqrt(LONG_BUDGET_STEPS / steps) x sqrt(128 / d_in) (the last factor only
    above d_in 128, its `budget_lr_d_in`), at least base_lr and at most its `budget_lr_cap` (1e-2).
    Gao et al.'s 2e-4 / sqrt(hidden / 2^14) is fitted on long runs; a run of a few hundred steps, as a
    sweep trial on a CPU gets, measured best at 1e-2 where that rule gives 8e-4 to 1.6e-3 (d_in 64 and
    128). Wider inputs want less: at d_in 768 the best lr was 4e-3 (3e-3: 0.013 MCC behind; 7.6e-3, the
    rule without the d_in factor: 0.126 behind), at d_in 256 4.5e-3 to 7e-3. Adam moves every weight
    by about lr a step, and a unit decoder row's weights are ~1/sqrt(d_in), so the same lr turns a
    wider row further.
    relu: the same without the d_in factor, at most its budget_lr_cap, 3e-3: its rule
    1e-3 x sqrt(128 / d_in) measured 0.04-0.25 MCC behind 3e-3 at 400-1000 steps, at d_in 64 to 256
    alike, and 3e-3 was the best cell on MiniLM (d_in 384) too (so the cap, not the scaled rule, sets
    the lr there). jumprelu: base_lr unchanged (not
    measured at short budgets). hidden and k enter through base_lr (k: not measured to matter).
    """
    spec = architecture(arch)
    if spec.budget_lr_cap is None:
        return base_lr
    factor = max(1.0, (LONG_BUDGET_STEPS / max(1, steps)) ** 0.5)
    if spec.budget_lr_d_in is not None and d_in > spec.budget_lr_d_in:
        factor *= (spec.budget_lr_d_in / d_in) ** 0.5
    return max(base_lr, min(base_lr * factor, spec.budget_lr_cap))


# The recipe's batch size (tokens per optimizer step) and its short-budget rule: e.g. TopK at 1M tokens
# trains at 2048 (489 steps) rather than 4096 (245), which measured 0.034 MCC better; relu wants more
# steps (at 1M tokens 1024 beat 2048 by 0.027 MCC at the same lr) (benchmarks/README.md, "Quality").
# Below MIN_BUDGET_BATCH_SIZE nothing was measured.
DEFAULT_BATCH_SIZE = 4096
MIN_BUDGET_BATCH_SIZE = 1024


def budget_batch_size(arch: str, budget_tokens: int | None) -> int | None:
    """The recipe batch_size for an architecture and a budget in tokens (None: unknown yet).

    TopK family and relu: DEFAULT_BATCH_SIZE, halved while budget_tokens / batch < the architecture's
    budget_min_steps (400; 800), at least MIN_BUDGET_BATCH_SIZE; None when it depends on a budget not
    known yet (epochs before the data is read). jumprelu: DEFAULT_BATCH_SIZE whatever the budget.
    """
    min_steps = architecture(arch).budget_min_steps
    if min_steps is None:
        return DEFAULT_BATCH_SIZE
    if budget_tokens is None:
        return None
    batch = DEFAULT_BATCH_SIZE
    while batch > MIN_BUDGET_BATCH_SIZE and budget_tokens / batch < min_steps:
        batch //= 2
    return batch


def notes_equivalent(l1_lambda: float, d_in: int, batch_size: int) -> float:
    """The l1_lambda here that a coefficient under the notes' convention (MSE averaged over the d_in
    dimensions, L1 summed over the batch) corresponds to: it is d_in x batch_size times stronger."""
    return l1_lambda * d_in * batch_size


def l1_lambda_note(l1_lambda: float, d_in: int, batch_size: int) -> str | None:
    """One line for a relu l1_lambda too small to change anything (None for 0 or a usable value)."""
    if not 0 < l1_lambda < L1_NEGLIGIBLE:
        return None
    equivalent = notes_equivalent(l1_lambda, d_in, batch_size)
    return (
        f"l1_lambda={l1_lambda:g} is too small to change anything here (below {L1_NEGLIGIBLE:g} it trains "
        f"like l1_lambda=0; usable values are ~1 to 10). If it comes from code that averages the MSE over "
        f"the dims and sums the L1 over the batch, the same strength here is l1_lambda = {l1_lambda:g} x "
        f"d_in {d_in} x batch_size {batch_size} = {_round(equivalent)}"
    )


def _round(value: float) -> str:
    return f"{value:.3g}" if value < 1e4 else f"{value:.2e}"


def config_note(cfg: Any) -> str | None:
    """l1_lambda_note for a composed config, before any data is read (d_in from the synthetic keys or
    the first shard's header); None where it does not apply or d_in cannot be known yet. The batch
    size is the run's (the recipe's for a token budget; DEFAULT_BATCH_SIZE where an epochs budget
    leaves it open)."""
    if (
        architecture(cfg.model.name).sparsity_metric != "l1"
        or cfg.l1_lambda is None
        or not 0 < cfg.l1_lambda < L1_NEGLIGIBLE
    ):
        return None
    d_in = cfg.data.d_in if cfg.data.kind == "synthetic" else None
    if d_in is None:
        try:
            from sae_sweep.data.readers import open_shards

            d_in = open_shards(Path(cfg.data.path))[0].d_in
        except Exception:  # unreadable folders are reported by the run itself, with their file
            return None
    batch_size = cfg.batch_size
    if batch_size is None:
        batch_size = budget_batch_size(cfg.model.name, None if cfg.tokens is None else int(cfg.tokens))
    return l1_lambda_note(cfg.l1_lambda, int(d_in), int(batch_size or DEFAULT_BATCH_SIZE))
