"""SD 1.x / 2.x and SDXL U-Nets: BasicTransformerBlocks at several resolution levels."""

from __future__ import annotations

from typing import ClassVar

from diffaccel.sites import Geometry, Site

from .base import Adapter, _number, set_levels, tensor_arg
from .generic import basic_block_sites


class UNetAdapter(Adapter):
    family = "SD 1.x/2.x"
    model_classes = ("UNet2DConditionModel",)
    cfg_layout = "batched"
    input_name = "sample"
    exclude: ClassVar[str | None] = None  # a module-path part whose transformer blocks are no sites

    def variant(self) -> str:
        cfg = self.model.config
        if cfg.get("addition_embed_type") == "text_time":
            return "SDXL"
        return "SD 2.x" if cfg.get("cross_attention_dim") == 1024 else "SD 1.x"

    def _downsample(self, name: str) -> int:
        """Token grid divisor of a top-level block, from the U-Net's own down/up samplers."""
        down = [getattr(b, "downsamplers", None) is not None for b in self.model.down_blocks]
        up = [getattr(b, "upsamplers", None) is not None for b in self.model.up_blocks]
        top, _, rest = name.partition(".")
        if top == "mid_block":
            return 2 ** sum(down)
        i = int(rest.split(".", 1)[0])
        if top == "down_blocks":
            return 2 ** sum(down[:i])
        return 2 ** (sum(down) - sum(up[:i]))

    def find_sites(self) -> list[Site]:
        # Execution order is down, mid, up; module registration order puts mid last.
        section = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
        sites = [s for s in basic_block_sites(self, self.model, downsample=self._downsample)
                 if self.exclude is None or self.exclude not in s.name.split(".")]
        sites.sort(key=lambda s: section.get(s.name.split(".", 1)[0], 3))  # stable: keeps order inside
        blocks = list(dict.fromkeys(s.block for s in sites))
        for s in sites:
            s.depth = blocks.index(s.block)
        set_levels(sites)
        return _number(sites)

    def geometry(self, args, kwargs):
        sample = tensor_arg(args, kwargs, "sample")
        return Geometry(1, sample.shape[-2], sample.shape[-1]), sample.shape[0]
