"""Wan 2.1 / 2.2: self-attention with RoPE, cross-attention to text, feed-forward. Wan 2.2 pipelines
carry a second transformer (`transformer_2`) for the low-noise steps."""

from __future__ import annotations

from .base import Adapter, tensor_arg


class WanAdapter(Adapter):
    family = "Wan 2.1/2.2"
    model_classes = ("WanTransformer3DModel",)
    temporal_compression = 4
    cfg_layout = "separate"
    blocks = (("blocks", {"attn1": ("self_attn", "rope", ("rotary_emb", 3)), "attn2": ("cross_attn", "image"), "ffn": ("ff", "image")}),)

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "hidden_states")  # (B, C, F, H, W)
        return self.patch_grid(x, 2), x.shape[0]
