"""The procedural captioned-shapes dataset the reference models are trained on.

A scene holds one to three shapes (kind, colour, size, position on a 3x3 grid) on a plain or a
two-colour gradient background; its caption says all of that in words ("a small red circle at the
top left and a large blue square in the center on a white background"). Scenes come from a seeded
generator, so the dataset is the same on every machine and nothing is downloaded. Captions are split
deterministically by a checksum: one in ten is held out of training, for evaluation.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 135, 30), "purple": (140, 60, 180), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.24, "large": 0.36}  # radius as a fraction of a grid cell
# phrase -> (row, column) of the 3x3 grid
POSITIONS: dict[str, tuple[int, int]] = {
    "at the top left": (0, 0), "at the top": (0, 1), "at the top right": (0, 2),
    "on the left": (1, 0), "in the center": (1, 1), "on the right": (1, 2),
    "at the bottom left": (2, 0), "at the bottom": (2, 1), "at the bottom right": (2, 2),
}
JITTER = 0.12  # centre offset, fraction of a cell; large shapes stay inside their cell
HELD_OUT_EVERY = 10


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str
    dx: float = 0.0  # jitter of the centre, fraction of a cell
    dy: float = 0.0

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} {self.position}"

    @property
    def cell(self) -> tuple[int, int]:
        return POSITIONS[self.position]

    def centre(self, size: int) -> tuple[float, float]:
        """(x, y) of the shape's centre in pixels, in an image of `size` x `size`."""
        row, col = self.cell
        return (col + 0.5 + self.dx) * size / 3, (row + 0.5 + self.dy) * size / 3


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[str, ...]  # one colour, or (top, bottom) of a vertical gradient

    @property
    def caption(self) -> str:
        article = "an" if self.background[0][0] in "aeiou" else "a"
        if len(self.background) == 1:
            bg = f"on {article} {self.background[0]} background"
        else:
            bg = f"on {article} {self.background[0]} to {self.background[1]} gradient"
        return " and ".join(s.phrase for s in self.shapes) + " " + bg


def vocabulary() -> list[str]:
    """Every word a caption can use, in a fixed order."""
    words = ["a", "an", "and", "on", "to", "background", "gradient", *SIZES, *COLOURS, *SHAPES]
    for phrase in POSITIONS:
        words += [w for w in phrase.split() if w not in words]
    return list(dict.fromkeys(words))


def is_held_out(caption: str) -> bool:
    return zlib.crc32(caption.encode()) % HELD_OUT_EVERY == 0


def random_scene(rng: random.Random, max_shapes: int = 3, gradient_p: float = 0.3) -> Scene:
    n = rng.randint(1, max_shapes)
    cells = rng.sample(list(POSITIONS), n)
    colours = rng.sample(list(COLOURS), n + 2)
    shape_colours, bg_pool = colours[:n], colours[n:]
    background = tuple(bg_pool) if rng.random() < gradient_p else (bg_pool[0],)
    shapes = tuple(
        Shape(rng.choice(SHAPES), c, rng.choice(list(SIZES)), p, rng.uniform(-JITTER, JITTER),
              rng.uniform(-JITTER, JITTER))
        for c, p in zip(shape_colours, cells))
    return Scene(shapes, background)


def _mask(kind: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    if kind == "circle":
        return x * x + y * y <= r * r
    if kind == "square":
        return (x.abs() <= 0.85 * r) & (y.abs() <= 0.85 * r)
    if kind == "diamond":
        return x.abs() + y.abs() <= 1.15 * r
    if kind == "triangle":  # apex up
        return (y <= 0.75 * r) & (y >= -r) & (x.abs() <= (y + r) * 0.62)
    raise ValueError(f"unknown shape {kind!r}; available: {list(SHAPES)}")


def render(scene: Scene, size: int = 128) -> torch.Tensor:
    """The scene as a (3, size, size) float image in [-1, 1], shapes drawn in caption order."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    top = torch.tensor(COLOURS[scene.background[0]], dtype=torch.float32).view(3, 1, 1)
    bottom = torch.tensor(COLOURS[scene.background[-1]], dtype=torch.float32).view(3, 1, 1)
    t = (yy / size).unsqueeze(0)
    img = top * (1 - t) + bottom * t
    for s in scene.shapes:
        cx, cy = s.centre(size)
        m = _mask(s.kind, xx - cx, yy - cy, SIZES[s.size] * size / 3)
        img = torch.where(m, torch.tensor(COLOURS[s.colour], dtype=torch.float32).view(3, 1, 1), img)
    return img / 127.5 - 1


def scenes(seed: int, held_out: bool = False, max_shapes: int = 3, gradient_p: float = 0.3) -> Iterator[Scene]:
    """An endless, seeded stream of training scenes (or, with held_out, of held-out ones)."""
    rng = random.Random(seed)
    while True:
        scene = random_scene(rng, max_shapes, gradient_p)
        if is_held_out(scene.caption) == held_out:
            yield scene


def batch(stream: Iterator[Scene], n: int, size: int = 128) -> tuple[torch.Tensor, list[str]]:
    picked = [next(stream) for _ in range(n)]
    return torch.stack([render(s, size) for s in picked]), [s.caption for s in picked]


def evaluation_scenes(n: int, seed: int = 0) -> list[Scene]:
    """`n` held-out single-shape scenes on plain backgrounds: the caption-following benchmark."""
    rng = random.Random(seed)
    out: list[Scene] = []
    seen: set[str] = set()
    for scene in scenes(seed, held_out=True, max_shapes=1, gradient_p=0.0):
        if scene.caption not in seen:
            seen.add(scene.caption)
            out.append(scene)
        if len(out) == n:
            break
    rng.shuffle(out)
    return out


def colour_map(images: torch.Tensor) -> torch.Tensor:
    """Index into COLOURS of the nearest palette colour of every pixel; images (B, 3, H, W) in [-1, 1]."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1  # (C, 3)
    d = ((images.float().unsqueeze(1) - palette.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # (B, C, H, W)
    return d.argmin(1)


def follows_caption(images: torch.Tensor, scenes_: Sequence[Scene], min_cover: float = 0.05) -> torch.Tensor:
    """For each image, whether every shape of its scene shows in its grid cell: the shape's colour is
    the most frequent palette colour there apart from the background's, and covers at least
    `min_cover` of the cell. Returns a bool tensor (B,)."""
    names = list(COLOURS)
    idx = colour_map(images)
    size = images.shape[-1]
    bounds = [round(i * size / 3) for i in range(4)]
    ok = []
    for k, scene in enumerate(scenes_):
        good = True
        for s in scene.shapes:
            row, col = s.cell
            region = idx[k, bounds[row]:bounds[row + 1], bounds[col]:bounds[col + 1]]
            counts = torch.bincount(region.flatten(), minlength=len(names)).float()
            for bg in scene.background:
                counts[names.index(bg)] = -1
            want = names.index(s.colour)
            good &= bool(counts.argmax() == want) and bool(counts[want] >= min_cover * region.numel())
        ok.append(good)
    return torch.tensor(ok)
