"""How an accelerated ComfyUI model runs: the node package's part of ComfyUI's sampling.

A node returns a clone of the MODEL it was given (ComfyUI's `ModelPatcher.clone()`: the clone shares
the weights and the diffusion model, and owns its `model_options`) carrying the acceleration as data,
an `Acceleration` under `model_options["transformer_options"]["diffaccel"]`, and one OUTER_SAMPLE
wrapper under the key "diffaccel". Nothing is changed on the shared diffusion model until that clone
samples: the wrapper then installs the core's hooks (`accelerate_pipeline` on the bare diffusion
model, with the sampler's sigmas as the run's steps) and removes them when sampling ends, however it
ends, so the input model, and every other clone of it, samples exactly as before.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from ..api import (
    _plan,
    _warn_idle,
    accelerate_pipeline,
    installation,
    remove_acceleration,
    reset,
    resolve_methods,
)
from ..describe import describe
from ..methods.base import MethodConfig
from ..pipelines import adapter_for

KEY = "diffaccel"
log = logging.getLogger("diffaccel.comfy")


class Acceleration:
    """The methods a MODEL's clone runs with, and what its last sampling did (`report`). ComfyUI deep-copies
    model options when it clones a model: the copy is this object, so a report written during a
    sampling reaches every clone that carries the acceleration (configs are immutable)."""

    def __init__(self, configs: list[MethodConfig]):
        self.configs = tuple(configs)
        self.description: dict | None = None  # the last sampling's describe()

    @property
    def report(self) -> str | None:
        """The last sampling's summary line and describe() table (None before a sampling)."""
        if self.description is None:
            return None
        return summary(self.description) + "\n" + str(self.description)

    def __deepcopy__(self, memo: dict) -> Acceleration:
        return self

    def __repr__(self) -> str:
        return f"Acceleration({[c.name for c in self.configs]})"


def diffusion_model(model: Any) -> torch.nn.Module:
    """The denoiser of a ComfyUI MODEL (a ModelPatcher)."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(inner, torch.nn.Module):
        raise TypeError(f"expected a ComfyUI MODEL (a ModelPatcher with a diffusion model), got {type(model).__name__}")
    return inner


def acceleration_of(model: Any) -> Acceleration | None:
    opts = getattr(model, "model_options", {}).get("transformer_options", {})
    found = opts.get(KEY)
    return found if isinstance(found, Acceleration) else None


def check(model: Any, configs: list[MethodConfig]) -> list[MethodConfig]:
    """The configs validated together against the model, before anything is changed: a family the core
    cannot reach, two methods that cannot share a site, and a method that would act on no site of this
    model are errors (ComfyUI shows them on the node)."""
    configs = resolve_methods(list(configs), {})
    denoiser = diffusion_model(model)
    if installation(denoiser) is not None:
        raise RuntimeError("this model's diffusion model is being sampled with an acceleration already; "
                           "try again when that sampling has ended")
    state = _plan(denoiser, "model", configs)  # raises for an unsupported family and for conflicts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_idle(configs, [state])
    idle = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if idle:
        limits = getattr(state.adapter, "limits", "")
        raise ValueError("; ".join(idle) + (f". {limits}" if limits else ""))
    return configs


def accelerate(model: Any, configs: list[MethodConfig]) -> Any:
    """A clone of a ComfyUI MODEL that samples with `configs` added to the acceleration it already carries
    (nodes chain: a merging node then a caching node compose, as a list of methods does in the core)."""
    from comfy.patcher_extension import WrappersMP

    held = acceleration_of(model)
    configs = check(model, list(held.configs if held else ()) + list(configs))
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})[KEY] = Acceleration(configs)
    if held is None:
        clone.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, sample_wrapper)
    return clone


def sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """ComfyUI's OUTER_SAMPLE wrapper: hooks on for this sampling, off afterwards (bit-exact removal).
    args: (noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)."""
    guider = executor.class_obj
    held = guider.model_options.get("transformer_options", {}).get(KEY)
    if not isinstance(held, Acceleration):
        return executor(*args, **kwargs)
    denoiser = guider.model_patcher.model.diffusion_model
    sigmas = args[3]
    steps = max(1, len(sigmas) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the node checked where each method acts
        accelerate_pipeline(denoiser, list(held.configs), num_steps=steps)
    try:
        for st in installation(denoiser).denoisers:
            st.adapter.sample_sigmas = sigmas.detach().to("cpu", torch.float64)
        reset(denoiser, steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = executor(*args, **kwargs)
        for w in caught:
            log.warning("diffaccel: %s", w.message)
        held.description = describe(denoiser)
        log.info("diffaccel: %s", summary(held.description))
        return out
    finally:
        remove_acceleration(denoiser)


def summary(desc: dict) -> str:
    """One line: the methods, and how many sub-layer calls of the last run were computed in full, in
    part, or served from a cache."""
    full = part = reused = 0
    for den in desc["denoisers"]:
        for row in den["sites"]:
            for call in row["last_run"].values():
                if call["computed"] == 0:
                    reused += 1
                elif call["computed"] < call["tokens"] or call["keys_values"] < call["tokens"]:
                    part += 1
                else:
                    full += 1
    names = ", ".join(m["method"] for m in desc["methods"]) or "nothing"
    total = full + part + reused
    return (f"{names}: of {total} sub-layer calls in the last sampling, {full} ran in full, {part} on fewer "
            f"tokens, {reused} were served from the cache")


def plan_report(model: Any) -> str:
    """What an accelerated MODEL will do (before it has sampled): the plan, as the core describes it."""
    held = acceleration_of(model)
    denoiser = diffusion_model(model)
    if held is None:
        adapter_for(denoiser)
        return "diffaccel: this model carries no acceleration\n" + str(describe(denoiser))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accelerate_pipeline(denoiser, list(held.configs))
    try:
        return "diffaccel: not sampled yet; the plan:\n" + str(describe(denoiser))
    finally:
        remove_acceleration(denoiser)
