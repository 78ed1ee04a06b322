"""`diffaccel bench flux-peers`: whole Euler runs on the Flux architecture (random weights), our caching
methods beside cache-dit and diffusers' caches; FLOPs counted on the real run."""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from ..metrics import relative_error
from .archs import FLOPS_ONLY, caching_arch
from .caching import PAPER_SETTINGS
from .common import installed, only, ours, report_header


def _peer_diffusers(model, config):
    """diffusers' own cache hooks (FirstBlockCache, TaylorSeer); calls run in a cache context."""
    model.enable_cache(config)
    model._reset_stateful_cache()
    return model.disable_cache


def _peer_cache_dit(model, steps: int, taylorseer: bool):
    """cache-dit DBCache with a static step mask (compute every third step and the last; the first
    block always runs, Fn=1, Bn=0), optionally with its TaylorSeer calibrator (order 1)."""
    import cache_dit

    mask = [1 if i % 3 == 0 or i == steps - 1 else 0 for i in range(steps)]
    cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=steps,
                                  steps_computation_mask=mask, steps_computation_policy="static", max_warmup_steps=0)
    cal = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
    cache_dit.enable_cache(model, cache_config=cfg, calibrator_config=cal)
    return lambda: cache_dit.disable_cache(model)


def peer_settings(steps: int) -> list[tuple[str, object, bool]]:
    """(label, installer, runs in a diffusers cache context). cache-dit patches the transformer's
    forward (kept after `disable_cache`, harmless for later runs), so its rows come last."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    rows = [("baseline", None, False)]
    rows += [(f"diffaccel {label}", lambda m, spec=spec: ours(m, spec, False, steps), False)
             for label, spec in PAPER_SETTINGS["flux"]]
    rows += [
        ("diffusers FirstBlockCache threshold=0.05",
         lambda m: _peer_diffusers(m, FirstBlockCacheConfig(threshold=0.05)), True),
        ("diffusers FirstBlockCache threshold=0.5",
         lambda m: _peer_diffusers(m, FirstBlockCacheConfig(threshold=0.5)), True),
        ("diffusers TaylorSeer interval=3",
         lambda m: _peer_diffusers(m, TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=1)), True),
        ("cache-dit DBCache static mask 1/3", lambda m: _peer_cache_dit(m, steps, False), False),
        ("cache-dit DBCache static mask 1/3 + TaylorSeer", lambda m: _peer_cache_dit(m, steps, True), False),
    ]
    return rows


def _euler(model, inputs, steps: int, in_context: bool) -> torch.Tensor:
    """A flow-matching Euler run: each step feeds the model's velocity back into the latents, so
    consecutive calls see close inputs, as in a real sampler."""
    kwargs = inputs(1, 0, steps, "cpu")
    x = kwargs.pop("hidden_states")
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        kwargs["timestep"] = sigmas[i].expand(x.shape[0])
        ctx = model.cache_context("cond") if in_context else contextlib.nullcontext()
        with ctx:
            v = model(hidden_states=x, **kwargs).sample
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def run(args: argparse.Namespace) -> dict:
    if args.arch in FLOPS_ONLY:
        raise SystemExit(f"diffaccel bench flux-peers: --arch {args.arch} is for FLOP counts only: "
                         f"{FLOPS_ONLY[args.arch]}")
    """Whole Euler runs on the Flux architecture: our caching methods at the papers' settings beside
    cache-dit and diffusers' caches, FLOPs counted on the real run, latency, error of the result."""
    from torch.utils.flop_counter import FlopCounterMode

    steps, size = args.steps, args.size
    torch.manual_seed(0)
    model, inputs = caching_arch(args.arch, size)
    settings = only(peer_settings(steps), args.only)
    report = report_header(args, size=size, steps=steps, results=[])
    base_out = base_time = base_flops = None
    for label, install, in_context in settings:
        with installed(model, install), torch.no_grad(), FlopCounterMode(display=False) as counter:
            t0 = time.perf_counter()
            out = _euler(model, inputs, steps, in_context)
            elapsed = time.perf_counter() - t0
        flops = counter.get_total_flops()
        if base_out is None:
            base_out, base_time, base_flops = out, elapsed, flops
        row = dict(config=label, seconds=elapsed, speedup=base_time / elapsed, flops=flops,
                   flop_speedup=base_flops / flops, rel_error=relative_error(out, base_out))
        report["results"].append(row)
        print(f"{label:<48} {elapsed:8.2f}s {row['speedup']:6.2f}x  (FLOPs {row['flop_speedup']:.2f}x)"
              f"  rel.err {row['rel_error']:.4f}", flush=True)
    return report


NAME = "flux-peers"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="whole Euler runs on the Flux architecture: our caching methods beside cache-dit "
                                  "(DBCache, static mask, +TaylorSeer) and diffusers' FirstBlockCache and TaylorSeer; "
                                  "FLOPs counted on the real run")
    p.add_argument("--arch", choices=("flux-2x4", "tiny-flux", "flux-dev"), default="flux-2x4")
    p.add_argument("--size", type=int, default=256, help="image size in pixels")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", nargs="*", help="run only configurations whose label contains one of these")
    return p
