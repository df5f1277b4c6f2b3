"""Text to harvest over: documents from `pydoc` or files, a held-out slice of them, and token windows.

Documents are split deterministically: every n-th one (n = round(1 / holdout_fraction)) is held out,
so the LM evaluation reads text the SAE never saw whatever the tokenizer or context length. Each
document is tokenized on its own and cut into windows of at most `context_length` tokens, with the
tokenizer's own special tokens (BERT: [CLS] ... [SEP]) or a prepended BOS (causal LMs) around each.
Documents are numbered in source order over all of them (held out or not); a harvested row's
provenance is (document number, position among that document's tokens, token id).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sae_sweep.errors import ConfigError, DataError

PYDOC = "pydoc"
TEXT_SUFFIXES = (".txt", ".jsonl")
_TEXT_ALLOWED = (
    "pydoc (Python's own documentation), or comma-separated .txt/.jsonl files, globs or folders "
    "holding such files"
)

Part = Literal["train", "heldout", "all"]


@dataclass(frozen=True)
class TextSource:
    spec: str  # what the user wrote
    files: tuple[Path, ...]  # empty for pydoc
    text_field: str
    holdout_every: int  # document i is held out when i % holdout_every == holdout_every - 1; 0 = none

    def indexed(self, part: Part = "train") -> Iterator[tuple[int, str]]:
        """(document number among all documents, text) of one part's non-empty documents, in order."""
        for i, doc in enumerate(self._all()):
            held = self.holdout_every > 0 and i % self.holdout_every == self.holdout_every - 1
            if part == "all" or held == (part == "heldout"):
                yield i, doc

    def document(self, index: int) -> str:
        """Document number `index` (as `indexed` numbers them)."""
        for i, doc in enumerate(self._all()):
            if i == index:
                return doc
        raise IndexError(index)

    def names(self) -> list[str]:
        """A short label per document, by number: the pydoc topic, the file name, or file:line."""
        return [name for name, _ in self._named()]

    def describe(self) -> dict[str, Any]:
        """For the manifest: where the text came from and what was held out."""
        return {
            "text": self.spec,
            "files": [str(f) for f in self.files],
            "text_field": self.text_field,
            "heldout": f"every {self.holdout_every}th document" if self.holdout_every else "none",
        }

    def _all(self) -> Iterator[str]:
        return (doc for _, doc in self._named())

    def _named(self) -> Iterator[tuple[str, str]]:
        if not self.files:
            from pydoc_data.topics import topics  # the stdlib's own help text: always present, offline

            yield from ((f"pydoc {key}", topics[key]) for key in sorted(topics))
            return
        for path in self.files:
            if path.suffix == ".txt":
                doc = path.read_text(encoding="utf-8", errors="replace")
                if doc.strip():
                    yield path.name, doc
            else:
                yield from _jsonl_documents(path, self.text_field)


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, f"line {line_no} is not JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(path, f"line {line_no} has no string field '{field}' (set text_field=...)")
            if record[field].strip():
                yield f"{path.name}:{line_no}", record[field]


def resolve_text(spec: str, text_field: str = "text", holdout_fraction: float = 0.05) -> TextSource:
    """The files a `text=` value names (checked now, so a typo fails before the model loads)."""
    every = round(1 / holdout_fraction) if holdout_fraction > 0 else 0
    if spec.strip() == PYDOC:
        return TextSource(PYDOC, (), text_field, every)
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif any(ch in part for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            found = [path] if path.is_file() else []
        found = [p for p in found if p.suffix in TEXT_SUFFIXES]
        if not found:
            raise ConfigError("text", part, f"{_TEXT_ALLOWED} (nothing readable matches this part)")
        files.extend(p for p in found if p not in files)
    if not files:
        raise ConfigError("text", spec, _TEXT_ALLOWED)
    return TextSource(spec, tuple(files), text_field, every)


# ---------------------------------------------------------------------------------------------------
# Token windows


@dataclass(frozen=True)
class Framing:
    """Special tokens around every window, as the tokenizer (or prepend_bos) puts them."""

    prefix: tuple[int, ...]  # e.g. (CLS,) or (BOS,)
    suffix: tuple[int, ...]  # e.g. (SEP,)
    pad_id: int

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.suffix)


def framing(tokenizer: Any, prepend_bos: bool) -> Framing:
    """Find the tokenizer's special-token template by encoding a probe with and without it."""
    probe = "sae sweep probe"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
    prefix, suffix = (tuple(full[:at]), tuple(full[at + len(plain) :])) if at is not None else ((), ())
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and not prefix and bos is not None:
        prefix = (bos,)
    pad = tokenizer.pad_token_id
    if pad is None:  # GPT-2 has none; padded positions are masked out, so any id will do
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return Framing(prefix, suffix, int(pad))


@dataclass(frozen=True)
class Window:
    ids: list[int]  # special tokens included
    doc: int  # document number (TextSource.indexed)
    start: int  # position in the document's tokens of the first token after the prefix


def windows(
    docs: Iterable[tuple[int, str]], tokenizer: Any, frame: Framing, context_length: int
) -> Iterator[Window]:
    """Each numbered document's tokens cut into windows of <= context_length ids (special tokens included)."""
    body = context_length - frame.n_special
    if body < 1:
        raise ConfigError(
            "context_length", context_length, f"more than the {frame.n_special} special tokens per sequence"
        )
    for index, doc in docs:
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(0, len(ids), body):
            yield Window([*frame.prefix, *ids[start : start + body], *frame.suffix], index, start)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    keep: torch.Tensor  # [B, T] bool: positions whose activations are harvested
    doc: torch.Tensor  # [B, T] document number of each position
    pos: torch.Tensor  # [B, T] position in the document's tokens; -1 for special tokens and padding

    @property
    def n_keep(self) -> int:
        return int(self.keep.sum())

    def provenance(self) -> torch.Tensor:
        """int32 [n_keep, 3]: (document, position, token id) of each harvested row, in row order."""
        return torch.stack([self.doc[self.keep], self.pos[self.keep], self.input_ids[self.keep]], 1).int()


def collate(rows: list[Window], frame: Framing, drop_bos: bool) -> Batch:
    """Right-pad to the longest window; `keep` drops padding and, by option, the prefix (BOS / CLS)."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), frame.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    doc = torch.empty((len(rows), width), dtype=torch.long)
    pos = torch.full((len(rows), width), -1, dtype=torch.long)
    n_prefix = len(frame.prefix)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        mask[i, : len(row.ids)] = 1
        doc[i] = row.doc
        n_body = len(row.ids) - frame.n_special
        pos[i, n_prefix : n_prefix + n_body] = torch.arange(row.start, row.start + n_body)
    keep = mask.bool()
    if drop_bos and frame.prefix:
        keep[:, :n_prefix] = False
    return Batch(ids, mask, keep, doc, pos)


def batches(
    docs: Iterable[tuple[int, str]],
    tokenizer: Any,
    frame: Framing,
    context_length: int,
    batch_size: int,
    drop_bos: bool,
) -> Iterator[Batch]:
    """Batches of windows over numbered documents (TextSource.indexed)."""
    rows: list[Window] = []
    for window in windows(docs, tokenizer, frame, context_length):
        rows.append(window)
        if len(rows) == batch_size:
            yield collate(rows, frame, drop_bos)
            rows = []
    if rows:
        yield collate(rows, frame, drop_bos)
