"""The runtime: one clock per pipeline (which run, which step), one tracker per denoiser (the context
of the current call: step, CFG layout, token geometry), and one hook per site that lets the methods
rewrite the sub-layer call and restores its output.

Step tracking is hook-based and universal: a forward pre-hook on the denoiser, and wrappers on the
scheduler's `set_timesteps` (a new run) and `step` (the next step). Methods never count steps.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .methods.base import MethodConfig, SiteCall
from .sites import Geometry, Site


class RunClock:
    """Which pipeline call ("run") and which denoising step we are in.

    With a scheduler it follows `set_timesteps` and `step`, so any number of denoiser calls per step
    (separate CFG branches, Wan 2.2's two experts) share a step index. Without one (a bare
    denoiser), every denoiser call is a step and `num_steps` is what the user gave, if anything.
    """

    def __init__(self, num_steps: int | None = None):
        self.run = 0
        self.step = 0
        self.calls_in_step = 0
        self.num_steps = num_steps
        self.scheduler: Any = None
        self._pipe_ref: Any = None
        self._fixed_steps = num_steps

    # -- scheduler wrapping ------------------------------------------------------------------
    def attach(self, pipe: Any) -> None:
        self._pipe_ref = weakref.ref(pipe)
        self._wrap(getattr(pipe, "scheduler", None))

    def _wrap(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        if scheduler is None or not hasattr(scheduler, "set_timesteps"):
            return
        original_set, original_step = scheduler.set_timesteps, scheduler.step
        clock = self

        # functools.wraps keeps the signatures: pipelines inspect set_timesteps for `sigmas`/`timesteps`.
        @functools.wraps(original_set)
        def set_timesteps(*args, **kwargs):
            out = original_set(*args, **kwargs)
            clock.new_run(_count(getattr(scheduler, "timesteps", None)))
            return out

        @functools.wraps(original_step)
        def step(*args, **kwargs):
            out = original_step(*args, **kwargs)
            clock.step += 1
            clock.calls_in_step = 0
            return out

        scheduler.set_timesteps = set_timesteps
        scheduler.step = step

    def detach(self) -> None:
        sch = self.scheduler
        if sch is not None:
            for name in ("set_timesteps", "step"):
                sch.__dict__.pop(name, None)
        self.scheduler = None

    def follow_pipeline(self) -> None:
        """Re-attach when the user swapped the pipeline's scheduler after acceleration."""
        pipe = self._pipe_ref() if self._pipe_ref is not None else None
        if pipe is None:
            return
        current = getattr(pipe, "scheduler", None)
        if current is not self.scheduler:
            self.detach()
            self._wrap(current)
            self.new_run(_count(getattr(current, "timesteps", None)))

    def new_run(self, num_steps: int | None) -> None:
        self.run += 1
        self.step = 0
        self.calls_in_step = 0
        self.num_steps = num_steps or self._fixed_steps

    @property
    def driven(self) -> bool:
        return self.scheduler is not None and hasattr(self.scheduler, "set_timesteps")


def _count(timesteps: Any) -> int | None:
    try:
        return len(timesteps) if timesteps is not None else None
    except TypeError:
        return None


@dataclass
class Context:
    """What a method needs to know about the current denoiser call."""

    run: int
    step: int
    num_steps: int | None
    call_in_step: int
    branch: str  # "cond", "uncond" or "cond_uncond" (batched CFG)
    cfg_batched: bool
    cond_half: str
    batch: int
    geometry: Geometry | None
    log: dict = field(repr=False, default_factory=dict)
    block_inputs: dict = field(repr=False, default_factory=dict)  # block path -> its hidden-state input
    shared: dict = field(repr=False, default_factory=dict)  # per-call results sub-layers of a block share


