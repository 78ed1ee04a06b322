"""The peer accelerators as benchmark rows: each peer's public API wrapped so that the fidelity
benchmark can install it on a pipeline, call the pipeline (or the peer's own entry point), and
remove it again, leaving the pipeline exactly as it was.

- U-Net pipelines: tomesd (token merging), DeepCache (reuse of the deep U-Net branch), T-GATE
  (cross-attention cached, then dropped, after a gate step);
- DiT pipelines (PixArt): cache-dit's DBCache (adaptive threshold or static step mask, each with and
  without its TaylorSeer calibrator), diffusers' own cache hooks (FirstBlockCache, TaylorSeerCache,
  PyramidAttentionBroadcast, FasterCache, MagCache), and T-GATE's PixArt loader.

Every peer comes at three strengths (mild, medium, strong). A peer whose package is missing still
gives its rows, marked `unavailable` with the reason and how to install it.

No peer undoes all of its patching: T-GATE has no removal at all (its `pipe.tgate`, and the patched
`forward` and `cache` it leaves on every attention layer, which make the next plain call wrong or
fail); tomesd leaves `_tome_info` on the U-Net and its blocks; DeepCache, diffusers' hooks and
cache-dit leave per-instance `forward`s (and registries, statistics); cache-dit patches the pipeline
*class*'s `__call__` while installed. So `install` records what a peer may touch first (the
pipeline's and every component module's class and attribute dict, the dicts of their classes) and
`remove` puts it back after the peer's own removal.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = ["INSTALL_HINT", "Installed", "PeerError", "PeerSetting", "install", "peer_settings"]

INSTALL_HINT = 'pip install "diffaccel[bench]"'
KINDS = ("unet", "dit")


class PeerError(RuntimeError):
    """A peer cannot run on this pipeline (the pipeline is left as it was)."""


@dataclass(frozen=True)
class PeerSetting:
    """One benchmark row of a peer at one strength."""

    peer: str  # package / project: "tomesd", "DeepCache", "T-GATE", "cache-dit", "diffusers"
    method: str  # e.g. "ToMe", "DBCache+TaylorSeer", "FirstBlockCache"
    label: str  # unique, with the strength: "tomesd ratio=0.5"
    strength: dict = field(hash=False)  # the settings, JSON-ready
    kinds: tuple[str, ...]  # denoiser kinds it applies to: ("unet",) or ("dit",)
    unavailable: str | None = None  # why it cannot run here, else None
    # (pipe, steps, strength) -> (undo, call): the peer's own installation and removal
    _apply: Callable | None = field(default=None, repr=False, compare=False)


class Installed(NamedTuple):
    remove: Callable[[], None]  # restores the pipeline exactly as it was
    call: Callable[..., object] | None  # None: call the pipeline as usual; else this, same keyword arguments


# -- the pipeline as it was ------------------------------------------------------------------------


def _denoiser(pipe) -> tuple[str, torch.nn.Module]:
    if getattr(pipe, "unet", None) is not None:
        return "unet", pipe.unet
    if getattr(pipe, "transformer", None) is not None:
        return "dit", pipe.transformer
    raise PeerError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer`")


def _fingerprint(value) -> list:
    """The contents of a container by identity, in order (hook and child dicts keep their order)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else (
        (v, v) for v in value)
    return [(k if isinstance(value, dict) else None, id(v)) for k, v in items]


