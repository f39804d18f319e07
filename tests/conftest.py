"""Shared fixtures: tiny zoo models saved once per session, with their eager reference outputs."""
from __future__ import annotations

import contextlib
import json
import os
import struct
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


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own cache directory: stream() keeps cost models there, and one test's cached
    costs would skip the timed calls another test learns from (and nothing lands in ~/.cache)."""
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))


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


def until_learned(sm, call, most: int = 14) -> None:
    """Run `call()` until `sm` has learned its costs and one whole call of the plan it keeps has run (3 to
    10 calls: learn.py; 3 where nothing streams), so the next call is warm: its ring was filled at the
    end of the call before. The call that ends learning may not leave it filled: a serial (timed) call
    issues nothing ahead, and a re-plan's first call starts with its ring empty."""
    for _ in range(most):
        plan, learned = sm.plan, sm.learning == "done"
        call()
        if learned and sm.learning == "done" and sm.plan is plan:
            return
    raise AssertionError(f"still learning ({sm.learning!r}) after {most} calls")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("layerstream")]


@contextlib.contextmanager
def nothing_left_open():
    """The body must fail; afterwards no layerstream thread is alive and the open fds are the same."""
    fds = open_fds()
    yield
    assert reader_threads() == [], f"threads left alive: {reader_threads()}"
    assert open_fds() == fds, f"fds opened and not closed: {open_fds() - fds}"


def assert_still_meta(model: torch.nn.Module) -> None:
    """A failed stream() gives nothing to the model: every parameter is still the meta one."""
    assert all(p.is_meta for p in model.parameters())


def small_model() -> torch.nn.Module:
    with ls.init_empty_weights():
        return torch.nn.Linear(2, 2)


def write_st(path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> str:
    """A safetensors file by hand: 8-byte little-endian header length, the JSON header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)
