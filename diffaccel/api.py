"""The public verbs: accelerate_pipeline, remove_acceleration, is_accelerated, reset."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.pipelines import (
    DENOISER_ATTRS,
    Adapter,
    UnsupportedModelError,
    adapter_for,
    supported_families,
    unwrap,
)

from .methods.base import MethodConfig, available_methods, method_class, unknown_option
from .parallel import context_parallel, refusal_message, refusals, runs_under_context_parallelism
from .runtime import BlockHook, PipeRef, RunClock, SiteHook, Tracker
from .sites import Site

STATE_ATTR = "_diffaccel"


@dataclass
class DenoiserState:
    attr: str
    model: torch.nn.Module
    adapter: Adapter
    sites: list[Site]
    placements: dict[int, list[MethodConfig]]  # site index -> methods acting there
    tracker: Tracker | None = None
    hooks: list[SiteHook] = field(default_factory=list)
    block_hooks: list[BlockHook] = field(default_factory=list)
    handles: list = field(default_factory=list)  # what removal undoes, in reverse order

    @property
    def skippable_blocks(self) -> list[str]:
        """Blocks a caching method may skip whole."""
        return [h.name for h in self.block_hooks if h.site_hooks]


@dataclass
class Installation:
    methods: list[MethodConfig]
    clock: RunClock
    denoisers: list[DenoiserState]
    # the accelerated pipeline, weakly (a copy of a denoiser alone does not copy its pipeline)
    pipe: PipeRef = field(default_factory=lambda: PipeRef(None))
    cfg_batched: bool | None = None  # bare denoisers: whether calls carry [uncond, cond] halves


# ---------------------------------------------------------------------------------------------
# configs


def _config_from(obj: Any) -> MethodConfig:
    if isinstance(obj, MethodConfig):
        return obj
    if isinstance(obj, str):
        return method_class(obj)()
    if isinstance(obj, dict):
        return MethodConfig.from_dict(obj)
    raise TypeError(f"a method is a registered name, a config object, a dict or a list of them; "
                    f"got {type(obj).__name__}")


def resolve_methods(method: Any, overrides: dict) -> list[MethodConfig]:
    """Method spec + keyword overrides -> validated configs. Raises before anything is changed."""
    items = list(method) if isinstance(method, (list, tuple)) else [method]
    if not items:
        raise ValueError("no method given; available: " + ", ".join(available_methods()))
    configs = [_config_from(m) for m in items]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"each method may be given once, got {names}")
    given: dict[int, dict] = {}
    for key, value in overrides.items():
        owners = [i for i, c in enumerate(configs) if key in c.option_names()]
        if not owners:
            raise unknown_option(key, configs)
        if len(owners) > 1:
            raise ValueError(f"option {key!r} fits several methods ({[names[i] for i in owners]}); "
                             f"pass config objects instead")
        given.setdefault(owners[0], {})[key] = value
    for i, options in given.items():  # together: options may only be valid in combination
        configs[i] = configs[i].with_options(**options)
    return configs


# ---------------------------------------------------------------------------------------------
# planning and installing


def _denoisers(target: Any) -> tuple[list[tuple[str, torch.nn.Module]], Any]:
    """The denoiser modules of a pipeline (or the module itself), and the pipeline (or None)."""
    if isinstance(target, torch.nn.Module):
        return [("model", target)], None
    found = [(a, getattr(target, a, None)) for a in DENOISER_ATTRS]
    found = [(a, m) for a, m in found if isinstance(m, torch.nn.Module)]
    if not found:
        raise UnsupportedModelError(
            f"{type(target).__name__} has no denoiser ({', '.join(DENOISER_ATTRS)}); pass a diffusers pipeline or "
            f"its unet/transformer. Supported families: {', '.join(supported_families())}")
    return found, target


def _plan(model: torch.nn.Module, attr: str, configs: list[MethodConfig]) -> DenoiserState:
    adapter = adapter_for(model)
    sites = adapter.sites
    placements: dict[int, list[MethodConfig]] = {}
    for site in sites:
        here = [m for m in configs if m.unsupported(site) is None and m.effective_policy().selects(site)]
        reducers = [m.name for m in here if m.reduces_tokens]
        if len(reducers) > 1:
            raise ValueError(f"{' and '.join(reducers)} would both reduce the tokens of {site.name}; "
                             f"give them disjoint sites with their policies, or use one of them")
        cachers = [m.name for m in here if m.caches]
        if len(cachers) > 1:
            raise ValueError(f"{' and '.join(cachers)} would both cache the outputs of {site.name}; "
                             f"give them disjoint sites with their policies, or use one of them")
        for m in here:
            why = m.conflict(site, [o for o in here if o is not m])
            if why:
                raise ValueError(f"{why}; give them disjoint sites with their policies, or use one of them")
        if here:
            placements[site.index] = here
    return DenoiserState(attr, model, adapter, sites, placements)


def _warn_idle(configs: list[MethodConfig], states: list[DenoiserState]) -> None:
    for m in configs:
        if any(m in ms for st in states for ms in st.placements.values()):
            continue
        reasons = sorted({r for st in states for s in st.sites
                          if m.effective_policy().selects(s) and (r := m.unsupported(s))})
        levels = sorted({s.level for st in states for s in st.sites if m.unsupported(s) is None})
        family = "/".join(dict.fromkeys(st.adapter.variant() for st in states))
        why = "; ".join(reasons) if reasons else (
            f"its policy selects no site it can act on (levels with such sites: {levels})")
        warnings.warn(f"{m.name} acts on no site of this {family} model: {why}", UserWarning, stacklevel=3)


def accelerate_pipeline(pipe: Any, method: Any, **overrides: Any) -> Any:
    """Patch a diffusers pipeline (or a bare unet/transformer) in place with one or more methods.

    `method` is a registered name ("tome", "todo", "sito", "fora", "toca", "duca"), a config object, a
    dict with a "method" key, or a list of them to compose. Keyword overrides set config fields, e.g. ratio=0.6. For a bare
    denoiser, `num_steps=` tells the step count that schedules are laid over, and `cfg_batched=True`
    that its calls carry [uncond, cond] halves (which then share one token selection). Returns `pipe`.
    Nothing is changed when an error is raised.
    """
    num_steps = overrides.pop("num_steps", None)
    cfg_batched = overrides.pop("cfg_batched", None)
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if cfg_batched is not None and not isinstance(cfg_batched, bool):
        raise TypeError(f"cfg_batched must be True or False, got {cfg_batched!r}")
    configs = resolve_methods(method, overrides)
    members, pipeline = _denoisers(pipe)
    if pipeline is not None and cfg_batched is not None:
        raise ValueError("cfg_batched is for bare denoisers; pipelines report their guidance layout themselves")
    for target in [pipe] + [m for _, m in members]:
        if installation(target) is not None:
            raise RuntimeError("this pipeline is already accelerated; call remove_acceleration(pipe) first, "
                               "or pass a list of methods to compose them")
    for _, model in members:
        cp = context_parallel(model)
        refused = refusals(configs, cp) if cp is not None else []
        if refused:
            raise ValueError(refusal_message(refused, runs_under_context_parallelism(cp)))
    states = [_plan(model, attr, configs) for attr, model in members]
    _warn_idle(configs, states)

    inst = Installation(configs, RunClock(num_steps), states, PipeRef(pipeline), cfg_batched)
    try:
        for st in states:
            _install(st, inst)
        if pipeline is not None:
            inst.clock.attach(pipeline)
            setattr(pipeline, STATE_ATTR, inst)
    except BaseException:
        _uninstall(inst)
        raise
    return pipe


def _install(st: DenoiserState, inst: Installation) -> None:
    st.tracker = Tracker(st.model, st.adapter, inst.clock, inst.pipe(), inst.cfg_batched)
    st.handles.append(st.model.register_forward_pre_hook(st.tracker.pre_hook, with_kwargs=True))
    st.handles.append(st.model.register_forward_hook(st.tracker.post_hook, with_kwargs=True))
    records_input = set()
    for site in st.sites:
        methods = st.placements.get(site.index)
        if not methods:
            continue
        hook = SiteHook(site, st.tracker, methods)
        st.hooks.append(hook)
        st.handles.extend(hook.attach(site.module))
        if any(m.needs_block_input() for m in methods):
            records_input.add(site.block)
    skippable = _skippable_blocks(st)
    for name in sorted(records_input | set(skippable)):
        block_hook = BlockHook(name, st.tracker, name in records_input, skippable.get(name, []))
        st.block_hooks.append(block_hook)
        st.handles.extend(block_hook.attach(st.model.get_submodule(name)))
    unwrap(st.model).__dict__[STATE_ATTR] = inst  # (a compile wrapper forwards attributes to the module)


def _skippable_blocks(st: DenoiserState) -> dict[str, list[SiteHook]]:
    """Blocks whose every site hosts a caching method that may skip whole blocks, with those sites'
    hooks (a block with a site its policy leaves out keeps running: that site is computed as usual)."""
    by_block: dict[str, list] = {}
    for site in st.sites:
        by_block.setdefault(site.block, []).append(site)
    hooks = {hook.site.index: hook for hook in st.hooks}
    out = {}
    for name, sites in by_block.items():
        hosted = [hooks.get(site.index) for site in sites]
        if all(h is not None and h.caching is not None and h.methods[h.caching].reuses_blocks() for h in hosted):
            out[name] = hosted
    return out


def _uninstall(inst: Installation) -> None:
    for st in inst.denoisers:
        for h in reversed(st.handles):
            h.remove()
        st.handles.clear()
        if st.tracker is not None:
            st.tracker.release()
        for hook in st.hooks + st.block_hooks:
            hook.reset_state()  # (no decision of an interrupted call is kept)
        st.hooks.clear()
        st.block_hooks.clear()
        unwrap(st.model).__dict__.pop(STATE_ATTR, None)
    inst.clock.detach()
    pipe = inst.pipe()
    if pipe is not None:
        pipe.__dict__.pop(STATE_ATTR, None)


def installation(pipe: Any) -> Installation | None:
    """The acceleration of a pipeline or denoiser: the pipeline's own, or (for a pipeline sharing an
    accelerated denoiser, e.g. made with `from_pipe`) its denoisers'."""
    if isinstance(pipe, torch.nn.Module):
        return unwrap(pipe).__dict__.get(STATE_ATTR)
    inst = pipe.__dict__.get(STATE_ATTR) if hasattr(pipe, "__dict__") else None
    if inst is None:
        denoisers = [m for a in DENOISER_ATTRS if isinstance(m := getattr(pipe, a, None), torch.nn.Module)]
        inst = next((i for m in denoisers if (i := unwrap(m).__dict__.get(STATE_ATTR))), None)
    return inst


def is_accelerated(pipe: Any) -> bool:
    """Whether a pipeline (or a bare denoiser) runs accelerated: its own acceleration, or that of a
    denoiser it shares with an accelerated pipeline (`from_pipe`)."""
    return installation(pipe) is not None


def remove_acceleration(pipe: Any) -> Any:
    """Undo `accelerate_pipeline`: hooks and scheduler wrappers removed, outputs bit-identical to a
    pipeline never patched. Attention processors were never replaced, so LoRA, IP-Adapter and custom
    processors are exactly as they were. Returns `pipe`; a pipeline not accelerated is left as is."""
    inst = installation(pipe)
    if inst is not None:
        _uninstall(inst)
    return pipe


def reset(pipe: Any, num_steps: int | None = None) -> None:
    """Start a new run on an accelerated bare denoiser (pipelines reset themselves at every call)."""
    inst = installation(pipe)
    if inst is None:
        raise RuntimeError("not accelerated: call accelerate_pipeline first")
    inst.clock.new_run(num_steps)
