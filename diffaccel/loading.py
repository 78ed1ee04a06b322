"""Loading the pipeline a face runs: the trained reference models (`dit`, `unet`), the random-weight SD
default (`random-sd`), or a saved pipeline folder / hub id through `DiffusionPipeline.from_pretrained`
(safetensors only). `diffaccel bench fidelity` and `diffaccel generate` read `--model` through it."""

from __future__ import annotations

import torch

BUILT_IN = ("dit", "unet", "random-sd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(model: str, weights: str | None, device: str | torch.device, dtype: torch.dtype):
    """(pipeline, kind "unet"/"dit", whether it is a reference model)."""
    if model in ("dit", "unet"):
        from .reference import load_reference_pipeline

        pipe, reference = load_reference_pipeline(model, path=weights), True
    elif model == "random-sd":
        from .testing import default_pipeline

        pipe, reference = default_pipeline(), False
    else:
        from diffusers import DiffusionPipeline

        pipe, reference = DiffusionPipeline.from_pretrained(model, use_safetensors=True), False
        pipe.set_progress_bar_config(disable=True)
    if str(device) != "cpu" or dtype != torch.float32:
        pipe.to(device, dtype)
    kind = "unet" if getattr(pipe, "unet", None) is not None else "dit"
    return pipe, kind, reference
