"""Hugging Face checkpoint folders and language models: `from_pretrained`, and `generate()` streamed.

A user who needs weight streaming usually has a folder (config.json and safetensors shards), not a
Python factory, and calls `generate()`. The model is built on meta from its config with transformers
(its non-persistent buffers real, see meta.py), the folder is streamed as it is (checkpoint.py), and
generate's forwards, prefill then one per new token, are streamed calls like any other.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch import nn

from .budget import fmt_bytes
from .capture import ST_TO_TORCH, TORCH_TO_ST
from .checkpoint import CONFIG_FILE, align_names, read_checkpoint
from .errors import ModelError, WeightMismatch
from .format import FileIndex, MissingConfig
from .meta import build_empty
from .quant import rename_quant

EXAMPLE_TOKENS = 128  # the CLI's example input for a text model: a 128-token prompt (fewer if positions run out)


def load_config(folder: str | os.PathLike):
    """transformers' config of a checkpoint folder, or MissingConfig saying what is wrong with it."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise MissingConfig(f"{folder}: not a folder; from_pretrained takes a Hugging Face checkpoint folder "
                            "(config.json beside the safetensors files); stream a single file with layerstream.stream()")
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise MissingConfig(f"{folder}: no {CONFIG_FILE}, so the model cannot be built; save the model with "
                            "save_pretrained(), or build it yourself and call layerstream.stream(model, folder)")
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise MissingConfig(f"{folder}/{CONFIG_FILE}: transformers cannot read it ({e}); check its model_type "
                            "against the installed transformers version") from None


def model_tensor_names(model: nn.Module) -> list[str]:
    """Every name a parameter or persistent buffer has in `model`'s state dict (tied ones under each)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for path, mod in model.named_modules(remove_duplicate=False):
        names += [f"{path}.{k}" if path else k for k, b in mod._buffers.items()
                  if b is not None and k not in mod._non_persistent_buffers_set]
    return names


def align_to_model(index: FileIndex, model: nn.Module) -> FileIndex:
    """`index` with its tensor names made the model's, where a renaming explains the difference.

    Names as they are win when they cover the model. Otherwise, for a transformers model, the key
    renamings transformers itself applies on load (its conversion mapping: legacy names such as ViT's
    `encoder.layer.0.attention.attention.query` for today's `layers.0.attention.q_proj`, and the
    base_model_prefix added or stripped); then a leading prefix (checkpoint.align_names). A key that
    transformers would convert (fuse, split, permute) is left as it is: streaming binds stored bytes.
    """
    want = model_tensor_names(model)
    if set(want) <= index.tensors.keys():
        return index
    original = index
    renamed = _hf_renamed(index, model, want)
    if renamed is not None and len(set(want) & renamed.tensors.keys()) > len(set(want) & index.tensors.keys()):
        index = renamed
    return rename_quant(original, align_names(index, want))  # an int8 pack's quant table follows the names


def _hf_renamed(index: FileIndex, model: nn.Module, want: list[str]) -> FileIndex | None:
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x: no conversion mapping; the prefix rule still applies
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    known = dict.fromkeys(want, True)
    tensors = {}
    for key in sorted(index.tensors):
        new, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, known)
        if converted is not None or (new not in known and key in known):
            new = key  # a conversion is not a rename; a name that already fits stays
        if new not in tensors or tensors[new].name == new:
            tensors[new] = replace(index.tensors[key], name=new)
    return replace(index, tensors=tensors)


def file_dtype(index: FileIndex) -> torch.dtype | None:
    """The floating dtype holding most of the checkpoint's bytes (what the model must be built in)."""
    by = Counter()
    for t in index.tensors.values():
        if t.dtype in ("F64", "F32", "F16", "BF16"):
            by[t.dtype] += t.nbytes
    return ST_TO_TORCH[by.most_common(1)[0][0]] if by else None


