"""The usual way, for comparison: load every weight from the file into memory, then run."""
from __future__ import annotations

import os

from safetensors import safe_open
from torch import nn

from .capture import ST_TO_TORCH, match_file
from .checkpoint import read_checkpoint, shard_of
from .quant import quant_table
from .quantize import dequantize


def load_eager(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Materialise every parameter and persistent buffer of `model` (built on meta) from `path`.

    `path` is a safetensors file or a Hugging Face folder (sharded or not), with names matched to the
    model as streaming matches them, so tied weights stay tied and mismatches raise the same
    WeightMismatch. Tensors come from safetensors' own loader, shard by shard, so they sit in memory as
    that loader puts them; int8 tensors of a quantized pack are dequantised as streaming does (the same
    arithmetic, so streamed and eager outputs agree bit for bit). Returns the model, now holding all
    its weights in memory.
    """
    from .pretrained import align_to_model

    raw = read_checkpoint(path)
    index = align_to_model(raw, model)
    _, owners, _, _ = match_file(model, index)
    # Back from the model's names to each tensor's shard and stored name (renaming keeps offsets).
    stored = {(t.begin, t.end): n for n, t in raw.tensors.items()}
    quant = quant_table(index)
    by_shard: dict[str, list[tuple[str, str]]] = {}
    for name in owners:
        t = index.tensors[name]
        shard = shard_of(raw, t.begin)[1]
        by_shard.setdefault(shard, []).append((name, name if name in raw.tensors else stored[(t.begin, t.end)]))
    for shard, names in by_shard.items():
        with safe_open(shard, framework="pt") as f:
            for name, file_name in names:
                t = f.get_tensor(file_name)
                q = quant.get(name)
                if q is not None:
                    st = index.tensors[q.scale]
                    scale = f.get_tensor(stored[(st.begin, st.end)])
                    t = dequantize(t, scale, q.axis, ST_TO_TORCH[q.dtype])
                places = owners[name]
                holder = nn.Parameter(t, requires_grad=False) if places[0].is_param else t
                for o in places:
                    o.assign(holder)
    return model
