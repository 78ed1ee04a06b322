"""The runtime: one clock per pipeline (which run, which step), one tracker per denoiser (the context
of the current call: step, CFG layout, token geometry), and one hook per site that lets the methods
rewrite the sub-layer call and restores its output.

Step tracking is hook-based and universal: a forward pre-hook on the denoiser, and wrappers on the
scheduler's `set_timesteps` (a new run) and `step` (the next step). Methods never count steps.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffaccel.pipelines import DENOISER_ATTRS, unwrap

from .call import CacheEntry, CallRecord, Context, Plan, SiteCall, warn_once
from .methods.base import MethodConfig
from .parallel import (
    context_parallel,
    group_of,
    refusal_message,
    refusals,
    runs_under_context_parallelism,
    selects_tokens,
)
from .sites import Site

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
        else:
            clock.next_step()
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
        self.on_step: list = []  # called, outside the denoiser, before each step of a pipeline's loop

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
        self.next_step()

    def next_step(self) -> None:
        """A step of a pipeline's loop is about to begin (outside any denoiser call: where a compiled
        denoiser's decisions are made, see `Tracker.prepare`)."""
        for listener in self.on_step:
            listener()

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
        self.log: dict[int, dict[str, CallRecord]] = {}  # step -> site -> what its call did
        self.notes: dict[str, str] = {}  # site -> why a selected method did not act (last run)
        self.decisions: dict[int, dict] = {}  # step -> what adaptive caching decided there (last run)
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
        self.site_hooks: list[SiteHook] = []
        self.group = None  # context parallelism's process group (read at each run's first call)
        self.world = 1  # and how many processes hold a slice of the tokens
        self.block_hooks: list[BlockHook] = []
        self.frame: StepFrame | None = None  # a compiled denoiser's decisions for the coming step
        self.step_key = torch.zeros((), dtype=torch.int64)
        self.call_ctx: Context | None = None  # a compiled denoiser's next call: its context and programs
        self.site_programs: dict[int, SiteProgram | None] = {}
        self.block_programs: dict[str, tuple | None] = {}
        clock.on_run_end.append(self.finish_run)
        clock.on_step.append(self.prepare)

    def release(self) -> None:
        """Drop every cached output (at the end of each run, before a new one, and on removal)."""
        self.cache.clear()
        self.state.clear()
        self._cache_bytes = 0

    def finish_run(self) -> None:
        """The run's last step is done (or its loop was left): warn about a token method that acted
        on no call of the run, and release the caches."""
        self.settle()
        for name, reasons in self.idle.items():
            if name in self.acted:
                continue
            why = max(reasons, key=reasons.get) if reasons else ""
            if why.startswith("cost model"):
                why = (f"at its default strength the cost model found no site where it saves time ({why}); "
                       f"an explicit strength acts anyway")
            warn_once(self.warned, ("idle", name), f"{name} acted on no site in this run: "
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

    # -- a compiled denoiser -----------------------------------------------------------------
    def compiled(self) -> bool:
        """Whether the denoiser is compiled (`module.compile()`, or a pipeline holding its
        `torch.compile` wrapper)."""
        model = unwrap(self.model)
        if getattr(model, "_compiled_call_impl", None) is not None:
            return True
        pipe = self.clock.current() or self.pipe()
        return any(getattr(pipe, attr, None) is not model and unwrap(getattr(pipe, attr, None)) is model
                   for attr in DENOISER_ATTRS)

    def prepare(self) -> None:
        """Before a step of a pipeline's loop (outside the denoiser): when the denoiser is compiled,
        make every decision of the step here (each site's parameters and plan, for each CFG branch),
        so the traced hooks read only what the decisions are, never the step: the compiled graphs
        are one per distinct set of decisions, whatever the run's length."""
        self.settle()
        if not self.compiled():
            self.frame = None
            return
        for method in {h.methods[h.caching] for h in self.site_hooks if h.caching is not None}:
            if method.forecast != "reuse" or method.threshold is not None:
                warn_once(self.warned, ("compiled", method.name),
                          f"{method.name}: a compiled denoiser's steps are planned before they run, so its cached "
                          f"steps reuse the stored output on the static schedule: forecast={method.forecast!r} and "
                          f"threshold={method.threshold!r} act in eager runs only")
        clock = self.clock
        if self._log_run != clock.run:
            self._check_parallel()
            self.log, self.notes, self._log_run = {}, {}, clock.run
            self.decisions = {}
            self.acted, self.idle = set(), {}
        if self._cache_run != clock.run:
            self.release()
            self._cache_run, self.cache_peak_bytes = clock.run, 0
        pipe = clock.current() or self.pipe()
        local = _loop_locals(pipe)
        self.adapter.prepare_compiled(local)
        batched = self.cfg_override if self.cfg_override is not None else \
            self.adapter.cfg_layout == "batched" and _guidance(pipe, local)
        branches = ("cond_uncond",) if batched else ("cond", "uncond") if self.adapter.cfg_layout == "separate" \
            else ("cond",)
        frame = StepFrame()
        self.step_key.fill_(clock.step)
        for branch in branches:  # (each branch logs apart, and keeps its own per-run state)
            state = self.state.setdefault(("branch", branch), {})
            ctx = Context(clock.run, clock.step, clock.num_steps, 0, branch, batched, self.adapter.cond_half, 0, None,
                          {}, self.block_inputs, state=state, notes=self.notes, warned=self.warned,
                          step_key=self.step_key, state_branch="", group=self.group, world=self.world)
            frame.contexts[branch] = ctx
            frame.sites[branch] = {hook.site.index: hook.program(ctx) for hook in self.site_hooks}
            frame.blocks[branch] = {hook.name: hook.program(ctx) for hook in self.block_hooks}
        for i, branch in enumerate(branches):  # separate CFG calls alternate: what the call after each runs
            after = branches[(i + 1) % len(branches)]
            frame.contexts[branch].after = (frame.contexts[after], frame.sites[after], frame.blocks[after])
        self.frame = frame
        self._select(branches[0])

    def settle(self) -> None:
        """Account, outside the denoiser, for what the compiled calls of the last step did: which
        token methods acted, and the cache's size."""
        frame, self.frame, self.call_ctx = self.frame, None, None
        if frame is None:
            return
        acted_at = {}
        for ctx in frame.contexts.values():
            if ctx.log:
                self.log.setdefault(ctx.step, {}).update(ctx.log)
            if ctx.notes is not self.notes:
                self.notes.update(ctx.notes)
            acted_at.update(ctx.acted)
        for (method, site), acted in acted_at.items():
            if acted:
                self.acted.add(method)
            else:
                reasons = self.idle.setdefault(method, {})
                why = self.notes.get(site, "")
                reasons[why] = reasons.get(why, 0) + 1
        self._cache_bytes = sum(_entry_bytes(e) for e in self.cache.values() if e.output is not None)
        self.cache_peak_bytes = max(self.cache_peak_bytes, self._cache_bytes)

    def _select(self, branch: str) -> None:
        """The branch the next compiled call runs: set before that call's frame starts (by `prepare`, or
        as a side effect of the previous call), since a compiled frame's guards read these values at
        its entry, before anything the frame itself assigns."""
        frame = self.frame
        self.call_ctx, self.site_programs, self.block_programs = \
            frame.contexts[branch], frame.sites[branch], frame.blocks[branch]

    def _compiled_pre_hook(self, args, kwargs):
        """The traced pre-hook: the call's context, prepared outside the denoiser."""
        ctx = self.call_ctx
        ctx.geometry, ctx.batch = self.adapter.geometry(args, kwargs)
        # new, not cleared: the graph never depends on what they held (settle gathers them)
        ctx.log, ctx.shared, ctx.notes, ctx.acted = {}, {}, {}, {}
        self.block_inputs.clear()
        self.ctx = ctx
        return None

    def pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling() and self.call_ctx is not None:
            return self._compiled_pre_hook(args, kwargs)
        clock = self.clock
        host_step = self.adapter.host_step(args, kwargs)
        if host_step is not None:  # the program running the denoiser says which step this is
            if host_step != clock.step:
                clock.step, clock.calls_in_step = host_step, 0
        elif clock.driven:
            if not clock.loops:  # not inside a loop the clock knows: which pipeline is calling?
                clock.locate(self.model)
        else:
            clock.step = clock.calls_in_step if clock.run else 0
        pipe = clock.current() or self.pipe()
        if not clock.run:
            clock.new_run(_count(getattr(getattr(pipe, "scheduler", None), "timesteps", None)))
        geometry, batch = self.adapter.geometry(args, kwargs)
        key = (clock.run, batch)
        cond_half = self.adapter.cond_half
        host = self.adapter.host_branch(args, kwargs, batch)
        if host is not None:  # the call says it (a host that batches branches as it sees fit)
            branch, self._cfg_batched, cond_half = host
            self._cfg_run = None
        else:
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
            self._check_parallel()
            self.log, self.notes, self._log_run = {}, {}, clock.run
            self.decisions = {}
            self.acted, self.idle = set(), {}
        if self._cache_run != clock.run:  # a new run (or one after an interrupted run) starts empty
            self.release()
            self._cache_run, self.cache_peak_bytes = clock.run, 0
        self.block_inputs.clear()  # an interrupted call may have left some behind
        step = clock.step
        self.ctx = Context(clock.run, step, clock.num_steps, clock.calls_in_step, branch, self._cfg_batched,
                           cond_half, batch, geometry, self.log.setdefault(step, {}),
                           self.block_inputs, state=self.state, notes=self.notes, warned=self.warned,
                           decisions=self.decisions, group=self.group, world=self.world)
        clock.calls_in_step += 1
        return None

    def _check_parallel(self) -> None:
        """At each run's first call: the process group of context parallelism enabled on the denoiser
        (after acceleration too), and a clear error where a method placed on it cannot run there."""
        cp = context_parallel(self.model)
        self.group = group_of(cp) if cp is not None else None
        self.world = cp._flattened_mesh.size() if cp is not None else 1
        if cp is None:
            return
        placed = list(dict.fromkeys(m for h in self.site_hooks for m in h.methods))
        refused = refusals(placed, cp)
        compiled = self.compiled()
        if compiled:  # (token selections made before the step, per slice: not done)
            refused += [(m.name, "under torch.compile, its token selections are not done with context parallelism "
                         "(an eager denoiser runs it)") for m in placed if selects_tokens(m)
                        if m.name not in dict(refused)]
        if refused:
            raise RuntimeError(refusal_message(refused, runs_under_context_parallelism(cp, compiled)) + "; call "
                               "remove_acceleration(pipe) and accelerate it with one of those")

    def post_hook(self, module, args, kwargs, output):
        ctx, self.last, self.ctx = self.ctx, self.ctx, None
        if torch.compiler.is_compiling() and self.call_ctx is not None:
            if ctx is not None:  # separate CFG branches alternate: the next call is the other one
                self.call_ctx, self.site_programs, self.block_programs = ctx.after
            return None
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


def _copy(output: Any) -> Any:
    """A block output (a tensor, or a tuple of them) with its tensors copied."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_copy(o) for o in output)
    return output


def _hidden_states(args: tuple, kwargs: dict, name: str = "hidden_states") -> Any:
    """A block's hidden-state input, passed by position or by keyword (`name`: as the family calls it)."""
    return args[0] if args else kwargs.get(name)


class StepFrame:
    """The decisions of one step of a compiled denoiser, made outside it by `Tracker.prepare`: per CFG
    branch a context, each site's program and each skippable block's."""

    def __init__(self):
        self.contexts: dict[str, Context] = {}
        self.sites: dict[str, dict[int, SiteProgram]] = {}
        self.blocks: dict[str, dict[str, tuple | None]] = {}


@dataclass
class SiteProgram:
    """One site's decisions for a step of a compiled denoiser: each method's parameters (None: idle),
    the caching method's plan, and the cache entry it reads or fills."""

    params: list
    choice: str | None = None  # the plan's value (a string: a compiled graph guards its value exactly)
    entry: CacheEntry | None = None


PLANS = {plan.value: plan for plan in Plan}


def _loop_locals(pipe: Any) -> dict:
    """The local variables of the pipeline call running the denoising loop (empty when none is on
    the stack): what a compiled denoiser's step is prepared from, beside the pipeline's attributes."""
    frame = sys._getframe(1)
    for _ in range(MAX_FRAMES):
        if frame is None:
            break
        if pipe is not None and frame.f_locals.get("self") is pipe:
            return frame.f_locals
        frame = frame.f_back
    return {}


def _guidance(pipe: Any, local: dict) -> bool:
    """Whether a pipeline's run uses batched classifier-free guidance, asked outside the denoiser:
    its `do_classifier_free_guidance`, else its denoising loop's local of that name."""
    if pipe is None:
        return False
    try:
        return bool(pipe.do_classifier_free_guidance)
    except (AttributeError, TypeError):
        return bool(local.get("do_classifier_free_guidance", False))


# -- hooks ------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What a hook decided before one call of its module: run the forward with these arguments inside
    these contexts, or skip it and hand back `output`; after the call, `finish` turns the output into
    what the caller gets (restores, storing into a cache)."""

    args: tuple
    kwargs: dict
    skip: bool = False
    output: Any = None
    arounds: tuple = ()
    finish: Callable[[Any], Any] | None = None
    same: bool = False  # the arguments are those the call came with


class Hook:
    """One object per hooked module, shaped like diffusers' ModelHook: `pre_forward` decides what a
    call does (None: run it as it came; a `Prepared`: run it with other arguments, inside contexts, or
    skip it), the forward runs or is skipped, `post_forward` finishes the output, `reset_state`
    forgets per-run state.

    `attach` plugs it in with torch's forward pre- and post-hooks (so other hooks on the module see
    the arguments and outputs as before; a pre-hook registered after ours sees the reduced call) and
    a `HookedForward` that runs or skips the forward. The decision travels from the pre-hook to the
    forward and the post-hook in `_pending`, the only per-call state, set and cleared by the hook itself."""

    _pending: Prepared | None = None

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Prepared | None:
        return None

    def post_forward(self, module: torch.nn.Module, prepared: Prepared, output: Any) -> Any:
        return prepared.finish(output) if prepared.finish is not None else output

    def reset_state(self) -> None:
        self._pending = None

    # -- plumbing, the same for every hook ---------------------------------------------------------
    def attach(self, module: torch.nn.Module) -> list:
        """Hook `module`; the handles to remove, in order (removal goes in reverse)."""
        return [module.register_forward_pre_hook(self._torch_pre, with_kwargs=True),
                HookedForward(module, self),
                module.register_forward_hook(self._torch_post, with_kwargs=True)]

    def _torch_pre(self, module, args, kwargs):
        prepared = self._pending = self.pre_forward(module, args, kwargs)
        if prepared is None or prepared.skip or prepared.same:
            return None  # the call runs with the arguments it came with
        return tuple(prepared.args), prepared.kwargs

    def run_forward(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        prepared = self._pending
        if prepared is None:
            return forward(*args, **kwargs)
        if prepared.skip:
            return prepared.output
        if prepared.arounds:
            return _within(prepared.arounds, forward, args, kwargs)
        return forward(*args, **kwargs)

    def _torch_post(self, module, args, kwargs, output):
        prepared, self._pending = self._pending, None
        if prepared is None or prepared.skip:
            return None
        return self.post_forward(module, prepared, output)


def _within(arounds: tuple, forward: Callable, args: tuple, kwargs: dict) -> Any:
    """forward(*args, **kwargs) inside the context managers, entered in order (nested `with`s, which
    a compiler traces)."""
    if not arounds:
        return forward(*args, **kwargs)
    with arounds[0]:
        return _within(arounds[1:], forward, args, kwargs)


class HookedForward:
    """Stands in for a module's `forward` (an instance attribute over the class's method) and lets the
    module's hook run or skip the forward it replaced. An object rather than a closure, so that a deep
    copy of the model gets hooks of its own.

    Order-safe with other libraries' forward wrappers: ours may sit inside or outside theirs
    (diffusers' HookRegistry: enable_cache, group offloading; accelerate's hooks). `remove` puts back
    exactly what was there when ours is outermost; when another wrapper was added after ours, it
    relinks that wrapper's reference to our inner forward where it can find it (diffusers' and
    accelerate's hook records) and otherwise leaves ours in place as a pass-through."""

    def __init__(self, module: torch.nn.Module, hook: Hook):
        self.module, self.hook = module, hook
        self.had_previous = "forward" in module.__dict__
        self.previous = module.__dict__.get("forward")
        self.inner = module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        hook = self.hook
        if hook is None:
            return self.inner(*args, **kwargs)
        return hook.run_forward(self.inner, args, kwargs)

    def remove(self) -> None:
        self.hook = None
        d = self.module.__dict__
        if d.get("forward") is self:
            if self.had_previous:
                d["forward"] = self.previous
            else:
                del d["forward"]
            return
        registry = d.get("_diffusers_hook")  # diffusers' HookRegistry, added after ours
        for ref in getattr(registry, "_fn_refs", ()):
            if getattr(ref, "forward", None) is self:
                ref.forward = self.inner
            if getattr(ref, "original_forward", None) is self:
                ref.original_forward = self.inner
        if d.get("_old_forward") is self:  # accelerate's add_hook_to_module, added after ours
            d["_old_forward"] = self.inner