class _Pristine:
    """What a peer may patch, recorded before it installs: the pipeline's and every component
    module's class and attribute dict (mutable containers in them, such as hook and child dicts,
    also by content) and the dicts of their classes. `restore` puts all of it back in place."""

    def __init__(self, pipe):
        objects = [pipe] + [m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()]
        self.objects = [(o, o.__class__, dict(vars(o)),
                         {k: (v, _fingerprint(v), v.copy()) for k, v in vars(o).items()
                          if isinstance(v, (dict, list, set))})
                        for o in {id(o): o for o in objects}.values()]
        classes = {cls for _, cls, _, _ in self.objects}
        self.classes = [(c, dict(vars(c))) for c in classes]

    def restore(self) -> None:
        for cls, saved in self.classes:
            for k in [k for k in vars(cls) if k not in saved]:
                delattr(cls, k)
            for k, v in saved.items():
                if vars(cls).get(k, _MISSING) is not v:
                    setattr(cls, k, v)
        for obj, cls, saved, containers in self.objects:
            if obj.__class__ is not cls:
                obj.__class__ = cls
            now = vars(obj)
            for k in [k for k in now if k not in saved]:
                del now[k]
            for k, v in saved.items():
                if now.get(k, _MISSING) is not v:
                    now[k] = v
            for container, fingerprint, contents in containers.values():
                if _fingerprint(container) != fingerprint:
                    if isinstance(container, list):
                        container[:] = contents
                    else:
                        container.clear()
                        container.update(contents)


_MISSING = object()


def install(setting: PeerSetting, pipe, steps: int) -> Installed:
    """Apply the peer to the pipeline, for runs of `steps` steps. Raises PeerError (the pipeline left
    exactly as it was) if it cannot run here: package missing, another kind of denoiser, or the
    peer's own installation failing on this pipeline."""
    if setting.unavailable or setting._apply is None:
        raise PeerError(setting.unavailable or f"{setting.label}: no way to install it")
    kind, _ = _denoiser(pipe)
    if kind not in setting.kinds:
        raise PeerError(f"{setting.label} applies to {'/'.join(setting.kinds)} pipelines, not to "
                        f"{type(pipe).__name__} ({kind})")
    pristine = _Pristine(pipe)
    try:
        undo, call = setting._apply(pipe, steps, dict(setting.strength))
    except BaseException as e:
        pristine.restore()
        if isinstance(e, PeerError) or not isinstance(e, Exception):
            raise
        raise PeerError(f"{setting.label}: {type(e).__name__}: {e}") from e
    done = []

    def remove() -> None:
        if done:
            return
        done.append(True)
        try:
            if undo is not None:
                undo()
        finally:
            pristine.restore()

    return Installed(remove, call)


# -- availability ------------------------------------------------------------------------------------


def _missing(module: str, package: str) -> str | None:
    """None when `module` imports, else a sentence saying why and how to install it."""
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a package broken against the installed diffusers
        return (f"{package} is not usable here ({type(e).__name__}: {e}); install the benchmark's peers with "
                f"`{INSTALL_HINT}`")
    return None


