"""The runtime: one clock per pipeline (which run, which step), one tracker per denoiser (the context
of the current call: step, CFG layout, token geometry), and one hook per site that lets the methods
rewrite the sub-layer call and restores its output.

Step tracking is hook-based and universal: a forward pre-hook on the denoiser, and wrappers on the
scheduler's `set_timesteps` (a new run) and `step` (the next step). Methods never count steps.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.pipelines import DENOISER_ATTRS, unwrap

from .methods.base import CacheEntry, MethodConfig, SiteCall
from .sites import Geometry, Site

MAX_FRAMES = 64  # how far up the stack a denoiser call looks for the pipeline running it


class PipeRef:
    """A weak reference to a pipeline that `copy.deepcopy` maps onto the copy of that pipeline (a
    plain weakref would still point at the original), or drops when the pipeline is not copied."""

    __slots__ = ("_ref",)

    def __init__(self, pipe: Any):
        self._ref = weakref.ref(pipe) if pipe is not None else None

    def __call__(self) -> Any:
        return self._ref() if self._ref is not None else None

    def __deepcopy__(self, memo: dict) -> PipeRef:
        pipe = self()
        return PipeRef(memo.get(id(pipe)) if pipe is not None else None)


class _Patch:
    """Stands in for a method on one instance (a scheduler's `set_timesteps` / `step`, a pipeline's
    `progress_bar`) and calls the clock around it. An object rather than a closure, so that
    `copy.deepcopy` of a pipeline gives the copy patches of its own; `remove` puts back exactly what
    was there before (another library's instance-level wrapper included)."""

    def __init__(self, owner: Any, name: str, clock: RunClock):
        self.name, self.clock = name, clock
        self.owner_ref = PipeRef(owner) if name == "progress_bar" else None
        self.owner = None if self.owner_ref is not None else owner
        self.had_previous = name in owner.__dict__
        self.previous = owner.__dict__.get(name)
        if self.owner is not None:  # inspect.signature follows it (pipelines inspect set_timesteps)
            self.__wrapped__ = getattr(owner, name)
        owner.__dict__[name] = self

    def target(self) -> Any:
        return self.owner_ref() if self.owner_ref is not None else self.owner

    def original(self):
        owner = self.target()
        return self.previous if self.had_previous else getattr(type(owner), self.name).__get__(owner)

    def remove(self) -> None:
        owner = self.target()
        if owner is None or owner.__dict__.get(self.name) is not self:
            return
        if self.had_previous:
            owner.__dict__[self.name] = self.previous
        else:
            del owner.__dict__[self.name]


class _SetTimesteps(_Patch):
    def __call__(self, *args, **kwargs):
        out = self.original()(*args, **kwargs)
        self.clock.new_run(_count(getattr(self.target(), "timesteps", None)))
        return out


class _Step(_Patch):
    def __call__(self, *args, **kwargs):
        out = self.original()(*args, **kwargs)
        clock = self.clock
        clock.step += 1
        clock.calls_in_step = 0
        if clock.num_steps and clock.step >= clock.num_steps:
            clock.end_run()
        return out


class _ProgressBar(_Patch):
    """Every diffusers pipeline runs its denoising loop inside `self.progress_bar(...)`, whose total is
    the number of steps the loop really runs (fewer than num_inference_steps for img2img and inpaint
    with strength < 1, SDXL's denoising_start / denoising_end): the clock plans the run over that
    span, and the run ends (caches released) when the loop is left, normally or by an exception."""

    def __call__(self, *args, **kwargs):
        bar = self.original()(*args, **kwargs)
        total = kwargs.get("total")
        iterable = kwargs.get("iterable", args[0] if args else None)
        return _Loop(bar, self.clock, self.target(), total if total is not None else _count(iterable))


class _Loop:
    """The progress bar a pipeline loops in, seen by the clock: entering it begins the denoising loop,
    leaving it (or exhausting it, when iterated) ends the run. Anything else goes to the bar."""

    def __init__(self, bar: Any, clock: RunClock, pipe: Any, total: int | None):
        self._bar, self._clock, self._pipe, self._total = bar, clock, pipe, total

    def __enter__(self):
        self._clock.begin_loop(self._pipe, self._total)
        return self._bar.__enter__()

    def __exit__(self, *exc):
        try:
            return self._bar.__exit__(*exc)
        finally:
            self._clock.end_loop()

    def __iter__(self):
        self._clock.begin_loop(self._pipe, self._total)
        try:
            yield from self._bar
        finally:
            self._clock.end_loop()

    def __getattr__(self, name: str):
        return getattr(self._bar, name)


class RunClock:
    """Which pipeline call ("run") and which denoising step we are in.

    With a pipeline it follows the scheduler's `set_timesteps` (a new run) and `step` (the next step),
    so any number of denoiser calls per step (separate CFG branches, Wan 2.2's two experts) share a
    step index, and the pipeline's denoising loop (its progress bar) gives the number of steps the run
    really has. A denoiser shared by several pipelines (`from_pipe`, a pipeline built from another's
    components) follows whichever of them is running it: a call from outside any loop the clock knows
    finds its pipeline on the call stack and adopts it. Without a pipeline (a bare denoiser), every
    denoiser call is a step and `num_steps` is what the user gave, if anything.
    """

    def __init__(self, num_steps: int | None = None):
        self.run = 0
        self.step = 0
        self.calls_in_step = 0
        self.num_steps = num_steps
        self._fixed_steps = num_steps
        self.patches: list[_Patch] = []
        self.pipes: list[PipeRef] = []  # pipelines that drive the clock, the accelerated one first
        self.current = PipeRef(None)  # the pipeline running now (or last)
        self.loops = 0  # denoising loops of driving pipelines now running
        self.on_run_end: list = []  # called when a run's last step is done or its loop is left

    # -- pipelines and schedulers ------------------------------------------------------------
    def attach(self, pipe: Any) -> None:
        """Follow this pipeline's runs (its scheduler and its denoising loop)."""
        if any(ref() is pipe for ref in self.pipes):
            return
        self.pipes.append(PipeRef(pipe))
        self._patch_scheduler(getattr(pipe, "scheduler", None))
        if callable(getattr(pipe, "progress_bar", None)):
            self.patches.append(_ProgressBar(pipe, "progress_bar", self))
        self.current = PipeRef(pipe)
        self._prune()

    def _prune(self) -> None:
        """Forget pipelines that are gone, and unpatch schedulers no followed pipeline uses any more
        (a swapped-out scheduler, or that of a pipeline that is gone)."""
        self.pipes = [ref for ref in self.pipes if ref() is not None]
        used = {id(getattr(ref(), "scheduler", None)) for ref in self.pipes}
        keep = []
        for patch in self.patches:
            target = patch.target()
            if target is None or (patch.owner is not None and id(target) not in used):
                patch.remove()
            else:
                keep.append(patch)
        self.patches = keep

    def _patch_scheduler(self, scheduler: Any) -> bool:
        """Patch a scheduler (once); False when it is already followed or has nothing to follow."""
        if scheduler is None or not hasattr(scheduler, "set_timesteps") or self._follows(scheduler):
            return False
        self.patches.append(_SetTimesteps(scheduler, "set_timesteps", self))
        self.patches.append(_Step(scheduler, "step", self))
        return True

    def _follows(self, scheduler: Any) -> bool:
        return any(p.target() is scheduler for p in self.patches if isinstance(p, _Step))

    def detach(self) -> None:
        for patch in reversed(self.patches):
            patch.remove()
        self.patches.clear()
        self.pipes.clear()
        self.current = PipeRef(None)

    @property
    def driven(self) -> bool:
        return any(isinstance(p, _Step) for p in self.patches)

    def sync(self, pipe: Any) -> None:
        """`pipe` is running the denoiser: adopt it if it is new to the clock, and follow its scheduler
        if it was swapped. Either way the run is taken up where its scheduler stands."""
        self.current = PipeRef(pipe)
        known = any(ref() is pipe for ref in self.pipes)
        if known and self._follows(getattr(pipe, "scheduler", None)):
            return
        if known:
            self._patch_scheduler(pipe.scheduler)
            self._prune()
        else:
            self.attach(pipe)
        left, done = _position(pipe)
        self.new_run(left)
        self.step = done

    def locate(self, model: torch.nn.Module) -> None:
        """A denoiser call outside every denoising loop the clock knows: find the pipeline running it
        on the call stack (none: a bare call, the clock stays as it is)."""
        frame = sys._getframe(2)
        for _ in range(MAX_FRAMES):
            if frame is None:
                return
            owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
            if owner is not None and hasattr(owner, "scheduler") and hasattr(type(owner), "__weakref__") and \
                    any(unwrap(getattr(owner, attr, None)) is unwrap(model) for attr in DENOISER_ATTRS):
                self.sync(owner)
                return
            frame = frame.f_back

    # -- runs --------------------------------------------------------------------------------
    def begin_loop(self, pipe: Any, total: int | None) -> None:
        self.sync(pipe)
        steps = _loop_steps(pipe, total)
        if steps:
            self.num_steps = self.step + steps
        self.loops += 1

    def end_loop(self) -> None:
        self.loops = max(0, self.loops - 1)
        if not self.loops:
            self.end_run()

    def end_run(self) -> None:
        """Announce the end of the run (its last counted step is done, or its loop was left: both may
        come; the listeners release caches and warn once, so a second call changes nothing)."""
        for listener in self.on_run_end:
            listener()

    def new_run(self, num_steps: int | None) -> None:
        self.run += 1
        self.step = 0
        self.calls_in_step = 0
        self.num_steps = num_steps or self._fixed_steps


def _count(timesteps: Any) -> int | None:
    try:
        return len(timesteps) if timesteps is not None else None
    except TypeError:
        return None


def _loop_length(pipe: Any) -> int | None:
    """The timesteps a pipeline's denoising loop runs over (one scheduler step each), as most pipelines
    record them just before the loop (`_num_timesteps`: after img2img's strength and SDXL's
    denoising_start / denoising_end took their part, with PNDM's extra step and Heun's second
    evaluations counted)."""
    n = getattr(pipe, "_num_timesteps", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _position(pipe: Any) -> tuple[int | None, int]:
    """(steps of the pipeline's current run, steps already done), for a run taken up part-way: the loop's
    length, else the scheduler's timesteps after its begin index; done from its step index."""
    scheduler = getattr(pipe, "scheduler", None)
    begin = getattr(scheduler, "begin_index", None) or 0
    index = getattr(scheduler, "step_index", None)
    done = max(0, index - begin) if isinstance(index, int) else 0
    total = _count(getattr(scheduler, "timesteps", None))
    return _loop_length(pipe) or (total - begin if total else None), done


def _loop_steps(pipe: Any, total: int | None) -> int | None:
    """Scheduler steps of a denoising loop whose progress bar counts `total`: the loop's length where
    the pipeline records it; else `total`, but a second-order scheduler (Heun, DPM2) steps twice per
    counted step, except at its end."""
    if _loop_length(pipe):
        return _loop_length(pipe)
    if not total:
        return None
    scheduler = getattr(pipe, "scheduler", None)
    order = getattr(scheduler, "order", 1) or 1
    if order == 1:
        return total
    left, done = _position(pipe)
    return min(total * order, left - done) if left else total * order


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
    warned: set = field(repr=False, default_factory=set)  # warnings already given by this installation

    def warn_once(self, key: Any, message: str) -> None:
        """A UserWarning, given once per installation for each key."""
        _warn_once(self.warned, key, message)


def _warn_once(warned: set, key: Any, message: str) -> None:
    if key not in warned:
        warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


class Tracker:
    """One per denoiser: builds the Context of each call from the clock and the adapter."""

    def __init__(self, model: torch.nn.Module, adapter: Any, clock: RunClock, pipe: Any = None,
                 cfg_batched: bool | None = None):
        self.model = model
        self.cfg_override = cfg_batched
        self.adapter = adapter
        self.clock = clock
        self.pipe = PipeRef(pipe)
        self.ctx: Context | None = None
        self.last: Context | None = None
        self.log: dict[int, dict[str, tuple]] = {}  # step -> site -> (tokens, computed, keys/values)
        self.notes: dict[str, str] = {}  # site -> why a selected method did not act (last run)
        self.warned: set = set()
        # token methods in this run: those that changed some call, and why the others did not
        self.acted: set[str] = set()
        self.idle: dict[str, dict[str, int]] = {}  # method -> {reason: calls}
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
        clock.on_run_end.append(self.finish_run)

    def release(self) -> None:
        """Drop every cached output (at the end of each run, before a new one, and on removal)."""
        self.cache.clear()
        self.state.clear()
        self._cache_bytes = 0

    def finish_run(self) -> None:
        """The run's last step is done (or its loop was left): warn about a token method that acted
        on no call of the run, and release the caches."""
        for name, reasons in self.idle.items():
            if name in self.acted:
                continue
            why = max(reasons, key=reasons.get) if reasons else ""
            if why.startswith("cost model"):
                why = (f"at its default strength the cost model found no site where it saves time ({why}); "
                       f"an explicit strength acts anyway")
            _warn_once(self.warned, ("idle", name), f"{name} acted on no site in this run: "
                       f"{why or 'no call had image tokens it could locate'}; describe() says why per site")
        self.release()

    def record(self, method: MethodConfig, site: Site, acted: bool) -> None:
        """Whether a token method changed a call (and if not, why, from the site's note)."""
        if acted:
            self.acted.add(method.name)
        else:
            reasons = self.idle.setdefault(method.name, {})
            why = self.notes.get(site.name, "")
            reasons[why] = reasons.get(why, 0) + 1

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
            if not clock.loops:  # not inside a loop the clock knows: which pipeline is calling?
                clock.locate(self.model)
        else:
            clock.step = clock.calls_in_step if clock.run else 0
        pipe = clock.current() or self.pipe()
        if not clock.run:
            clock.new_run(_count(getattr(getattr(pipe, "scheduler", None), "timesteps", None)))
        geometry, batch = self.adapter.geometry(args, kwargs)
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
            self.acted, self.idle = set(), {}
        if self._cache_run != clock.run:  # a new run (or one after an interrupted run) starts empty
            self.release()
            self._cache_run, self.cache_peak_bytes = clock.run, 0
        self.block_inputs.clear()  # an interrupted call may have left some behind
        step = clock.step
        self.ctx = Context(clock.run, step, clock.num_steps, clock.calls_in_step, branch, self._cfg_batched,
                           self.adapter.cond_half, batch, geometry, self.log.setdefault(step, {}),
                           self.block_inputs, state=self.state, notes=self.notes, warned=self.warned)
        clock.calls_in_step += 1
        return None

    def post_hook(self, module, args, kwargs, output):
        self.last, self.ctx = self.ctx, None
        clock = self.clock
        if not clock.driven and clock.num_steps and self.last is not None and self.last.step + 1 >= clock.num_steps:
            self.finish_run()  # a bare denoiser's run ends with its last counted step
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
    entry; "compute" (and "recompute", inside a cycle) runs the call in full and stores its output.
    Token methods rewrite the call, and the post-hook restores the output. Methods may also ask for
    contexts the sub-layer's forward runs in (`SiteCall.arounds`: ToDo's pooling inside attention,
    the attention probes of token-wise caching)."""

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
        self._store: tuple | None = None  # (cache key, signature, step, until, input) to store this call's output under
        self.reuse_output: Any = None  # set for the forward wrapper when this call is skipped
        self.arounds: tuple = ()  # set for the forward wrapper: contexts the call runs in

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
        self._restores, self._store, self.reuse_output, self.arounds = None, None, None, ()
        ctx = self.tracker.ctx
        if ctx is None:
            return None
        params = self.update_params(ctx)
        if self._idle:
            return None
        site = self.site
        call = SiteCall(args, kwargs)
        n = call.hidden.shape[1]
        caching = None
        if self.caching is not None and params[self.caching] is not None:
            method, p = self.methods[self.caching], params[self.caching]
            cache_key = (ctx.branch, site.index)
            signature = (ctx.batch, ctx.geometry, tuple(call.hidden.shape))
            entry = self.tracker.cache.get(cache_key)
            if entry is not None and entry.signature != signature:
                entry = None
            plan = method.plan(site, ctx, p, entry, call) if entry is not None else "compute"
            if plan == "reuse":
                self.reuse_output = entry.output
                ctx.log[site.name] = (n, 0, 0)
                return None
            caching = (method, p, entry, plan)
            if plan != "partial":  # "recompute" runs in full inside a cycle: the entry keeps the cycle
                start, until = (entry.step, entry.until) if plan == "recompute" else \
                    (ctx.step, method.cycle_end(ctx, p))
                self._store = (cache_key, signature, start, until, call.hidden)
        for method, p in zip(self.methods, params):
            if p is not None and not method.caches:
                self.tracker.record(method, site, bool(method.act(site, ctx, p, call)))
        if caching is not None:
            method, p, entry, plan = caching
            if plan == "partial":
                method.refresh(site, ctx, p, entry, call)
            else:
                method.prepare_compute(site, ctx, p, call)
        ctx.log[site.name] = (n, call.hidden.shape[1], call.keys_values or n)
        self.arounds = tuple(call.arounds)
        self._restores = call.restores or None
        if call.reduced or call.keys_values is not None:
            return tuple(call.args), call.kwargs
        return None

    def post_hook(self, module, args, kwargs, output):
        restores, self._restores = self._restores, None
        self.arounds = ()
        if self.reuse_output is not None:
            self.reuse_output = None
            return None
        if restores:
            for restore in reversed(restores):
                output = restore(output)
        if self._store is not None:
            key, signature, step, until, hidden = self._store
            self._store = None
            entry = CacheEntry(output, step, signature, until)
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
        self.arounds: tuple = ()  # (SkippableForward's interface: blocks run in no context)
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


class SkippableForward:
    """Stands in for a module's `forward` (an instance attribute over the class's method) so that a
    call can return a cached output without running, or run inside contexts the methods set up;
    otherwise it calls the forward it replaced. `remove` puts back exactly what was there (another
    library's forward wrapper included)."""

    def __init__(self, module: torch.nn.Module, hook: SiteHook | BlockReuseHook):
        self.module, self.hook = module, hook
        self.had_previous = "forward" in module.__dict__
        self.previous = module.__dict__.get("forward")
        self.inner = module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        out = self.hook.reuse_output
        if out is not None:
            return out
        arounds = self.hook.arounds
        if arounds:
            with contextlib.ExitStack() as stack:
                for around in arounds:
                    stack.enter_context(around)
                return self.inner(*args, **kwargs)
        return self.inner(*args, **kwargs)

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            if self.had_previous:
                self.module.__dict__["forward"] = self.previous
            else:
                del self.module.__dict__["forward"]
