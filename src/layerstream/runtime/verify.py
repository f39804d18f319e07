"""Checking a landed read against the digests `pack` recorded (packfile.Check), before it is bound.

xxh3-64 hashes at about 7 GB/s on one core here and releases the GIL; checking every read of a packed
ViT-B/16 at 25% cost 3.3% of a call (benchmarks/verify_cost.py).
"""
from __future__ import annotations

import xxhash

from ..errors import ChecksumError


def verify(mem: memoryview, base: int, checks, what: str) -> None:
    """Raise ChecksumError naming `what` (the unit) unless every check's bytes at `base` hash right."""
    for c in checks:
        got = xxhash.xxh3_64_hexdigest(mem[base + c.slot_off:base + c.slot_off + c.nbytes])
        if got != c.digest:
            raise ChecksumError(
                f"{what}: the bytes of {c.what} read from the file hash to {got}, but the pack recorded "
                f"{c.digest}: the file was changed or corrupted after it was packed; pack it again from "
                "its source (or pass verify=False to skip checks)")
