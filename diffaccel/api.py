"""The public verbs: accelerate_pipeline, remove_acceleration, describe."""

from __future__ import annotations

import dataclasses
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

from .methods.base import MethodConfig, available_methods, method_class
from .runtime import BlockInputHook, BlockReuseHook, PipeRef, RunClock, SiteHook, SkippableForward, Tracker
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
    block_hooks: list[BlockReuseHook] = field(default_factory=list)  # blocks a caching method may skip whole
    handles: list = field(default_factory=list)


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
        d = dict(obj)
        name = d.pop("method", None)
        if name is None:
            raise ValueError(f"a method dict needs a 'method' key naming the method, got {obj!r}")
        return _replace(method_class(name)(), d)
    raise TypeError(f"a method is a registered name, a config object, a dict or a list of them; "
                    f"got {type(obj).__name__}")


def _unknown_option(key: str, configs: list[MethodConfig]) -> TypeError:
    allowed = sorted({f.name for c in configs for f in dataclasses.fields(c)})
    aliases = sorted({a for c in configs for a in c.aliases})
    return TypeError(f"unknown option {key!r} for {'/'.join(c.name for c in configs)}; allowed: {allowed}"
                     + (f" (or the reference's names {aliases})" if aliases else ""))


def _replace(cfg: MethodConfig, changes: dict) -> MethodConfig:
    unknown = [k for k in changes if k not in cfg.option_names()]
    if unknown:
        raise _unknown_option(unknown[0], [cfg])
    changes = dict(cfg.translate(k, v) for k, v in changes.items())
    if getattr(cfg, "cost_model", False) is None and "cost_model" not in changes and set(changes) & set(cfg.params):
        changes = {**changes, "cost_model": False}  # a strength the user asked for acts wherever it is selected
    return dataclasses.replace(cfg, **changes) if changes else cfg


def resolve_methods(method: Any, overrides: dict) -> list[MethodConfig]:
    """Method spec + keyword overrides -> validated configs. Raises before anything is changed."""
    items = list(method) if isinstance(method, (list, tuple)) else [method]
    if not items:
        raise ValueError("no method given; available: " + ", ".join(available_methods()))
    configs = [_config_from(m) for m in items]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"each method may be given once, got {names}")
    for key, value in overrides.items():
        owners = [i for i, c in enumerate(configs) if key in c.option_names()]
        if not owners:
            raise _unknown_option(key, configs)
        if len(owners) > 1:
            raise ValueError(f"option {key!r} fits several methods ({[names[i] for i in owners]}); "
                             f"pass config objects instead")
        configs[owners[0]] = _replace(configs[owners[0]], {key: value})
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
    blocks = set()
    for site in st.sites:
        methods = st.placements.get(site.index)
        if not methods:
            continue
        hook = SiteHook(site, st.tracker, methods)
        st.hooks.append(hook)
        st.handles.append(site.module.register_forward_pre_hook(hook.pre_hook, with_kwargs=True))
        st.handles.append(site.module.register_forward_hook(hook.post_hook, with_kwargs=True))
        if any(m.wraps_forward(site) for m in methods):
            st.handles.append(SkippableForward(site.module, hook))
        if any(m.needs_block_input() for m in methods):
            blocks.add(site.block)
    _install_block_reuse(st)
    for name in sorted(blocks):
        block_hook = BlockInputHook(name, st.tracker)
        block = st.model.get_submodule(name)
        st.handles.append(block.register_forward_pre_hook(block_hook.pre_hook, with_kwargs=True))
        st.handles.append(block.register_forward_hook(block_hook.post_hook, with_kwargs=True))
    unwrap(st.model).__dict__[STATE_ATTR] = inst  # (a compile wrapper forwards attributes to the module)


def _install_block_reuse(st: DenoiserState) -> None:
    """Blocks whose every site hosts a caching method that may skip whole blocks get a
    BlockReuseHook (sites a policy leaves out keep the block running: they are computed as usual)."""
    by_block: dict[str, list] = {}
    for site in st.sites:
        by_block.setdefault(site.block, []).append(site)
    hooks = {hook.site.index: hook for hook in st.hooks}
    for name, sites in by_block.items():
        hosted = [hooks.get(site.index) for site in sites]
        if not all(h is not None and h.caching is not None and h.methods[h.caching].reuses_blocks()
                   for h in hosted):
            continue
        block_hook = BlockReuseHook(name, st.tracker, hosted)
        st.block_hooks.append(block_hook)
        block = st.model.get_submodule(name)
        st.handles.append(block.register_forward_pre_hook(block_hook.pre_hook, with_kwargs=True))
        st.handles.append(block.register_forward_hook(block_hook.post_hook, with_kwargs=True))
        st.handles.append(SkippableForward(block, block_hook))


def _uninstall(inst: Installation) -> None:
    for st in inst.denoisers:
        for h in reversed(st.handles):
            h.remove()
        st.handles.clear()
        if st.tracker is not None:
            st.tracker.release()
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
