"""Expanding a unit's int8 weights in its arena slot, in place, once its read has been verified.

The slot was laid out for it (quant.expand_layout): the stored bytes lie in the slot's tail, the float
tensors go to its head, and working front to back never overwrites a byte before it is read. The work
is torch ops on the arena's own tensor, so on CUDA it runs on the compute stream, after the staged
copy it waits on and before the compute that uses the weights.
"""
from __future__ import annotations

import torch

from ..capture import ST_TO_TORCH
from ..quantize import dequantize_into

MOVE_CHUNK = 4 * 2**20  # bytes moved per chunk, through a temporary: source and destination may overlap


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def expand(buf: torch.Tensor, base: int, plan) -> None:
    """Carry out `plan` (quant Expand records, in file order) on the slot at `base` of `buf` (uint8)."""
    # Every scale first, aside: a tensor before it in the slot may expand over its bytes.
    scales = {e.scale_off: buf[base + e.scale_off:base + e.scale_off + 4 * e.shape[e.axis]].view(torch.float32).clone()
              for e in plan if e.scale}
    for e in plan:
        src, dst = base + e.src_off, base + e.dst_off
        if not e.scale:
            step = MOVE_CHUNK if e.nbytes > MOVE_CHUNK else max(e.nbytes, 1)
            for a in range(0, e.nbytes, step):
                k = min(step, e.nbytes - a)
                buf[dst + a:dst + a + k].copy_(buf[src + a:src + a + k].clone())
            continue
        dtype = ST_TO_TORCH[e.dtype]
        n = _numel(e.shape)
        q = buf[src:src + n].view(torch.int8).view(e.shape)
        out = buf[dst:dst + n * dtype.itemsize].view(dtype).view(e.shape)
        dequantize_into(out, q, scales[e.scale_off], e.axis)

