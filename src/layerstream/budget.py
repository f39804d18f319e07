"""Byte sizes and budgets, parsed once at the edge: "512MB", "1.5GiB", "10%", 4096."""
from __future__ import annotations

import math
import re

from .errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """Parse a byte size: an int, or a number with a unit (B, KB, MB, GB: powers of 10; KiB, MiB, GiB: of 2)."""
    if isinstance(text, bool):
        raise BudgetError(f"byte size {text!r} is a bool; give a number of bytes or a string like '512MB'")
    if isinstance(text, (int, float)):
        if isinstance(text, float) and not math.isfinite(text):
            raise BudgetError(f"byte size {text} is not a finite number; give a number of bytes or a string like '512MB'")
        if text < 0:
            raise BudgetError(f"byte size {text} is negative")
        return int(text)
    m = _RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise BudgetError(
            f"cannot parse byte size {text!r}: use a number of bytes or a number with one of "
            "B, KB, MB, GB, KiB, MiB, GiB (e.g. '512MB', '1.5GiB')")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value):
        raise BudgetError(f"byte size {text!r} is too large; give a size like '512MB' or '1.5GiB'")
    return int(value)


def parse_budget(text: str | int | float, weight_bytes: int) -> int:
    """Parse a weight-memory budget; a percentage is of the model's weight bytes ("10%")."""
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            pct = float(text.strip()[:-1])
        except ValueError:
            raise BudgetError(f"cannot parse budget {text!r}: a percentage looks like '10%'") from None
        value = weight_bytes * pct / 100
        if not (0 < pct and math.isfinite(value)):
            raise BudgetError(f"budget {text!r} must be a positive, finite percentage of the weights (e.g. '10%')")
        return int(value)
    return parse_bytes(text)


def fmt_bytes(n: int | float) -> str:
    """Human-readable bytes in binary units, for messages and tables."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
