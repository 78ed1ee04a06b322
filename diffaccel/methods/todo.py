"""ToDo (Smith et al., 2024): token downsampling for self-attention.

Keys and values come from the token grid pooled by `factor` (nearest, average or max); queries keep
every token, so nothing needs unmerging. One factor per resolution level, active within a window of
the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policy import Policy, Rule, Selector, Window
from ..sites import Site
from ..tokens import pool_tokens
from .base import MethodConfig, SiteCall, check_choice, check_number, grid_of, register

POOL_MODES = ("nearest", "avg", "max")


@register
@dataclass(frozen=True)
class ToDoConfig(MethodConfig):
    """factor: key/value downsampling factor per side at the finest level (1 = off).
    level_factors: {level: factor} for coarser levels (level 0 is the finest), e.g. {1: 1.5}.
    start, end: the part of the run (fraction of steps) in which ToDo acts."""

    factor: float = 2.0
    mode: str = "nearest"
    max_downsample: int = 1
    level_factors: dict = field(default_factory=dict)
    start: float = 0.0
    end: float = 1.0
    policy: Policy | dict | str | None = None

    name = "todo"
    priority = 0
    params = ("factor",)

    def __hash__(self):
        return hash((self.factor, self.mode, self.max_downsample, tuple(sorted(self.level_factors.items())),
                     self.start, self.end))

    def validate(self) -> None:
        n = type(self).__name__
        check_number(n, "factor", self.factor, 1.0, 64.0)
        check_choice(n, "mode", self.mode, POOL_MODES)
        check_number(n, "max_downsample", self.max_downsample, 1, 8, integer=True)
        if not isinstance(self.level_factors, dict):
            raise TypeError(f"{n}.level_factors must be a dict {{level: factor}}, got {self.level_factors!r}")
        for level, f in self.level_factors.items():
            check_number(n, "level_factors key", level, 0, 8, integer=True)
            check_number(n, f"level_factors[{level}]", f, 1.0, 64.0)
        check_number(n, "start", self.start, 0.0, 1.0)
        check_number(n, "end", self.end, 0.0, 1.0)
        if self.end <= self.start:
            raise ValueError(f"{n} needs start < end, got start={self.start}, end={self.end}")

    def default_policy(self) -> Policy:
        when = Window(self.start, self.end)
        rules = [Rule(Selector(kind="self_attn", level=(0, self.max_downsample - 1)), {"factor": self.factor}, when)]
        rules += [Rule(Selector(kind="self_attn", level=lvl), {"factor": f}, when)
                  for lvl, f in sorted(self.level_factors.items())]
        return Policy(tuple(rules))

    def unsupported(self, site: Site) -> str | None:
        if site.note:
            return site.note
        if site.kind != "self_attn":
            return "ToDo pools the keys/values of self-attention only"
        if getattr(site.module, "norm_cross", None) is not None:
            return "attention normalizes its context: pooled keys/values would be normalized twice"
        return None

    def is_identity(self, params: dict) -> bool:
        return params["factor"] <= 1.0

    def act(self, site: Site, ctx, params: dict, call: SiteCall) -> None:
        if call.kwargs.get("encoder_hidden_states") is not None or call.kwargs.get("attention_mask") is not None:
            return  # a context or mask was given: not plain self-attention on this call
        x = call.hidden
        grid = grid_of(site, ctx, x.shape[1])
        if grid is None:
            return
        kv = pool_tokens(x, *grid, params["factor"], self.mode)
        call.kwargs["encoder_hidden_states"] = kv
        call.keys_values = kv.shape[1]
