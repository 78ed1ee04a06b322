"""`diffaccel bench caching`: whole runs of the caching methods at the papers' settings on PixArt-alpha
and Flux architectures (random weights): FLOPs counted on the meta device, latency of real runs."""

from __future__ import annotations

import argparse
import statistics

import torch

from ..methods.duca import DuCaConfig
from ..methods.toca import ToCaConfig
from ..metrics import relative_error
from .archs import CACHE_ARCHS, FLOPS_ONLY, caching_arch
from .common import installed, only, ours, report_header, rounds

# The papers' settings per architecture (ToCa: PixArt-alpha N=3 R=0.3; Flux N=4 R=0.1, first 3 steps
# full; DuCa: PixArt N=3 R=0.75; FORA: N=3): with our default schedules and scores, and as the
# reference code sets them (`paper(...)`: its interval schedule, scores and stream factors).
PAPER_SETTINGS = {
    "pixart": [("fora N=3", {"method": "fora", "interval": 3}),
               ("toca N=3 R=0.3", {"method": "toca", "interval": 3, "fresh_ratio": 0.3}),
               ("toca paper(pixart-alpha)", ToCaConfig.paper("pixart-alpha")),
               ("duca N=3 R=0.75", {"method": "duca", "interval": 3, "fresh_ratio": 0.75}),
               ("duca paper(pixart-alpha)", DuCaConfig.paper("pixart-alpha"))],
    "flux": [("fora N=3", {"method": "fora", "interval": 3}),
             ("toca N=4 R=0.1 warmup=3", {"method": "toca", "interval": 4, "fresh_ratio": 0.1, "warmup": 3}),
             ("toca paper(flux)", ToCaConfig.paper("flux")),
             ("duca N=4 R=0.1 warmup=3", {"method": "duca", "interval": 4, "fresh_ratio": 0.1, "warmup": 3}),
             # TaylorSeer's FLUX.1-dev setting (N=6, order 2, first 3 steps full, last step not forced),
             # then longer intervals and HiCache's forecast, and token-wise forecasting
             ("taylorseer N=6 O=2 (paper)", {"method": "taylorseer"}),
             ("taylorseer N=7 O=2", {"method": "taylorseer", "interval": 7}),
             ("taylorseer N=8 O=2", {"method": "taylorseer", "interval": 8}),
             ("taylorseer N=7 hermite O=1", {"method": "taylorseer", "interval": 7, "forecast": "hermite", "order": 1}),
             ("toca N=6 R=0.1 warmup=3 taylor O=1", {"method": "toca", "interval": 6, "fresh_ratio": 0.1, "warmup": 3,
                                                     "forecast": "taylor", "order": 1})],
}
PAPER_SETTINGS["pixart"] += [
    ("taylorseer N=6 O=2 (paper)", {"method": "taylorseer"}),
    ("taylorseer N=3 O=1 warmup=0", {"method": "taylorseer", "interval": 3, "order": 1, "warmup": 0}),
    ("fora N=3 hermite O=1", {"method": "fora", "interval": 3, "forecast": "hermite", "order": 1})]


def _run_steps(model, inputs, steps: int, device) -> torch.Tensor:
    out = None
    with torch.no_grad():
        for step in range(steps):
            out = model(**inputs(1, step, steps, device)).sample
    return out


def caching_flops(arch: str, steps: int, settings: list, size: int | None = None) -> dict[str, float]:
    """Total FLOPs of `steps` denoiser calls per configuration, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model, inputs = caching_arch(arch, size)
    flops = {}
    for label, spec in settings:
        install = (lambda m, spec=spec: ours(m, spec, "pixart" in arch, steps)) if spec else None
        with installed(model, install), FlopCounterMode(display=False) as counter:
            _run_steps(model, inputs, steps, "meta")
        flops[label] = counter.get_total_flops()
    return flops


def run(args: argparse.Namespace) -> dict:
    if args.arch in FLOPS_ONLY and args.steps:
        raise SystemExit(f"diffaccel bench caching: --arch {args.arch} is for FLOP counts only: {FLOPS_ONLY[args.arch]}")
    family = "flux" if "flux" in args.arch else "pixart"
    settings = [("baseline", None), *PAPER_SETTINGS[family],
                # installed, but its policy idle at every step: the cost of being there
                ("toca idle (warmup >= steps)", {"method": "toca", "warmup": 10_000})]
    settings = only(settings, args.only)
    report = report_header(args, size=args.size, flops={}, latency=[])
    for steps in args.flop_steps:
        flops = caching_flops(args.arch, steps, settings, args.size)
        report["flops"][steps] = {k: {"flops": v, "speedup": flops["baseline"] / v} for k, v in flops.items()}
        for k, v in flops.items():
            print(f"FLOPs {steps:>3} steps  {k:<28} {v / 1e12:9.2f} TFLOP {flops['baseline'] / v:6.2f}x", flush=True)
    if args.steps:
        torch.manual_seed(0)
        model, inputs = caching_arch(args.arch, args.size)
        configs = [(label, (lambda m, spec=spec: ours(m, spec, "pixart" in args.arch, args.steps)) if spec else None)
                   for label, spec in settings]
        times, runs = rounds(model, configs, [None] * args.repeats, args.warmup,
                              lambda _: _run_steps(model, inputs, args.steps, "cpu"))
        outs = {label: out[-1] for label, out in runs.items()}
        base = statistics.median(times["baseline"])
        flop_speedup = report["flops"].get(args.steps, {})
        for label, _ in settings:
            t = statistics.median(times[label])
            row = dict(config=label, steps=args.steps, seconds=t, speedup=base / t,
                       flop_speedup=flop_speedup.get(label, {}).get("speedup"),
                       rel_error_last_step=relative_error(outs[label], outs["baseline"]), runs=len(times[label]))
            report["latency"].append(row)
            print(f"latency {args.steps} steps {label:<28} {t:8.2f}s {row['speedup']:6.2f}x"
                  f"  (FLOPs {row['flop_speedup'] or float('nan'):.2f}x)  rel.err {row['rel_error_last_step']:.4f}",
                  flush=True)
    return report


NAME = "caching"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="whole runs of the caching methods at the papers' settings on PixArt-alpha / Flux "
                                  "architectures: FLOPs (meta device) and latency")
    p.add_argument("--arch", choices=CACHE_ARCHS, default="pixart-alpha",
                   help="flux-dev: FLUX.1-dev's full depth at 1024 px, FLOPs only (--steps 0)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: 256 for PixArt-alpha, "
                                                          "512 for Flux 2+4, 1024 for flux-dev)")
    p.add_argument("--flop-steps", type=int, nargs="*", default=[20, 50],
                   help="step counts of the runs to count FLOPs of (none: skip)")
    p.add_argument("--steps", type=int, default=20, help="steps of the timed runs (0: FLOPs only)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--only", nargs="*", help="run only configurations whose label contains one of these")
    return p
