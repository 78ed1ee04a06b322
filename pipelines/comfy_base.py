"""What the ComfyUI adapters share: ComfyUI runs its own model classes (not diffusers'), and every call
of the denoiser says in `transformer_options` which sigma it denoises (`sigmas`) and which CFG branch
each batch chunk is (`cond_or_uncond`: 0 conditional, 1 unconditional, in the order batched). The
sampler's sigmas are handed over by the node package's sampling wrapper (`sample_sigmas`), so a step
is the call's sigma among them, whatever the sampler (Heun's second evaluation falls on the next
sigma, and is counted with the step it lands on)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Adapter


def is_comfy_model(model: torch.nn.Module, names: tuple[str, ...], module_prefix: str) -> bool:
    """Whether `model` is (a subclass of) one of ComfyUI's classes `names` defined under `module_prefix`."""
    return any(c.__name__ in names and c.__module__.startswith(module_prefix) for c in type(model).__mro__)


class ComfyAdapter(Adapter):
    cfg_layout = "batched"
    input_name = "x"
    comfy_classes: ClassVar[tuple[str, ...]] = ()
    comfy_module: ClassVar[str] = "comfy.ldm."
    limits: ClassVar[str] = ""  # what the family's patch points do not reach, for the nodes' errors

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.sample_sigmas: torch.Tensor | None = None  # set by the sampling wrapper, for each sampling

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return is_comfy_model(model, cls.comfy_classes, cls.comfy_module)

    @staticmethod
    def options(kwargs: dict) -> dict:
        opts = kwargs.get("transformer_options")
        return opts if isinstance(opts, dict) else {}

    def host_step(self, args: tuple, kwargs: dict) -> int | None:
        sigmas = self.sample_sigmas
        sigma = self.options(kwargs).get("sigmas")
        if sigmas is None or not isinstance(sigma, torch.Tensor) or sigma.numel() == 0 or len(sigmas) < 2:
            return None
        # one host read per denoiser call (not per layer): the nearest of the run's sigmas
        levels = sigmas[:-1].to(torch.float64)
        return int((levels - float(sigma.reshape(-1)[0])).abs().argmin())

    def host_branch(self, args: tuple, kwargs: dict, batch: int) -> tuple[str, bool, str] | None:
        chunks = self.options(kwargs).get("cond_or_uncond")
        if not isinstance(chunks, (list, tuple)) or not chunks:
            return None
        chunks = [int(c) for c in chunks]
        # ComfyUI may run several calls with one label in a step (conds it cannot batch together, or
        # split for memory): each cond's uuid keeps their caches apart
        uuids = self.options(kwargs).get("uuids")
        tag = (" " + ",".join(map(str, uuids))) if isinstance(uuids, (list, tuple)) and uuids else ""
        if sorted(chunks) == [0, 1] and batch % 2 == 0:
            return "cond_uncond" + tag, True, "first" if chunks[0] == 0 else "second"
        if set(chunks) == {0}:
            return "cond" + tag, False, "second"
        if set(chunks) == {1}:
            return "uncond" + tag, False, "second"
        return "chunks " + ",".join(map(str, chunks)) + tag, False, "second"  # (several conds: their own branch)

    def is_cfg_batched(self, pipe: Any, args: tuple, kwargs: dict, batch: int) -> bool:
        return False  # (a call without cond_or_uncond: ComfyUI did not say, so every row selects its own)
