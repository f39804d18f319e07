"""MODEL arguments of the CLI: a zoo name (`zoo:resnet50`), a factory (`package.module:function`), or
a Hugging Face checkpoint folder (config.json beside safetensors files, sharded or not).

A factory takes no arguments and returns a `layerstream.zoo.ModelSpec` (how to build the model and
its example inputs). A folder's spec builds the model from its config and streams the folder itself.
Weights of zoo models and factories not given with --weights are made once from seed 0 and cached.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from . import zoo
from .zoo import ModelSpec


class ModelRefError(ValueError):
    """A MODEL argument that names no zoo model and no importable factory."""


def resolve(ref: str) -> ModelSpec:
    if os.path.isdir(ref):
        return folder_spec(ref)
    if ref.startswith("zoo:") or ":" not in ref:
        return zoo.get(ref)
    mod_name, _, fn_name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelRefError(f"MODEL {ref!r}: cannot import {fn_name!r} from {mod_name!r} ({e}); give a zoo name "
                            f"(zoo:{', zoo:'.join(zoo.names())}) or package.module:function") from None
    spec = fn()
    if not isinstance(spec, ModelSpec):
        raise ModelRefError(f"MODEL {ref!r}: {fn_name}() returned {type(spec).__name__}, not a "
                            "layerstream.zoo.ModelSpec(name, build, example_inputs, description)")
    return spec


def weights_for(ref: str, spec: ModelSpec, weights: str | None) -> Path:
    """The weight file to stream: the one given, or the cached seed-0 file (made on first use)."""
    if weights:
        return Path(weights)
    if os.path.isdir(ref):
        return Path(ref)  # a checkpoint folder streams as it is
    name = spec.name if ref.startswith("zoo:") or ":" not in ref else ref.replace(":", ".")
    path = zoo.weights_path(name)
    if not path.exists():
        print(f"making weights for {ref} (once) -> {path}", file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        zoo.save_weights(spec, path)
    return path


def folder_spec(folder: str) -> ModelSpec:
    """A checkpoint folder as a ModelSpec: built from its config.json in the dtype the checkpoint stores,
    fed a 128-token prompt (text models) or an image (vision models)."""
    from .checkpoint import read_checkpoint
    from .pretrained import build_model, example_inputs, file_dtype, load_config

    config = load_config(folder)
    dtype = file_dtype(read_checkpoint(folder))
    inputs = example_inputs(config)  # refuses a model type it cannot feed now, not after the build
    arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    return ModelSpec(os.path.basename(os.path.normpath(folder)), lambda: build_model(config, dtype),
                     lambda: inputs, f"{arch} from {folder} ({dtype})")
