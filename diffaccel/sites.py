"""Sites (places where a method acts) and token geometry (how a site's tokens lie on a grid)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SITE_KINDS = ("self_attn", "cross_attn", "ff", "block")

# How the tokens a site sees are laid out:
#   "image": image/video tokens, row-major over (frames, height, width)
#   "joint": a sub-layer that mixes text and image tokens: either its input is one [text, image] (or
#            [image, text]) sequence (Flux single-stream blocks, CogVideoX feed-forward), or it takes
#            the image tokens as hidden states and the text as a second stream (SD3, Flux, CogVideoX,
#            HunyuanVideo joint attention); which one is read from the token count of each call
#   "text":  only text tokens (context feed-forward of dual-stream blocks)
#   "rope":  image/video tokens with rotary position embeddings passed to the processor
SITE_LAYOUTS = ("image", "joint", "text", "rope")


@dataclass(eq=False)
class Site:
    """One sub-layer (or block) of a denoiser that a method may act on."""

    name: str  # module path inside the denoiser, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    kind: str  # one of SITE_KINDS
    module: torch.nn.Module = field(repr=False)
    block: str  # module path of the enclosing block
    depth: int  # index of the enclosing block in execution order
    downsample: int = 1  # token grid = base grid / downsample (U-Net resolution levels)
    level: int = 0  # resolution level: 0 is the finest token grid that has sites
    layout: str = "image"
    index: int = 0  # position among all sites of the denoiser
    blocks: int = 1  # number of blocks of the denoiser that have sites (depths are 0 .. blocks - 1)
    # The block list the site's block belongs to (Flux: "transformer_blocks" or
    # "single_transformer_blocks"; "" where a family has one stack), the block's index in it and the
    # number of blocks with sites in it
    stream: str = ""
    stream_depth: int = 0
    stream_blocks: int = 1
    note: str = ""  # why a site cannot host token methods, when it cannot
    # The argument carrying rotary position embeddings (cos, sin) of the tokens, as (keyword, position
    # in the forward call): token methods gather them with the tokens they keep.
    rope: tuple[str, int] | None = None  # position -1: keyword only
    # The keyword through which the site's attention takes keys and values apart from its queries
    # (diffusers: encoder_hidden_states; ComfyUI: context), and whether it does so plainly (None: as
    # its diffusers processor decides, at each call)
    kv_arg: str = "encoder_hidden_states"
    plain_kv: bool | None = None

    def grid(self, geometry: Geometry | None) -> tuple[int, int, int] | None:
        """(frames, height, width) of this site's image tokens for the current call, or None."""
        if geometry is None:
            return None
        h, w = geometry.height, geometry.width
        d = self.downsample
        while d > 1:  # stride-2 convolutions with padding 1: ceil(n / 2)
            h, w, d = (h + 1) // 2, (w + 1) // 2, d // 2
        return geometry.frames, h, w


@dataclass(frozen=True)
class Geometry:
    """Token geometry of one denoiser call, read from its inputs by the family adapter."""

    frames: int
    height: int  # token rows at downsample 1 (after patchify)
    width: int
    text_tokens: int = 0  # text tokens in joint sequences
    text_first: bool = False  # joint order: [text, image] when True, [image, text] otherwise
    frame_span: int = 1  # video frames one token row spans in time (VAE temporal compression x patch)
    pixels: int = 8  # image pixels one token spans per side at downsample 1 (VAE scale x patch)

    @property
    def pixel_area(self) -> int:
        """Pixels of one frame of the image the denoiser is generating."""
        return self.height * self.width * self.pixels ** 2

    @property
    def image_tokens(self) -> int:
        return self.frames * self.height * self.width
