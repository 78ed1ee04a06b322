"""HunyuanVideo: dual-stream blocks (joint [video, text] attention with RoPE), then single-stream."""

from __future__ import annotations

from .base import Adapter, tensor_arg

ROPE = ("image_rotary_emb", -1)  # (cos, sin) over the video tokens


class HunyuanVideoAdapter(Adapter):
    family = "HunyuanVideo"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    temporal_compression = 4
    cfg_layout = "separate"  # guidance-distilled: one call per step; true CFG: cond then uncond
    blocks = (
        ("transformer_blocks", {"attn": ("self_attn", "joint", ROPE), "ff": ("ff", "image"), "ff_context": ("ff", "text")}),
        ("single_transformer_blocks", {"attn": ("self_attn", "joint", ROPE), "proj_mlp": ("ff", "joint"),
                                      "proj_out": ("ff", "joint")}),
    )

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "hidden_states")  # (B, C, F, H, W)
        text = tensor_arg(args, kwargs, "encoder_hidden_states", 2)
        return self.patch_grid(x, 2, text.shape[1] if text is not None else 0, False), x.shape[0]
