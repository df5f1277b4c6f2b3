"""SAELens on-disk layout: export a run's SAE so `sae_lens.SAE.load_from_disk(DIR)` loads it, and import.

    python -m sae_sweep.interop.saelens export RUN_DIR OUT_DIR [--model-name NAME] [--hook-name NAME]
    python -m sae_sweep.interop.saelens import SAELENS_DIR OUT_RUN_DIR

The layout (SAELens 6): `cfg.json` + `sae_weights.safetensors` holding W_enc [d_in, d_sae], b_enc
[d_sae], W_dec [d_sae, d_in], b_dec [d_in] (+ threshold [d_sae] for jumprelu). cfg.json has top-level
architecture (standard | topk | jumprelu), d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations (+ k and rescale_acts_by_decoder_norm for topk) and a
`metadata` dict with model_name, hook_name, context_size, prepend_bos, dataset_path and
sae_lens_version (the loader converts configs without a version >= 6 as pre-6.0 ones, so the export
states the layout version it follows).

sae_sweep's plain form already applies to raw activations with no pre-encoder bias, so the export
copies tensors unchanged (apply_b_dec_to_input false, normalize_activations none). Each architecture
declares its SAELens form (`saelens_architecture`): relu is standard, and batchtopk and
matryoshka_batchtopk, whose inference is `pre where pre > threshold`, are jumprelu (as SAELens itself
saves its BatchTopK and Matryoshka BatchTopK SAEs). Import folds
what SAELens can hold and the plain form cannot (b_dec subtracted before the encoder, decoder-norm
rescaling for topk) into the weights; run-time normalisations (layer_norm, constant_norm_rescale,
covariance_whitening) cannot be folded and are refused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from sae_sweep import rundir
from sae_sweep._version import __version__
from sae_sweep.errors import DataError, SaeSweepError
from sae_sweep.harvest import read_manifest
from sae_sweep.models import FORMAT_VERSION, architectures

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_LAYOUT_VERSION = "6.0.0"  # the cfg.json layout written here (SAELens >= 6)
# SAELens's inference architectures -> ours (an export names its own, which comes back where it can).
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
FOLDED_NORMALISATIONS = ("none", "expected_average_only_in")  # the latter is folded in when SAELens saves


def _read_sae_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise DataError(path, "no such SAE file (expected a run directory holding sae.safetensors)")
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def _run_provenance(run_dir: Path) -> dict[str, Any]:
    """model/hook/text from the harvest manifest of the run's data folder, when there is one."""
    data_path = ((rundir.read_config(run_dir) or {}).get("data") or {}).get("path")
    manifest = read_manifest(data_path) if data_path and Path(data_path).is_dir() else None
    if data_path is None or manifest is None:
        return {"dataset_path": data_path}
    return {
        "model_name": manifest.get("model"),
        "hook_name": manifest.get("hook_name"),
        "context_size": manifest.get("context_length"),
        "prepend_bos": bool(manifest.get("prefix_ids")),
        "dataset_path": manifest.get("text"),
        "activations_path": str(Path(data_path).resolve()),
    }


