"""One adapter per model family. `adapter_for(model)` picks the family of a denoiser."""

from __future__ import annotations

import torch

from .animatediff import AnimateDiffAdapter
from .base import CFG_LAYOUTS, Adapter
from .cogvideox import CogVideoXAdapter
from .comfy_flux import ComfyFluxAdapter
from .comfy_unet import ComfyUNetAdapter
from .comfy_wan import ComfyWanAdapter
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
    UNetAdapter, AnimateDiffAdapter, PixArtAdapter, DiTAdapter, SD3Adapter, FluxAdapter, CogVideoXAdapter, WanAdapter,
    HunyuanVideoAdapter, LTXVideoAdapter, ComfyUNetAdapter, ComfyFluxAdapter, ComfyWanAdapter,
    GenericAdapter,
)

# Pipeline attributes that hold denoisers, in the order pipelines call them.
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")

__all__ = ["ADAPTERS", "CFG_LAYOUTS", "DENOISER_ATTRS", "REFUSED", "Adapter", "UnsupportedModelError", "adapter_for",
           "supported_families", "unwrap"]


class UnsupportedModelError(TypeError):
    """The model belongs to no family diffaccel knows."""


def supported_families() -> list[str]:
    names = []
    for a in ADAPTERS:
        names.extend(["SD 1.x/2.x", "SDXL"] if a is UNetAdapter else [a.family])
    return names


# Denoisers that hold BasicTransformerBlocks (so the generic adapter would take them) whose tokens are
# not one image grid per call: accepting them would leave the token methods acting nowhere, silently.
REFUSED = {
    "UNet3DConditionModel": "a text-to-video U-Net that runs frames as a batch with temporal transformers",
    "UNetSpatioTemporalConditionModel": "Stable Video Diffusion's U-Net runs frames as a batch with temporal "
                                        "transformers",
    "I2VGenXLUNet": "a video U-Net that runs frames as a batch with temporal transformers",
}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module a `torch.compile` wrapper (OptimizedModule) compiles, or the module itself."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The family adapter of a denoiser (seen through a torch.compile wrapper). Raises
    UnsupportedModelError for a model of no supported family, or one whose family would leave every
    method acting nowhere."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(
            f"expected a diffusers pipeline or denoiser module, got {type(model).__name__}; "
            f"supported families: {', '.join(supported_families())}")
    model = unwrap(model)
    name = type(model).__name__
    why = next((r for c in type(model).__mro__ if (r := REFUSED.get(c.__name__))), None)
    if why is None:
        adapter = next((cls(model) for cls in ADAPTERS if cls.matches(model)), None)
        if adapter is not None:
            adapter.sites = adapter.find_sites()
            if adapter.sites:
                return adapter
        why = "it has no transformer blocks a family adapter knows (Kandinsky 2.x's U-Net, for one, attends " \
              "with added text keys and values instead)" if adapter is not None else "it is not a supported denoiser"
    raise UnsupportedModelError(f"{name}: {why}; supported families: {', '.join(supported_families())}")
