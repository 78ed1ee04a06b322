"""ComfyUI's Flux (`comfy.ldm.flux.model.Flux`, and the models ComfyUI builds on it): dual-stream blocks
then single-stream blocks. Their attention is a function the blocks call, not a module, so the sites
are the modules around it: the image and text MLPs of the dual-stream blocks, and the input
projection (queries, keys, values and MLP input) and output projection of the single-stream blocks.
Caching methods act there, and DuCa's aggressive steps skip whole blocks, attention included; the
token methods, which act on attention, find no site here."""

from __future__ import annotations

from diffaccel.sites import Geometry

from .base import tensor_arg
from .comfy_base import ComfyAdapter


class ComfyFluxAdapter(ComfyAdapter):
    family = "ComfyUI Flux"
    comfy_classes = ("Flux",)
    comfy_module = "comfy.ldm.flux"
    cfg_layout = "separate"
    block_input = "img"
    # single-stream blocks add into their input in place: a stored block output is copied
    inplace_blocks = True
    limits = ("ComfyUI's Flux computes attention in a function its blocks call, not in a module, so the token "
              "methods (tome, todo, sito) have no attention site here; the caching methods (fora, toca, duca) act on "
              "its MLPs and projections")
    blocks = (
        ("double_blocks", {"img_mlp": ("ff", "image"), "txt_mlp": ("ff", "text")}),
        ("single_blocks", {"linear1": ("ff", "joint"), "linear2": ("ff", "joint")}),
    )

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "x")
        context = tensor_arg(args, kwargs, "context", 2)
        p = getattr(self.model, "patch_size", 2) or 2
        h, w = (x.shape[-2] + p // 2) // p, (x.shape[-1] + p // 2) // p
        text = context.shape[1] if context is not None and context.ndim == 3 else 0
        return Geometry(1, h, w, text, True, pixels=p * self.spatial_compression), x.shape[0]
