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

from .methods.base import CacheEntry, MethodConfig, SiteCall
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
        self.on_run_end: list = []  # called when the last step of a run is done (caches are released)

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
            if clock.num_steps and clock.step >= clock.num_steps:
                clock.end_run()
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

    def end_run(self) -> None:
        for listener in self.on_run_end:
            listener()

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
    state: dict = field(repr=False, default_factory=dict)  # per-run state of caching methods (per block)
    notes: dict = field(repr=False, default_factory=dict)  # site name -> why a method did not act (this run)


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
        self.notes: dict[str, str] = {}  # site -> why a selected method did not act (last run)
        self._log_run = -1
        self._cfg_run: tuple[int, int] | None = None
        self._cfg_batched = False
        self.block_inputs: dict[str, torch.Tensor] = {}
        # caching methods: (CFG branch, site index) -> CacheEntry, for the run `_cache_run`
        self.cache: dict[tuple[str, int], CacheEntry] = {}
        self.state: dict = {}  # what caching methods keep per run beside the entries (e.g. per-block scores)
        self._cache_run = -1
        self._cache_bytes = 0
        self.cache_peak_bytes = 0
        clock.on_run_end.append(self.release)

    def release(self) -> None:
        """Drop every cached output (at the end of each run, before a new one, and on removal)."""
        self.cache.clear()
        self.state.clear()
        self._cache_bytes = 0

    def cache_bytes(self) -> int:
        return self._cache_bytes

    def store(self, key: tuple[str, int], entry: CacheEntry) -> None:
        old = self.cache.get(key)
        self._cache_bytes += _entry_bytes(entry) - (_entry_bytes(old) if old is not None else 0)
        self.cache[key] = entry
        self.cache_peak_bytes = max(self.cache_peak_bytes, self._cache_bytes)

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
        elif self.adapter.cfg_layout == "separate" and clock.driven and clock.calls_in_step % 2 == 1:
            # (a bare denoiser has no step boundaries: each of its calls is a step of the one branch)
            branch = "uncond"
        else:
            branch = "cond"
        if self._log_run != clock.run:
            self.log, self.notes, self._log_run = {}, {}, clock.run
        if self._cache_run != clock.run:  # a new run (or one after an interrupted run) starts empty
            self.release()
            self._cache_run, self.cache_peak_bytes = clock.run, 0
        self.block_inputs.clear()  # an interrupted call may have left some behind
        step = clock.step
        self.ctx = Context(clock.run, step, clock.num_steps, clock.calls_in_step, branch, self._cfg_batched,
                           self.adapter.cond_half, batch, geometry, self.log.setdefault(step, {}),
                           self.block_inputs, state=self.state, notes=self.notes)
        clock.calls_in_step += 1
        return None

    def post_hook(self, module, args, kwargs, output):
        self.last, self.ctx = self.ctx, None
        clock = self.clock
        if not clock.driven and clock.num_steps and self.last is not None and self.last.step + 1 >= clock.num_steps:
            self.release()  # a bare denoiser's run ends with its last counted step
        return None


def _nbytes(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_nbytes(o) for o in output)
    return 0


def _entry_bytes(entry: CacheEntry) -> int:
    return _nbytes(entry.output) + _nbytes(list(entry.extra.values()))


def _hidden_states(args: tuple, kwargs: dict) -> Any:
    """A block's hidden-state input, passed by position or by keyword."""
    return args[0] if args else kwargs.get("hidden_states")


class BlockInputHook:
    """Records a block's hidden-state input for the methods that measure similarity on it."""

    def __init__(self, name: str, tracker: Tracker):
        self.name = name
        self.tracker = tracker

    def pre_hook(self, module, args, kwargs):
        if self.tracker.ctx is not None:
            self.tracker.block_inputs[self.name] = _hidden_states(args, kwargs)

    def post_hook(self, module, args, kwargs, output):
        self.tracker.block_inputs.pop(self.name, None)


