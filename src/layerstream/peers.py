"""The peers `bench --baselines` measures layerstream against: accelerate's and diffusers' disk offloading.

Both need an offload folder written from a model whose weights are loaded (`prepare`). A user does that
once, so the bench does it in a process of its own and reports its time apart; the timed process then
builds the model on meta and attaches the peer's hooks to the existing folder (`attach`), which is how
a user who prepared the folder starts. Neither library is a dependency: `missing` says how to get them.

- accelerate-disk: `disk_offload(model, folder, execution_device)`. The folder holds one memmapped
  `.dat` file per tensor; every call reads each weight from it (through the page cache) into memory
  and drops it after the module runs. Buffers are offloaded too (`offload_buffers=True`), since the
  model's persistent buffers (BatchNorm statistics) are on meta like its parameters.
- diffusers-group-disk: `apply_group_offloading(..., offload_type="block_level", offload_to_disk_path=)`.
  Block level groups the children of a `ModuleList`/`Sequential` one block per group; diffusers only
  looks at the top module's children unless told the path (`block_modules`), so we give it the path to
  the largest such list (the transformer layers, the ResNet stages). Each group is one safetensors
  file, loaded whole before the group runs and dropped after it.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

PEERS = ("accelerate-disk", "diffusers-group-disk")
_LIBRARY = {"accelerate-disk": "accelerate", "diffusers-group-disk": "diffusers"}


class PeerError(RuntimeError):
    """A peer that cannot run this model here; the bench records the reason and goes on."""


def missing(system: str) -> str | None:
    """Why `system` cannot run in this environment (its library is not installed), or None."""
    lib = _LIBRARY[system]
    if importlib.util.find_spec(lib) is None:
        return f"{lib} is not installed; install the bench extras: pip install -e '.[bench]'"
    return None


def import_library(system: str) -> None:
    """Import the peer's library now, so a cold start's timed part does not pay for it (imports are timed apart).

    Both wrap their hooks in `torch.compiler.disable`, whose first use imports torch._dynamo (seconds on
    this machine): an import like the others, so it happens here too.
    """
    import torch._dynamo  # noqa: F401
    if system == "accelerate-disk":
        import accelerate  # noqa: F401
    else:
        import diffusers.hooks  # noqa: F401


def block_path(model: nn.Module) -> list[str]:
    """Names of the modules leading to the largest ModuleList/Sequential: diffusers' `block_modules`."""
    lists = [(sum(p.numel() for p in m.parameters()), name) for name, m in model.named_modules()
             if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1]
    if not lists:
        raise PeerError(f"{type(model).__name__} has no ModuleList or Sequential of blocks: diffusers' block-level "
                        "offloading would put the whole model in one group, which is no offloading at all")
    _, name = max(lists)
    return name.split(".")[:-1]


def tied_parameters(model: nn.Module) -> list[str]:
    """Names of parameters that are another parameter too (tied weights), each after the first."""
    seen, tied = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.append(name)
        seen.add(id(p))
    return tied


def _diffusers_offload(model: nn.Module, folder: str, device: torch.device) -> None:
    from diffusers.hooks import apply_group_offloading
    apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                           num_blocks_per_group=1, offload_to_disk_path=folder, block_modules=block_path(model))


def prepare(system: str, model: nn.Module, folder: str) -> None:
    """Write the peer's offload folder from `model`, whose weights are loaded."""
    if system == "accelerate-disk":
        from accelerate.utils import offload_state_dict
        offload_state_dict(folder, model.state_dict())
    else:
        _diffusers_offload(model, folder, torch.device("cpu"))  # writes one file per group, now
    if not os.listdir(folder):
        raise PeerError(f"{system} wrote nothing to {folder}")


def attach(system: str, model: nn.Module, folder: str, device: torch.device) -> nn.Module:
    """`model` (built on meta) made callable by the peer, its weights read from the prepared `folder`."""
    if system == "accelerate-disk":
        from accelerate import disk_offload
        return disk_offload(model, folder, execution_device=device, offload_buffers=True)
    _materialise_meta(model)
    _diffusers_offload(model, folder, device)  # the group files exist, so it reads and writes none
    return model


def _materialise_meta(model: nn.Module) -> None:
    """Give every meta tensor uninitialised CPU storage (never touched, so no RSS), ties kept.

    diffusers moves each group's tensors by assigning `.data`, which cannot change a meta tensor into a
    CPU one; with real (empty) tensors it attaches, then replaces them from the group files.
    """
    done: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for k, t in table.items():
                if t is not None and t.is_meta:
                    if id(t) not in done:
                        real = torch.empty_like(t, device="cpu")
                        done[id(t)] = nn.Parameter(real, requires_grad=False) if isinstance(t, nn.Parameter) else real
                    table[k] = done[id(t)]
