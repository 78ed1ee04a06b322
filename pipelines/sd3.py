"""Stable Diffusion 3 / 3.5: joint [image, text] attention, image-only feed-forward, and (3.5) a
second image-only self-attention."""

from __future__ import annotations

from .base import Adapter, tensor_arg


class SD3Adapter(Adapter):
    family = "SD3/3.5"
    model_classes = ("SD3Transformer2DModel",)
    blocks = (("transformer_blocks", {
        "attn": ("self_attn", "joint"),
        "attn2": ("self_attn", "image"),
        "ff": ("ff", "image"),
        "ff_context": ("ff", "text"),
    }),)

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "hidden_states")
        text = tensor_arg(args, kwargs, "encoder_hidden_states", 1)
        return self.patch_grid(x, None, text.shape[1] if text is not None else 0, False), x.shape[0]