def _rows(peer: str, method: str, kind: str, prefix: str, rows: list[tuple[str, dict]], apply,
          unavailable: str | None = None) -> list[PeerSetting]:
    """One PeerSetting per (tag, strength), labelled "prefix tag", less those that repeat an earlier
    strength (at few steps, two gate fractions can round to the same step); a single row labelled
    "prefix" saying why when the peer is unavailable."""
    if unavailable:
        return [PeerSetting(peer, method, prefix, {}, (kind,), unavailable)]
    seen, out = set(), []
    for tag, strength in rows:
        key = json.dumps({k: v for k, v in strength.items() if k != "mask_policy"}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(PeerSetting(peer, method, f"{prefix} {tag}", strength, (kind,), None, apply))
    return out


def _at(fraction: float, steps: int) -> int:
    return max(1, round(fraction * steps))


# -- U-Net peers -----------------------------------------------------------------------------------


def _tomesd(pipe, steps: int, s: dict):
    """tomesd's patch of the U-Net's transformer blocks. Its random destination tokens are drawn from
    a fork of torch's global generator taken at the first call after installing."""
    import tomesd

    tomesd.apply_patch(pipe, **s)
    return (lambda: tomesd.remove_patch(pipe)), None


def _deepcache(pipe, steps: int, s: dict):
    """DeepCache's helper: the U-Net's deep branch computed every `cache_interval` steps, the cached
    features reused between (branch 0: only the outermost down/up blocks run on those steps)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(**s)
    helper.enable()
    return helper.disable, None


_TGATE_LOADERS = {  # pipeline class -> T-GATE loader
    "StableDiffusionPipeline": "TgateSDLoader", "StableDiffusionXLPipeline": "TgateSDXLLoader",
    "PixArtAlphaPipeline": "TgatePixArtAlphaLoader", "PixArtSigmaPipeline": "TgatePixArtSigmaLoader",
}


def _tgate(pipe, steps: int, s: dict):
    """T-GATE's loader adds `pipe.tgate(...)`, its own copy of the pipeline's call that caches the
    cross-attention at `gate_step` (averaging the CFG halves) and then reuses it, dropping the CFG
    batch; self-attention is cached every `sp_interval` steps before the gate and `fi_interval`
    after, from step `warm_up`. It has no removal: `remove` restores the attention forwards it
    patched, which stay after each call and break a plain call (their last step's reuse flags)."""
    import tgate

    name = next((loader for cls, loader in _TGATE_LOADERS.items()
                 if any(c.__name__ == cls for c in type(pipe).__mro__)), None)
    if name is None:
        raise PeerError(f"T-GATE has no loader for {type(pipe).__name__} (it has {', '.join(_TGATE_LOADERS)})")
    getattr(tgate, name)(pipe)

    def call(*args, **kwargs):
        return pipe.tgate(*args, **kwargs, **s)

    return None, call


def _unet_peers(steps: int) -> list[PeerSetting]:
    rows = _rows("tomesd", "ToMe", "unet", "tomesd", [(f"ratio={r}", {"ratio": r}) for r in (0.3, 0.5, 0.7)],
                 _tomesd, _missing("tomesd", "tomesd"))
    rows += _rows("DeepCache", "DeepCache", "unet", "DeepCache",
                  [(f"N={n}", {"cache_interval": n, "cache_branch_id": 0}) for n in (2, 3, 5)],
                  _deepcache, _missing("DeepCache", "DeepCache"))
    rows += _tgate_rows("unet", steps, sp_interval=5)
    return rows


def _tgate_rows(kind: str, steps: int, sp_interval: int) -> list[PeerSetting]:
    """T-GATE's README settings (gate 10/25 steps, sp_interval 5 on SD-XL; 15/25, 3 on PixArt; warm-up
    2, fi_interval 1), with the gate at 60%, 40% and 25% of the steps (12, 8, 5 of 20)."""
    rows = [(f"gate={_at(f, steps)}/{steps}",
             {"gate_step": _at(f, steps), "sp_interval": sp_interval, "fi_interval": 1, "warm_up": 2})
            for f in (0.6, 0.4, 0.25)]
    return _rows("T-GATE", "T-GATE", kind, "T-GATE", rows, _tgate, _missing("tgate", "T-GATE (pip package tgate)"))


# -- DiT peers: cache-dit ------------------------------------------------------------------------------


def _cache_dit(pipe, steps: int, s: dict):
    """cache-dit's DBCache on the whole pipeline (its registered PixArt adapter: each call starts fresh
    cache contexts). Fn first blocks always run (Bn last ones too); the rest are skipped, their
    residual reused, when the first blocks' residual changed less than `residual_diff_threshold`
    (adaptive) or on the steps the mask marks 0 (static). TaylorSeer extrapolates the reused residual."""
    import cache_dit

    cfg = {"Fn_compute_blocks": s["Fn"], "Bn_compute_blocks": s["Bn"], "num_inference_steps": steps}
    if "steps_computation_mask" in s:
        cfg.update(steps_computation_mask=list(s["steps_computation_mask"]), steps_computation_policy="static",
                   max_warmup_steps=0)
    else:
        cfg.update(residual_diff_threshold=s["residual_diff_threshold"], max_warmup_steps=s["max_warmup_steps"])
    calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=s["taylorseer_order"])
                  if "taylorseer_order" in s else None)
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**cfg), calibrator_config=calibrator)
    return (lambda: cache_dit.disable_cache(pipe)), None


