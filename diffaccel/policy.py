"""Policies: which parameters a method uses at each denoising step and at each site.

A policy is an ordered list of rules. A rule has a site selector (kind, depth range, resolution
level, name pattern), a window of the run in which it is active, and schedules for the method's
parameters over denoising progress. The last active rule that selects a site wins; a site no rule
selects is left alone. Policies round-trip through plain dicts and JSON.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .sites import SITE_KINDS, Site

__all__ = [
    "Constant",
    "Cosine",
    "Linear",
    "Piecewise",
    "Policy",
    "Rule",
    "Schedule",
    "Selector",
    "Window",
    "progress_of",
]


def progress_of(step: int, num_steps: int | None) -> float:
    """Fraction of the run done before `step`: 0 at the first step. Unknown step counts give 0."""
    if not num_steps:
        return 0.0
    return min(max(step / num_steps, 0.0), 1.0)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


class Schedule:
    """A value as a function of denoising progress p in [0, 1]."""

    type: str = ""

    def __call__(self, p: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def knots(self) -> list[float]:
        """Values at which the schedule reaches its extremes (for validation)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def to_dict(self) -> dict:
        raise NotImplementedError  # pragma: no cover - abstract

    @staticmethod
    def from_obj(obj: Any) -> Schedule:
        """A schedule from a number, a Schedule or its dict form."""
        if isinstance(obj, Schedule):
            return obj
        if isinstance(obj, (int, float)) and not isinstance(obj, bool):
            return Constant(obj)
        if isinstance(obj, dict):
            kind = obj.get("type")
            cls = _SCHEDULES.get(kind)
            if cls is None:
                raise ValueError(f"unknown schedule type {kind!r}; allowed: {sorted(_SCHEDULES)}")
            args = {k: v for k, v in obj.items() if k != "type"}
            try:
                return cls(**args)
            except TypeError as e:
                raise ValueError(f"bad fields for schedule {kind!r}: {e}") from None
        raise TypeError(f"a schedule must be a number, a Schedule or a dict with 'type', got {obj!r}")


@dataclass(frozen=True)
class Constant(Schedule):
    value: float
    type = "constant"

    def __post_init__(self):
        _number(self.value, "Constant.value")

    def __call__(self, p: float) -> float:
        return self.value

    def knots(self) -> list[float]:
        return [self.value]

    def to_dict(self) -> dict:
        return {"type": self.type, "value": self.value}


@dataclass(frozen=True)
class Linear(Schedule):
    """Linear from `start` (at progress p0) to `end` (at p1), flat outside."""

    start: float
    end: float
    p0: float = 0.0
    p1: float = 1.0
    type = "linear"

    def __post_init__(self):
        for n in ("start", "end", "p0", "p1"):
            _number(getattr(self, n), f"{type(self).__name__}.{n}")
        if not 0.0 <= self.p0 < self.p1 <= 1.0:
            raise ValueError(f"{type(self).__name__} needs 0 <= p0 < p1 <= 1, got p0={self.p0}, p1={self.p1}")

    def _t(self, p: float) -> float:
        return min(max((p - self.p0) / (self.p1 - self.p0), 0.0), 1.0)

    def __call__(self, p: float) -> float:
        return self.start + (self.end - self.start) * self._t(p)

    def knots(self) -> list[float]:
        return [self.start, self.end]

    def to_dict(self) -> dict:
        return {"type": self.type, "start": self.start, "end": self.end, "p0": self.p0, "p1": self.p1}


@dataclass(frozen=True)
class Cosine(Linear):
    """Half-cosine ease from `start` to `end` between progress p0 and p1."""

    type = "cosine"

    def __call__(self, p: float) -> float:
        t = 0.5 - 0.5 * math.cos(math.pi * self._t(p))
        return self.start + (self.end - self.start) * t


@dataclass(frozen=True)
class Piecewise(Schedule):
    """Piecewise constant (or linear) through points [(progress, value), ...] sorted by progress."""

    points: tuple
    interpolate: bool = False
    type = "piecewise"

    def __post_init__(self):
        pts = tuple((float(_number(p, "Piecewise point")), _number(v, "Piecewise value")) for p, v in self.points)
        if not pts:
            raise ValueError("Piecewise needs at least one (progress, value) point")
        if any(b[0] <= a[0] for a, b in zip(pts, pts[1:])) or not 0.0 <= pts[0][0] <= pts[-1][0] <= 1.0:
            raise ValueError(f"Piecewise points need strictly increasing progress in [0, 1], got {self.points!r}")
        object.__setattr__(self, "points", pts)

    def __call__(self, p: float) -> float:
        pts = self.points
        if p <= pts[0][0]:
            return pts[0][1]
        for (p0, v0), (p1, v1) in zip(pts, pts[1:]):
            if p < p1:
                return v0 + (v1 - v0) * (p - p0) / (p1 - p0) if self.interpolate else v0
        return pts[-1][1]

    def knots(self) -> list[float]:
        return [v for _, v in self.points]

    def to_dict(self) -> dict:
        return {"type": self.type, "points": [list(pt) for pt in self.points], "interpolate": self.interpolate}


_SCHEDULES = {c.type: c for c in (Constant, Linear, Cosine, Piecewise)}


