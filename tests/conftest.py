"""Shared fixtures: tiny zoo models saved once per session, with their eager reference outputs."""
from __future__ import annotations

import os
import threading

import pytest
import torch

import layerstream as ls
from layerstream import zoo
from layerstream.outputs import tensors_of
from layerstream.stream import model_weight_bytes

TINY = ["tiny-resnet", "tiny-vit", "tiny-bert", "tiny-gpt2", "tiny-t5", "tiny-llama", "twice"]


flat = tensors_of


class Saved:
    """A tiny model's weight file and its eager outputs (built from the file, as a user would)."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        self.spec = zoo.get(name)
        self.inputs = self.spec.example_inputs()
        model = ls.load_eager(zoo.build_on_meta(self.spec.build), path)
        self.weight_bytes = model_weight_bytes(model)
        with torch.no_grad():
            self.expected = flat(model(*self.inputs))

    def model(self):
        return zoo.build_on_meta(self.spec.build)

    def check(self, out) -> None:
        got = flat(out)
        assert len(got) == len(self.expected)
        for g, e in zip(got, self.expected):
            assert g.dtype == e.dtype and g.shape == e.shape
            assert torch.equal(g, e), f"{self.name}: max diff {(g.float() - e.float()).abs().max()}"


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    cache: dict[str, Saved] = {}

    def get(name: str) -> Saved:
        if name not in cache:
            path = str(root / f"{name}.safetensors")
            zoo.save_weights(zoo.get(name), path)
            cache[name] = Saved(name, path)
        return cache[name]

    return get


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("layerstream")]
