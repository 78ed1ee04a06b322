"""The cost model that decides where a token method's default policy is worth applying.

A token method makes a sub-layer work on fewer tokens (ToMe, SiTo) or fewer keys/values (ToDo) but
spends work of its own: similarity matching, gathers and scatters, pooling, and a handful of extra
ops. On few tokens or cheap layers that costs more than it saves. For each call the model estimates
both sides as time on the device:

    time = flops / FLOPS + bytes moved / BANDWIDTH + extra ops * LAUNCH

LAUNCH is the effective cost of one extra op: `launch` for a reduced call (ToMe, SiTo: sorts, index
gathers and scatters) and `pool_launch` for a pooled one (ToDo: a reshape and an interpolation).

Where the constants come from (`device_cost`, first match wins; docs/calibration.md):

1. the user's own calibration of this device, `diffaccel calibrate` (`diffaccel.calibrate()`):
   one JSON file per device name (`cpu-<cpu model>`, `cuda-<gpu name>`) under
   `$DIFFACCEL_CACHE_DIR`, else `$XDG_CACHE_HOME/diffaccel`, else `~/.cache/diffaccel`, in
   `calibration/`. Read once per process; `calibrate()` and `reset_calibrations()` refresh it. A
   file that cannot be used warns (CalibrationWarning) and is passed over.
2. the shipped default of the device type, `diffaccel/calibration/<type>.json`: the CPU file is a
   full `diffaccel calibrate --no-save --json` run on the project's 2-core machine; the CUDA file is
   an unmeasured estimate (`"measured": false`, orders of magnitude: 2e14 flop/s, 2e12 B/s, 8 us)
   until a GPU run (`python -m diffaccel calibrate --device cuda --json`, bench/gpu/run.sh) replaces
   it. Devices of
   another type use the CUDA file.

What a calibration measures (diffaccel.calibration): FLOPS is the median matmul throughput over the
shapes that matter (batch 2 x 256..4096 tokens x widths 320..1280, fp32 on CPU, fp16 on CUDA);
BANDWIDTH the rate of a large copy (bytes of the tensor per second, each byte counted once, as
`moved` below counts each tensor once); `launch` and `pool_launch` are fitted to the token ops
themselves: ToMe's and SiTo's matching + reduce + restore, and ToDo's pooling, timed at a few sizes,
minus what FLOPS and BANDWIDTH account for, per extra op of `LAUNCHES` (least squares in relative
error, floored at the measured time of one tiny op). Before calibration files the CPU row was
hand-measured on a profile of the reference DiT (6e10 flop/s, 5e9 B/s, 45 us per extra op of either kind,
including the hook's own Python work), after constants (1e11, 2e10, 5 us) that let SiTo and ToMe
slow that model down by 7-19%.

Flops are counted from the sub-layer's own Linear weights (2 flops per multiply-add per token) plus,
for attention, 4 flops per query-key pair per channel (scores and weighted sum); each score (a head's
query-key pair) also costs `score` seconds of its own (max, exp, sum, normalise), measured on
attention whose 4-channel heads make that work dominate (0 in files measured before it was). A method acts on a
call when the time it saves exceeds the time it costs (`saves > costs`). Only the default policy
consults the model: a ratio or factor the user sets explicitly acts wherever its selectors point.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CALIBRATION_FORMAT = "diffaccel.calibration"
CALIBRATION_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "calibration"


class CalibrationWarning(UserWarning):
    """A saved calibration could not be used; the cost model falls back to the shipped default."""


@dataclass(frozen=True)
class DeviceCost:
    flops: float  # flop/s
    bandwidth: float  # bytes/s
    launch: float  # seconds per extra op of a reduced call (ToMe, SiTo)
    pool_launch: float | None = None  # seconds per extra op of a pooled call (ToDo); None: `launch`
    score: float = 0.0  # seconds per attention score (one head, one query-key pair) beyond its matmul flops

    def __post_init__(self):
        if self.pool_launch is None:
            object.__setattr__(self, "pool_launch", self.launch)

    def time(self, flops: float = 0.0, nbytes: float = 0.0, launches: int = 0) -> float:
        return flops / self.flops + nbytes / self.bandwidth + launches * self.launch


# Extra kernel launches of one reduced call, per method (reduce + restore, or pool).
LAUNCHES = {"merge": 24, "prune": 26, "pool": 8}

# Last resort when a shipped file cannot be read (a broken install): the constants before calibration.
_BUILTIN = {"cpu": DeviceCost(6e10, 5e9, 45e-6), "cuda": DeviceCost(2e14, 2e12, 8e-6)}


@dataclass(frozen=True)
class Calibration:
    """The cost model's constants for one device, where they come from, and the raw measurements.

    `to_dict()` is the JSON file's content (the user's cache file and a shipped default alike);
    `origin` and `path` say where this copy was read from and are not part of the file."""

    device: str  # calibration name: "cpu-amd-epyc", "cuda-nvidia-h200"
    device_type: str  # "cpu", "cuda"
    flops: float  # flop/s
    bandwidth: float  # bytes/s
    launch: float  # seconds per extra op of a reduced call (ToMe, SiTo)
    pool_launch: float  # seconds per extra op of a pooled call (ToDo)
    score: float = 0.0  # seconds per attention score beyond its matmul flops (softmax); 0: not measured
    measured: bool = True
    source: str = "measured"  # "measured" or "estimate"
    date: str | None = None  # ISO 8601, UTC
    command: str | None = None
    torch: str | None = None
    quick: bool = False
    measurements: dict = field(default_factory=dict, compare=False)
    origin: str = "measured"  # "user cache", "shipped", "built-in", or "measured" (not saved)
    path: str | None = None

    @property
    def cost(self) -> DeviceCost:
        return DeviceCost(self.flops, self.bandwidth, self.launch, self.pool_launch, self.score)

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "device": self.device,
                "device_type": self.device_type, "measured": self.measured, "source": self.source,
                "constants": {"flops": self.flops, "bandwidth": self.bandwidth, "launch": self.launch,
                              "pool_launch": self.pool_launch, "score": self.score},
                "date": self.date, "command": self.command, "torch": self.torch, "quick": self.quick,
                "measurements": self.measurements}

    @classmethod
    def from_dict(cls, d: Any, origin: str, path: str | None = None) -> Calibration:
        """Raises ValueError saying what is wrong with a file's content."""
        if not isinstance(d, dict) or d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"not a diffaccel calibration (format {d.get('format') if isinstance(d, dict) else d!r})")
        if d.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"calibration format version {d.get('version')!r}, this diffaccel reads version "
                             f"{CALIBRATION_VERSION}")
        consts = d.get("constants")
        if not isinstance(consts, dict):
            raise ValueError("no constants")
        values = {}
        for key in ("flops", "bandwidth", "launch", "pool_launch"):
            v = consts.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"constant {key!r} must be a positive finite number, got {v!r}")
            values[key] = float(v)
        score = consts.get("score", 0.0)  # (files measured before it was: not counted)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or score < 0:
            raise ValueError(f"constant 'score' must be a finite number >= 0, got {score!r}")
        values["score"] = float(score)
        if not isinstance(d.get("device"), str) or d.get("device_type") not in ("cpu", "cuda"):
            raise ValueError("no device name or type")
        return cls(device=d["device"], device_type=d["device_type"], **values, measured=bool(d.get("measured", True)),
                   source=str(d.get("source", "measured")), date=d.get("date"), command=d.get("command"),
                   torch=d.get("torch"), quick=bool(d.get("quick", False)),
                   measurements=d.get("measurements") or {}, origin=origin, path=path)

    def summary(self) -> str:
        """One line for describe(): which calibration the cost model uses."""
        if not self.measured:
            return (f"cost model: built-in {self.device_type.upper()} estimate (not measured; run "
                    f"`diffaccel calibrate`)")
        when = (self.date or "?")[:10] + (", quick" if self.quick else "")
        if self.origin == "shipped":
            return (f"cost model: shipped {self.device_type} default (measured on {self.device} {when}, "
                    f"command `{self.command}`)")
        return f"cost model: calibration {self.device} (measured {when}, {self.origin})"


