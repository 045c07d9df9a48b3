"""Files and folders the library writes: atomic writes (a unique temporary file beside the target,
synced, then renamed, so a crash never leaves a torn file) and output folders with clear errors."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import ScSteerError


def check_folder(path: str | Path, what: str = "--out") -> Path:
    """A folder that is, or could be, created at ``path``: a one-line error (naming ``what``) where a file
    stands at it or at one of its parents. Creates nothing."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ScSteerError(f"{what} {str(path)!r}: {str(p)!r} is a file, not a folder")
            break
    return path


def make_dir(path: str | Path, what: str = "--out") -> Path:
    """Create a folder and its parents; a one-line error (naming ``what``) where a file is in the way."""
    path = check_folder(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScSteerError(f"{what} {str(path)!r}: cannot create the folder ({e.strerror})") from None
    return path


def check_new_file(path: str | Path, what: str, force: bool = False) -> Path:
    """A file about to be written: not a folder, and not an existing file unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise ScSteerError(f"{what} {str(path)!r} is a folder; expected a file name")
    if path.exists() and not force:
        raise ScSteerError(f"{what} {str(path)!r} already exists; choose another name or pass --force to replace it")
    check_folder(path.parent, what)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a unique temporary path next to ``path``, sync it, then move it into place."""
    path = Path(path)
    make_dir(path.parent, "output folder")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def _finite(obj):
    """``obj`` with every non-finite float (NaN, +-inf) as None, and numbers of numpy / torch as plain ones."""
    import math

    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):      # a numpy or torch scalar
        return _finite(obj.item())
    return obj


def to_json(obj, **kw) -> str:
    """Strict JSON (``json.dumps`` with ``allow_nan=False``): a missing or undefined number is ``null``,
    never a bare ``NaN`` that JavaScript's ``JSON.parse``, jq and every strict reader reject. Plain data
    is written as it is; only what ``json`` refuses (a non-finite float, a numpy or torch number) is
    walked and cleaned first."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except (ValueError, TypeError):
        return json.dumps(_finite(obj), allow_nan=False, **kw)


def parse_json(text: str, where: str, expect: type | None = dict, what: str = ""):
    """JSON text as ``expect`` (a dict unless told; None: any JSON), with one-line errors that say
    ``where`` it came from and ``what`` it should be."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScSteerError(f"{where} is not valid JSON ({e})" + (f"; expected {what}" if what else "")) from None
    if expect is not None and not isinstance(value, expect):
        shape = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise ScSteerError(f"{where}: expected {shape}" + (f" ({what})" if what else "")
                           + f", found {type(value).__name__}")
    return value


def read_json(path: str | Path, what: str, expect: type | None = dict):
    """A JSON file the library or the user wrote (``parse_json``); a missing or unreadable file is one
    line too."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ScSteerError(f"{str(path)!r} does not exist (expected {what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScSteerError(f"{str(path)!r} is unreadable ({e}); expected {what}") from None
    return parse_json(text, repr(str(path)), expect, what)


def file_sha256(path: str | Path, chars: int = 16) -> str:
    """The first ``chars`` hex digits of a file's SHA-256, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:chars]