class SiteHook:
    """Forward pre/post hooks on one site's module, running the methods installed there in order.

    A caching method plans each call against its cache entry: "reuse" hands the cached output to the
    module's forward wrapper (`SkippableForward`), the module does not run, and no other method acts;
    "partial" lets the method rewrite the call to a subset of tokens whose outputs it writes into the
    entry; "compute" runs the call in full and stores its output. Token methods rewrite the call, and
    the post-hook restores the output."""

    def __init__(self, site: Site, tracker: Tracker, methods: list[MethodConfig]):
        self.site = site
        self.tracker = tracker
        self.methods = sorted(methods, key=lambda m: m.priority)
        self.policies = [m.effective_policy() for m in self.methods]
        self.caching = next((i for i, m in enumerate(self.methods) if m.caches), None)
        self._cache_key: tuple | None = None
        self._params: list[dict | None] = []
        self._idle = True
        self._restores: list | None = None
        self._store: tuple | None = None  # (cache key, signature, step, input) to store this call's output under
        self.reuse_output: Any = None  # set for the forward wrapper when this call is skipped
        self.around: Any = None  # set for the forward wrapper: a context the call runs in (`hits`: it acted)

    def params_at(self, step: int, num_steps: int | None) -> list[dict | None]:
        return [m.resolve(p.evaluate(self.site, step, num_steps)) for m, p in zip(self.methods, self.policies)]

    def update_params(self, ctx: Context) -> list[dict | None]:
        """Each method's parameters at this call's step (evaluated once per step)."""
        key = (ctx.run, ctx.step, ctx.num_steps)
        if key != self._cache_key:
            self._cache_key, self._params = key, self.params_at(ctx.step, ctx.num_steps)
            self._idle = all(p is None for p in self._params)
        return self._params

    def pre_hook(self, module, args, kwargs):
        self._restores, self._store, self.reuse_output, self.around = None, None, None, None
        ctx = self.tracker.ctx
        if ctx is None:
            return None
        self.update_params(ctx)
        if self._idle:
            return None
        call = SiteCall(args, kwargs)
        n = call.hidden.shape[1]
        partial = None
        if self.caching is not None and self._params[self.caching] is not None:
            method, params = self.methods[self.caching], self._params[self.caching]
            cache_key = (ctx.branch, self.site.index)
            signature = (ctx.batch, ctx.geometry, tuple(call.hidden.shape))
            entry = self.tracker.cache.get(cache_key)
            if entry is not None and entry.signature != signature:
                entry = None
            plan = method.plan(self.site, ctx, params, entry, call) if entry is not None else "compute"
            if plan == "reuse":
                self.reuse_output = entry.output
                ctx.log[self.site.name] = (n, 0, 0)
                return None
            if plan == "partial":
                partial = (method, params, entry)
            else:  # "recompute" runs in full inside a cycle: the entry keeps the cycle's start step
                start = entry.step if plan == "recompute" else ctx.step
                self._store = (cache_key, signature, start, call.hidden)
        active = [(m, p) for m, p in zip(self.methods, self._params) if p is not None and not m.caches]
        if not active and partial is None:
            if self._store is not None:
                ctx.log[self.site.name] = (n, n, n)
            return None
        for method, params in active:
            method.act(self.site, ctx, params, call)
        if partial is not None:
            method, params, entry = partial
            method.refresh(self.site, ctx, params, entry, call)
        ctx.log[self.site.name] = (n, call.hidden.shape[1], call.keys_values or n)
        self.around = call.around
        if not call.reduced and call.keys_values is None:
            return None
        self._restores = call.restores
        return tuple(call.args), call.kwargs

    def post_hook(self, module, args, kwargs, output):
        restores, self._restores = self._restores, None
        around, self.around = self.around, None
        ctx = self.tracker.ctx
        if around is not None and not around.hits and ctx is not None:  # the attention ran elsewhere
            n, computed, _ = ctx.log[self.site.name]
            ctx.log[self.site.name] = (n, computed, n)
            ctx.notes[self.site.name] = "its attention backend does not call scaled_dot_product_attention: keys/values not pooled"
        if self.reuse_output is not None:
            self.reuse_output = None
            return None
        if restores:
            for restore in reversed(restores):
                output = restore(output)
        if self._store is not None:
            key, signature, step, hidden = self._store
            self._store = None
            entry = CacheEntry(output, step, signature)
            ctx = self.tracker.ctx
            if ctx is not None:
                method = self.methods[self.caching]
                method.init_entry(self.site, ctx, self._params[self.caching], entry, hidden)
            self.tracker.store(key, entry)
        return output if restores else None