@dataclass
class _Store:
    """A full output to store once the call ran: under `key`, for calls of `signature`, its cycle
    begun at `step` and ending at `until`; `hidden` is the call's input (for the method's extras)."""

    key: tuple
    signature: tuple
    step: int
    until: int | None
    hidden: torch.Tensor


class SiteHook(Hook):
    """The hook of one site: runs the methods installed there, in order, on each call.

    A caching method plans each call against its cache entry: REUSE skips the forward and returns the
    cached output (no other method acts); PARTIAL lets the method rewrite the call to a subset of
    tokens whose outputs it writes into the entry; COMPUTE (and RECOMPUTE, inside a cycle) runs the
    call in full and stores its output. Token methods rewrite the call (fewer query tokens, pooled
    keys and values, contexts the forward runs in: `SiteCall.arounds`), and their restores give the
    output back its full length."""

    def __init__(self, site: Site, tracker: Tracker, methods: list[MethodConfig]):
        self.site = site
        self.tracker = tracker
        self.methods = sorted(methods, key=lambda m: m.priority)
        self.policies = [m.effective_policy() for m in self.methods]
        self.caching = next((i for i, m in enumerate(self.methods) if m.caches), None)
        self._params_key: tuple | None = None
        self._params: list[dict | None] = []
        self._idle = True
        tracker.site_hooks.append(self)

    def params_at(self, step: int, num_steps: int | None) -> list[dict | None]:
        return [m.resolve(p.evaluate(self.site, step, num_steps)) for m, p in zip(self.methods, self.policies)]

    def update_params(self, ctx: Context) -> list[dict | None]:
        """Each method's parameters at this call's step (evaluated once per step)."""
        key = (ctx.run, ctx.step, ctx.num_steps)
        if key != self._params_key:
            self._params_key, self._params = key, self.params_at(ctx.step, ctx.num_steps)
            self._idle = all(p is None for p in self._params)
        return self._params

    def program(self, ctx: Context) -> SiteProgram | None:
        """This site's decisions for a step of a compiled denoiser (made outside it): None when every
        method rests. A full computation gets its cache entry here, filled by the traced call."""
        params = self.update_params(ctx)
        if self._idle:
            return None
        prog = SiteProgram(list(params))
        if self.caching is not None and params[self.caching] is not None:
            method, p = self.methods[self.caching], params[self.caching]
            key = (ctx.branch, self.site.index)
            entry = self.tracker.cache.get(key)
            if entry is not None and entry.output is None:
                entry = None
            plan = method.plan(self.site, ctx, p, entry, None) if entry is not None else Plan.COMPUTE
            if plan == Plan.COMPUTE:
                entry = CacheEntry(None, ctx.step, None, method.cycle_end(ctx, p))
                self.tracker.cache[key] = entry
            prog.params[self.caching] = method.compiled_params(self.site, ctx, p, entry, plan)
            prog.choice, prog.entry = plan.value, entry
        return prog

    def pre_forward(self, module, args, kwargs) -> Prepared | None:
        ctx = self.tracker.ctx
        if ctx is None:
            return None
        if torch.compiler.is_compiling() and self.tracker.call_ctx is not None:
            return self._compiled_pre_forward(ctx, args, kwargs)
        params = self.update_params(ctx)
        if self._idle:
            return None
        site = self.site
        call = SiteCall(args, kwargs)
        n = call.hidden.shape[1]
        caching, store = None, None
        if self.caching is not None and params[self.caching] is not None:
            method, p = self.methods[self.caching], params[self.caching]
            key = (ctx.branch, site.index)
            signature = (ctx.batch, ctx.geometry, tuple(call.hidden.shape))
            method.begin_call(site, ctx, p, call)
            entry = self.tracker.cache.get(key)
            if entry is not None and entry.signature != signature:
                entry = None
            plan = method.plan(site, ctx, p, entry, call) if entry is not None else Plan.COMPUTE
            if plan == Plan.REUSE:
                ctx.log[site.name] = CallRecord(n, 0, 0)
                return Prepared(args, kwargs, skip=True, output=method.serve(site, ctx, p, entry))
            caching = (method, p, entry, plan)
            if plan != Plan.PARTIAL:  # RECOMPUTE runs in full inside a cycle: the entry keeps the cycle
                start, until = (entry.step, entry.until) if plan == Plan.RECOMPUTE else \
                    (ctx.step, method.cycle_end(ctx, p))
                store = _Store(key, signature, start, until, call.hidden)
        for method, p in zip(self.methods, params):
            if p is not None and not method.caches:
                self.tracker.record(method, site, bool(method.act(site, ctx, p, call)))
        if caching is not None:
            method, p, entry, plan = caching
            if plan == Plan.PARTIAL:
                method.refresh(site, ctx, p, entry, call)
            else:
                method.prepare_compute(site, ctx, p, call)
        ctx.log[site.name] = CallRecord(n, call.hidden.shape[1], call.keys_values or n)
        restores = tuple(call.restores)
        if not (restores or store or call.arounds or call.changed):
            return None

        def finish(output):
            for restore in reversed(restores):
                output = restore(output)
            if store is not None:
                self._store(ctx, store, output)
            return output

        return Prepared(tuple(call.args), call.kwargs, arounds=tuple(call.arounds), finish=finish)

    def _compiled_pre_forward(self, ctx: Context, args: tuple, kwargs: dict) -> Prepared | None:
        """`pre_forward` as traced in a compiled denoiser: the decisions come from the step's program."""
        prog = self.tracker.site_programs.get(self.site.index)
        if prog is None:
            return None
        site, params = self.site, prog.params
        call = SiteCall(args, kwargs)
        n = call.hidden.shape[1]
        plan, entry = PLANS.get(prog.choice), prog.entry
        if plan is not None:
            plan = self.methods[self.caching].traced_plan(site, ctx, params[self.caching], entry, call, plan)
        if plan == Plan.REUSE:  # (compiled: the stored output; forecasts fall back to it, with a warning)
            ctx.log[site.name] = CallRecord(n, 0, 0)
            return Prepared(args, kwargs, skip=True, output=entry.output)
        for method, p in zip(self.methods, params):
            if p is not None and not method.caches:
                ctx.acted[(method.name, site.name)] = bool(method.act(site, ctx, p, call))
        store = plan in (Plan.COMPUTE, Plan.RECOMPUTE)
        if plan is not None:
            method, p = self.methods[self.caching], params[self.caching]
            if plan == Plan.PARTIAL:
                method.refresh(site, ctx, p, entry, call)
            else:
                method.prepare_compute(site, ctx, p, call)
        ctx.log[site.name] = CallRecord(n, call.hidden.shape[1], call.keys_values or n)
        restores = tuple(call.restores)
        hidden = call.hidden if not call.changed else SiteCall(args, kwargs).hidden
        signature = (ctx.batch, ctx.geometry, tuple(hidden.shape))

        def finish(output):
            for restore in reversed(restores):
                output = restore(output)
            if store:
                entry.output, entry.signature = output, signature
                self.methods[self.caching].init_entry(site, ctx, params[self.caching], entry, hidden)
            return output

        return Prepared(tuple(call.args), call.kwargs, arounds=tuple(call.arounds), finish=finish,
                        same=not (len(restores) or store or len(call.arounds) or call.changed))

    def _store(self, ctx: Context, store: _Store, output: Any) -> None:
        entry = CacheEntry(output, store.step, store.signature, store.until)
        method = self.methods[self.caching]
        params = self._params[self.caching]
        method.init_entry(self.site, ctx, params, entry, store.hidden)
        previous = self.tracker.cache.get(store.key)
        method.stored(ctx, params, entry, previous if previous is not None and previous.signature == store.signature
                      else None)
        self.tracker.store(store.key, entry)