class Tracker:
    """One per denoiser: builds the Context of each call from the clock and the adapter."""

    def __init__(self, model: torch.nn.Module, adapter: Any, clock: RunClock, pipe: Any = None,
                 cfg_batched: bool | None = None):
        self.model = model
        self.cfg_override = cfg_batched
        self.adapter = adapter
        self.clock = clock
        self._pipe_ref = weakref.ref(pipe) if pipe is not None else None
        self.ctx: Context | None = None
        self.last: Context | None = None
        self.log: dict[int, dict[str, tuple]] = {}  # step -> site -> (tokens, computed, keys/values)
        self._log_run = -1
        self._cfg_run: tuple[int, int] | None = None
        self._cfg_batched = False
        self.block_inputs: dict[str, torch.Tensor] = {}

    def pre_hook(self, module, args, kwargs):
        clock = self.clock
        if clock.driven:
            clock.follow_pipeline()
        else:
            clock.step = clock.calls_in_step if clock.run else 0
        if not clock.run:
            clock.new_run(_count(getattr(clock.scheduler, "timesteps", None)))
        geometry, batch = self.adapter.geometry(args, kwargs)
        pipe = self._pipe_ref() if self._pipe_ref is not None else None
        key = (clock.run, batch)
        if key != self._cfg_run:  # guidance cannot change inside a run: decide once
            if self.cfg_override is not None:
                batched = self.cfg_override and batch % 2 == 0
            else:
                batched = self.adapter.is_cfg_batched(pipe, args, kwargs, batch)
            self._cfg_run, self._cfg_batched = key, batched
        if self._cfg_batched:
            branch = "cond_uncond"
        elif self.adapter.cfg_layout == "separate" and clock.calls_in_step % 2 == 1:
            branch = "uncond"
        else:
            branch = "cond"
        if self._log_run != clock.run:
            self.log, self._log_run = {}, clock.run
        self.block_inputs.clear()  # an interrupted call may have left some behind
        step = clock.step
        self.ctx = Context(clock.run, step, clock.num_steps, clock.calls_in_step, branch, self._cfg_batched,
                           self.adapter.cond_half, batch, geometry, self.log.setdefault(step, {}),
                           self.block_inputs)
        clock.calls_in_step += 1
        return None

    def post_hook(self, module, args, kwargs, output):
        self.last, self.ctx = self.ctx, None
        return None


class BlockInputHook:
    """Records a block's hidden-state input for the methods that measure similarity on it."""

    def __init__(self, name: str, tracker: Tracker):
        self.name = name
        self.tracker = tracker

    def pre_hook(self, module, args, kwargs):
        if self.tracker.ctx is not None:
            self.tracker.block_inputs[self.name] = args[0] if args else kwargs.get("hidden_states")

    def post_hook(self, module, args, kwargs, output):
        self.tracker.block_inputs.pop(self.name, None)


class SiteHook:
    """Forward pre/post hooks on one site's module, running the methods installed there in order."""

    def __init__(self, site: Site, tracker: Tracker, methods: list[MethodConfig]):
        self.site = site
        self.tracker = tracker
        self.methods = sorted(methods, key=lambda m: m.priority)
        self.policies = [m.effective_policy() for m in self.methods]
        self._cache_key: tuple | None = None
        self._params: list[dict | None] = []
        self._restores: list | None = None

    def params_at(self, step: int, num_steps: int | None) -> list[dict | None]:
        return [m.resolve(p.evaluate(self.site, step, num_steps)) for m, p in zip(self.methods, self.policies)]

    def pre_hook(self, module, args, kwargs):
        self._restores = None
        ctx = self.tracker.ctx
        if ctx is None:
            return None
        key = (ctx.run, ctx.step, ctx.num_steps)
        if key != self._cache_key:
            self._cache_key, self._params = key, self.params_at(ctx.step, ctx.num_steps)
        active = [(m, p) for m, p in zip(self.methods, self._params) if p is not None]
        if not active:
            return None
        call = SiteCall(args, kwargs)
        n = call.hidden.shape[1]
        for method, params in active:
            method.act(self.site, ctx, params, call)
        ctx.log[self.site.name] = (n, call.hidden.shape[1], call.keys_values or n)
        if not call.reduced and call.keys_values is None:
            return None
        self._restores = call.restores
        return tuple(call.args), call.kwargs

    def post_hook(self, module, args, kwargs, output):
        restores, self._restores = self._restores, None
        if not restores:
            return None
        for restore in reversed(restores):
            output = restore(output)
        return output
