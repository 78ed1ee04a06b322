"""One adapter per model family. `adapter_for(model)` picks the family of a denoiser."""

from __future__ import annotations

import torch

from .base import CFG_LAYOUTS, Adapter
from .cogvideox import CogVideoXAdapter
from .dit import DiTAdapter
from .flux import FluxAdapter
from .generic import GenericAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .ltx import LTXVideoAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .wan import WanAdapter

# Order matters: the generic fallback comes last.
ADAPTERS: tuple[type[Adapter], ...] = (
    UNetAdapter, PixArtAdapter, DiTAdapter, SD3Adapter, FluxAdapter, CogVideoXAdapter, WanAdapter,
    HunyuanVideoAdapter, LTXVideoAdapter, GenericAdapter,
)

# Pipeline attributes that hold denoisers, in the order pipelines call them.
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")

__all__ = ["ADAPTERS", "CFG_LAYOUTS", "DENOISER_ATTRS", "Adapter", "UnsupportedModelError", "adapter_for",
           "supported_families"]


class UnsupportedModelError(TypeError):
    """The model belongs to no family diffaccel knows."""


def supported_families() -> list[str]:
    names = []
    for a in ADAPTERS:
        names.extend(["SD 1.x/2.x", "SDXL"] if a is UNetAdapter else [a.family])
    return names


def adapter_for(model: torch.nn.Module) -> Adapter:
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(
            f"expected a diffusers pipeline or denoiser module, got {type(model).__name__}; "
            f"supported families: {', '.join(supported_families())}")
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported denoiser; supported families: {', '.join(supported_families())}")
