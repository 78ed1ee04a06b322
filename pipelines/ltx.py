"""LTX-Video: packed (B, F*H*W, C) tokens with RoPE self-attention, cross-attention, feed-forward."""

from __future__ import annotations

from diffaccel.sites import Geometry

from .base import Adapter, tensor_arg


class LTXVideoAdapter(Adapter):
    family = "LTX-Video"
    model_classes = ("LTXVideoTransformer3DModel",)
    temporal_compression = 8
    spatial_compression = 32
    blocks = (("transformer_blocks", {"attn1": ("self_attn", "rope", ("image_rotary_emb", 3)), "attn2": ("cross_attn", "image"),
                                      "ff": ("ff", "image")}),)

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "hidden_states")
        f, h, w = (kwargs.get(k) for k in ("num_frames", "height", "width"))
        if not all(isinstance(v, int) for v in (f, h, w)):
            return None, x.shape[0]
        cfg = self.model.config
        p, pt = cfg.get("patch_size", 1) or 1, cfg.get("patch_size_t", 1) or 1
        return Geometry(f // pt, h // p, w // p, frame_span=self.temporal_compression * pt,
                        pixels=p * self.spatial_compression), x.shape[0]
