"""`stream(model, path, budget)`: the model, callable as before, with its weights streamed from disk."""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from .budget import parse_budget
from . import learn
from .capture import ST_TO_TORCH, capture, fuse, packed_order
from .checkpoint import read_checkpoint
from .errors import ClosedError, ModelError
from .format import FileIndex
from .layout import unit_layout
from .outputs import tensors_of
from .packfile import checks_for, rename_units, tensor_digests, unit_table
from .planfile import read_plan_file
from .plan import Plan, plan_fill
from .plan.cost import CostModel
from .plan.simulate import Prediction
from .report import Report  # noqa: F401 - its home was here; imported from here too
from .pretrained import align_to_model
from .runtime.arena import Arena
from .runtime import lookup
from .runtime.executor import Executor
from .runtime.io import DEFAULT_WORKERS, make_io, open_reader
from .runtime.trace import Trace
from .units import parse_block

if TYPE_CHECKING:
    from .pretrained import GenerationStats

MIN_UNIT = 256 * 2**10
MAX_UNIT = 64 * 2**20


def default_max_unit(budget: int) -> int:
    """Units of about an eighth of the budget: the ring holds a few, the rest can stay resident."""
    return max(MIN_UNIT, min(MAX_UNIT, budget // 8))


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and persistent buffers (tied weights counted once)."""
    seen, total = set(), 0
    for mod in model.modules():
        tensors = list(mod._parameters.values()) + [
            b for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class StreamedModel(nn.Module):
    """Wraps a model whose weights are streamed from a safetensors file into a budgeted arena.

    Calls run under torch.no_grad(): streamed weights are views that the next load overwrites, so
    nothing may keep them for a backward pass. Calls from several threads are served one at a time
    (one arena, one schedule; compute on one device is serial anyway). Close it (or use `with`) to
    stop its reads, close its file and free its arena.
    """

    def __init__(self, model: nn.Module, path: str | os.PathLike | FileIndex, budget="10%", device="cpu", *,
                 plan: Plan | str | os.PathLike | None = None, max_unit: int | None = None, reader: str = "auto",
                 io: str = "auto", workers: int = DEFAULT_WORKERS, trace: bool = True, verify: bool = True,
                 profile_cache: str = "on"):
        super().__init__()
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r}: layerstream streams to 'cpu' or 'cuda' devices")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device here; use device='cpu'")
        self._exec = self._arena = self._io = self._reader = self._stage = None
        self._call_lock = threading.RLock()
        self._hooks = []
        self._overridden = []  # modules whose forward lookup.py replaced (gather, block units)
        self.model = model
        # Everything that can refuse (file header, model/file match, budget) runs before anything opens.
        # A Hugging Face folder of shards is one virtual file (checkpoint.py); names are aligned to the
        # model's where a renaming is the difference (a base-model checkpoint in a head model).
        index = path if isinstance(path, FileIndex) else read_checkpoint(path)
        self.index = align_to_model(index, model)
        self.path = index.path if isinstance(path, FileIndex) else os.fspath(path)
        table = unit_table(index)  # a packed file's checksummed units, else None
        self.unit_table = rename_units(table, index, self.index) if table else None
        self.verify = verify and self.unit_table is not None
        self.weight_bytes = model_weight_bytes(model)
        self.budget_bytes = parse_budget(budget, self.weight_bytes)
        root_order = None
        if isinstance(plan, (str, os.PathLike)):  # a file `layerstream plan --json` wrote
            plan, max_unit, root_order = read_plan_file(plan, max_unit)
        self.max_unit = max_unit or default_max_unit(self.budget_bytes)
        # Large embedding tables read only the rows looked up (on the CPU), large linears compute in row blocks.
        # (Not when the budget holds every unit whole: then the table is resident and no row is read per call.)
        cap = capture(model, self.index, self.max_unit, split=True)
        if self.device.type == "cpu" and self.budget_bytes < sum(unit_layout(u, self.index).slot_nbytes
                                                                 for u in cap.program.units):
            cap = capture(model, self.index, self.max_unit, split=True, gather=True)
        if not root_order and plan is None and self.unit_table:
            # A packed file knows the order: a better first guess than registration order, so even the
            # first (cold) call reads ahead the units it needs instead of missing them.
            root_order = packed_order(cap, self.index)
        if root_order:  # a plan's units, or the pack's order: merged along that order
            cap = fuse(cap, root_order, self.max_unit, self.index)
        self._set_capture(cap)
        self._learning = "done" if plan is not None else "order"  # a plan the user passed is kept as it is
        self._reader_mode = reader
        self._profile_cache = learn.check_cache_mode(profile_cache)
        self._weights_identity = learn.weights_identity(self.index) if self._profile_cache != "off" else None
        self.profile_note = ""  # where the cost model came from, once there is one
        self._check = None  # how the planned calls check a cached cost model (learn._check_cached)
        self._mismatches = 0  # learning calls of other shapes than the timed call's (learn.LEARN_TRIES)
        self.costs: CostModel | None = None
        self._profile_bps = 0.0
        self._overlapped: CostModel | None = None
        self._overlapped_s = 0.0
        self._pure_costs: CostModel | None = None  # the serial call's (compute and the disk alone), to refit
        self._refines = 0  # rounds left whose plan's warm calls are fitted again (learn.REFINE_ROUNDS)
        self._warm: list = []  # this round's warm calls so far: (s, call number, their CostModel)
        self._kept = None  # the last refit plan: (plan, its faster warm call s, its costs, how fitted)
        self._timed_read_bytes = 0  # what the timed call's plan read (learn.REFIT_MIN_SHARE)
        self.prediction: Prediction | None = None
        plan = plan or plan_fill(self.cap.program, self.sizes, self.budget_bytes)
        self.trace = Trace(trace)
        self._latencies: list[float] = []
        self._bytes_last = 0
        self._stall_last = 0
        self._call = None  # the call in flight: (executor, bytes read, stall ns, start s, shape key)
        self._key_overlapped = None  # the shape key of the timed overlapped call (learning)
        self.generation: GenerationStats | None = None
        try:
            _move_real_buffers(model, self.device)
            self._reader = open_reader(self.index.path, reader, self.index.parts)
            self._io = self._open_io(io, workers)
            self._start(plan)
            for path_, mod in self.cap.roots.items():
                self._hooks.append(mod.register_forward_pre_hook(self._pre_hook(path_)))
                self._hooks.append(mod.register_forward_hook(self._post_hook(path_), always_call=True))
            self._overridden = lookup.install(self.cap, lambda: self._exec)
        except BaseException:
            self.close()
            raise

    @property
    def config(self):
        """The inner model's config (transformers): code that reads `model.config` takes the streamed model."""
        return self.model.config

    def _apply(self, fn, recurse=True):
        """`.to()`, `.float()`, `.cuda()` reach here: the weights live in the arena, not in the model, so
        a move or cast to what is already the case is a no-op (a pipeline calling `.to(device)` on its
        modules works); any other refuses, since it would need the weights loaded."""
        floats = [ST_TO_TORCH[t.dtype] for t in self.cap.program.tensors if t.dtype in ("F64", "F32", "F16", "BF16")]
        like = torch.empty(0, dtype=floats[0] if floats else torch.float32, device=self.device)
        probe = fn(like)
        if probe.device != like.device or probe.dtype != like.dtype:
            raise ModelError(f"a streamed model cannot be moved or cast (to {probe.device}, {probe.dtype}): its "
                             f"weights stream into an arena on {self.device}; stream again with device=... instead")
        return self

    def _set_capture(self, cap) -> None:
        self.cap = cap
        self.layouts = {u.uid: unit_layout(u, self.index) for u in cap.program.units}
        self.sizes = {u: lay.slot_nbytes for u, lay in self.layouts.items()}
        self.checks = ({u: checks_for(lay, self.unit_table, self.index) for u, lay in self.layouts.items()}
                       if self.verify else {})
        # A tensor cut into row blocks is checked whole, as its blocks stream by (runtime/lookup.py).
        digests = tensor_digests(self.unit_table) if self.verify else {}
        self.split_digests = {b: digests[b] for b in {parse_block(n)[0] for n in cap.virtual} if b in digests}

    def _open_io(self, io: str, workers: int):
        """This model's own I/O backend over its reader (a Session's models share the session's instead)."""
        return make_io(self._reader, self.trace, io, workers)

    # The hooks look the executor up at call time, so a re-plan swaps it without touching hooks.
    def _pre_hook(self, path: str):
        return lambda mod, args: self._exec.pre(path)

    def _post_hook(self, path: str):
        return lambda mod, args, out: self._exec.post(path)

    def _start(self, plan: Plan) -> None:
        self.plan = plan
        self._arena = Arena(plan.arena_bytes, self.budget_bytes, self.device)
        if self.device.type == "cuda":
            from .runtime.device import CudaStage
            host = max([plan.ring_bytes] + [self.sizes[u] for u, _ in plan.resident] + [4096])
            self._stage = CudaStage(self.device, host)
        self._exec = Executor(self.cap, self.layouts, plan, self._arena, self._io, self.trace, self._stage,
                              self.checks, self.split_digests)

    def _stop(self) -> None:
        if self._exec is not None:
            self._exec.close()
            self._exec = None
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        if self._arena is not None:
            self._arena.close()
            self._arena = None

    def forward(self, *args, **kwargs):
        with self._call_lock:
            self._begin(args, kwargs)
            out, failed = None, True
            try:
                with torch.no_grad():
                    out = self.model(*args, **kwargs)
                failed = False
            finally:
                self._end(out, failed)
            return out

    def generate(self, *args, **kwargs):
        """The inner model's `generate()` (transformers), every forward it makes a streamed call.

        Prefill and each decoding step are calls like any other: served under the call lock, timed,
        re-planned between calls. The KV cache lives outside the weight budget; its size, tokens/s and
        the bound set by the disk are in `report().generation`.
        """
        from .pretrained import generate_streamed
        with self._call_lock:
            if self._exec is None:
                raise ClosedError("this streamed model is closed; call layerstream.stream() again")
            return generate_streamed(self, args, kwargs)

    def _begin(self, args, kwargs) -> None:
        """Start a call: the executor aligns its schedule to a call start (see Executor.begin_call)."""
        if self._exec is None:
            raise ClosedError("this streamed model is closed; call layerstream.stream() again")
        ex = self._exec
        self._call = (ex, ex.stats.bytes_read, ex.stats.stall_ns, time.perf_counter(), _shape_key(args, kwargs))
        ex.begin_call()

    def _end(self, out, failed: bool) -> None:
        """End the call begun by _begin; a failed call releases its units and records nothing."""
        ex, read0, stall0, t0, key = self._call
        self._call = None
        try:
            if not failed and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the call ends when its output is computed
        finally:
            ex.end_call()
        if failed:
            return
        self._latencies.append((time.perf_counter() - t0) * 1e3)
        self.trace.add(f"call {len(self._latencies)}", "call", ex.t_call[0], ex.t_call[1], "calls")
        self._bytes_last = ex.stats.bytes_read - read0
        self._stall_last = ex.stats.stall_ns - stall0
        _check_not_meta(out)
        self._maybe_replan(ex, key)

    def _maybe_replan(self, ex: Executor, key=()) -> None:
        """Learn from the call just served, and re-plan once its costs are known (learn.py)."""
        learn.after_call(self, ex, key)

    def _restart(self, cap, make_plan) -> None:
        """Free the arena, adopt `cap`, then plan (with `cap`'s slot sizes) and start again."""
        stats = self._exec.stats
        self._stop()
        self._set_capture(cap)
        self._start(make_plan())
        self._exec.stats = stats

    @property
    def learning(self) -> str:
        """What the next call teaches the planner (learn.py): "order", "overlapped" (timed), "pure" (serial),
        "settle" (a plan's first call after a re-plan or the serial call, filling its ring), "refine" (its
        next two, the faster fitted again), "check" (a cached cost model); "done" once the plan is the one
        calls will keep running."""
        return self._learning

    def report(self) -> Report:
        ex = self._exec
        if ex is None:
            raise ClosedError("report() after close(): keep the report before closing")
        notes = []
        if self._reader.mode == "buffered":
            notes.append("the filesystem refused O_DIRECT: buffered reads, pages dropped after each read")
        if self.profile_note:
            notes.append(self.profile_note)
        return Report(
            calls=len(self._latencies), latency_ms=self._latencies[-1] if self._latencies else 0.0,
            latency_ms_all=list(self._latencies), weight_bytes=self.weight_bytes,
            budget_bytes=self.budget_bytes, arena_bytes=self._arena.nbytes,
            arena_peak_bytes=self._arena.peak_bytes, resident_bytes=self.plan.ring_offset,
            ring_bytes=self.plan.ring_bytes, bytes_read=ex.stats.bytes_read, bytes_read_last_call=self._bytes_last,
            stall_ms=self._stall_last / 1e6, demand_misses=ex.stats.demand_misses,
            units=len(self.cap.program.units), loads_per_call=len(self.plan.loads),
            reader=f"{self._reader.mode}/{self._io.kind}", planner=self.plan.planner,
            predicted_ms=self.prediction.latency_s * 1e3 if self.prediction else None,
            read_bps=self.costs.read_bps if self.costs else None, notes=notes, generation=self.generation)

    def close(self) -> None:
        """Stop reads, remove hooks, give the model back its meta tensors, close the file, free the arena."""
        with self._call_lock:  # never under a call in flight
            self._close()

    def _close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        lookup.uninstall(self._overridden)
        self._overridden = []
        self._stop()
        if self._io is not None:
            self._io.close()
            self._io = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _shape_key(args, kwargs) -> tuple:
    """Shapes and dtypes of a call's tensor arguments, but an attention mask's (it grows by one per decoded
    token), and a KV cache's length in powers of two (a step's attention grows with it)."""
    items = list(enumerate(args)) + [(k, v) for k, v in kwargs.items() if k != "attention_mask"]
    key = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in items if isinstance(v, torch.Tensor))
    cache = kwargs.get("past_key_values")
    if hasattr(cache, "get_seq_length"):
        key += (("kv_cache_length_bits", (int(cache.get_seq_length()).bit_length(),), ""),)
    return key


def _move_real_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (no file holds them) were built real on the CPU: move them to `device`."""
    for mod in model.modules():
        for name, b in mod._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                mod._buffers[name] = b.to(device)


def _check_not_meta(out) -> None:
    """A meta tensor in the output means a weight was used outside the forward of the module owning it."""
    if any(t.is_meta for t in tensors_of(out)):
        raise ModelError(
            "the output is on the meta device: the model used a weight outside the forward of the "
            "module that owns it (e.g. a parent reading child.weight directly), so it was not loaded; "
            "pass a larger max_unit so that parent and child form one unit")


def stream(model: nn.Module, path: str | os.PathLike, budget="10%", device="cpu", **kwargs) -> StreamedModel:
    """Stream `model`'s weights from `path` under `budget` bytes of weight memory.

    `path` is a safetensors file or a Hugging Face checkpoint folder (one file or shards with their
    index.json), streamed as it is. `model` is best built with its weights on meta
    (`layerstream.init_empty_weights()`); `budget` is a byte count, a size ("512MB", "1.5GiB") or a
    share of the model's weights ("10%").
    """
    return StreamedModel(model, path, budget, device, **kwargs)
