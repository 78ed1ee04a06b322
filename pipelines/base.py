"""What every family adapter provides: its sites, its token geometry per call, and its CFG layout."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from diffaccel.sites import Geometry, Site

# How a family's pipelines run classifier-free guidance:
#   "batched":   one call on [uncond, cond] rows (the conditional half is `cond_half`)
#   "separate":  one call per branch (cond first, then uncond), or a single call without guidance
#   "distilled": one call, guidance folded into the model
CFG_LAYOUTS = ("batched", "separate", "distilled")


def tensor_arg(args: tuple, kwargs: dict, name: str, position: int = 0) -> Any:
    """An argument of a forward call, whether passed by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class Adapter:
    """One model family. Subclasses set the class attributes and, where needed, override methods.

    blocks: (path of a ModuleList of blocks, {child name: (site kind, token layout[, rotary argument])})
    pairs, in execution order; the rotary argument is (keyword, position) of the (cos, sin) embeddings
    the child's forward takes.
    """

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    blocks: ClassVar[tuple[tuple[str, dict[str, tuple[str, str]]], ...]] = ()
    cfg_layout: ClassVar[str] = "batched"
    cond_half: ClassVar[str] = "second"  # which half of a batched-CFG call is conditional
    input_name: ClassVar[str] = "hidden_states"  # the latent argument of the denoiser's forward
    block_input: ClassVar[str] = "hidden_states"  # the hidden-state keyword of its blocks' forward
    # Whether the family's blocks (or those after them) change their input tensors in place: a stored
    # block output is then copied when stored and when served
    inplace_blocks: ClassVar[bool] = False
    temporal_compression: ClassVar[int] = 1  # video frames per latent frame of the family's VAE
    spatial_compression: ClassVar[int] = 8  # image pixels per latent pixel (per side) of the family's VAE

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.sites: list[Site] = []  # found by adapter_for

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        """Whether `model` is one of the family's classes or a subclass of one (a model that adds to a
        diffusers class keeps its blocks)."""
        return any(c.__name__ in cls.model_classes for c in type(model).__mro__)

    def variant(self) -> str:
        """The family as shown to users (e.g. SDXL rather than SD 1.x/2.x)."""
        return self.family

    def find_sites(self) -> list[Site]:
        sites: list[Site] = []
        depth = 0
        for path, children in self.blocks:
            blocks = self.model.get_submodule(path) if _has_submodule(self.model, path) else []
            for i, block in enumerate(blocks):
                for child, (kind, layout, *rope) in children.items():
                    module = getattr(block, child, None)
                    if isinstance(module, torch.nn.Module):
                        site = self.make_site(f"{path}.{i}.{child}", kind, module, f"{path}.{i}", depth, layout,
                                              rope=rope[0] if rope else None)
                        site.stream = path
                        sites.append(site)
                depth += 1
        return _number(sites)

    def make_site(self, name: str, kind: str, module: torch.nn.Module, block: str, depth: int, layout: str,
                  downsample: int = 1, rope: tuple[str, int] | None = None) -> Site:
        return Site(name=name, kind=kind, module=module, block=block, depth=depth, downsample=downsample,
                    layout=layout, note="text tokens only" if layout == "text" else "", rope=rope)

    def geometry(self, args: tuple, kwargs: dict) -> tuple[Geometry | None, int]:
        """(token geometry, batch size) of one denoiser call."""
        raise NotImplementedError  # pragma: no cover - abstract

    def patch_grid(self, x: torch.Tensor, frames_dim: int | None, text_tokens: int = 0,
                   text_first: bool = False) -> Geometry:
        """Geometry of a latent (B, C, H, W) or video latent, divided by the model's patch sizes."""
        cfg = self.model.config
        p = cfg.get("patch_size", 1) or 1
        if isinstance(p, (tuple, list)):
            pt, ph, pw = p
        else:
            pt, ph, pw = (cfg.get("patch_size_t", 1) or 1), p, p
        frames = x.shape[frames_dim] // pt if frames_dim is not None else 1
        span = self.temporal_compression * pt if frames_dim is not None else 1
        return Geometry(frames, x.shape[-2] // ph, x.shape[-1] // pw, text_tokens, text_first, span,
                        ph * self.spatial_compression)

    def prepare_compiled(self, loop_locals: dict) -> None:
        """Before a step of a compiled denoiser (outside it): read from the pipeline's loop (its local
        variables) what `geometry` cannot read from tensor values inside a compiled graph."""

    def host_step(self, args: tuple, kwargs: dict) -> int | None:
        """The denoising step of this call where the program running the denoiser says it in the call
        (ComfyUI: the call's sigma among the sampler's), else None: the clock counts the steps."""
        return None

    def host_branch(self, args: tuple, kwargs: dict, batch: int) -> tuple[str, bool, str] | None:
        """(CFG branch, whether the call is batched [uncond, cond] halves, which half is conditional) where
        the call itself says it (ComfyUI's cond_or_uncond), else None: decided once per run as usual."""
        return None

    def is_cfg_batched(self, pipe: Any, args: tuple, kwargs: dict, batch: int) -> bool:
        """Whether this call carries batched [uncond, cond] rows."""
        if self.cfg_layout != "batched" or pipe is None or batch % 2:
            return False
        try:
            return bool(pipe.do_classifier_free_guidance)
        except (AttributeError, TypeError):
            pass
        # Pipelines without that property (PixArt) batch CFG as cat([latents] * 2): equal halves.
        # The tracker asks once per pipeline call, so this comparison is no per-step sync.
        x = tensor_arg(args, kwargs, self.input_name)
        return isinstance(x, torch.Tensor) and torch.equal(x[: batch // 2], x[batch // 2:])


def _has_submodule(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def set_levels(sites: list[Site]) -> None:
    """Resolution levels from the sites' downsample factors: 0 is the finest grid that has sites."""
    finest = min((s.downsample for s in sites), default=1)
    for s in sites:
        s.level = int(math.log2(s.downsample // finest))


def _number(sites: list[Site]) -> list[Site]:
    """Index the sites in execution order and count blocks, over the model and within each stream."""
    blocks = 1 + max((s.depth for s in sites), default=0)
    streams: dict[str, list[str]] = {}
    for s in sites:
        order = streams.setdefault(s.stream, [])
        if s.block not in order:
            order.append(s.block)
    for i, s in enumerate(sites):
        s.index, s.blocks = i, blocks
        s.stream_depth, s.stream_blocks = streams[s.stream].index(s.block), len(streams[s.stream])
    return sites
