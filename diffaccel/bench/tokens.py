"""`diffaccel bench tokens`: one denoiser call at high resolution on a DiT architecture (random
weights), the token methods at their defaults and two stronger settings: FLOPs and latency."""

from __future__ import annotations

import argparse
import statistics

import torch

from ..metrics import relative_error
from .archs import CACHE_ARCHS, FLOPS_ONLY, caching_arch
from .common import installed, only, ours, report_header, rounds

# Each method at its default (the cost model decides where it acts) and at two stronger settings.
TOKEN_SETTINGS = [
    ("tome default", "tome"), ("tome ratio=0.6", {"method": "tome", "ratio": 0.6}),
    ("tome ratio=0.75", {"method": "tome", "ratio": 0.75}),
    ("todo default", "todo"), ("todo factor=3", {"method": "todo", "factor": 3.0}),
    ("todo factor=4", {"method": "todo", "factor": 4.0}),
    ("sito default", "sito"), ("sito ratio=0.6", {"method": "sito", "ratio": 0.6}),
    ("sito ratio=0.75", {"method": "sito", "ratio": 0.75}),
]


def run(args: argparse.Namespace) -> dict:
    if args.arch in FLOPS_ONLY:
        raise SystemExit(f"diffaccel bench tokens: --arch {args.arch} is for FLOP counts only: {FLOPS_ONLY[args.arch]}")
    """Per denoiser call on a DiT architecture at args.sizes[0] px: FLOPs (meta device) and latency
    of the token methods against the baseline, with the relative error of the output."""
    from torch.utils.flop_counter import FlopCounterMode

    size = args.sizes[0]
    pairs = args.cfg  # PixArt calls as guidance pairs (both halves share one selection)
    settings = only([("baseline", None), *TOKEN_SETTINGS], args.only)
    report = report_header(args, size=size, batch=args.batch, cfg_pairs=pairs, results=[])
    configs = [(label, (lambda m, spec=spec: ours(m, spec, pairs)) if spec else None) for label, spec in settings]
    with torch.device("meta"):
        meta_model, meta_inputs = caching_arch(args.arch, size)
    flops = {}
    for label, install in configs:
        with installed(meta_model, install), torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta_model(**meta_inputs(args.batch, 0, 1, "meta", pairs))
        flops[label] = counter.get_total_flops()
    del meta_model
    torch.manual_seed(0)
    model, inputs = caching_arch(args.arch, size)
    calls = [inputs(args.batch, 7 * i + 3, 20, "cpu", pairs) for i in range(args.repeats)]
    times, outs = rounds(model, configs, calls, args.warmup, lambda kwargs: model(**kwargs).sample)
    base = statistics.median(times["baseline"])
    for label, _ in settings:
        t = statistics.median(times[label])
        err = statistics.mean(relative_error(o, b) for o, b in zip(outs[label], outs["baseline"]))
        row = dict(config=label, seconds=t, speedup=base / t, flops=flops[label],
                   flop_speedup=flops["baseline"] / flops[label], rel_error=err, runs=len(times[label]))
        report["results"].append(row)
        print(f"{size:>5} {label:<18} {t:8.2f}s {row['speedup']:6.2f}x  (FLOPs {row['flop_speedup']:.2f}x)"
              f"  rel.err {err:.4f}", flush=True)
    return report


NAME = "tokens"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="one denoiser call at --sizes[0] px on a PixArt-alpha / Flux architecture: the token "
                                  "methods (tome, todo, sito) at their defaults and two stronger settings")
    p.add_argument("--arch", choices=CACHE_ARCHS, default="pixart-alpha")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024], help="image size in pixels (the first is used)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds, each on its own input")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--cfg", action="store_true", help="inputs are guidance pairs (PixArt's batched CFG)")
    p.add_argument("--only", nargs="*", help="run only configurations whose label contains one of these")
    return p
