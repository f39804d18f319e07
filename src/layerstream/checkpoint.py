"""A checkpoint as it lies on disk, read as one virtual file: a safetensors file, or a Hugging Face
folder (config.json beside model.safetensors, or beside shards and model.safetensors.index.json).

Why one virtual file: the layout, the planner and the executor all speak absolute file offsets, and
none of them needs to learn about shards. Each shard's validated header is placed at its own base in
one address space. Bases are 4 KiB aligned, so O_DIRECT offsets stay aligned; a gap wider than
layout.MAX_GAP separates one shard's last byte from the next base, so the layout's coalescing rule
never joins two shards into one read extent. The reader (runtime/io.py) routes each read by offset to
its shard's file. Nothing is converted or copied: a folder is streamed as it was downloaded.

Names: a checkpoint saved from a base model (GPT2Model: `h.0.attn.c_attn.weight`) loaded into its
head model (GPT2LMHeadModel: `transformer.h.0.attn.c_attn.weight`), or the reverse, differs by one
leading prefix. `align_names` renames the index to the model's names where one prefix explains the
difference, as transformers' `base_model_prefix` handling does when it loads such a checkpoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Iterable

from .format import FileIndex, IndexCorrupt, MissingShard, NoWeightFile, ShardMismatch, read_index
from .layout import ALIGN, MAX_GAP

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# Between one shard's (page-rounded) end and the next base: wider than MAX_GAP, so no extent spans two.
SHARD_GAP = 2 * MAX_GAP


def _up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def read_checkpoint(path: str | os.PathLike) -> FileIndex:
    """The validated index of a safetensors file, of a checkpoint folder, or of a folder's index.json.

    A folder's model.safetensors wins over an index, as in transformers. A sharded checkpoint comes
    back as one virtual file whose `parts` say where each shard lies (see the module docstring).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
        if os.path.isfile(single):
            return read_index(single)
        if os.path.isfile(index):
            return read_sharded(index)
        found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".json")))
        raise NoWeightFile(
            f"{path}: no {SINGLE_FILE} and no {INDEX_FILE} in this folder (it holds: {', '.join(found) or 'nothing'}); "
            "pass a Hugging Face checkpoint folder saved with safetensors (save_pretrained does so by default), "
            "or the .safetensors file itself")
    if path.endswith(".index.json"):
        return read_sharded(path)
    return read_index(path)


def read_sharded(index_path: str | os.PathLike) -> FileIndex:
    """Validate model.safetensors.index.json against its shards' headers; return one virtual file.

    The index is the authority on which tensor is where (transformers loads by it too): every tensor
    it names must be in the shard it names, and a shard's tensors the index does not name are left out.
    """
    index_path = os.fspath(index_path)
    folder = os.path.dirname(os.path.abspath(index_path))
    weight_map = _weight_map(index_path)
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if absent:
        raise MissingShard(
            f"{index_path} names {len(shards)} shard(s) but {len(absent)} are not in {folder}: "
            f"{', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}; the download or copy is incomplete: "
            "fetch the missing shard files again")
    indexes = {s: read_index(os.path.join(folder, s)) for s in shards}
    wrong = [f"{name!r} -> {shard}" for name, shard in weight_map.items() if name not in indexes[shard].tensors]
    if wrong:
        raise ShardMismatch(
            f"{index_path} places {len(wrong)} tensor(s) in shards whose headers do not hold them: "
            f"{', '.join(wrong[:10])}{' ...' if len(wrong) > 10 else ''}; the index and the shards come from "
            "different saves: copy the folder again from one save")
    by_shard: dict[str, list[str]] = {s: [] for s in shards}
    for name, shard in weight_map.items():
        by_shard[shard].append(name)
    return combine(folder, [(indexes[s], by_shard[s]) for s in shards])


def _weight_map(index_path: str) -> dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, RecursionError) as e:
        raise IndexCorrupt(f"{index_path}: not valid UTF-8 JSON ({e}); the index file is corrupt") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not (isinstance(wm, dict) and wm and all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items())):
        raise IndexCorrupt(f"{index_path}: expected {{\"weight_map\": {{tensor name: shard file}}}} with at least "
                           f"one tensor, got {json.dumps(obj)[:200]}; the index file is corrupt")
    outside = sorted({v for v in wm.values() if os.path.isabs(v) or os.path.normpath(v).startswith("..")})
    if outside:
        raise IndexCorrupt(f"{index_path}: shard file(s) {', '.join(outside[:5])} lie outside the checkpoint folder; "
                           "a weight_map names files inside its own folder")
    return wm


def combine(path: str, shards: Iterable[tuple[FileIndex, Iterable[str]]]) -> FileIndex:
    """Place each shard's named tensors at the shard's base in one address space (pure).

    `data_start` is the first shard's (it sits at base 0); `file_size` is the end of the last shard.
    """
    tensors, parts, metadata, base, end, data_start = {}, [], {}, 0, 0, None
    for idx, names in shards:
        parts.append((base, idx.path))
        metadata.update(idx.metadata)
        data_start = idx.data_start if data_start is None else data_start
        for n in names:
            t = idx.tensors[n]
            tensors[n] = replace(t, begin=base + t.begin, end=base + t.end)
        end = base + idx.file_size
        base = _up(end) + SHARD_GAP
    return FileIndex(path, end, data_start or 0, tensors, metadata, tuple(parts))


def align_names(index: FileIndex, model_names: Iterable[str]) -> FileIndex:
    """`index` with its tensors renamed to the model's names where one leading prefix is the difference.

    Tries adding or stripping each first name component (`transformer`, `model`, `bert`, ...) and keeps
    the renaming that lets the most model tensors be found, if it finds more than the names as they are.
    Stripping drops the tensors outside the prefix (a head the model does not have). Pure.
    """
    want = set(model_names)
    have = set(index.tensors)
    best, best_n = None, len(want & have)
    if best_n == len(want):
        return index
    firsts = {n.split(".", 1)[0] for n in want | have if "." in n}
    for p in sorted(firsts):
        added = {n if n.startswith(p + ".") else f"{p}.{n}": n for n in have}
        stripped = {n[len(p) + 1:]: n for n in have if n.startswith(p + ".")}
        for mapping in (added, stripped):
            found = len(want & mapping.keys())
            if found > best_n:
                best, best_n = mapping, found
    if best is None:
        return index
    tensors = {new: replace(index.tensors[old], name=new) for new, old in best.items()}
    return replace(index, tensors=tensors)


def shard_paths(index: FileIndex) -> list[str]:
    """The files behind an index: its shards, or its one file."""
    return [p for _, p in index.parts] or [index.path]


def shard_of(index: FileIndex, offset: int) -> tuple[int, str]:
    """(base, file) of the shard holding virtual `offset`: file offset = offset - base."""
    return max(((b, p) for b, p in index.parts if b <= offset), default=(0, index.path))