@dataclass(frozen=True)
class Window:
    """Part of the run in which a rule is active: [start, end) in progress (unit="progress") or step indices."""

    start: float = 0.0
    end: float | None = None
    unit: str = "progress"

    def __post_init__(self):
        if self.unit not in ("progress", "step"):
            raise ValueError(f"Window.unit must be 'progress' or 'step', got {self.unit!r}")
        _number(self.start, "Window.start")
        if self.end is not None:
            _number(self.end, "Window.end")
            if self.end <= self.start:
                raise ValueError(f"Window needs end > start, got start={self.start}, end={self.end}")
        if self.unit == "progress" and not (0.0 <= self.start <= 1.0 and (self.end is None or self.end <= 1.0)):
            raise ValueError(f"a progress Window lies in [0, 1], got start={self.start}, end={self.end}")
        if self.start < 0:
            raise ValueError(f"Window.start must be >= 0, got {self.start}")

    def contains(self, step: int, num_steps: int | None) -> bool:
        x = step if self.unit == "step" else progress_of(step, num_steps)
        return x >= self.start and (self.end is None or x < self.end)

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "unit": self.unit}


def _int_range(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or value[0] > value[1]
    ):
        raise ValueError(f"{what} must be an int or an inclusive (low, high) pair of ints, got {value!r}")
    return (value[0], value[1])


@dataclass(frozen=True)
class Selector:
    """Which sites a rule applies to. Unset fields match everything.

    kind: a site kind or a tuple of kinds (self_attn, cross_attn, ff, block).
    depth: block index or inclusive (low, high) range.
    level: resolution level or inclusive range; 0 is the finest token grid of the model.
    name: fnmatch pattern on the site's module path (e.g. "up_blocks.*attn1").
    """

    kind: tuple | str | None = None
    depth: tuple | int | None = None
    level: tuple | int | None = None
    name: str | None = None

    def __post_init__(self):
        kind = self.kind
        if isinstance(kind, str):
            kind = (kind,)
        if kind is not None:
            kind = tuple(kind)
            bad = [k for k in kind if k not in SITE_KINDS]
            if bad:
                raise ValueError(f"unknown site kind {bad[0]!r}; allowed: {list(SITE_KINDS)}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "depth", _int_range(self.depth, "Selector.depth"))
        object.__setattr__(self, "level", _int_range(self.level, "Selector.level"))
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"Selector.name must be a string pattern, got {self.name!r}")

    def matches(self, site: Site) -> bool:
        if self.kind is not None and site.kind not in self.kind:
            return False
        if self.depth is not None and not self.depth[0] <= site.depth <= self.depth[1]:
            return False
        if self.level is not None and not self.level[0] <= site.level <= self.level[1]:
            return False
        return self.name is None or fnmatch.fnmatchcase(site.name, self.name)

    def to_dict(self) -> dict:
        d = {
            "kind": list(self.kind) if self.kind else None,
            "depth": list(self.depth) if self.depth else None,
            "level": list(self.level) if self.level else None,
            "name": self.name,
        }
        return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class Rule:
    select: Selector = field(default_factory=Selector)
    params: dict = field(default_factory=dict)
    when: Window = field(default_factory=Window)

    def __post_init__(self):
        if isinstance(self.select, dict):
            object.__setattr__(self, "select", _from_fields(Selector, self.select, "selector"))
        if isinstance(self.when, dict):
            object.__setattr__(self, "when", _from_fields(Window, self.when, "window"))
        if not isinstance(self.select, Selector):
            raise TypeError(f"Rule.select must be a Selector or dict, got {self.select!r}")
        if not isinstance(self.when, Window):
            raise TypeError(f"Rule.when must be a Window or dict, got {self.when!r}")
        if not isinstance(self.params, dict):
            raise TypeError(f"Rule.params must be a dict of name -> schedule, got {self.params!r}")
        object.__setattr__(self, "params", {str(k): Schedule.from_obj(v) for k, v in self.params.items()})

    def to_dict(self) -> dict:
        return {
            "select": self.select.to_dict(),
            "params": {k: v.to_dict() for k, v in self.params.items()},
            "when": self.when.to_dict(),
        }


def _from_fields(cls, d: dict, what: str):
    if not isinstance(d, dict):
        raise TypeError(f"a {what} must be a dict, got {d!r}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"bad {what} fields {sorted(d)}: {e}") from None


@dataclass(frozen=True)
class Policy:
    """An ordered list of rules; `evaluate` answers: at this step, at this site, with what parameters?"""

    rules: tuple = ()

    def __post_init__(self):
        rules = tuple(r if isinstance(r, Rule) else _from_fields(Rule, r, "rule") for r in self.rules)
        object.__setattr__(self, "rules", rules)

    def selects(self, site: Site) -> bool:
        """Whether any rule selects this site at some step."""
        return any(r.select.matches(site) for r in self.rules)

    def evaluate(self, site: Site, step: int, num_steps: int | None) -> dict | None:
        """Parameters at this step and site (schedules evaluated), or None when no rule is active here."""
        p = progress_of(step, num_steps)
        for rule in reversed(self.rules):
            if rule.select.matches(site) and rule.when.contains(step, num_steps):
                return {k: s(p) for k, s in rule.params.items()}
        return None

    def param_names(self) -> set[str]:
        return {k for r in self.rules for k in r.params}

    def to_dict(self) -> dict:
        return {"rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, d: dict) -> Policy:
        if not isinstance(d, dict) or "rules" not in d or not isinstance(d["rules"], list):
            raise ValueError("a policy dict needs a 'rules' list, e.g. {'rules': [{'select': {...}, 'params': {...}}]}")
        unknown = set(d) - {"rules"}
        if unknown:
            raise ValueError(f"unknown policy fields {sorted(unknown)}; allowed: ['rules']")
        return cls(tuple(d["rules"]))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"malformed policy JSON: {e}") from None
        return cls.from_dict(data)