def _cache_dit_rows(steps: int) -> list[PeerSetting]:
    """DBCache Fn=1 Bn=0 (PixArt has few blocks; the default Fn=8 would leave none to skip), with and
    without TaylorSeer (order 1): adaptive, residual-diff thresholds 0.12, 0.2, 0.3 after a quarter of
    the steps of warm-up (its default warm-up, 8, is for 28-50 steps; its default threshold, 0.08,
    skips no step of the reference DiT at 20 steps, 0.12 skips 6); static, cache-dit's own step masks
    "slow", "medium", "fast" (`cache_dit.steps_mask`: 4, 6 or at least 8 steps)."""
    missing = _missing("cache_dit", "cache-dit")
    if missing:
        return _rows("cache-dit", "DBCache", "dit", "cache-dit", [], None, missing)
    import cache_dit

    warmup = _at(0.25, steps)
    rows = []
    for method, extra in (("DBCache", {}), ("DBCache+TaylorSeer", {"taylorseer_order": 1})):
        adaptive = [(f"Fn=1 rdt={r}", {"Fn": 1, "Bn": 0, "residual_diff_threshold": r, "max_warmup_steps": warmup,
                                       **extra}) for r in (0.12, 0.2, 0.3)]
        rows += _rows("cache-dit", method, "dit", f"cache-dit {method}", adaptive, _cache_dit)
        try:
            masks = [(p, cache_dit.steps_mask(total_steps=steps, mask_policy=p)) for p in ("slow", "medium", "fast")]
        except (AssertionError, ValueError) as e:
            rows += [PeerSetting("cache-dit", method, f"cache-dit {method} Fn=1 mask={p}", {"mask_policy": p}, ("dit",),
                                 f"cache-dit's step masks do not cover {steps} steps ({e or 'need 4, 6 or >= 8'})")
                     for p in ("slow", "medium", "fast")]
            continue
        rows += _rows("cache-dit", method, "dit", f"cache-dit {method}",
                      [(f"Fn=1 mask={p}", {"Fn": 1, "Bn": 0, "mask_policy": p, "steps_computation_mask": m, **extra})
                       for p, m in masks], _cache_dit)
    return rows


# -- DiT peers: diffusers' hooks -------------------------------------------------------------------------


