"""Build a model with its weights on meta but its non-persistent buffers real.

`with torch.device("meta")` puts everything on meta, including buffers no weight file holds (rotary
`inv_freq`, `position_ids`, causal masks), which could then never be filled. Like accelerate's
`init_empty_weights(include_buffers=False)`, we build on CPU and intercept registration: each parameter
and persistent buffer moves to meta the moment it is registered, so its CPU storage (from
`torch.empty`) is dropped before any initialiser touches it and the build stays instant and small
even for multi-GB models.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn


def _to_meta_param(p: nn.Parameter) -> nn.Parameter:
    return type(p)(p.to("meta"), requires_grad=p.requires_grad)


@contextlib.contextmanager
def init_empty_weights():
    """Inside, new parameters and persistent buffers are created on meta; other buffers stay real."""
    reg_param, reg_buf = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        reg_param(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = _to_meta_param(self._parameters[name])

    def register_buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        if persistent and tensor is not None:
            tensor = tensor.to("meta")
        reg_buf(self, name, tensor, persistent=persistent)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
    try:
        with torch.device("cpu"):  # a caller's ambient default device (e.g. meta) must not leak in
            yield
    finally:
        nn.Module.register_parameter = reg_param  # type: ignore[method-assign]
        nn.Module.register_buffer = reg_buf  # type: ignore[method-assign]


def build_empty(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` under init_empty_weights(), then move to meta anything assigned past registration."""
    with init_empty_weights():
        model = build()
    for mod in model.modules():
        for k, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                mod._parameters[k] = _to_meta_param(p)
        for k, b in mod._buffers.items():
            if b is not None and k not in mod._non_persistent_buffers_set and not b.is_meta:
                mod._buffers[k] = b.to("meta")
    return model
