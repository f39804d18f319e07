"""nn.Module (weights on meta) + a weight file's index -> Program: the unit cut and a first step order.

The cut follows DESIGN.md: a module whose weights fit `max_unit` is one unit; a larger one is split
into its children, and the tensors it owns beside its children form a pinned unit of their own;
consecutive small units are merged (`fuse`) up to a load capacity so per-unit overhead (hooks,
syscalls) stays small. The step order is first guessed from registration order, unmerged; the executor
records the true order on the first call, and units are merged and planned again from that record
(demand misses keep the first call correct).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import MetaBufferError, WeightMismatch
from .format import FileIndex
from .layout import tensor_span, unit_layout
from .packfile import recorded_roots
from .quant import quant_table, seen_as
from .units import Program, TensorRef, Unit, block_name, roots_in_order

TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}
GATHER_MIN = 8 * 2**20  # embedding tables from this size read only the rows a call looks up


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
    virtual: dict[str, TensorRef] = field(default_factory=dict)  # row blocks that block units hold (units.block_name)

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


def capture(model: nn.Module, index: FileIndex, max_unit: int, *, gather: bool = False,
            split: bool = False) -> Captured:
    """Cut `model` into load units against the weight file `index` (see module docstring); unmerged.

    With `gather`, a large embedding table is a gather unit (only the rows looked up are read); with
    `split`, a linear layer larger than `max_unit` is cut into row blocks computed one after another
    (lookup.py), so no single unit is larger than `max_unit` and a small budget still runs it.
    """
    names_of, owners, refs, originals = match_file(model, index)
    virtual: dict[str, TensorRef] = {}

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
        return sum((refs.get(n) or virtual[n]).nbytes for n in names)

    def stored_as_model(t: torch.Tensor) -> bool:
        """Stored as the model sees it (not int8 with scales): rows of it can be read and used as they are."""
        name = names_of.get(id(t))
        return name is not None and index.tensors[name].dtype == TORCH_TO_ST.get(t.dtype)

    def gatherable(mod: nn.Module, names: list[str]) -> bool:
        return (gather and type(mod) is nn.Embedding and mod.max_norm is None and names == own(mod)
                and len(names) == 1 and stored_as_model(mod.weight) and refs[names[0]].nbytes >= GATHER_MIN)

    def blocks(mod: nn.Module, names: list[str]) -> list[list[str]]:
        """Row blocks of an oversized nn.Linear, each at most max_unit; [] if it is not one."""
        if not (split and type(mod) is nn.Linear and names == own(mod) and nbytes(names) > max_unit
                and all(stored_as_model(t) for t in (mod.weight, mod.bias) if t is not None)):
            return []
        parts = [t for t in (mod.weight, mod.bias) if t is not None]
        rows = mod.weight.shape[0]
        per_row = sum(t.numel() // rows * t.element_size() for t in parts)
        # Blocks of a multiple of 64 rows: their products equal the whole layer's bit for bit on the
        # CPU kernels we measured (odd block sizes change the summation order of some rows).
        step = max(64, max_unit // per_row // 64 * 64)
        out = []
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            names_b = []
            for t in parts:
                ref = refs[names_of[id(t)]]
                vname = block_name(ref.name, lo, hi)
                virtual[vname] = TensorRef(vname, ref.dtype, (hi - lo, *ref.shape[1:]), ref.nbytes // rows * (hi - lo))
                names_b.append(vname)
            out.append(names_b)
        return out

    raw: list[tuple[str, list[str], bool, str]] = []  # (root path, tensors, pinned, mode), in registration order
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
        container = type(mod).forward is nn.Module.forward  # a ModuleList is never called: no hook fires on it
        if (nbytes(names) <= max_unit and not container) or not any(tensors_below(c) for _, c in kids):
            bl = blocks(mod, names)
            raw.extend([(path, b, False, "block") for b in bl] or
                       [(path, names, False, "gather" if gatherable(mod, names) else "")])
            roots[path] = mod
            return
        if own(mod):
            raw.append((path, own(mod), True, ""))
            roots[path] = mod
        for kpath, kid in kids:
            cut(kid, kpath)

    cut(model, "")
    units = [Unit(i, _unit_name(path, names, mode), (path,), tuple(names), nbytes(names), pinned, mode)
             for i, (path, names, pinned, mode) in enumerate(raw)]
    program = Program(tuple(units), tuple(u.uid for u in units), tuple(refs.values()))
    return Captured(program, owners, originals, roots, _root_units(units), program, virtual)


def _unit_name(path: str, names: list[str], mode: str) -> str:
    name = path or "<top>"
    return f"{name}[{names[0].rpartition('=')[2]}]" if mode == "block" else name


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

    def slot(uids: list[int]) -> int:
        tensors = tuple(t for x in uids for t in base[x].tensors)
        return unit_layout(Unit(-1, "", (), tensors, 0), index).slot_nbytes

    merge_bytes = min(merge_bytes, max((slot([u.uid]) for u in base if not u.pinned and not u.mode), default=0))
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
        if (g is not None and uid in once and all(x in once for x in g) and not u.pinned and not u.mode
                and not base[g[0]].pinned and not base[g[0]].mode
                and not set(u.tensors) & {t for x in g for t in base[x].tensors}
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
                              tensors, sum(base[x].nbytes for x in g), base[g[0]].pinned, base[g[0]].mode))
        steps.append(new_id[key])
    for u in base:  # units this call never opened keep their own id, for a later call that does
        if not any(u.uid in g for g in groups):
            units.append(Unit(len(units), u.name, u.roots, u.tensors, u.nbytes, u.pinned, u.mode))
    program = Program(tuple(units), tuple(steps), cap.base.tensors)
    return Captured(program, cap.owners, cap.originals, cap.roots, _root_units(units), cap.base, cap.virtual)


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
    first = {u.uid: min(tensor_span(index, t)[0] for t in u.tensors) for u in cap.base.units if u.tensors}
    return roots_in_order(cap.base.units[uid] for uid in sorted(first, key=first.get))