def cache_dir() -> Path:
    """The user's cache folder: $DIFFACCEL_CACHE_DIR, else $XDG_CACHE_HOME/diffaccel, else ~/.cache/diffaccel."""
    if os.environ.get("DIFFACCEL_CACHE_DIR"):
        return Path(os.environ["DIFFACCEL_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "diffaccel"
    return Path.home() / ".cache" / "diffaccel"


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\b(cpu|processor)\b|@.*$", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform module)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device | str) -> str:
    """The calibration name of a device: "cpu-<cpu model>", "cuda-<gpu name>" (or "<type>")."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu-" + _slug(cpu_model())
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "cuda-" + _slug(torch.cuda.get_device_name(index))
    return device.type


def user_calibration_path(name: str) -> Path:
    return cache_dir() / "calibration" / f"{name}.json"


@functools.cache
def shipped_calibration(device_type: str) -> Calibration:
    """The default shipped for a device type (cpu, or cuda for every other type)."""
    kind = "cpu" if device_type == "cpu" else "cuda"
    path = SHIPPED_DIR / f"{kind}.json"
    try:
        return Calibration.from_dict(json.loads(path.read_text()), "shipped", str(path))
    except (OSError, ValueError) as e:  # a broken install: the constants before calibration files
        warnings.warn(f"diffaccel: cannot read the shipped calibration {path} ({e}); using built-in constants",
                      CalibrationWarning, stacklevel=2)
        c = _BUILTIN[kind]
        return Calibration(kind, kind, c.flops, c.bandwidth, c.launch, c.pool_launch, measured=False,
                           source="estimate", origin="built-in")


def load_calibration(path: str | os.PathLike) -> Calibration:
    """A calibration file; raises ValueError (or OSError) saying why it cannot be used."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    return Calibration.from_dict(data, "user cache", str(path))


def _resolve(device: torch.device) -> Calibration:
    if device.type not in ("cpu", "cuda"):
        return shipped_calibration(device.type)
    name = device_name(device)
    path = user_calibration_path(name)
    if path.is_file():
        try:
            cal = load_calibration(path)
            if cal.device != name:
                raise ValueError(f"it was measured on {cal.device}, not {name}")
            return cal
        except (OSError, ValueError) as e:
            warnings.warn(f"diffaccel: ignoring the calibration {path}: {e}; the cost model uses the shipped "
                          f"{device.type} default (run `diffaccel calibrate` to measure this device again)",
                          CalibrationWarning, stacklevel=3)
    return shipped_calibration(device.type)


_CALIBRATIONS: dict[torch.device, Calibration] = {}
_COSTS: dict[torch.device, DeviceCost] = {}


def calibration_for(device: torch.device | str) -> Calibration:
    """The calibration the cost model uses on `device`: the user's saved one for this device name,
    else the shipped default of its type (resolved once per process and device)."""
    device = torch.device(device)
    cal = _CALIBRATIONS.get(device)
    if cal is None:
        cal = _CALIBRATIONS[device] = _resolve(device)
    return cal


def device_cost(device: torch.device) -> DeviceCost:
    cost = _COSTS.get(device)
    if cost is None:
        cost = _COSTS[device] = calibration_for(device).cost
    return cost


def reset_calibrations() -> None:
    """Forget the calibrations read so far: the next `device_cost` reads the files again."""
    _CALIBRATIONS.clear()
    _COSTS.clear()


# The shipped default constants per device type.
DEVICES: dict[str, DeviceCost] = {kind: shipped_calibration(kind).cost for kind in ("cpu", "cuda")}


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


def attention_heads(module: torch.nn.Module) -> int:
    """Heads of an attention module (1 where it does not say)."""
    heads = getattr(module, "heads", 1)
    return heads if isinstance(heads, int) and heads > 0 else 1


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


def reduction_overhead(b: int, n: int, kept: int, cells: int, c: int, size: int,
                       prune: bool = False) -> tuple[float, float, int]:
    """(flops, bytes moved, extra ops) of ToMe's / SiTo's own work on one call: `n` tokens of width
    `c` (`size` bytes an element) in `b` rows reduced to `kept`, `cells` destinations."""
    match = 2 * b * (n - cells) * cells * c
    if prune:  # the summed similarity, and each pruned token's most similar kept token
        match += 4 * b * n * c + 2 * b * (n - kept) * kept * c
    moved = b * c * size * (4 * n + 2 * kept)  # gather in, scatter-add, restore scatter, copies
    return match, moved, LAUNCHES["prune" if prune else "merge"]


def reduction_estimate(module: torch.nn.Module, kind: str, x: torch.Tensor, n: int, kept: int, text: int,
                       cells: int, prune: bool = False) -> Estimate:
    """ToMe / SiTo on one call: `n` image tokens of `x` (B, L, C) reduced to `kept`, `text` other
    tokens in the sequence (or in joint attention), `cells` destinations compared with every source."""
    dev = device_cost(x.device)
    b, c, size = x.shape[0], x.shape[-1], x.element_size()
    flops = 2 * b * (n - kept) * linear_macs(module)
    width = attention_width(module)
    saves = 0.0
    if kind == "self_attn" and width:
        pairs = (n + text) ** 2 - (kept + text) ** 2
        flops += 4 * b * width * pairs
        saves = dev.score * b * attention_heads(module) * pairs
    return Estimate(saves + dev.time(flops), dev.time(*reduction_overhead(b, n, kept, cells, c, size, prune)))


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
    moved, ops = pooling_overhead(b, n, pooled, c if before_projection else 2 * width, size)
    saves = dev.time(flops) + dev.score * b * attention_heads(module) * queries * (n - pooled)
    return Estimate(saves, dev.time(0, moved) + ops * dev.pool_launch)


def pooling_overhead(b: int, n: int, pooled: int, c: int, size: int) -> tuple[float, int]:
    """(bytes moved, extra ops) of ToDo's own work on one call: `n` tokens of `c` channels (the input's,
    or the keys' and values' together) in `b` rows pooled to `pooled`."""
    return b * size * (n + pooled) * c, LAUNCHES["pool"]
