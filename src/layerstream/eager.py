"""The usual way, for comparison: load every weight from the file into memory, then run."""
from __future__ import annotations

import os

from safetensors import safe_open
from torch import nn

from .capture import match_file
from .format import read_index


def load_eager(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Materialise every parameter and persistent buffer of `model` (built on meta) from `path`.

    Uses the same name matching as streaming, so tied weights stay tied and mismatches raise the same
    WeightMismatch. Returns the model, now holding all its weights in memory.
    """
    index = read_index(path)
    _, owners, _, _ = match_file(model, index)
    with safe_open(os.fspath(path), framework="pt") as f:
        for name, places in owners.items():
            t = f.get_tensor(name)
            holder = nn.Parameter(t, requires_grad=False) if places[0].is_param else t
            for o in places:
                o.assign(holder)
    return model
