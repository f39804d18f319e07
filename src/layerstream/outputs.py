"""The tensors of a forward's result, whatever its shape (tensor, tuple, dict, transformers output)."""
from __future__ import annotations

import torch


def tensors_of(out) -> list[torch.Tensor]:
    """Every tensor in `out`, depth first, in a fixed order (for comparing and saving outputs)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for x in out for t in tensors_of(x)] if isinstance(out, (list, tuple)) else []
