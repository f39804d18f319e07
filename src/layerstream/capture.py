"""nn.Module (weights on meta) + a weight file's index -> Program: the unit cut and a first step order.

The cut follows DESIGN.md: a module whose weights fit `max_unit` is one unit; a larger one is split
into its children, and the tensors it owns beside its children form a pinned unit of their own;
consecutive small units are merged (`fuse`) up to a load capacity so per-unit overhead (hooks,
syscalls) stays small. The step order is first guessed from registration order, unmerged; the executor
records the true order on the first call, and units are merged and planned again from that record
(demand misses keep the first call correct).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import MetaBufferError, WeightMismatch
from .format import FileIndex
from .layout import unit_layout
from .packfile import recorded_roots
from .quant import quant_table, seen_as
from .units import Program, TensorRef, Unit

TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


@dataclass
class Owner:
    """One place a tensor is registered: `module._parameters[attr]` or `module._buffers[attr]`."""

    module: nn.Module
    attr: str
    is_param: bool

    def assign(self, tensor: torch.Tensor) -> None:
        """Make the module hold `tensor` here (no registration checks: this is the hot path)."""
        (self.module._parameters if self.is_param else self.module._buffers)[self.attr] = tensor


@dataclass
class Captured:
    """A Program plus the live objects the runtime needs to bind it (kept apart from the pure Program)."""

    program: Program
    owners: dict[str, list[Owner]]  # file tensor name -> every place it is registered
    originals: dict[str, torch.Tensor]  # file tensor name -> the model's own tensor (restored on close)
    roots: dict[str, nn.Module]  # module path -> module, for every unit root
    root_units: dict[str, list[int]]  # module path -> unit ids it needs
    base: Program  # the unmerged cut, which fuse() merges again from each recorded order

    @property
    def base_root_units(self) -> dict[str, list[int]]:
        return _root_units(self.base.units)


def _tensors_of(model: nn.Module):
    """Yield (module path, module, attr, tensor, is_param) for every parameter and persistent buffer."""
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                yield path, mod, attr, p, True
        for attr, b in mod._buffers.items():
            if b is None:
                continue
            if attr in mod._non_persistent_buffers_set:
                if b.is_meta:
                    name = f"{path}.{attr}" if path else attr
                    raise MetaBufferError(
                        f"buffer {name!r} is non-persistent (no weight file holds it) but is on the meta "
                        "device; build the model with layerstream.init_empty_weights() (parameters on meta, "
                        "buffers real) instead of `with torch.device('meta')`")
                continue
            yield path, mod, attr, b, False


def match_file(model: nn.Module, index: FileIndex):
    """Map every distinct model tensor to its file tensor; raise WeightMismatch listing every problem."""
    by_id: dict[int, list[tuple[str, nn.Module, str, torch.Tensor, bool]]] = {}
    for path, mod, attr, t, is_param in _tensors_of(model):
        by_id.setdefault(id(t), []).append((f"{path}.{attr}" if path else attr, mod, attr, t, is_param))
    names_of: dict[int, str] = {}
    owners: dict[str, list[Owner]] = {}
    refs: dict[str, TensorRef] = {}
    originals: dict[str, torch.Tensor] = {}
    missing, wrong = [], []
    quant = quant_table(index)  # int8 tensors: the model sees them as their float dtype and size
    for tid, regs in by_id.items():
        sd_names = list(dict.fromkeys(r[0] for r in regs))
        fname = next((n for n in sd_names if n in index.tensors), None)
        t = regs[0][3]
        if fname is None:
            missing.append(" = ".join(sd_names))
            continue
        ft = index.tensors[fname]
        want = (TORCH_TO_ST.get(t.dtype, str(t.dtype)), tuple(t.shape))
        dtype, nbytes = seen_as(ft, quant)
        if (dtype, ft.shape) != want:
            wrong.append(f"{fname}: model {want[0]}{list(want[1])}, file {ft.dtype}{list(ft.shape)}")
            continue
        names_of[tid] = fname
        owners[fname] = [Owner(mod, attr, is_param) for _, mod, attr, _, is_param in regs]
        originals[fname] = t
        refs[fname] = TensorRef(fname, dtype, ft.shape, nbytes, tuple(n for n in sd_names if n != fname))
    if missing or wrong:
        lines = [f"{index.path} does not match the model:"]
        if missing:
            lines.append(f"  {len(missing)} model tensor(s) missing from the file: " + ", ".join(missing[:20])
                         + (" ..." if len(missing) > 20 else ""))
        if wrong:
            lines.append(f"  {len(wrong)} tensor(s) with a different dtype or shape:")
            lines += [f"    {w}" for w in wrong[:20]] + (["    ..."] if len(wrong) > 20 else [])
        lines.append("  build the model from the same config the file was saved from, or pass the matching file")
        raise WeightMismatch("\n".join(lines))
    return names_of, owners, refs, originals


def capture(model: nn.Module, index: FileIndex, max_unit: int) -> Captured:
    """Cut `model` into load units against the weight file `index` (see module docstring); unmerged."""
    names_of, owners, refs, originals = match_file(model, index)

    def own(mod: nn.Module) -> list[str]:
        ts = [t for t in list(mod._parameters.values()) + list(mod._buffers.values()) if t is not None]
        return list(dict.fromkeys(names_of[id(t)] for t in ts if id(t) in names_of))

    subtree: dict[int, list[str]] = {}

    def tensors_below(mod: nn.Module) -> list[str]:
        if id(mod) not in subtree:
            names = own(mod)
            for child in mod.children():
                names += tensors_below(child)
            subtree[id(mod)] = list(dict.fromkeys(names))
        return subtree[id(mod)]

    def nbytes(names: list[str]) -> int:
        return sum(refs[n].nbytes for n in names)

    raw: list[tuple[str, list[str], bool]] = []  # (root path, tensors, pinned), in registration order
    seen: set[int] = set()
    roots: dict[str, nn.Module] = {}

    def cut(mod: nn.Module, path: str) -> None:
        if id(mod) in seen:
            return  # a module registered twice (T5's shared embedding): hooked once, by its first path
        seen.add(id(mod))
        names = tensors_below(mod)
        if not names:
            return
        kids = [(f"{path}.{n}" if path else n, c) for n, c in mod.named_children()]
        if nbytes(names) <= max_unit or not any(tensors_below(c) for _, c in kids):
            raw.append((path, names, False))
            roots[path] = mod
            return
        if own(mod):
            raw.append((path, own(mod), True))
            roots[path] = mod
        for kpath, kid in kids:
            cut(kid, kpath)

    cut(model, "")
    units = [Unit(i, path or "<top>", (path,), tuple(names), nbytes(names), pinned)
             for i, (path, names, pinned) in enumerate(raw)]
    program = Program(tuple(units), tuple(u.uid for u in units), tuple(refs.values()))
    return Captured(program, owners, originals, roots, _root_units(units), program)


def _root_units(units) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for u in units:
        for r in u.roots:
            out.setdefault(r, []).append(u.uid)
    return out


def fuse(cap: Captured, root_order: list[str], merge_bytes: int, index: FileIndex) -> Captured:
    """Merge units that ran one after another in a recorded call, up to `merge_bytes` of slot each.

    Merging follows the order a call really took (registration order can lie: ResNet registers its
    shortcut before the layers it runs after), so a merged unit's last root, which closes its window,
    is the one that really runs last. A unit loaded more than once per call is never merged. A merge
    never outgrows the largest unit already there, so fusing never raises the minimum budget.
    """
    base = cap.base.units
    ref = {t.name: t.nbytes for t in cap.base.tensors}

    def slot(uids: list[int]) -> int:
        tensors = tuple(t for x in uids for t in base[x].tensors)
        return unit_layout(Unit(-1, "", (), tensors, 0), index).slot_nbytes

    merge_bytes = min(merge_bytes, max((slot([u.uid]) for u in base if not u.pinned), default=0))
    opens: list[int] = []
    for path in root_order:
        for uid in cap.base_root_units[path]:
            if not opens or opens[-1] != uid:
                opens.append(uid)
    once = {u for u in opens if opens.count(u) == 1}
    groups: list[list[int]] = []
    for uid in opens:
        g = groups[-1] if groups else None
        u = base[uid]
        if (g is not None and uid in once and all(x in once for x in g) and not u.pinned
                and not base[g[0]].pinned and not set(u.tensors) & {t for x in g for t in base[x].tensors}
                and slot(g + [uid]) <= merge_bytes):
            g.append(uid)
        else:
            groups.append([uid])
    units, steps, new_id = [], [], {}
    for g in groups:
        key = tuple(g)
        if key not in new_id:
            new_id[key] = len(units)
            tensors = tuple(t for x in g for t in base[x].tensors)
            units.append(Unit(len(units), "+".join(base[x].name for x in g), tuple(r for x in g for r in base[x].roots),
                              tensors, sum(ref[t] for t in tensors), base[g[0]].pinned))
        steps.append(new_id[key])
    for u in base:  # units this call never opened keep their own id, for a later call that does
        if not any(u.uid in g for g in groups):
            units.append(Unit(len(units), u.name, u.roots, u.tensors, u.nbytes, u.pinned))
    program = Program(tuple(units), tuple(steps), cap.base.tensors)
    return Captured(program, cap.owners, cap.originals, cap.roots, _root_units(units), cap.base)


def packed_order(cap, index: FileIndex) -> list[str]:
    """The first call's guess from a packed file: the module paths its pack recorded running (each
    mapped to the unit root that holds it in this cut), else the units in file order."""
    roots = cap.base_root_units
    out = []
    for path in recorded_roots(index):
        while path not in roots and path:
            path = path.rpartition(".")[0]
        if path in roots:
            out.append(path)
    if out:
        return out + [r for r in roots if r not in set(out)]
    first = {u.uid: min(index.tensors[t].begin for t in u.tensors) for u in cap.base.units if u.tensors}
    return [r for uid in sorted(first, key=first.get) for r in cap.base.units[uid].roots]