def model_class(config):
    """The class config.json's `architectures` names, else the causal-LM class, else the base model."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    return AutoModel


def build_model(config, dtype: torch.dtype | None = None, attn_implementation: str | None = None) -> nn.Module:
    """The model for `config`, in eval mode. Honours the ambient device: wrap in build_empty() for meta."""
    cls = model_class(config)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    build = cls.from_config if hasattr(cls, "_model_mapping") else cls._from_config
    return build(config, **kwargs).eval()


def empty_from_folder(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                      attn_implementation: str | None = None) -> tuple[nn.Module, FileIndex]:
    """(model on meta built from the folder's config, the folder's validated index)."""
    config = load_config(folder)
    index = read_checkpoint(folder)
    stored = file_dtype(index)
    if dtype is not None and stored is not None and dtype != stored:
        raise WeightMismatch(
            f"{folder}: dtype={dtype} was asked for but the checkpoint stores its weights as {stored}; streaming "
            f"binds the stored bytes as they are (nothing is converted at load time): pass dtype=None (or "
            f"{stored}), or pack the checkpoint in {TORCH_TO_ST.get(dtype, dtype)} first")
    model = build_empty(lambda: build_model(config, dtype or stored, attn_implementation))
    return model, index


def from_pretrained(path: str | os.PathLike, budget="10%", device="cpu", dtype: torch.dtype | None = None, *,
                    attn_implementation: str | None = None, **stream_kwargs):
    """Stream the Hugging Face checkpoint folder `path` (config.json and safetensors, sharded or not).

    Builds the model from config.json with transformers, its weights on meta, and streams the folder
    as it is under `budget` (see layerstream.stream). `dtype` None builds the model in the dtype the
    checkpoint stores; another dtype is refused, as streaming converts nothing. A checkpoint saved from
    the base model loads into the head model and the reverse (names differ by a prefix); tied weights
    (lm_head = embeddings) are read once. Returns a StreamedModel; call it, or `.generate()`.
    """
    from .stream import stream
    model, index = empty_from_folder(path, dtype, attn_implementation)
    return stream(model, index, budget, device, **stream_kwargs)


def example_inputs(config, seed: int = 0) -> tuple:
    """A sensible input for the model type: a 128-token prompt for text models, an image for vision ones."""
    g = torch.Generator().manual_seed(seed)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{config.model_type}: an encoder-decoder model needs decoder inputs the CLI does not "
                         "make yet; use layerstream.from_pretrained() and call it or .generate() in Python")
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        n = min(EXAMPLE_TOKENS, getattr(config, "max_position_embeddings", None) or EXAMPLE_TOKENS)
        return (torch.randint(0, vocab, (1, n), generator=g),)
    size = getattr(config, "image_size", None)
    if size:
        size = size if isinstance(size, int) else size[0]
        return (torch.randn(1, getattr(config, "num_channels", 3), size, size, generator=g),)
    raise ModelError(f"{config.model_type}: the config has neither vocab_size nor image_size, so no example "
                     "input can be made; call the streamed model from Python with your own inputs")


# ---- generate() -------------------------------------------------------------------------------


@dataclass
class GenerationStats:
    """What the last generate() cost: tokens/s against the bound the disk sets, and the KV cache."""

    steps: int  # forwards: the prefill, then one per further token (each adds one token per sequence)
    batch: int
    seconds: float  # the whole generate()
    tokens_per_s: float  # steps / seconds, per sequence
    first_token_ms: float
    decode_tokens_per_s: float | None  # the steps after the prefill, per second of the time they took
    streamed_bytes_per_token: int | None  # mean bytes read per decoding step (what the resident set leaves)
    read_bps: float | None  # the reader's measured speed on this checkpoint
    bound_tokens_per_s: float | None  # read_bps / streamed bytes per token; None if nothing streams
    kv_cache_bytes: int  # outside the weight budget, measured after the last step

    def rows(self) -> list[tuple[str, str]]:
        decode = "-" if self.decode_tokens_per_s is None else f"{self.decode_tokens_per_s:.1f} tokens/s"
        bound = ("no weight streams per token" if self.bound_tokens_per_s is None else
                 f"{self.bound_tokens_per_s:.1f} tokens/s ({fmt_bytes(self.streamed_bytes_per_token)}/token at "
                 f"{self.read_bps / 1e9:.2f} GB/s)")
        return [("generate", f"{self.steps} tokens x {self.batch} in {self.seconds:.2f} s "
                             f"({self.tokens_per_s:.1f} tokens/s, first token {self.first_token_ms:.1f} ms)"),
                ("decode (bound)", f"{decode} ({bound})"),
                ("KV cache (outside budget)", fmt_bytes(self.kv_cache_bytes))]


def cache_nbytes(cache, _seen=None) -> int:
    """Bytes of the tensors a transformers cache (or a legacy tuple of tensors) holds, each counted once."""
    seen = set() if _seen is None else _seen
    if cache is None or id(cache) in seen:
        return 0
    seen.add(id(cache))
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, (list, tuple)):
        return sum(cache_nbytes(x, seen) for x in cache)
    if isinstance(cache, dict):
        return sum(cache_nbytes(x, seen) for x in cache.values())
    if type(cache).__module__.startswith("transformers.") and hasattr(cache, "__dict__"):
        return sum(cache_nbytes(x, seen) for x in vars(cache).values())
    return 0


def generate_streamed(sm, args, kwargs):
    """Run `sm.model.generate(*args, **kwargs)` with each of its forwards a streamed call of `sm`.

    A pre-hook (first of all hooks) begins the call and a forward hook (last, always called) ends it,
    both on the top module, so the executor's own hooks run inside the call just as in sm.forward.
    The caller holds sm's call lock for the whole generate().
    """
    model = sm.model
    if not callable(getattr(model, "generate", None)):
        raise ModelError(f"{type(model).__name__} has no generate(): build the model with a language-model head "
                         "(AutoModelForCausalLM, or from_pretrained on a causal-LM checkpoint)")
    steps: list[tuple[float, int]] = []  # (end time, bytes read) of each forward
    last = {}
    t0 = time.perf_counter()

    def begin(mod, a, kw):
        sm._begin(a, kw)

    def end(mod, a, kw, out):
        if sm._call is None:  # begin refused (closed): nothing to end
            return
        sm._end(out, failed=out is None)  # always_call: on an exception the hook sees no output
        if out is not None:
            steps.append((time.perf_counter(), sm._bytes_last))
            last["cache"] = getattr(out, "past_key_values", None)

    hooks = [model.register_forward_pre_hook(begin, prepend=True, with_kwargs=True),
             model.register_forward_hook(end, with_kwargs=True, always_call=True)]
    try:
        result = model.generate(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    sm.generation = _stats(sm, steps, t0, time.perf_counter(), result, cache_nbytes(last.get("cache")))
    return result


def _stats(sm, steps, t0: float, t1: float, result, kv_bytes: int) -> GenerationStats | None:
    if not steps:
        return None
    seqs = getattr(result, "sequences", result)
    batch = seqs.shape[0] if isinstance(seqs, torch.Tensor) and seqs.dim() == 2 else 1
    decode = steps[1:]
    per_token = round(sum(b for _, b in decode) / len(decode)) if decode else None
    bps = sm.costs.read_bps if sm.costs else (sm._profile_bps or None)
    bound = bps / per_token if bps and per_token else None
    return GenerationStats(
        steps=len(steps), batch=batch, seconds=t1 - t0, tokens_per_s=len(steps) / (t1 - t0),
        first_token_ms=(steps[0][0] - t0) * 1e3,
        decode_tokens_per_s=len(decode) / (decode[-1][0] - steps[0][0]) if decode else None,
        streamed_bytes_per_token=per_token, read_bps=bps, bound_tokens_per_s=bound, kv_cache_bytes=kv_bytes)
