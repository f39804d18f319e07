"""Modules whose weights layerstream computes with itself: gathered embedding rows, linear row blocks.

An embedding lookup needs only the rows of the ids it looks up: a *gather* unit's slot is a small
scratch (layout.gather_layout), and the module's forward reads just those rows into it, in page-aligned
runs, then copies them out: a 412 MB table costs a 128-token prompt 1.57 MB of reads
(benchmarks/gather_rows.py), and a decoding step one row. A tied output projection still streams the
table whole, as its own unit(s).

A linear layer larger than the unit size is cut into *block* units of rows (capture.py); its forward
computes them one after another, each block released as soon as its columns are computed, so its next
block's read lands in the ring while this one computes and no unit outgrows a small budget.

Both replace the module's forward on the instance (restored on close); the hooks around it still run,
so a module's call is timed and traced like any other. Rows are copies and blocks are the same products
(blocks are multiples of 64 rows but the last, which gave the whole layer's products bit for bit on
the CPU kernels measured; CUDA's kernels are chosen by shape and are not checked), so outputs equal the
eager model's on the CPU. Gather units are made on the CPU only, and only when the budget cannot hold
every weight (then the table would be resident and read no rows at all).

Checksums: a packed file's digest covers a whole tensor, so a split tensor is hashed as its blocks
stream by, in row order, and the call fails with ChecksumError at the layer's end if it does not match
(an output computed from bad bytes is never returned). Gathered rows are not checked: a digest of the
whole table cannot check a few rows.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import xxhash
from torch import nn

from ..capture import ST_TO_TORCH, Captured
from ..errors import BudgetError, ChecksumError
from ..units import Extent, parse_block
from ..layout import align_down, align_up
from .load import Load, chunks_of


def install(cap: Captured, get_exec: Callable) -> list[tuple[nn.Module, object]]:
    """Give the root module of every gather and block unit its forward; (module, what its instance
    held as `forward` before, or None) for each, for `uninstall`."""
    done: dict[int, tuple[nn.Module, object]] = {}
    for u in cap.base.units:
        mod = cap.roots[u.roots[0]]
        if u.mode and id(mod) not in done:
            done[id(mod)] = (mod, mod.__dict__.get("forward"))
            make = _gather_forward if u.mode == "gather" else _blocks_forward
            mod.forward = make(get_exec, u.roots[0])
    return list(done.values())


def uninstall(installed: list[tuple[nn.Module, object]]) -> None:
    for mod, before in installed:
        if before is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = before


def _gather_forward(get_exec: Callable, path: str):
    def forward(input: torch.Tensor) -> torch.Tensor:
        ex = get_exec()
        (uid,) = ex.cap.root_units[path]
        name = ex.units[uid].tensors[0]
        whole = ex.resident_views.get(name)
        if whole is None and name in ex.bound_by:  # a tied projection holds the table now
            whole = ex.holders[name].data
        if whole is not None:
            return F.embedding(input, whole)
        return gather(ex, uid, input)
    return forward


def check_resident_splits(ex) -> None:
    """Check, once, each split tensor all of whose blocks are resident (a call never re-reads them)."""
    blocks: dict[str, list[tuple[int, str, int]]] = {}  # tensor -> (first row, block name, unit id)
    for u in ex.units:
        for n in u.tensors:
            if u.mode == "block" and parse_block(n)[0] in ex.split_digests:
                blocks.setdefault(parse_block(n)[0], []).append((parse_block(n)[1], n, u.uid))
    for t, parts in blocks.items():
        if all(uid in ex.resident for _, _, uid in parts):
            h = xxhash.xxh3_64()
            for _, n, _ in sorted(parts):
                _hash(h, ex.resident_views[n])
            _check(h, t, ex.split_digests[t], f"tensor {t}")
            ex.split_verified.add(t)


def _hash(h, view: torch.Tensor) -> None:
    h.update(view.reshape(-1).view(torch.uint8).cpu().numpy())


def _check(h, tensor: str, digest: str, what: str) -> None:
    if h.hexdigest() != digest:
        raise ChecksumError(
            f"{what}: the bytes of tensor {tensor} read from the file hash to {h.hexdigest()}, but the pack "
            f"recorded {digest}: the file was changed or corrupted after it was packed; pack it again from "
            "its source (or pass verify=False to skip checks)")


def _blocks_forward(get_exec: Callable, path: str):
    def forward(input: torch.Tensor) -> torch.Tensor:
        ex = get_exec()
        uids = ex.cap.root_units[path]
        tensors = {parse_block(n)[0]: None for u in uids for n in ex.units[u].tensors}
        check = {t: xxhash.xxh3_64() for t in tensors if t in ex.split_digests and t not in ex.split_verified}
        outs = []
        for uid in uids:
            ex.acquire(uid)
            views = ex.views(uid)
            for name, view in zip(ex.units[uid].tensors, views):
                h = check.get(parse_block(name)[0])
                if h is not None:  # blocks come in row order: their bytes, one after another, are the tensor's
                    _hash(h, view)
            outs.append(F.linear(input, *views))
            ex.release((uid,))
        for t, h in check.items():
            _check(h, t, ex.split_digests[t], path)
        return torch.cat(outs, dim=-1)
    return forward


def gather(ex, uid: int, ids: torch.Tensor) -> torch.Tensor:
    """`table[ids]` for gather unit `uid`, reading only the rows `ids` names (sorted, page runs)."""
    ref = ex.refs[ex.units[uid].tensors[0]]
    dtype, rows_n, row_shape = ST_TO_TORCH[ref.dtype], ref.shape[0], tuple(ref.shape[1:])
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{ex.units[uid].name}: embedding ids must be int64 or int32, got {ids.dtype}")
    flat = ids.reshape(-1)
    if flat.numel() == 0:
        return torch.empty((*ids.shape, *row_shape), dtype=dtype)
    uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    lo, hi = int(uniq[0]), int(uniq[-1])
    if lo < 0 or hi >= rows_n:
        raise IndexError(f"{ex.units[uid].name}: index {lo if lo < 0 else hi} out of range for a table of "
                         f"{rows_n} rows")
    addr = ex.acquire(uid)
    lay = ex.layouts[uid]
    begin, row = lay.table
    wanted = uniq.tolist()
    parts, i = [], 0
    while i < len(wanted):  # as many rows as the slot holds per read, then copy them out
        runs, where, used = [], [], 0  # runs: [slot offset, file start, file end]
        while i < len(wanted):
            a = begin + wanted[i] * row
            first, last = align_down(a), align_up(a + row)
            if runs and first <= runs[-1][2]:
                grow = max(0, last - runs[-1][2])
                if where and used + grow > lay.slot_nbytes:
                    break
                runs[-1][2] += grow
                used += grow
            else:
                if where and used + last - first > lay.slot_nbytes:
                    break
                runs.append([used, first, last])
                used += last - first
            where.append(runs[-1][0] + a - runs[-1][1])
            i += 1
        if used > lay.slot_nbytes:
            raise BudgetError(f"{ex.units[uid].name}: one row ({row} bytes) does not fit its "
                              f"{lay.slot_nbytes}-byte gather slot")
        chunks = chunks_of([Extent(first, last - first, off) for off, first, last in runs], addr,
                           ex.io.chunk_bytes, lay.data_end)
        ex.read_now(Load(uid, None, addr, used), chunks)
        parts.append(torch.stack([ex.arena.view(addr + w, dtype, row_shape) for w in where]))
    table = parts[0] if len(parts) == 1 else torch.cat(parts)
    return table[inverse].reshape(*ids.shape, *row_shape)
