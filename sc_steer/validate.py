"""One validation layer for user input: flags, config files, recipes, API fields.

Each checker takes the name the user knows the value by (``--lr``, ``sae.k``, ``recipe[0].coeff``),
the value, and the allowed range; it returns the value (converted where that is safe) or raises a
``ScSteerError`` that names the field and says what was expected. Booleans are never numbers, and
NaN or infinity is never a number here.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .errors import ScSteerError


INT64_MAX = 2 ** 63 - 1   # every integer here may reach torch, which holds it in 64 bits
SEED_MAX = 2 ** 32 - 1    # seeds are combined with step and epoch counts, and must stay in 64 bits then


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi], and within 64 bits whatever ``hi`` says."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScSteerError(f"{name} {value!r}: expected an integer{_range(lo, hi)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ScSteerError(f"{name} {value!r}: expected an integer{_range(lo, hi)}")
    if abs(value) > INT64_MAX:
        raise ScSteerError(f"{name} {value!r}: expected an integer{_range(lo, hi)} of at most 64 bits "
                           f"(|value| <= {INT64_MAX:,})")
    return value


def seed(name: str, value: Any) -> int:
    """A random seed: an integer in [0, 2**32 - 1]."""
    return integer(name, value, 0, SEED_MAX)


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite int or float (not a bool) in the range; ``lo_open``/``hi_open`` exclude the ends."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ScSteerError(f"{name} {value!r}: expected a finite number{_range(lo, hi, lo_open, hi_open)}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        raise ScSteerError(f"{name} {value!r}: expected a finite number{_range(lo, hi, lo_open, hi_open)}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ScSteerError(f"{name} {value!r}: expected true or false")
    return value


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = list(options)
    if not isinstance(value, str) or value not in options:
        raise ScSteerError(f"{name} {value!r}: expected one of {', '.join(options)}")
    return value


def text(name: str, value: Any, *, empty: bool = False, max_chars: int | None = None) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ScSteerError(f"{name} {value!r}: expected {'a' if empty else 'a non-empty'} string")
    if max_chars is not None and len(value) > max_chars:
        raise ScSteerError(f"{name}: {len(value):,} characters, more than the limit of {max_chars:,}")
    return value


def strings(name: str, value: Any) -> list[str]:
    """A list of non-empty strings (a comma-separated string is split)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ScSteerError(f"{name} {value!r}: expected a non-empty list of names, e.g. [\"resid_post.*\"]")
    return value


def table(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ScSteerError(f"{name} {value!r}: expected a table (key = value pairs)")
    return value


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f" {'<' if hi_open else '<='} {hi}"
    return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
