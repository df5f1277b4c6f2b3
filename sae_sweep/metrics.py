"""The metric registry (`METRICS`: name -> direction, kind, what it needs, one-line doc).

Everything that lists metrics derives from `METRICS`: sweep objectives and their running proxies,
the terminal table (`TERMINAL`), trials.csv, table.md (`TABLE`), the figures (`PANELS`) and the
README's metric list (`python -m sae_sweep.metrics` prints it; a test holds the README to it).
How each is measured (streaming accumulators, feature matching) is in sae_sweep/measures.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# A latent is "dense" when it fires on more than this share of tokens.
DENSE_THRESHOLD = 0.1
# A run whose held-out FVU is at least this explains nothing (the mean does as well): recorded as
# collapsed by the trainer, never on a Pareto front.
COLLAPSED_FVU = 1.0

# --- the registry -----------------------------------------------------------------------------------

MINIMIZE, MAXIMIZE = "minimize", "maximize"
HELD_OUT, TRAINING = "held-out", "training"
GROUND_TRUTH, LM = "ground truth", "eval.lm"  # what a metric needs: data=synthetic; eval.lm.enabled=true


@dataclass(frozen=True)
class Metric:
    """One key of metrics.json that measures the SAE (run facts such as `tokens` are RUN_FACTS)."""

    name: str
    direction: str | None  # minimize | maximize (which way is better); None: neither, a diagnostic
    kind: str  # held-out (the test split, or the final weights) | training (measured while training)
    doc: str  # one line: the definition (x normalised, means over tokens)
    needs: str | None = None  # ground truth (data=synthetic) | eval.lm (eval.lm.enabled=true) | None
    running: str | None = None  # the curves.csv column that tracks it while training (pruning)
    running_rises: bool = True  # whether the metric rises with that column
    label: str = ""  # short name in tables (default: the name)
    axis: str = ""  # axis label in figures (default: the label)
    percent: bool = False  # a fraction shown as a percentage in tables and figures
    log: bool = False  # plotted on a log axis
    fmt: str = ".4g"  # format of its value in table.md

    @property
    def header(self) -> str:
        return (self.label or self.name) + (" %" if self.percent else "")


_MSE = "mean_t ||x - x_hat||^2"
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("mse", MINIMIZE, HELD_OUT, _MSE, running="mse", label="MSE", axis="MSE (log)", log=True),
        Metric(
            "fvu",
            MINIMIZE,
            HELD_OUT,
            "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (fraction of variance unexplained)",
            running="mse",
            label="FVU",
            log=True,
        ),
        Metric(
            "explained_variance",
            MAXIMIZE,
            HELD_OUT,
            "1 - fvu",
            running="mse",
            running_rises=False,
            label="expl. var.",
            axis="explained variance",
            fmt=".4f",
        ),
        Metric(
            "l0",
            MINIMIZE,
            HELD_OUT,
            "mean #{i : f_i > 0}",
            running="l0",
            label="L0",
            axis="L0 (active latents / token, log)",
            log=True,
            fmt=".3g",
        ),
        Metric("l1", MINIMIZE, HELD_OUT, "mean sum_i f_i ||W_dec,i||", label="L1", axis="L1 (log)", log=True),
        Metric(
            "loss",
            MINIMIZE,
            HELD_OUT,
            "mse + l1_lambda x the architecture's sparsity metric (l1 or l0; mse alone for the TopK family)",
            running="loss",
        ),
        Metric(
            "dead_frac",
            MINIMIZE,
            TRAINING,
            "share of latents silent over the last `train.dead_window` = 10^7 training tokens (all tokens "
            "if fewer; the window used is `dead_window_tokens`)",
            running="dead_frac",
            label="dead",
            axis="dead latents (%)",
            percent=True,
            fmt=".1f",
        ),
        Metric(
            "alive_frac",
            MAXIMIZE,
            TRAINING,
            "1 - dead_frac",
            running="dead_frac",
            running_rises=False,
            label="alive",
            percent=True,
            fmt=".1f",
        ),
        Metric(
            "dense_frac",
            MINIMIZE,
            HELD_OUT,
            f"share of latents firing on more than {DENSE_THRESHOLD:.0%} of tokens",
        ),
        Metric(
            "pct_active_batch",
            None,
            HELD_OUT,
            "% of latents firing at least once per batch: the notes' old proxy, for comparison only",
        ),
        Metric("cos_sim", MAXIMIZE, HELD_OUT, "mean cos(x, x_hat)"),
        Metric("l2_ratio", None, HELD_OUT, "mean ||x_hat|| / ||x|| (below 1: shrinkage)"),
        Metric("tokens_per_s", MAXIMIZE, TRAINING, "training tokens per second (training loop only)"),
        Metric("train_seconds", MINIMIZE, TRAINING, "seconds in the training loop"),
        Metric(
            "mcc",
            MAXIMIZE,
            HELD_OUT,
            "Hungarian-matched mean |cos| between true features and decoder rows",
            needs=GROUND_TRUTH,
            label="MCC",
            axis="MCC vs true features",
            fmt=".3f",
        ),
        Metric(
            "f1",
            MAXIMIZE,
            HELD_OUT,
            "mean per-latent firing F1 against the matched true feature",
            needs=GROUND_TRUTH,
        ),
        Metric(
            "ce_loss_score",
            MAXIMIZE,
            HELD_OUT,
            "(CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean): 1 = lossless, 0 = no better than "
            "zeroing the layer",
            needs=LM,
            label="CE score",
            fmt=".3f",
        ),
        Metric("delta_lm_loss", MINIMIZE, HELD_OUT, "CE_sae - CE_clean, nats per token", needs=LM),
        Metric("ce_loss_clean", None, HELD_OUT, "the LM's own cross-entropy on the held-out text", needs=LM),
        Metric(
            "ce_loss_sae",
            MINIMIZE,
            HELD_OUT,
            "cross-entropy with the SAE's reconstruction spliced in",
            needs=LM,
        ),
        Metric(
            "ce_loss_zero_ablation", None, HELD_OUT, "cross-entropy with the layer's output zeroed", needs=LM
        ),
    )
}
# metrics.json keys that describe the run rather than measure the SAE.
RUN_FACTS = (
    "status",
    "reason",
    "tokens",
    "steps",
    "dead_window_tokens",
    "n_eval_tokens",
    "resumed_from_tokens",
    "architecture",
    "d_in",
    "hidden_dim",
    "l1_lambda",
    "k",
    "lr",
    "batch_size",
    "scale_factor",
    "raw_mean_norm",
)
# What each view shows, in its order.
TERMINAL = ("fvu", "l0", "explained_variance", "dead_frac", "mcc")  # the sweep's closing table
TABLE = (
    "alive_frac",
    "dead_frac",
    "l0",
    "mse",
    "l1",
    "explained_variance",
    "mcc",
    "ce_loss_score",
)  # table.md
PANELS = ("explained_variance", "l0", "dead_frac", "mse", "l1", "mcc")  # report/metrics_vs_params.png


def every_run_has() -> tuple[str, ...]:
    """The metrics of every completed run (LM scores only come with eval.lm), in registry order."""
    return tuple(name for name, m in METRICS.items() if m.needs != LM)


def running_columns() -> tuple[str, ...]:
    """curves.csv columns measured on training batches that share a metric's name (mse, l0, ...)."""
    return tuple(dict.fromkeys(m.running for m in METRICS.values() if m.running in METRICS))


def markdown_list() -> str:
    """The README's metric list."""
    better = {MINIMIZE: "lower is better", MAXIMIZE: "higher is better", None: "no better side"}
    lines = []
    for m in METRICS.values():
        notes = [m.kind, better[m.direction]] + ([f"needs {m.needs}"] if m.needs else [])
        lines.append(f"- `{m.name}` ({'; '.join(notes)}): {m.doc}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_list())
