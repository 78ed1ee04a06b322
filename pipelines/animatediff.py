"""AnimateDiff: an SD U-Net (UNetMotionModel) whose spatial transformer blocks see each video frame as
a batch row, with motion modules (temporal transformers over the frames of each token) between them.

The sites are the spatial blocks' sub-layers, on each frame's token grid; the motion modules are left
alone (their tokens are frames, not an image grid), so the methods act per frame. Batched CFG
carries [unconditional frames, conditional frames] rows, which keeps the halves' shared selection."""

from __future__ import annotations

from diffaccel.sites import Geometry

from .base import tensor_arg
from .unet import UNetAdapter


class AnimateDiffAdapter(UNetAdapter):
    family = "AnimateDiff"
    model_classes = ("UNetMotionModel",)
    exclude = "motion_modules"

    def variant(self) -> str:
        return f"AnimateDiff ({super().variant()})"

    def geometry(self, args, kwargs):
        sample = tensor_arg(args, kwargs, "sample")  # (B, C, F, H, W); frames run as batch rows inside
        return Geometry(1, sample.shape[-2], sample.shape[-1]), sample.shape[0]
