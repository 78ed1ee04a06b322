"""ComfyUI's Wan 2.1/2.2 (`comfy.ldm.wan.model.WanModel` and the models ComfyUI builds on it): a stack
of blocks with self-attention (rotary embeddings applied inside the module), cross-attention to the
text, and a feed-forward, on a (frames, height, width) grid of video tokens. The caching methods act
on all three; the token methods do not reach the self-attention, whose rotary embeddings are
ComfyUI's own tensor format, and the site says so."""

from __future__ import annotations

import math

from diffaccel.sites import Geometry, Site

from .base import tensor_arg
from .comfy_base import ComfyAdapter

ROTARY = ("ComfyUI's Wan applies its rotary embeddings inside this attention module, in its own format: "
          "token methods do not reach it")


class ComfyWanAdapter(ComfyAdapter):
    family = "ComfyUI Wan"
    comfy_classes = ("WanModel",)
    comfy_module = "comfy.ldm.wan"
    cfg_layout = "batched"
    # ComfyUI's VACE model adds into block outputs in place: a stored block output is copied
    inplace_blocks = True
    temporal_compression = 4
    blocks = (("blocks", {"self_attn": ("self_attn", "image"), "cross_attn": ("cross_attn", "image"),
                          "ffn": ("ff", "image")}),)
    limits = "The caching methods (fora, toca, duca) act on every sub-layer of ComfyUI's Wan"

    def make_site(self, name: str, kind: str, module, block: str, depth: int, layout: str, downsample: int = 1,
                  rope=None) -> Site:
        site = super().make_site(name, kind, module, block, depth, layout, downsample, rope)
        if kind == "self_attn":
            site.note = ROTARY
        return site

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "x")
        pt, ph, pw = getattr(self.model, "patch_size", (1, 2, 2))
        frames = math.ceil(x.shape[2] / pt)
        return Geometry(frames, math.ceil(x.shape[-2] / ph), math.ceil(x.shape[-1] / pw), 0, False,
                        self.temporal_compression * pt, ph * self.spatial_compression), x.shape[0]
