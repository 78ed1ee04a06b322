"""The reference models: small text-to-image pipelines trained here on procedural captioned shapes.

`load_reference_pipeline("unet")` is an SD-style `StableDiffusionPipeline` (its U-Net a diffusers
`UNet2DConditionModel` whose transformer blocks add 2-D positions to their cross-attention queries),
`load_reference_pipeline("dit")` a PixArt-alpha-style `PixArtAlphaPipeline`; both share one VAE
(scale 8, 256x256 images, 32x32 latents) and one frozen text encoder with a word-level tokenizer.
Weights ship with the package as safetensors in `save_pretrained` folders and load offline with
`from_pretrained`; `python -m diffaccel.reference.train` reproduces them.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
KINDS = ("unet", "dit")


def load_reference_pipeline(kind: str = "unet", path: str | Path | None = None, progress_bar: bool = False):
    """The trained reference pipeline of `kind` ("unet" or "dit"), in eval mode on the CPU.

    `path` is a folder written by the training script (default: the weights shipped with the package).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown reference pipeline kind {kind!r}; available: {list(KINDS)}")
    root = Path(path) if path is not None else WEIGHTS_DIR
    denoiser = root / ("unet" if kind == "unet" else "transformer")
    if not (denoiser / "config.json").exists():
        raise FileNotFoundError(f"no trained {kind} weights in {root}; run `python -m diffaccel.reference.train "
                                f"--out {root}` to train them")
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    from .models import ReferenceUNet2DConditionModel
    from .train import pixart_pipeline, sd_pipeline

    kwargs = {"use_safetensors": True}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", **kwargs)
    vae = AutoencoderKL.from_pretrained(root / "vae", **kwargs)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(root / "scheduler")
    if kind == "unet":
        unet = ReferenceUNet2DConditionModel.from_pretrained(denoiser, **kwargs)
        pipe = sd_pipeline(text_encoder, tokenizer, vae, unet, scheduler)
    else:
        pipe = pixart_pipeline(text_encoder, tokenizer, vae,
                               PixArtTransformer2DModel.from_pretrained(denoiser, **kwargs), scheduler)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe
