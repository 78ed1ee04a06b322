"""DiT (class-conditional): BasicTransformerBlocks (adaLN-zero) on one patch grid."""

from __future__ import annotations

from .base import tensor_arg
from .pixart import PixArtAdapter


class DiTAdapter(PixArtAdapter):  # same blocks and grid; its own CFG detection
    family = "DiT"
    model_classes = ("DiTTransformer2DModel",)
    cond_half = "first"  # DiTPipeline batches [cond, uncond]

    def is_cfg_batched(self, pipe, args, kwargs, batch) -> bool:
        # DiTPipeline keeps guidance in a local; its unconditional rows carry the null class label.
        labels = tensor_arg(args, kwargs, "class_labels", 2)
        if pipe is None or batch % 2 or labels is None:
            return False
        null = self.model.config.get("num_embeds_ada_norm", 1000)
        return bool((labels[batch // 2:] == null).all()) and not bool((labels[: batch // 2] == null).any())
