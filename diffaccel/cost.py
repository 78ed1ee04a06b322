"""The cost model that decides where a token method's default policy is worth applying.

A token method makes a sub-layer work on fewer tokens (ToMe, SiTo) or fewer keys/values (ToDo) but
spends work of its own: similarity matching, gathers and scatters, pooling, and a handful of extra
kernel launches. On few tokens or cheap layers that costs more than it saves. For each call the
model estimates both sides as time on the device:

    time = flops / FLOPS + bytes moved / BANDWIDTH + launches * LAUNCH

with the device constants below. The CPU row is measured on the project's 2-core machine (a profile
of the reference DiT, 256 tokens of width 128, batch 2): its matmuls run at about 6e10 flop/s, its
gathers and scatters move about 5 GB/s, and each extra op of a reduced call costs about 45 us with
the hook's own Python work; SiTo's 26 extra ops cost 1.6 ms a site there, where the constants before
(1e11, 2e10, 5 us) estimated 0.26 ms and let SiTo and ToMe slow that model down by 7-19%. The CUDA
row is orders of magnitude, not a measurement:

    device  FLOPS          BANDWIDTH     LAUNCH
    cpu     6e10 flop/s    5e9 B/s       45 us
    cuda    2e14 flop/s    2e12 B/s      8 us

Flops are counted from the sub-layer's own Linear weights (2 flops per multiply-add per token) plus,
for attention, 4 flops per query-key pair per channel (scores and weighted sum). A method acts on a
call when the time it saves exceeds the time it costs (`saves > costs`). Only the default policy
consults the model: a ratio or factor the user sets explicitly acts wherever its selectors point.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceCost:
    flops: float  # flop/s
    bandwidth: float  # bytes/s
    launch: float  # seconds per extra kernel launch

    def time(self, flops: float = 0.0, nbytes: float = 0.0, launches: int = 0) -> float:
        return flops / self.flops + nbytes / self.bandwidth + launches * self.launch


DEVICES = {"cpu": DeviceCost(6e10, 5e9, 45e-6), "cuda": DeviceCost(2e14, 2e12, 8e-6)}

# Extra kernel launches of one reduced call, per method (reduce + restore, or pool).
LAUNCHES = {"merge": 24, "prune": 26, "pool": 8}


def device_cost(device: torch.device) -> DeviceCost:
    return DEVICES.get(device.type, DEVICES["cuda"])


def linear_macs(module: torch.nn.Module) -> int:
    """Multiply-adds per token of every Linear inside a sub-layer (cached per module)."""
    macs = _MACS.get(module)
    if macs is None:
        macs = _MACS[module] = sum(m.in_features * m.out_features for m in module.modules()
                                   if isinstance(m, torch.nn.Linear))
    return macs


_MACS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attention_width(module: torch.nn.Module) -> int:
    """Inner width of an attention module's scores (0 for sub-layers without attention)."""
    to_q = getattr(module, "to_q", None)
    return to_q.out_features if isinstance(to_q, torch.nn.Linear) else 0


@dataclass(frozen=True)
class Estimate:
    saves: float  # seconds
    costs: float  # seconds

    @property
    def worth_it(self) -> bool:
        return self.saves > self.costs

    def why(self) -> str:
        return (f"cost model: saves ~{self.saves * 1e6:.0f} us, costs ~{self.costs * 1e6:.0f} us per call"
                + ("" if self.worth_it else ", so this site is skipped"))


def reduction_estimate(module: torch.nn.Module, kind: str, x: torch.Tensor, n: int, kept: int, text: int,
                       cells: int, prune: bool = False) -> Estimate:
    """ToMe / SiTo on one call: `n` image tokens of `x` (B, L, C) reduced to `kept`, `text` other
    tokens in the sequence (or in joint attention), `cells` destinations compared with every source."""
    dev = device_cost(x.device)
    b, c, size = x.shape[0], x.shape[-1], x.element_size()
    flops = 2 * b * (n - kept) * linear_macs(module)
    width = attention_width(module)
    if kind == "self_attn" and width:
        flops += 4 * b * width * ((n + text) ** 2 - (kept + text) ** 2)
    saves = dev.time(flops)
    match = 2 * b * (n - cells) * cells * c
    if prune:  # the summed similarity, and each pruned token's most similar kept token
        match += 4 * b * n * c + 2 * b * (n - kept) * kept * c
    moved = b * c * size * (4 * n + 2 * kept)  # gather in, scatter-add, restore scatter, copies
    costs = dev.time(match, moved, LAUNCHES["prune" if prune else "merge"])
    return Estimate(saves, costs)


def pooling_estimate(module: torch.nn.Module, x: torch.Tensor, n: int, pooled: int, text: int,
                     before_projection: bool) -> Estimate:
    """ToDo on one call: the keys/values of `n` image tokens pooled to `pooled` (before the key/value
    projections, or after them and the rotary embedding), queries unchanged."""
    dev = device_cost(x.device)
    b, c, size = x.shape[0], x.shape[-1], x.element_size()
    width = attention_width(module) or c
    queries = x.shape[1]
    flops = 4 * b * width * queries * (n - pooled)
    if before_projection:
        flops += 2 * 2 * b * (n - pooled) * c * width  # the key and value projections
    moved = b * size * (n + pooled) * (c if before_projection else 2 * width)
    return Estimate(dev.time(flops), dev.time(0, moved, LAUNCHES["pool"]))
