"""The call contract between the runtime and the methods.

For every call of a denoiser the runtime builds one `Context` (which run and step, the guidance
layout, the token geometry); for every call of a site that some method acts on it builds one
`SiteCall` (the sub-layer's arguments, as the methods rewrite them). A caching method answers each
call with a `Plan`, against the `CacheEntry` it stored for that site. What happened is logged per
site and step as a `CallRecord`, which `describe()` reads.

This module imports nothing from the runtime or the methods, so both import it.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .sites import Geometry


class Plan(str, enum.Enum):
    """What a caching method does with one call of a site it holds a fitting cache entry for."""

    COMPUTE = "compute"  # run in full and store the output: a new cycle begins
    REUSE = "reuse"  # return the entry's output; the sub-layer does not run
    PARTIAL = "partial"  # `refresh` rewrites the call to some tokens and writes their outputs into the entry
    RECOMPUTE = "recompute"  # run in full inside the entry's cycle: the output is stored, the cycle kept


class CallRecord(NamedTuple):
    """What one site call did: its tokens, the query tokens computed (0: the output was reused), and
    the tokens its keys and values came from."""

    tokens: int
    computed: int
    keys_values: int


@dataclass
class CacheEntry:
    """A sub-layer (or block) output kept for reuse at later steps.

    output:    what the call returned
    step:      the step the entry's cycle began at
    signature: (batch, geometry, input shape) of the call it belongs to; it never serves another
    until:     the step at which the entry's cycle ends (the next full computation; None: no cycle)
    extra:     what the method keeps per token beside the output (counted in the cache's size)"""

    output: Any
    step: int
    signature: tuple
    until: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)


Restore = Callable[[Any], Any]


class SiteCall:
    """One call of a site's module, as the methods rewrite it before it runs.

    args, kwargs: the call's arguments (the hidden states first, or as `hidden_states`)
    restores:     functions of the output, applied last to first after the call (a token method's
                  unmerge, a caching method's scatter into its entry)
    keys_values:  tokens the keys and values come from, when a method changed them (ToDo)
    reduced:      whether a method changed the query tokens
    arounds:      context managers the sub-layer's forward runs in, entered in order (ToDo's pooling
                  inside attention, the attention probes of token-wise caching)"""

    __slots__ = ("args", "kwargs", "restores", "keys_values", "reduced", "arounds")

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = list(args), dict(kwargs)
        self.restores: list[Restore] = []
        self.keys_values: int | None = None
        self.reduced = False
        self.arounds: list[AbstractContextManager] = []

    def get(self, name: str, position: int = -1) -> Any:
        """An argument of the call by keyword, or by position (counting the hidden states as 0)."""
        if 0 <= position < len(self.args):
            return self.args[position]
        return self.kwargs.get(name)

    def set(self, name: str, position: int, value: Any) -> None:
        if 0 <= position < len(self.args):
            self.args[position] = value
        else:
            self.kwargs[name] = value

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        if self.args:
            self.args[0] = value
        else:
            self.kwargs["hidden_states"] = value

    @property
    def changed(self) -> bool:
        """Whether the call's arguments differ from those it was made with."""
        return self.reduced or self.keys_values is not None


@dataclass
class Context:
    """What a method knows about the current denoiser call.

    run, step, num_steps: the pipeline call (counted from 1), its denoising step (from 0) and how
                    many steps it has (None when unknown: a bare denoiser without num_steps)
    call_in_step:   denoiser calls already made in this step (separate CFG branches, experts)
    branch:         "cond", "uncond" or "cond_uncond" (both halves of batched CFG in one call)
    cfg_batched:    whether this call's batch is [uncond, cond] halves, which share token selections
    cond_half:      which half is the conditional one ("first" or "second")
    batch:          the call's batch size
    geometry:       the token grid of the call's image tokens (None when the adapter read none)
    log:            site name -> CallRecord, for this step
    block_inputs:   block path -> its hidden-state input (recorded for methods that measure on it)
    shared:         per-call results the sub-layers of a block share (one matching, one fresh set)
    state:          per-run state of caching methods (e.g. a block's attention statistic)
    notes:          site name -> why a method did not act there (this run)
    decisions:      step -> whether adaptive caching computed it, and why (this run)
    step_key:       in a compiled denoiser, the step as a 0-d tensor (see `Tracker.prepare`)"""

    run: int
    step: int
    num_steps: int | None
    call_in_step: int
    branch: str
    cfg_batched: bool
    cond_half: str
    batch: int
    geometry: Geometry | None
    log: dict[str, CallRecord] = field(repr=False, default_factory=dict)
    block_inputs: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    shared: dict = field(repr=False, default_factory=dict)
    state: dict = field(repr=False, default_factory=dict)
    notes: dict[str, str] = field(repr=False, default_factory=dict)
    warned: set = field(repr=False, default_factory=set)  # warnings already given by this installation
    # a compiled denoiser's step as a tensor (its value is not a constant of the compiled graph): what
    # the seeded draws read there (see methods.common.BlockRandom)
    step_key: torch.Tensor | None = field(repr=False, default=None)
    acted: dict = field(repr=False, default_factory=dict)  # compiled calls: (method, site) -> whether it acted
    # what caching methods key their per-run `state` by beside their own keys: the branch (compiled
    # calls keep a state dict per branch instead, so a graph never depends on the branch's name)
    state_branch: str | None = field(repr=False, default=None)
    after: Any = field(repr=False, default=None)  # compiled calls: what the next call of the step runs
    # adaptive caching: step -> what was decided there (this run), for describe()
    decisions: dict = field(repr=False, default_factory=dict)
    # context parallelism: the process group the denoiser's tokens are split over (None: one process),
    # and its size; each call then holds 1 / world of the sequence
    group: Any = field(repr=False, default=None)
    world: int = 1

    def __post_init__(self):
        if self.state_branch is None:
            self.state_branch = self.branch

    def warn_once(self, key: Any, message: str) -> None:
        """A UserWarning, given once per installation for each key."""
        warn_once(self.warned, key, message)


def warn_once(warned: set, key: Any, message: str) -> None:
    if key not in warned:
        warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)
