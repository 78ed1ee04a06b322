"""Image helpers for reports: tensors to PIL images, and a captioned side-by-side grid (what `diffaccel
run` writes as grid.png: the baseline and each method on the same prompts and seeds)."""

from __future__ import annotations

import re

import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 4  # pixels between cells and around the grid
MIN_CELL = 96  # a column is at least this wide, so that a caption over small images stays readable
FONT_SIZE = 12  # Pillow's built-in font, scalable where Pillow has FreeType (a fixed bitmap font otherwise)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) tensor in [0, 1] as an RGB PIL image (values outside are clipped)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"an image is (3, H, W), got {tuple(image.shape)}")
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous()
    return Image.fromarray(array.numpy(), "RGB")


def _wrap(text: str, width: int, font, draw: ImageDraw.ImageDraw) -> list[str]:
    """`text` broken into lines no wider than `width` pixels: at spaces, after , and : where a word is
    too long (method specs such as todo:factor=2,mode=avg have no spaces), and anywhere as a last resort."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for piece in re.findall(r"[^ ,:]*[,:]| ?[^ ,:]+| +", paragraph):
            if line and draw.textlength(line + piece, font=font) > width:
                lines.append(line.rstrip())
                line = piece.lstrip()
            else:
                line += piece
            while draw.textlength(line, font=font) > width and len(line) > 1:  # one piece wider than a line
                cut = max(k for k in range(1, len(line) + 1) if k == 1 or draw.textlength(line[:k], font=font) <= width)
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line.rstrip())
    return lines


def image_grid(columns: list[tuple[str, torch.Tensor]], max_rows: int = 8) -> Image.Image:
    """One column per (caption, images) pair, images (N, 3, H, W) in [0, 1], one row per image of the
    batch (the first `max_rows`; a footer says how many were left out). Each caption is drawn above its
    column, wrapped to the column's width (a newline in it starts a new line). Every column must hold
    images of the same shape, so that row k compares the same prompt and seed across columns."""
    if not columns:
        raise ValueError("image_grid needs at least one column")
    shapes = [tuple(images.shape) for _, images in columns]
    if len(shapes[0]) != 4 or shapes[0][1] != 3:
        raise ValueError(f"image_grid takes images (N, 3, H, W); column {columns[0][0]!r} has shape {shapes[0]}")
    for (caption, _), shape in zip(columns, shapes):
        if shape != shapes[0]:
            raise ValueError(f"image_grid: every column needs images of one shape; column {columns[0][0]!r} has "
                             f"{shapes[0]}, column {caption!r} has {shape}")
    n, _, h, w = shapes[0]
    rows = min(n, max_rows)
    cell = max(w, MIN_CELL)
    try:
        font = ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [_wrap(caption, cell, font, measure) for caption, _ in columns]
    line_h = measure.textbbox((0, 0), "Ág", font=font)[3] + 2
    top = PAD + max(len(c) for c in captions) * line_h + PAD
    footer = f"the first {rows} of {n} images" if rows < n else ""
    height = top + rows * (h + PAD) + (line_h + PAD if footer else 0)
    grid = Image.new("RGB", (PAD + len(columns) * (cell + PAD), height), "white")
    draw = ImageDraw.Draw(grid)
    for j, ((_, images), lines) in enumerate(zip(columns, captions)):
        x = PAD + j * (cell + PAD)
        for i, line in enumerate(lines):
            draw.text((x, PAD + i * line_h), line, fill="black", font=font)
        for k in range(rows):
            grid.paste(to_pil(images[k]), (x + (cell - w) // 2, top + k * (h + PAD)))
    if footer:
        draw.text((PAD, top + rows * (h + PAD)), footer, fill="black", font=font)
    return grid