class BlockReuseHook:
    """Forward pre/post hooks on a block whose every site hosts a caching method that may skip whole
    blocks (DuCa's aggressive steps): the block's output is stored whenever it runs, and on a step
    where every site's method says the block may be skipped, the block returns that stored output
    without running (its modulation, norms and residual additions included)."""

    def __init__(self, name: str, tracker: Tracker, site_hooks: list[SiteHook]):
        self.name = name
        self.tracker = tracker
        self.site_hooks = site_hooks
        self.reuse_output: Any = None  # set for the forward wrapper when this call is skipped
        self.around: Any = None  # (SkippableForward's interface: blocks run in no context)
        self._store: tuple | None = None

    def pre_hook(self, module, args, kwargs):
        self.reuse_output, self._store = None, None
        ctx = self.tracker.ctx
        if ctx is None:
            return None
        hidden = _hidden_states(args, kwargs)
        if not isinstance(hidden, torch.Tensor):
            return None
        plans = []
        for hook in self.site_hooks:
            params = hook.update_params(ctx)[hook.caching]
            if params is None:
                return None  # the method rests at this step: the sub-layers decide for themselves
            plans.append((hook, params))
        key = (ctx.branch, self.name)
        signature = (ctx.batch, ctx.geometry, tuple(hidden.shape))
        self._store = (key, signature)
        stored = self.tracker.cache.get(key)
        if stored is None or stored.signature != signature:
            return None
        entries = []
        for hook, params in plans:
            entry = self.tracker.cache.get((ctx.branch, hook.site.index))
            if entry is None or entry.signature[:2] != signature[:2] or \
                    not hook.methods[hook.caching].skips_block(ctx, params, entry):
                return None
            entries.append(entry)
        self._store = None
        self.reuse_output = stored.output
        for hook, entry in zip(self.site_hooks, entries):
            ctx.log[hook.site.name] = (entry.signature[2][1], 0, 0)
        return None

    def post_hook(self, module, args, kwargs, output):
        if self.reuse_output is not None:
            self.reuse_output = None
            return None
        store, self._store = self._store, None
        ctx = self.tracker.ctx
        if store is not None and ctx is not None:
            key, signature = store
            self.tracker.store(key, CacheEntry(output, ctx.step, signature))
        return None


_MISSING = object()


class SkippableForward:
    """Stands in for a module's `forward` (an instance attribute over the class's method) so that a
    call can return a cached output without running, or run inside a context a method set up (ToDo's
    PooledAttention); otherwise it calls the forward it replaced. `remove` puts back exactly what was
    there (another library's forward wrapper included)."""

    def __init__(self, module: torch.nn.Module, hook: SiteHook):
        self.module, self.hook = module, hook
        self.previous = module.__dict__.get("forward", _MISSING)
        self.inner = module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        out = self.hook.reuse_output
        if out is not None:
            return out
        around = self.hook.around
        if around is not None:
            with around:
                return self.inner(*args, **kwargs)
        return self.inner(*args, **kwargs)

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            if self.previous is _MISSING:
                del self.module.__dict__["forward"]
            else:
                self.module.__dict__["forward"] = self.previous
