"""CogVideoX: joint [text, video] attention and feed-forward over the concatenated sequence."""

from __future__ import annotations

from .base import Adapter, tensor_arg


class CogVideoXAdapter(Adapter):
    family = "CogVideoX"
    model_classes = ("CogVideoXTransformer3DModel",)
    temporal_compression = 4
    blocks = (("transformer_blocks", {"attn1": ("self_attn", "joint", ("image_rotary_emb", -1)), "ff": ("ff", "joint")}),)

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "hidden_states")  # (B, F, C, H, W)
        text = tensor_arg(args, kwargs, "encoder_hidden_states", 1)
        return self.patch_grid(x, 1, text.shape[1] if text is not None else 0, True), x.shape[0]
