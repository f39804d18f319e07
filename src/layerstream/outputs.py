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


def outputs_equal(got: list[torch.Tensor], want: list[torch.Tensor], exact: bool = True) -> bool:
    """Bit for bit (the CPU promise); or within 1e-5 on CUDA, whose kernels may pick other algorithms
    for weights at other addresses."""
    if len(got) != len(want):
        return False
    if exact:
        return all(g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, want))
    return all(g.shape == w.shape and torch.allclose(g, w, rtol=1e-5, atol=1e-5) for g, w in zip(got, want))