class BlockHook(Hook):
    """The hook of one block: records its hidden-state input for the methods that measure similarity
    on it (ToMe's and SiTo's metric="block"), and, where every site of the block hosts a caching
    method that may skip whole blocks (DuCa's aggressive steps), stores the block's output whenever it
    runs and, on a step where every site's method says the block may be skipped, returns that output
    without running it (its modulation, norms and residual additions included)."""

    def __init__(self, name: str, tracker: Tracker, records_input: bool, site_hooks: list[SiteHook]):
        self.name = name
        self.tracker = tracker
        self.records_input = records_input
        self.site_hooks = site_hooks  # empty: the block is never skipped whole
        tracker.block_hooks.append(self)

    def program(self, ctx: Context) -> tuple | None:
        """For a compiled denoiser, decided outside it: ("skip", entry) or ("store", key) or None."""
        if not self.site_hooks:
            return None
        plans = []
        for hook in self.site_hooks:
            params = hook.update_params(ctx)[hook.caching]
            if params is None:
                return None
            plans.append((hook, params))
        key = (ctx.branch, self.name)
        stored = self.tracker.cache.get(key)
        if stored is not None and stored.output is not None:
            records = []
            for hook, params in plans:
                entry = self.tracker.cache.get((ctx.branch, hook.site.index))
                if entry is None or entry.output is None or not hook.methods[hook.caching].skips_block(ctx, params, entry):
                    break
                records.append((hook.site.name, entry.signature[2][1]))
            else:
                return ("skip", stored, tuple(records))
        entry = self.tracker.cache[key] = CacheEntry(None, ctx.step, None)
        return ("store", entry)

    def pre_forward(self, module, args, kwargs) -> Prepared | None:
        ctx = self.tracker.ctx
        if ctx is None:
            return None
        hidden = _hidden_states(args, kwargs, self.tracker.adapter.block_input)
        if self.records_input:
            self.tracker.block_inputs[self.name] = hidden
        if torch.compiler.is_compiling() and self.tracker.call_ctx is not None:
            store = self._compiled_plan(ctx, hidden)
        else:
            store = self._reuse_plan(ctx, hidden) if self.site_hooks else None
        if isinstance(store, Prepared):
            self.tracker.block_inputs.pop(self.name, None)
            return store

        def finish(output):
            self.tracker.block_inputs.pop(self.name, None)
            if store is not None:
                target, signature = store
                kept = _copy(output) if self.tracker.adapter.inplace_blocks else output
                if isinstance(target, CacheEntry):  # a compiled denoiser's: prepared outside
                    target.output, target.signature = kept, signature
                else:
                    self.tracker.store(target, CacheEntry(kept, ctx.step, signature))
            return output

        return Prepared(args, kwargs, finish=finish, same=True)

    def _compiled_plan(self, ctx: Context, hidden: Any) -> Prepared | tuple | None:
        prog = self.tracker.block_programs.get(self.name)
        if prog is None or not isinstance(hidden, torch.Tensor):
            return None
        if prog[0] == "store":
            return prog[1], (ctx.batch, ctx.geometry, tuple(hidden.shape))
        stored = prog[1]
        for name, tokens in prog[2]:
            ctx.log[name] = CallRecord(tokens, 0, 0)
        out = _copy(stored.output) if self.tracker.adapter.inplace_blocks else stored.output
        return Prepared((), {}, skip=True, output=out)

    def _reuse_plan(self, ctx: Context, hidden: Any) -> Prepared | tuple | None:
        """A skip of the block (Prepared), the (key, signature) its output is stored under, or None."""
        if not isinstance(hidden, torch.Tensor):
            return None
        plans = []
        for hook in self.site_hooks:
            params = hook.update_params(ctx)[hook.caching]
            if params is None:
                return None  # the method rests at this step: the sub-layers decide for themselves
            plans.append((hook, params))
        first, params = plans[0]  # adaptive steps: a step that starts here is decided here
        first.methods[first.caching].observe(ctx, params, hidden)
        key = (ctx.branch, self.name)
        signature = (ctx.batch, ctx.geometry, tuple(hidden.shape))
        stored = self.tracker.cache.get(key)
        if stored is None or stored.signature != signature:
            return key, signature
        entries = []
        for hook, params in plans:
            entry = self.tracker.cache.get((ctx.branch, hook.site.index))
            if entry is None or entry.signature[:2] != signature[:2] or \
                    not hook.methods[hook.caching].skips_block(ctx, params, entry):
                return key, signature
            entries.append(entry)
        for hook, entry in zip(self.site_hooks, entries):
            ctx.log[hook.site.name] = CallRecord(entry.signature[2][1], 0, 0)
        out = _copy(stored.output) if self.tracker.adapter.inplace_blocks else stored.output
        return Prepared((), {}, skip=True, output=out)
