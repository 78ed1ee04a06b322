"""Any model built from diffusers' BasicTransformerBlock (fallback), and the helper the U-Net,
PixArt and DiT adapters share to find such blocks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffaccel.sites import Site

from .base import Adapter, _number, tensor_arg


def basic_block_sites(adapter: Adapter, model: torch.nn.Module,
                      downsample: Callable[[str], int] | None = None) -> list[Site]:
    """attn1 / attn2 / ff of every BasicTransformerBlock, in module order."""
    from diffusers.models.attention import BasicTransformerBlock

    sites: list[Site] = []
    depth = 0
    for name, block in model.named_modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        ds = downsample(name) if downsample else 1
        self_kind = "cross_attn" if block.only_cross_attention else "self_attn"
        for child, kind in (("attn1", self_kind), ("attn2", "cross_attn"), ("ff", "ff")):
            module = getattr(block, child, None)
            if module is not None:
                sites.append(adapter.make_site(f"{name}.{child}", kind, module, name, depth, "image", ds))
        depth += 1
    return sites


class BasicBlockAdapter(Adapter):
    """Families built from BasicTransformerBlocks on one token grid."""

    cfg_layout = "batched"

    def find_sites(self) -> list[Site]:
        return _number(basic_block_sites(self, self.model))

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "hidden_states")
        if x is None:
            x = tensor_arg(args, kwargs, "sample")
        if not isinstance(x, torch.Tensor):
            return None, 0
        if x.ndim == 4:
            return self.patch_grid(x, None), x.shape[0]
        return None, x.shape[0]  # packed tokens: grid unknown, token methods stay idle


class GenericAdapter(BasicBlockAdapter):
    family = "generic BasicTransformerBlock model"

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        from diffusers.models.attention import BasicTransformerBlock

        return any(isinstance(m, BasicTransformerBlock) for m in model.modules())
