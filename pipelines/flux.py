"""Flux: dual-stream blocks (joint [text, image] attention with RoPE) then single-stream blocks, whose
sites are attention, the MLP input projection and the output projection that merges the two."""

from __future__ import annotations

import math

import torch

from diffaccel.sites import Geometry

from .base import Adapter, tensor_arg

ROPE = ("image_rotary_emb", 3)  # (cos, sin) over [text, image]


class FluxAdapter(Adapter):
    family = "Flux"
    model_classes = ("FluxTransformer2DModel",)
    cfg_layout = "separate"  # true CFG runs cond then uncond; guidance-distilled runs one call
    blocks = (
        ("transformer_blocks", {"attn": ("self_attn", "joint", ROPE), "ff": ("ff", "image"), "ff_context": ("ff", "text")}),
        ("single_transformer_blocks", {"attn": ("self_attn", "joint", ROPE), "proj_mlp": ("ff", "joint"),
                                      "proj_out": ("ff", "joint")}),
    )

    def __init__(self, model):
        super().__init__(model)
        self._ids_key = None
        self._ids_grid = None

    def prepare_compiled(self, loop_locals):
        ids = loop_locals.get("latent_image_ids")
        if isinstance(ids, torch.Tensor) and not ids.is_meta:
            self.geometry((ids,), {"img_ids": ids})  # reads the grid from the ids, as an eager call does

    def geometry(self, args, kwargs):
        x = tensor_arg(args, kwargs, "hidden_states")
        text = tensor_arg(args, kwargs, "encoder_hidden_states", 1)
        ids = kwargs.get("img_ids")
        if ids is None:
            return None, x.shape[0]
        if ids.ndim == 3:
            ids = ids[0]
        if ids.is_meta:  # shapes only (FLOP counting): take the grid as square when the count allows it
            h = w = math.isqrt(ids.shape[0])
            if h * w != ids.shape[0]:
                return None, x.shape[0]
        elif torch.compiler.is_compiling():  # the grid read before the step (prepare_compiled)
            if self._ids_grid is None or self._ids_grid[0] * self._ids_grid[1] != ids.shape[0]:
                return None, x.shape[0]
            h, w = self._ids_grid
        else:
            # Packed latents carry their grid only in the position ids: read it once per distinct ids tensor.
            key = (ids.data_ptr(), tuple(ids.shape))
            if key != self._ids_key:
                rows, cols = (ids[:, 1:3].amax(dim=0) + 1).tolist()
                self._ids_key, self._ids_grid = key, (int(rows), int(cols))
            h, w = self._ids_grid
        # packed latents: one token is a 2 x 2 patch of the VAE's latent
        return Geometry(1, h, w, text.shape[1] if text is not None else 0, True,
                        pixels=2 * self.spatial_compression), x.shape[0]
