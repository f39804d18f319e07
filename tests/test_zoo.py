"""Tests for layerstream.zoo: only the tiny models are built for real, so this stays fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from layerstream import zoo

TINY = ["tiny-resnet", "tiny-vit", "tiny-bert", "tiny-gpt2", "tiny-t5", "tiny-llama", "twice"]
BIG = {
    "resnet50": 1.02e8,
    "vit-b16": 3.46e8,
    "bert-base": 4.38e8,
    "gpt2-large": 3.1e9,
    "gpt-neo-1.3b": 5.4e9,
}


def _tensors(out: object) -> list[torch.Tensor]:
    """Every tensor in a forward result (a tensor, a ModelOutput, or nested tuples)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    raise TypeError(f"unexpected output type {type(out)}")


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.device("cpu"):
        return zoo.get(name).build()


def _run(model: nn.Module, name: str) -> list[torch.Tensor]:
    with torch.no_grad():
        return _tensors(model(*zoo.get(name).example_inputs()))


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _persistent(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{mn}.{k}": b
        for mn, mod in model.named_modules()
        for k, b in mod._buffers.items()
        if b is not None and k not in mod._non_persistent_buffers_set
    }


def _non_persistent(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{mn}.{k}": b
        for mn, mod in model.named_modules()
        for k, b in mod._buffers.items()
        if b is not None and k in mod._non_persistent_buffers_set
    }


def _unique_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers, tied tensors counted once."""
    seen = {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *_persistent(model).values()]}
    return sum(seen.values())


def test_names_and_lookup() -> None:
    assert set(TINY) | set(BIG) == set(zoo.names())
    assert zoo.get("zoo:tiny-gpt2") is zoo.get("tiny-gpt2")
    for name in zoo.names():
        spec = zoo.get(name)
        assert spec.name == name and spec.description and "\n" not in spec.description


def test_unknown_model_lists_names() -> None:
    with pytest.raises(zoo.UnknownModel) as exc:
        zoo.get("zoo:nope")
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, KeyError)
    for name in zoo.names():
        assert name in str(exc.value)


@pytest.mark.parametrize("name", TINY)
def test_tiny_builds_runs_deterministic(name: str) -> None:
    spec = zoo.get(name)
    a, b = _build(name), _build(name)
    assert not a.training
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert _unique_bytes(a) < 8e6
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Inputs are seeded, batch 1, on CPU.
    x1, x2 = spec.example_inputs(), spec.example_inputs()
    assert isinstance(x1, tuple) and x1
    for u, v in zip(x1, x2):
        assert u.device.type == "cpu" and u.shape[0] == 1 and torch.equal(u, v)
    _assert_same(_run(a, name), _run(b, name))
    _assert_same(_run(a, name), _run(a, name))


@pytest.mark.parametrize("name", TINY)
def test_build_honours_default_device(name: str) -> None:
    with torch.device("meta"):
        model = zoo.get(name).build()
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_build_on_meta(name: str) -> None:
    ref = _build(name)
    with torch.device("meta"):  # an ambient default device must not leak into non-persistent buffers
        meta = zoo.build_on_meta(zoo.get(name).build)
    assert not meta.training
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(b.device.type == "meta" for b in _persistent(meta).values())
    assert _persistent(meta).keys() == _persistent(ref).keys()
    np_meta, np_ref = _non_persistent(meta), _non_persistent(ref)
    assert np_meta.keys() == np_ref.keys()
    for k, b in np_meta.items():
        assert b.device.type == "cpu" and torch.equal(b, np_ref[k]), k
    # Same structure as the real model, and tied weights stay tied.
    assert meta.state_dict().keys() == ref.state_dict().keys()
    assert _unique_bytes(meta) == _unique_bytes(ref)
    # Registration is restored afterwards.
    assert nn.Linear(2, 2).weight.device.type == "cpu"


def test_non_persistent_buffers_present() -> None:
    """Guard that the meta test above actually exercises real non-persistent buffers."""
    meta = zoo.build_on_meta(zoo.get("tiny-llama").build)
    assert any(k.endswith("inv_freq") for k in _non_persistent(meta))
    assert any(k.endswith("position_ids") for k in _non_persistent(zoo.build_on_meta(zoo.get("tiny-bert").build)))


def test_tied_weights() -> None:
    gpt2 = _build("tiny-gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    t5 = _build("tiny-t5")
    assert t5.model.lm_head.weight is t5.model.shared.weight


def test_t5_positional_matches_keywords() -> None:
    model = _build("tiny-t5")
    ids, dec = zoo.get("tiny-t5").example_inputs()
    with torch.no_grad():
        ref = model.model(input_ids=ids, decoder_input_ids=dec).logits
    _assert_same(_run(model, "tiny-t5")[:1], [ref])


def test_twice_calls_block_twice() -> None:
    model = _build("twice")
    calls: list[int] = []
    model.block.register_forward_hook(lambda *_: calls.append(1))
    _run(model, "twice")
    assert len(calls) == 2
    assert "scale" in dict(model.named_parameters(recurse=False))


@pytest.mark.parametrize("name", TINY)
def test_save_weights_round_trip(name: str, tmp_path: Path) -> None:
    from safetensors.torch import load_model

    path = tmp_path / f"{name}.safetensors"
    size = zoo.save_weights(zoo.get(name), path, seed=0)
    assert size == path.stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))
    fresh = _build(name, seed=123)
    load_model(fresh, str(path))
    _assert_same(_run(fresh, name), _run(_build(name, seed=0), name))


def test_weights_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert zoo.weights_path("zoo:twice", str(tmp_path)) == tmp_path / "zoo" / "twice-seed0.safetensors"
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "env"))
    assert zoo.weights_path("twice") == tmp_path / "env" / "zoo" / "twice-seed0.safetensors"
    monkeypatch.delenv("LAYERSTREAM_CACHE")
    assert zoo.weights_path("twice") == Path.home() / ".cache" / "layerstream" / "zoo" / "twice-seed0.safetensors"


def test_ensure_weights(tmp_path: Path) -> None:
    path = zoo.ensure_weights("tiny-gpt2", str(tmp_path))
    assert path.exists() and path == zoo.weights_path("tiny-gpt2", str(tmp_path))
    mtime = path.stat().st_mtime_ns
    assert zoo.ensure_weights("zoo:tiny-gpt2", str(tmp_path)) == path
    assert path.stat().st_mtime_ns == mtime  # cached, not rewritten
    with pytest.raises(zoo.UnknownModel):
        zoo.ensure_weights("nope", str(tmp_path))


@pytest.mark.parametrize("name", sorted(BIG))
def test_big_model_sizes(name: str) -> None:
    """Meta builds are instant, so the big specs can be checked without allocating them."""
    model = zoo.build_on_meta(zoo.get(name).build)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert _unique_bytes(model) == pytest.approx(BIG[name], rel=0.05)
    (x,) = zoo.get(name).example_inputs()
    assert x.shape[0] == 1
