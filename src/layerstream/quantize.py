"""The int8 arithmetic (one place, so pack, the eager loader and the runtime agree bit for bit) and the
choice of which tensors a model lets `pack --quantize int8` store as int8. The format is in quant.py.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

CHUNK_ELEMS = 2**20  # dequantised per chunk: bounds the float32 temporary at 4 MiB


def quantize_int8(w: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (`axis` indexes the channels): (q int8, scale float32)."""
    wf = w.to(torch.float32)
    amax = wf.abs().amax(dim=1 - axis)  # (channels,)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    s = scale[:, None] if axis == 0 else scale[None, :]
    return torch.round(wf / s).clamp_(-127, 127).to(torch.int8), scale


def dequantize_into(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, axis: int) -> None:
    """out = q * scale, whole rows at a time: each chunk of q is read whole (into a temporary) before
    its rows of `out` are written, which is what lets `out` overlap q's later bytes (quant.expand_layout)."""
    rows, cols = q.shape
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    for r in range(0, rows, step):
        s = scale[r:r + step, None] if axis == 0 else scale[None, :]
        torch.mul(q[r:r + step].to(torch.float32), s, out=out[r:r + step])  # (no third pass: 1.5x faster)


def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int, dtype: torch.dtype) -> torch.Tensor:
    """q * scale as a new tensor of `dtype`: the same arithmetic as dequantising in the arena."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    dequantize_into(out, q, scale, axis)
    return out


def linear_weights(model: nn.Module) -> dict[str, int]:
    """{state_dict name: channel axis} of every linear layer's 2-D float weight that no other module shares.

    nn.Linear's weight is [out, in] (axis 0), transformers' Conv1D (GPT-2's linear) [in, out] (axis 1).
    A tied weight (an lm_head tied to the embedding) stays float: the embedding uses it otherwise.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # without transformers there is no Conv1D to find
        Conv1D = ()  # noqa: N806
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)):
            w = mod.weight
            if w.dim() == 2 and w.is_floating_point() and uses[id(w)] == 1:
                out[f"{path}.weight" if path else "weight"] = 1 if isinstance(mod, Conv1D) else 0
    return out
