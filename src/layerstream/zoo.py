"""A small zoo of reproducible models for tests and benchmarks.

Every model is built from a ``transformers`` config class (or defined here) with random
initialisation, so nothing is ever downloaded: the weights a benchmark streams are just
whatever ``torch.manual_seed(seed)`` produces, written once to a safetensors cache file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .meta import build_empty

__all__ = [
    "ModelSpec",
    "UnknownModel",
    "build_on_meta",
    "ensure_weights",
    "get",
    "names",
    "save_weights",
    "weights_path",
]

_PREFIX = "zoo:"


@dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo model and feed it.

    ``build`` takes no arguments and honours the current default device, so callers choose
    between a real CPU build and ``with torch.device("meta")`` (or :func:`build_on_meta`).
    """

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple]
    description: str


class UnknownModel(KeyError, ValueError):
    """Raised by :func:`get` for a name that is not in the zoo.

    It is a ``ValueError`` (a bad argument) and a ``KeyError`` (a failed lookup), so either
    ``except`` clause a caller already has will catch it.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- builders


def _hf(model_cls_name: str, config_cls_name: str, eager: bool = True, **config: Any) -> nn.Module:
    """Build a transformers model from its config, in eval mode and float32.

    The classes are named, not imported at module load, so ``import layerstream.zoo`` stays
    cheap. Eager attention keeps outputs independent of which SDPA kernel is picked, and
    ``use_cache=False`` keeps KV caches (non-tensor outputs) out of the forward result.
    """
    import transformers

    config_cls = getattr(transformers, config_cls_name)
    model_cls = getattr(transformers, model_cls_name)
    if eager:
        config.setdefault("attn_implementation", "eager")
    model = model_cls(config_cls(**config))
    return model.float().eval()


class _Seq2Seq(nn.Module):
    """Positional front end for encoder-decoder models.

    ``T5ForConditionalGeneration.forward``'s second positional argument is ``attention_mask``,
    so ``model(input_ids, decoder_input_ids)`` would silently pass the decoder ids as a mask.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids)


def _tiny_t5() -> nn.Module:
    model = _hf("T5ForConditionalGeneration", "T5Config", vocab_size=512, d_model=64, d_kv=16,
                d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, use_cache=False,
                decoder_start_token_id=0)
    return _Seq2Seq(model).eval()


class Twice(nn.Module):
    """A model with the shapes that trip up layer-by-layer streaming.

    ``block`` runs twice per forward (its weights must stay resident or be loaded twice) and
    ``scale`` is a parameter owned by the root module rather than by any child.
    """

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.block = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.scale = nn.Parameter(torch.ones(d))
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.block(h)
        h = self.block(h)
        return self.out(h * self.scale)


def _twice() -> nn.Module:
    return Twice().eval()


# --------------------------------------------------------------------------- inputs


def _gen() -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(0)


def _image(size: int) -> tuple:
    return (torch.randn(1, 3, size, size, generator=_gen()),)


def _tokens(vocab: int, length: int, n: int = 1) -> tuple:
    g = _gen()
    return tuple(torch.randint(0, vocab, (1, length), generator=g, dtype=torch.int64) for _ in range(n))


def _twice_inputs() -> tuple:
    return (torch.randn(1, 16, 64, generator=_gen()),)


# --------------------------------------------------------------------------- registry