def export_saelens(
    run_dir: str | Path, out_dir: str | Path, model_name: str | None = None, hook_name: str | None = None
) -> Path:
    """Write OUT_DIR/cfg.json + sae_weights.safetensors for the SAE of a run directory (or file)."""
    run_dir = Path(run_dir)
    sae_file = run_dir / rundir.SAE if run_dir.is_dir() else run_dir
    tensors, meta = _read_sae_file(sae_file)
    arch = meta.get("architecture")
    known = architectures()
    if arch not in known:
        raise DataError(sae_file, f"has architecture {arch!r}; exportable: {', '.join(known)}")
    saelens_arch = known[arch].saelens_architecture
    d_sae, d_in = tensors["W_dec"].shape
    hyper = json.loads(meta.get("hyperparameters", "{}"))
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "model_name": None,
        "hook_name": None,
        "hook_head_index": None,
        **(_run_provenance(run_dir) if run_dir.is_dir() else {}),
        "exported_by": f"sae_sweep {__version__}",
        "sae_sweep_architecture": arch,
        "sae_sweep_hyperparameters": hyper,
        "sae_sweep_scale_factor": meta.get("scale_factor"),
        "sae_sweep_raw_mean_norm": meta.get("raw_mean_norm"),
    }
    metadata.update({k: v for k, v in (("model_name", model_name), ("hook_name", hook_name)) if v})
    cfg: dict[str, Any] = {
        "architecture": saelens_arch,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # the plain form has no pre-encoder bias
        "normalize_activations": "none",  # the input scale is folded into the weights
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if saelens_arch == "topk":
        cfg.update(k=int(hyper["k"]), rescale_acts_by_decoder_norm=False)
    weights = {name: tensors[name].float().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if saelens_arch == "jumprelu":
        weights["threshold"] = tensors["threshold"].float().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_bytes(out / WEIGHTS_FILE, safetensors_bytes(weights))
    rundir.write_json(out / CFG_FILE, cfg)
    return out


def _pre6(cfg: dict[str, Any]) -> dict[str, Any]:
    """Older SAELens configs: the key renames and defaults SAELens's own loader applies."""
    cfg = {{"hook_point": "hook_name"}.get(k, k): v for k, v in cfg.items()}
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk":
        cfg["architecture"], cfg["k"] = "topk", cfg.get("activation_fn_kwargs", {}).get("k")
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    cfg["metadata"] = {k: cfg.get(k) for k in ("model_name", "hook_name", "context_size", "prepend_bos")}
    return cfg


def import_saelens(saelens_dir: str | Path, out_dir: str | Path) -> Path:
    """Write OUT_DIR/sae.safetensors (sae_sweep's plain form) from a SAELens folder."""
    src = Path(saelens_dir)
    cfg_path, weights_path = src / CFG_FILE, src / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise DataError(path, f"missing: a SAELens folder holds {CFG_FILE} and {WEIGHTS_FILE}")
    cfg = json.loads(cfg_path.read_text())
    version = (cfg.get("metadata") or {}).get("sae_lens_version") or cfg.get("sae_lens_version")
    if not version or int(str(version).split(".")[0]) < 6:
        cfg = _pre6(cfg)
    meta_in: dict[str, Any] = cfg.get("metadata") or {}
    arch_in = cfg.get("architecture", "standard")
    if arch_in not in FROM_SAELENS:
        raise DataError(cfg_path, f"has architecture {arch_in!r}; importable: {', '.join(FROM_SAELENS)}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in FOLDED_NORMALISATIONS:
        problem = f"uses normalize_activations={norm!r}: a run-time normalisation, not fixed weights"
        raise DataError(cfg_path, problem)
    with safe_open(str(weights_path), framework="pt") as fh:
        t = {k: fh.get_tensor(k).float() for k in fh.keys()}
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in t]
    if missing or (arch_in == "jumprelu" and "threshold" not in t):
        raise DataError(weights_path, f"lacks {missing or ['threshold']} for a {arch_in} SAE")
    if "finetuning_scaling_factor" in t or "scaling_factor" in t:
        raise DataError(weights_path, "has a finetuning scaling factor, which this importer does not fold")

    if cfg.get("rescale_acts_by_decoder_norm"):  # topk on pre * ||W_dec_i||: same selection once folded
        norms = t["W_dec"].norm(dim=1)
        t["W_enc"], t["b_enc"] = t["W_enc"] * norms, t["b_enc"] * norms
        t["W_dec"] = t["W_dec"] / norms[:, None]
    if cfg.get("apply_b_dec_to_input", True):
        # (x - b_dec) @ W_enc + b_enc == x @ W_enc + (b_enc - b_dec @ W_enc)
        t["b_enc"] = t["b_enc"] - t["b_dec"] @ t["W_enc"]

    arch = FROM_SAELENS[arch_in]
    hyper = dict(meta_in.get("sae_sweep_hyperparameters") or {})
    if arch_in == "topk":
        hyper = {"k": int(cfg["k"])}
    # An SAE exported by sae_sweep comes back as its own architecture where that holds the weights
    # unchanged (e.g. batchtopk, exported as jumprelu, when its threshold is still one number).
    original = architectures().get(str(meta_in.get("sae_sweep_architecture")))
    if original is not None and original.saelens_architecture == arch_in:
        if arch_in != "jumprelu" or original.inference_form_matches(t["threshold"]):
            arch = original.architecture
    d_sae, d_in = t["W_dec"].shape
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    if arch_in == "jumprelu":
        names.append("threshold")
    tensors = {k: t[k].contiguous() for k in names}
    scale = meta_in.get("sae_sweep_scale_factor") or "1.0"  # already folded either way
    metadata = {
        "format_version": FORMAT_VERSION,
        "architecture": arch,
        "d_in": str(d_in),
        "hidden": str(d_sae),
        "scale_factor": str(scale),
        "raw_mean_norm": str(meta_in.get("sae_sweep_raw_mean_norm") or math.nan),
        "hyperparameters": json.dumps(hyper),
        **{k: str(v) for k, v in hyper.items()},
        "imported_from": "saelens",
        **{k: str(meta_in[k]) for k in ("model_name", "hook_name") if meta_in.get(k) is not None},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_bytes(out / rundir.SAE, safetensors_bytes(tensors, metadata=metadata))
    rundir.write_json(out / "saelens_cfg.json", cfg)  # provenance
    return out


def main(argv: list[str]) -> int:
    prog, about = "python -m sae_sweep.interop.saelens", (__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog=prog, description=about)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="run directory -> SAELens folder (cfg.json + weights)")
    exp.add_argument("run_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--model-name", help="metadata.model_name (default: the harvest manifest's model)")
    exp.add_argument("--hook-name", help="metadata.hook_name (default: the manifest's hook_name)")
    imp = sub.add_parser("import", help="SAELens folder -> run directory with sae.safetensors")
    imp.add_argument("saelens_dir")
    imp.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            out = export_saelens(args.run_dir, args.out_dir, args.model_name, args.hook_name)
            print(f"wrote {out}/{CFG_FILE}, {WEIGHTS_FILE}; load with sae_lens.SAE.load_from_disk('{out}')")
        else:
            out = import_saelens(args.saelens_dir, args.out_dir)
            print(f"wrote {out / 'sae.safetensors'}; load with sae_sweep.models.load_sae('{out}')")
    except SaeSweepError as err:
        print(f"sae_sweep.interop.saelens: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
