"""Text sources -> documents -> fixed-length token rows with document ids and positions.

A data spec is one string, so that CLI flags, manifests and recipes can all name a dataset:

* ``demo`` / ``demo:train`` -- the demo model's training corpus shipped in the package;
* ``demo:heldout``         -- the held-out slice the demo model never trained on;
  both as passages of about ``DEMO_PASSAGE_CHARS`` characters taken from the three sources in turn,
  so that any prefix (``--max-tokens``) is a mix of Bible, plays and glosses, not the first book;
* ``path/to/file.txt``     -- a plain text file (one document, or one per line / paragraph);
* ``path/to/folder``       -- every ``*.txt`` / ``*.md`` file below it, one document each;
* ``path/to/file.jsonl``   -- one document per line, text in ``field`` (``.jsonl.gz`` too);
* ``hf:NAME[:CONFIG]:SPLIT`` -- a Hugging Face dataset (needs the optional ``datasets`` package).

Rows start with BOS (when the tokenizer has one) and are right-padded, so a token's position in
its row is its position in the model. ``keep`` marks real text tokens: BOS, separators and padding
are never used as SAE training data or statistics.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ScSteerError

DEMO_DATA = Path(__file__).parent / "demo" / "data"
SPLITS = ("file", "line", "paragraph")
DEMO_PASSAGE_CHARS = 3000


def _demo_file(split: str) -> Path:
    if split not in ("train", "heldout"):
        raise ScSteerError(f"data 'demo:{split}': expected demo, demo:train or demo:heldout")
    return DEMO_DATA / f"{split}.jsonl.gz"


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _split_text(text: str, split: str) -> list[str]:
    if split == "file":
        return [text] if text.strip() else []
    parts = text.splitlines() if split == "line" else text.split("\n\n")
    return [p for p in parts if p.strip()]


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-empty line of a ``.jsonl`` or ``.jsonl.gz`` file; a line
    that is not JSON is a one-line error naming the file and line."""
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ScSteerError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for n, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or field not in rec:
            keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            raise ScSteerError(f"{path}:{n}: no field {field!r} (found: {keys}); pass the text field's name")
        if not isinstance(rec[field], str):
            raise ScSteerError(f"{path}:{n}: field {field!r} is {type(rec[field]).__name__}, expected text")
        if rec[field].strip():
            yield rec[field]


def _passages(text: str, chars: int) -> Iterator[str]:
    """Consecutive whole lines of ``text``, about ``chars`` characters at a time."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines():
        buf.append(line)
        size += len(line) + 1
        if size >= chars:
            yield "\n".join(buf)
            buf, size = [], 0
    if "".join(buf).strip():
        yield "\n".join(buf)


def _demo_documents(path: Path, field: str) -> Iterator[str]:
    """The demo corpus as passages, one from each source in turn (sources in file order)."""
    if field != "text":
        raise ScSteerError(f"field {field!r}: the demo corpus has its text in 'text'")
    by_source: dict[str, list[str]] = {}
    with _open_text(path) as f:
        for line in f:
            rec = json.loads(line)
            by_source.setdefault(rec["source"], []).append(rec["text"])
    streams = [(p for doc in docs for p in _passages(doc, DEMO_PASSAGE_CHARS)) for docs in by_source.values()]
    for passages in itertools.zip_longest(*streams):
        yield from (p for p in passages if p is not None and p.strip())


def _hf_documents(spec: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ScSteerError(f"data {spec!r} needs the optional 'datasets' package (pip install datasets)") from None
    parts = spec.removeprefix("hf:").split(":")
    if len(parts) not in (2, 3):
        raise ScSteerError(f"data {spec!r}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - network, missing dataset, bad split: all one message
        raise ScSteerError(f"could not open dataset {spec!r}: {str(e).splitlines()[0]}") from None
    for rec in ds:
        if field not in rec:
            raise ScSteerError(f"dataset {spec!r} has no field {field!r} (found: {', '.join(rec)})")
        if rec[field].strip():
            yield rec[field]


def _local_files(spec: str) -> list[Path]:
    if spec == "demo" or spec.startswith("demo:"):
        return [_demo_file(spec.partition(":")[2] or "train")]
    path = Path(spec).expanduser()
    if not path.exists():
        raise ScSteerError(f"data path {spec!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise ScSteerError(f"data folder {spec!r} holds no .txt or .md files")
        return files
    return [path]


def iter_documents(spec: str, field: str = "text", split: str = "file") -> Iterator[str]:
    """The documents of a data spec in a fixed order (see the module docstring).

    A missing, empty or malformed source fails here, when called, not later in the middle of a job
    (the first document is read at once)."""
    docs = _documents(spec, field, split)
    first = next(docs)   # _documents raises rather than yield nothing
    return itertools.chain([first], docs)


def _documents(spec: str, field: str, split: str) -> Iterator[str]:
    if not isinstance(spec, str) or not spec:
        raise ScSteerError(f"data {spec!r}: expected demo, demo:heldout, a file, a folder or hf:NAME:SPLIT")
    if split not in SPLITS:
        raise ScSteerError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if spec.startswith("hf:"):
        yield from _hf_documents(spec, field)
        return
    found = False
    for path in _local_files(spec):
        name = path.name.removesuffix(".gz")
        if spec == "demo" or spec.startswith("demo:"):
            docs: Iterable[str] = _demo_documents(path, field)
        elif name.endswith(".jsonl"):
            docs = _jsonl_documents(path, field)
        else:
            with _open_text(path) as f:
                try:
                    text = f.read()
                except UnicodeDecodeError:
                    raise ScSteerError(f"data file {str(path)!r} is not UTF-8 text") from None
            if not text.strip() and not Path(spec).is_dir():
                raise ScSteerError(f"text file {str(path)!r} is empty")
            docs = _split_text(text, split)
        for doc in docs:
            found = True
            yield doc
    if not found:
        raise ScSteerError(f"data {spec!r} holds no documents (all empty)")


def data_fingerprint(spec: str) -> str:
    """A content hash of the files behind a spec (the spec itself for hub datasets)."""
    h = hashlib.sha256(spec.encode() if spec.startswith("hf:") else b"")
    if not spec.startswith("hf:"):
        for path in _local_files(spec):
            h.update(path.name.encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Row:
    """One model input row (unpadded) with, per token, its document id and whether it is text."""

    ids: list[int]
    doc: list[int]
    keep: list[bool]


@dataclass
class TokenBatch:
    """Right-padded rows; ``row`` is each row's global index, ``doc`` is -1 on non-text tokens."""

    input_ids: torch.Tensor       # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64
    keep: torch.Tensor            # [B, T] bool: real text tokens
    doc: torch.Tensor             # [B, T] int64
    row: torch.Tensor             # [B] int64

    @property
    def pos(self) -> torch.Tensor:
        """Position of each token in its row, which is its position in the model."""
        return torch.arange(self.input_ids.shape[1]).expand_as(self.input_ids)