_P = functools.partial
_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("resnet50", _P(_hf, "ResNetForImageClassification", "ResNetConfig", eager=False,
                                 layer_type="bottleneck", depths=[3, 4, 6, 3], embedding_size=64,
                                 hidden_sizes=[256, 512, 1024, 2048], num_labels=1000),
                  _P(_image, 224), "ResNet-50 (transformers ResNetConfig), 224x224 image"),
        ModelSpec("vit-b16", _P(_hf, "ViTForImageClassification", "ViTConfig", num_labels=1000),
                  _P(_image, 224), "ViT-B/16 (transformers ViTConfig defaults), 224x224 image"),
        ModelSpec("bert-base", _P(_hf, "BertModel", "BertConfig"),
                  _P(_tokens, 30522, 128), "BERT-base (transformers BertConfig defaults), 128 tokens"),
        ModelSpec("gpt2-large", _P(_hf, "GPT2LMHeadModel", "GPT2Config", n_embd=1280, n_layer=36,
                                   n_head=20, use_cache=False),
                  _P(_tokens, 50257, 128), "GPT-2 large, 774M params, tied lm_head, 128 tokens"),
        ModelSpec("gpt-neo-1.3b", _P(_hf, "GPTNeoForCausalLM", "GPTNeoConfig", hidden_size=2048,
                                     num_layers=24, num_heads=16,
                                     attention_types=[[["global", "local"], 12]],
                                     max_position_embeddings=2048, use_cache=False),
                  _P(_tokens, 50257, 128), "GPT-Neo 1.3B (transformers GPTNeoConfig), 128 tokens"),
        ModelSpec("tiny-resnet", _P(_hf, "ResNetForImageClassification", "ResNetConfig", eager=False,
                                    layer_type="bottleneck", depths=[1, 1], embedding_size=8,
                                    hidden_sizes=[32, 64], num_labels=10),
                  _P(_image, 32), "tiny ResNet with BatchNorm (test), 32x32 image"),
        ModelSpec("tiny-vit", _P(_hf, "ViTForImageClassification", "ViTConfig", image_size=32,
                                 patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=10),
                  _P(_image, 32), "tiny ViT (test), 32x32 image"),
        ModelSpec("tiny-bert", _P(_hf, "BertModel", "BertConfig", vocab_size=512, hidden_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=64),
                  _P(_tokens, 512, 16), "tiny BERT (test), 16 tokens"),
        ModelSpec("tiny-gpt2", _P(_hf, "GPT2LMHeadModel", "GPT2Config", vocab_size=512, n_embd=64,
                                  n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, use_cache=False),
                  _P(_tokens, 512, 16), "tiny GPT-2 with tied lm_head (test), 16 tokens"),
        ModelSpec("tiny-t5", _tiny_t5, _P(_tokens, 512, 16, 2),
                  "tiny T5 encoder-decoder, tied embeddings (test), 16+16 tokens"),
        ModelSpec("tiny-llama", _P(_hf, "LlamaForCausalLM", "LlamaConfig", vocab_size=512,
                                   hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, use_cache=False),
                  _P(_tokens, 512, 16), "tiny Llama with rotary inv_freq buffer (test), 16 tokens"),
        ModelSpec("twice", _twice, _twice_inputs,
                  "custom module calling one block twice, root-owned parameter (test)"),
    ]
}


def names() -> list[str]:
    """All model names, in registry order (big models first)."""
    return list(_SPECS)


def _normalize(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def get(name: str) -> ModelSpec:
    """Look up a model by name; the ``zoo:`` prefix used on command lines is accepted."""
    try:
        return _SPECS[_normalize(name)]
    except KeyError:
        raise UnknownModel(f"unknown zoo model {name!r}; valid names: {', '.join(_SPECS)}") from None


# --------------------------------------------------------------------------- meta build


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build with parameters and persistent buffers on meta, non-persistent buffers real (see meta.py)."""
    return build_empty(build)


# --------------------------------------------------------------------------- weight files


def save_weights(spec: ModelSpec, path: str | os.PathLike, seed: int = 0) -> int:
    """Build ``spec`` for real on CPU with ``seed`` and write its weights; return the file size.

    ``save_model`` drops tied duplicates (e.g. GPT-2's ``lm_head.weight``) and, in safetensors
    >= 0.6, writes straight from tensor memory, so peak RAM stays about one model's size. The
    file is written under a temporary name and renamed, so a crash never leaves a truncated
    file where :func:`ensure_weights` would trust it.
    """
    from safetensors.torch import save_model

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = spec.build()
    try:
        save_model(model, str(tmp))
        del model
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def weights_path(name: str, cache_dir: str | None = None) -> Path:
    """Where the seed-0 weights of zoo model ``name`` are cached."""
    root = cache_dir or os.environ.get("LAYERSTREAM_CACHE") or Path.home() / ".cache" / "layerstream"
    return Path(root).expanduser() / "zoo" / f"{_normalize(name)}-seed0.safetensors"


def ensure_weights(name: str, cache_dir: str | None = None) -> Path:
    """Return the cached weight file for ``name``, generating it on first use."""
    spec = get(name)
    path = weights_path(spec.name, cache_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(spec, path)
    return path
