"""How we know the reference models are real: caption following and step-to-step redundancy, each
measured beside a random-weight pipeline of the same architecture."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import data

GUIDANCE = 5.0
STEPS = 20


def denoiser_of(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def call_kwargs(pipe) -> dict:
    """Extra call arguments: clean_caption=False where the pipeline takes it (PixArt): its caption
    cleaning needs bs4 and ftfy, and without them it logs two notices per call and cleans nothing."""
    import inspect

    return {"clean_caption": False} if "clean_caption" in inspect.signature(pipe.__call__).parameters else {}


def random_weight_copy(pipe, seed: int = 0):
    """The same pipeline (VAE, text encoder, scheduler) with the denoiser re-initialised from `seed`."""
    from .train import pixart_pipeline, sd_pipeline

    den = denoiser_of(pipe)
    torch.manual_seed(seed)
    fresh = type(den).from_config(den.config).eval()
    build = sd_pipeline if hasattr(pipe, "unet") else pixart_pipeline
    other = build(pipe.text_encoder, pipe.tokenizer, pipe.vae, fresh,
                  type(pipe.scheduler).from_config(pipe.scheduler.config))
    other.set_progress_bar_config(disable=True)
    return other


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], steps: int = STEPS, guidance: float = GUIDANCE, seed: int = 0,
             batch: int = 16) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1]; prompt i always gets the noise of generator seed `seed + i`."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      output_type="pt", **call_kwargs(pipe)).images
        out.append(images * 2 - 1)
    return torch.cat(out)


def caption_following(pipe, n: int = 32, steps: int = STEPS, guidance: float = GUIDANCE, seed: int = 0,
                      batch: int = 16) -> float:
    """Fraction of `n` held-out single-shape captions whose image shows the described colour dominating
    the described grid cell (see `data.follows_caption`)."""
    scenes = data.evaluation_scenes(n, seed)
    images = generate(pipe, [s.caption for s in scenes], steps, guidance, seed, batch)
    return float(data.follows_caption(images, scenes).float().mean())


@torch.no_grad()
def step_redundancy(pipe, prompts: Sequence[str], steps: int = STEPS, guidance: float = GUIDANCE,
                    seed: int = 0) -> dict:
    """Relative change of every transformer block's output between consecutive denoising steps,
    ||h_t - h_(t-1)|| / ||h_(t-1)||, averaged over blocks: per step and overall (mean, median over steps).
    The redundancy that caching and merging exploit shows as small values."""
    from diffusers.models.attention import BasicTransformerBlock

    den = denoiser_of(pipe)
    blocks = [m for m in den.modules() if isinstance(m, BasicTransformerBlock)]
    outputs: list[list[torch.Tensor]] = []
    handles = [den.register_forward_pre_hook(lambda *_: outputs.append([]))]
    handles += [b.register_forward_hook(lambda _m, _a, out: outputs[-1].append(out.detach().float()))
                for b in blocks]
    try:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="latent",
             **call_kwargs(pipe))
    finally:
        for h in handles:
            h.remove()
    per_step = []
    for prev, cur in zip(outputs, outputs[1:]):
        rel = [((c - p).flatten(1).norm(dim=1) / p.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()
               for p, c in zip(prev, cur)]
        per_step.append(float(torch.stack(rel).mean()))
    ordered = sorted(per_step)
    return {"blocks": len(blocks), "per_step": [round(v, 4) for v in per_step],
            "mean": round(sum(per_step) / len(per_step), 4), "median": round(ordered[len(ordered) // 2], 4)}


def sample_grid(pipe, scenes: Sequence[data.Scene], steps: int = STEPS, guidance: float = GUIDANCE, seed: int = 0,
                columns: int = 4, label_width: int = 34):
    """A PIL image: for each scene its ground-truth render and the pipeline's image, captioned."""
    import textwrap

    from PIL import Image, ImageDraw

    images = generate(pipe, [s.caption for s in scenes], steps, guidance, seed)
    size = images.shape[-1]
    truth = torch.stack([data.render(s, size) for s in scenes])
    line_h, lines = 12, 5
    cell_w, cell_h = 2 * size + 6, size + lines * line_h + 10
    rows = (len(scenes) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w + 6, rows * cell_h + 6), "white")
    draw = ImageDraw.Draw(grid)

    def to_pil(t):
        return Image.fromarray(((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())

    for k, scene in enumerate(scenes):
        x, y = 6 + (k % columns) * cell_w, 6 + (k // columns) * cell_h
        grid.paste(to_pil(truth[k]), (x, y))
        grid.paste(to_pil(images[k]), (x + size + 2, y))
        text = textwrap.wrap(scene.caption, width=label_width * 2 * size // 256)[:lines]
        for i, line in enumerate(text):
            draw.text((x, y + size + 2 + i * line_h), line, fill="black")
    return grid