def _timestep_recorder(model: torch.nn.Module) -> Callable[[], float]:
    """A forward pre-hook on the denoiser keeping the timestep of its current call; returns the
    `current_timestep_callback` that FasterCache and PyramidAttentionBroadcast ask for (PixArt's
    pipeline has no `current_timestep`)."""
    seen = {"t": None}

    def hook(_module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen["t"] = float(t.flatten()[0]) if torch.is_tensor(t) else t

    model.register_forward_pre_hook(hook, with_kwargs=True)  # removed by `remove` (the pristine hooks)
    return lambda: seen["t"]


def _in_cache_context(pipe, model: torch.nn.Module):
    """The call for diffusers' stateful hooks: their state reset before and after each run (a pipeline
    without `CacheMixin`, PixArt's, resets nothing) and the run inside a cache context, which
    PixArtAlphaPipeline does not open (one context for the batched uncond+cond call)."""
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.invalidate_child_registries_cache()

    def call(*args, **kwargs):
        registry.reset_stateful_hooks()
        try:
            with CacheMixin.cache_context(model, "cond"):
                return pipe(*args, **kwargs)
        finally:
            registry.reset_stateful_hooks()

    return call


def _hook_names(model: torch.nn.Module) -> dict[int, set[str]]:
    """The names of the diffusers hooks on each module of `model` that has any."""
    return {id(m): set(m._diffusers_hook.hooks) for m in model.modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks}


def _remove_new_hooks(model: torch.nn.Module, before: dict[int, set[str]]) -> None:
    """diffusers' own removal of every hook added since `before` (`HookRegistry.remove_hook`)."""
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        for name in [n for n in (registry.hooks if registry else ()) if n not in before.get(id(m), ())]:
            registry.remove_hook(name, recurse=False)


def _diffusers_hook(pipe, steps: int, s: dict, method: str):
    """Apply one of diffusers' cache hooks with its `apply_*` function (PixArt's transformer has no
    `enable_cache`); removed with `HookRegistry.remove_hook`."""
    import diffusers.hooks as h

    _, model = _denoiser(pipe)
    before = _hook_names(model)
    s = dict(s)
    if method == "FirstBlockCache":
        h.apply_first_block_cache(model, h.FirstBlockCacheConfig(**s))
    elif method == "TaylorSeerCache":
        dtype = getattr(torch, s.pop("taylor_factors_dtype"))
        h.apply_taylorseer_cache(model, h.TaylorSeerCacheConfig(**s, taylor_factors_dtype=dtype))
    elif method == "PyramidAttentionBroadcast":
        s = {k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}
        h.apply_pyramid_attention_broadcast(model, h.PyramidAttentionBroadcastConfig(
            **s, current_timestep_callback=_timestep_recorder(model)))
    elif method == "FasterCache":
        s = {k: tuple(v) if isinstance(v, list) else v for k, v in s.items()}
        weight = s.pop("attention_weight")
        h.apply_faster_cache(model, h.FasterCacheConfig(
            **s, attention_weight_callback=lambda _: weight, current_timestep_callback=_timestep_recorder(model)))
    elif method == "MagCache":
        ratios = _mag_ratios(pipe, model, steps)
        _remove_new_hooks(model, before)
        h.apply_mag_cache(model, h.MagCacheConfig(**s, num_inference_steps=steps, mag_ratios=ratios))
    if _hook_names(model) == before:
        raise PeerError(f"diffusers {method} found no blocks or attention layers to hook in "
                        f"{type(model).__name__}")
    return (lambda: _remove_new_hooks(model, before)), _in_cache_context(pipe, model)


CALIBRATION_PROMPT = "a red circle on a blue background"


def _mag_ratios(pipe, model: torch.nn.Module, steps: int) -> list[float]:
    """MagCache's magnitude ratios for this model and step count, from one calibration run of the
    pipeline (MagCacheConfig(calibrate=True), one prompt, seed 0). diffusers only prints them (and
    logs them at INFO): read from the printed list."""
    import diffusers.hooks as h

    h.apply_mag_cache(model, h.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    kwargs = {"clean_caption": False} if "clean_caption" in inspect.signature(pipe.__call__).parameters else {}
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            _in_cache_context(pipe, model)(prompt=[CALIBRATION_PROMPT], num_inference_steps=steps,
                                           output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
    except Exception as e:
        raise PeerError(f"diffusers MagCache needs its magnitude ratios calibrated by a run of the pipeline on a "
                        f"text prompt, which failed: {type(e).__name__}: {e}") from e
    found = re.search(r"Calibration Complete.*?\n\s*\[([^\]]*)\]", printed.getvalue(), re.S)
    if not found:
        raise PeerError("diffusers MagCache calibration printed no magnitude ratios (its output format changed?)")
    ratios = [float(x) for x in found.group(1).split(",")]
    if len(ratios) != steps:
        raise PeerError(f"diffusers MagCache calibration gave {len(ratios)} ratios for {steps} steps")
    return ratios


def _diffusers_rows(steps: int) -> list[PeerSetting]:
    """diffusers' cache hooks at three strengths each:
    - FirstBlockCache: residual-change thresholds 0.1, 0.2, 0.3 (diffusers' default, 0.05, skips no
      step of the reference DiT at 20 steps; 0.1 skips 1, 0.2 skips 9);
    - TaylorSeerCache: full compute every 2, 3, 5 steps after 3 warm-up steps (its defaults but for the
      interval; first order, float32 factors), on the attention layers of the transformer blocks: its
      default patterns name Flux's `attn` only and would hook nothing of PixArt's `attn1`/`attn2`;
    - PyramidAttentionBroadcast: self-attention recomputed every 2, 3, 4 calls within timesteps
      (100, 800) of 1000 (diffusers' and the paper's default range);
    - FasterCache (no threshold: its strength is how much it skips): self-attention every 2, 2, 3
      calls and the unconditional branch every 3, 5 (its default), 5 calls, within its default
      timestep ranges, the strong one over wider ranges (up to 801 / 781);
    - MagCache: accumulated-error thresholds 0.03, 0.06 (its default), 0.12, at most 3 skipped steps
      in a row, the first 20% of the steps always computed, ratios calibrated on the pipeline."""
    import diffusers
    import diffusers.hooks as h

    table = {
        "FirstBlockCache": ("apply_first_block_cache",
                            [(f"threshold={t}", {"threshold": t}) for t in (0.1, 0.2, 0.3)]),
        "TaylorSeerCache": ("apply_taylorseer_cache",
                            [(f"N={n}", {"cache_interval": n, "disable_cache_before_step": 3, "max_order": 1,
                                         "taylor_factors_dtype": "float32",
                                         "cache_identifiers": [r"transformer_blocks\.\d+\.attn\d*"]})
                             for n in (2, 3, 5)]),
        "PyramidAttentionBroadcast": ("apply_pyramid_attention_broadcast",
                                      [(f"N={n}", {"spatial_attention_block_skip_range": n,
                                                   "spatial_attention_timestep_skip_range": [100, 800]})
                                       for n in (2, 3, 4)]),
        "FasterCache": ("apply_faster_cache",
                        [(f"N={n} uncond={u}", {"spatial_attention_block_skip_range": n,
                                                "spatial_attention_timestep_skip_range": [-1, hi_s],
                                                "unconditional_batch_skip_range": u,
                                                "unconditional_batch_timestep_skip_range": [-1, hi_u],
                                                "attention_weight": 0.5, "tensor_format": "BCHW"})
                         for n, u, hi_s, hi_u in ((2, 3, 681, 641), (2, 5, 681, 641), (3, 5, 801, 781))]),
        "MagCache": ("apply_mag_cache",
                     [(f"threshold={t}", {"threshold": t, "max_skip_steps": 3, "retention_ratio": 0.2})
                      for t in (0.03, 0.06, 0.12)]),
    }
    rows = []
    for method, (fn, strengths) in table.items():
        missing = None if hasattr(h, fn) else (
            f"diffusers {diffusers.__version__} has no `diffusers.hooks.{fn}`; the benchmark's peers need a newer "
            f"diffusers (`{INSTALL_HINT}`)")
        rows += _rows("diffusers", method, "dit", f"diffusers {method}", strengths,
                      lambda pipe, steps, s, method=method: _diffusers_hook(pipe, steps, s, method), missing)
    return rows


# -- the table -------------------------------------------------------------------------------------------


def peer_settings(kind: str, steps: int) -> list[PeerSetting]:
    """Every peer for denoiser kind "unet" or "dit", each at three strengths (mild, medium, strong), in
    a stable order, for runs of `steps` steps. A peer whose package is not importable still appears,
    as one row with `unavailable` saying why and how to install it."""
    if kind not in KINDS:
        raise ValueError(f"unknown denoiser kind {kind!r}; expected one of {KINDS}")
    if kind == "unet":
        return _unet_peers(steps)
    return _cache_dit_rows(steps) + _diffusers_rows(steps) + _tgate_rows("dit", steps, sp_interval=3)
