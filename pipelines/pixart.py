"""PixArt-alpha / sigma: BasicTransformerBlocks (adaLN-single) on one patch grid."""

from __future__ import annotations

from .base import tensor_arg
from .generic import BasicBlockAdapter


class PixArtAdapter(BasicBlockAdapter):
    family = "PixArt-alpha/sigma"
    model_classes = ("PixArtTransformer2DModel",)

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "hidden_states")
        return self.patch_grid(x, None), x.shape[0]
