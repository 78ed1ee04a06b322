"""ComfyUI's U-Net (SD 1.x/2.x, SDXL as ComfyUI loads them: `comfy.ldm...openaimodel.UNetModel`):
ComfyUI's own BasicTransformerBlocks (attn1, attn2, ff) inside SpatialTransformers at several
resolution levels. Their attention takes keys and values as `context` (and `value`)."""

from __future__ import annotations

from diffaccel.sites import Geometry, Site

from .base import _number, set_levels, tensor_arg
from .comfy_base import ComfyAdapter

LEVELS = ("input_blocks", "middle_block", "output_blocks")  # execution order


class ComfyUNetAdapter(ComfyAdapter):
    family = "ComfyUI U-Net (SD 1.x/2.x, SDXL)"
    comfy_classes = ("UNetModel",)
    comfy_module = "comfy.ldm.modules.diffusionmodules.openaimodel"

    def variant(self) -> str:
        label = getattr(self.model, "label_emb", None)
        adm = getattr(label[0][0], "in_features", None) if label is not None else None
        return "SDXL (ComfyUI)" if adm == 2816 else "SD 1.x/2.x (ComfyUI)"

    def _downsamples(self) -> dict[str, int]:
        """Token grid divisor of each top-level block, from the U-Net's own down/up samplers."""
        out, d = {}, 1
        for i, block in enumerate(self.model.input_blocks):
            out[f"input_blocks.{i}"] = d
            if any(type(m).__name__ == "Downsample" for m in block.modules()):
                d *= 2
        out["middle_block"] = d
        for i, block in enumerate(self.model.output_blocks):
            out[f"output_blocks.{i}"] = d
            if any(type(m).__name__ == "Upsample" for m in block.modules()):
                d //= 2
        return out

    def find_sites(self) -> list[Site]:
        downsample = self._downsamples()
        found = []
        for name, block in self.model.named_modules():
            if type(block).__name__ != "BasicTransformerBlock" or not hasattr(block, "attn1"):
                continue
            top = name.split(".", 1)[0]
            if top not in LEVELS:
                continue
            key = top if top == "middle_block" else ".".join(name.split(".")[:2])
            found.append((LEVELS.index(top), name, block, downsample.get(key, 1)))
        found.sort(key=lambda f: f[0])  # stable: module order inside each part
        sites: list[Site] = []
        for depth, (_, name, block, ds) in enumerate(found):
            self_kind = "cross_attn" if getattr(block, "disable_self_attn", False) else "self_attn"
            for child, kind in (("attn1", self_kind), ("attn2", "cross_attn"), ("ff", "ff")):
                module = getattr(block, child, None)
                if module is not None:
                    site = self.make_site(f"{name}.{child}", kind, module, name, depth, "image", ds)
                    site.kv_arg, site.plain_kv = "context", child != "ff"
                    sites.append(site)
        set_levels(sites)
        return _number(sites)

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "x")
        return Geometry(1, x.shape[-2], x.shape[-1]), x.shape[0]