def iter_rows(docs: Iterable[str], tokenizer: Any, ctx: int, *, prepend_bos: bool = True,
              packing: str = "pad") -> Iterator[Row]:
    """Cut documents into rows of at most ``ctx`` tokens.

    ``pad``: each document is split into its own rows (no row mixes documents).
    ``pack``: documents are concatenated with EOS between them and cut into full rows.
    Each row starts with BOS when ``prepend_bos``.
    """
    if not isinstance(ctx, int) or ctx < 2:
        raise ScSteerError(f"context length {ctx!r}: expected an integer >= 2 (BOS plus at least one token)")
    if packing not in ("pad", "pack"):
        raise ScSteerError(f"packing {packing!r}: expected pad or pack")
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise ScSteerError("this tokenizer has no BOS token; pass prepend_bos=False (CLI: --no-bos)")
    lead = [bos] if prepend_bos else []
    span = ctx - len(lead)
    if packing == "pad":
        for d, text in enumerate(docs):
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            for i in range(0, len(ids), span):
                chunk = ids[i:i + span]
                yield Row(lead + chunk, [-1] * len(lead) + [d] * len(chunk), [False] * len(lead) + [True] * len(chunk))
        return
    sep = tokenizer.eos_token_id
    buf_ids: list[int] = []
    buf_doc: list[int] = []
    buf_keep: list[bool] = []
    for d, text in enumerate(docs):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        buf_ids += ids
        buf_doc += [d] * len(ids)
        buf_keep += [True] * len(ids)
        if sep is not None:
            buf_ids.append(sep)
            buf_doc.append(-1)
            buf_keep.append(False)
        while len(buf_ids) >= span:
            yield Row(lead + buf_ids[:span], [-1] * len(lead) + buf_doc[:span], [False] * len(lead) + buf_keep[:span])
            del buf_ids[:span], buf_doc[:span], buf_keep[:span]
    if any(buf_keep):
        yield Row(lead + buf_ids, [-1] * len(lead) + buf_doc, [False] * len(lead) + buf_keep)


def collate(rows: list[Row], first_row: int, ctx: int, pad_id: int) -> TokenBatch:
    b = len(rows)
    ids = torch.full((b, ctx), pad_id, dtype=torch.long)
    mask = torch.zeros((b, ctx), dtype=torch.long)
    keep = torch.zeros((b, ctx), dtype=torch.bool)
    doc = torch.full((b, ctx), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        mask[i, :n] = 1
        keep[i, :n] = torch.tensor(r.keep)
        doc[i, :n] = torch.tensor(r.doc)
    width = int(mask.sum(1).max()) if b else 0
    return TokenBatch(ids[:, :width], mask[:, :width], keep[:, :width], doc[:, :width],
                      torch.arange(first_row, first_row + b))


def iter_batches(rows: Iterable[Row], batch_size: int, ctx: int, pad_id: int, start_row: int = 0) -> Iterator[TokenBatch]:
    """Group rows into padded batches, skipping the first ``start_row`` rows (for resuming)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ScSteerError(f"batch size {batch_size!r}: expected an integer >= 1")
    pending: list[Row] = []
    first = start_row
    for n, row in enumerate(rows):
        if n < start_row:
            continue
        pending.append(row)
        if len(pending) == batch_size:
            yield collate(pending, first, ctx, pad_id)
            first += len(pending)
            pending = []
    if pending:
        yield collate(pending, first, ctx, pad_id)


def pad_token_id(tokenizer: Any) -> int:
    """The id used to fill padding (masked out, never stored)."""
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """The items of ``items``, produced ``depth`` ahead on a background thread, so that tokenizing the
    next batches overlaps the model's work on this one. Errors reach the consumer where the failing item
    would have; a consumer that stops early stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            offer((end, e))
            return
        offer((end, None))

    thread = threading.Thread(target=produce, name="sc-steer-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
