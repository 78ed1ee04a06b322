"""`diffaccel bench unet`: per denoiser call on the SD 1.5 U-Net architecture (random weights), our
token methods beside tomesd; speed-up and relative error against the baseline of the same run."""

from __future__ import annotations

import argparse
import statistics

import torch

from ..metrics import relative_error
from .archs import SD_ARCHS, build_arch
from .common import installed, only, ours, report_header, rounds


def _peer_tomesd(model, ratio: float):
    import tomesd

    tomesd.apply_patch(model, ratio=ratio)
    return lambda: tomesd.remove_patch(model)


def configurations(ratio: float, factor: float, cfg: bool = False) -> list[tuple[str, object]]:
    """(label, installer) pairs; an installer patches the model and returns its remover."""
    return [
        ("baseline", None),
        (f"tomesd ratio={ratio}", lambda m: _peer_tomesd(m, ratio)),
        (f"diffaccel tome ratio={ratio}", lambda m: ours(m, {"method": "tome", "ratio": ratio}, cfg)),
        (f"diffaccel sito ratio={ratio}", lambda m: ours(m, {"method": "sito", "ratio": ratio}, cfg)),
        (f"diffaccel todo factor={factor}", lambda m: ours(m, {"method": "todo", "factor": factor}, cfg)),
    ]


def meta_flops(arch: str, configs: list, shapes: list) -> dict[str, int]:
    """FLOPs of one call per configuration, counted on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_arch(arch)
        call = [torch.randn(shape) if i != 1 else torch.full(shape, 500) for i, shape in enumerate(shapes)]
    flops = {}
    for label, install in configs:
        with installed(model, install), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*call)
        flops[label] = counter.get_total_flops()
    return flops


def run(args: argparse.Namespace) -> dict:
    if args.cfg and args.batch % 2:
        raise SystemExit("--cfg needs an even --batch (guidance pairs)")
    model = build_arch(args.arch)
    cross = model.config.cross_attention_dim
    results = []
    for size in args.sizes:
        lat = size // 8
        gen = torch.Generator().manual_seed(0)
        # one input per timed run (different noise and timestep), so the error is an average
        # --cfg: each call is a guidance pair, as pipelines batch it: the same latents twice, then
        # [unconditional, conditional] contexts
        rows = args.batch // 2 if args.cfg else args.batch
        inputs = []
        for i in range(args.repeats):
            latents = torch.randn(rows, 4, lat, lat, generator=gen)
            inputs.append((torch.cat([latents, latents]) if args.cfg else latents,
                           torch.tensor([args.timestep + 97 * i]), torch.randn(args.batch, 77, cross, generator=gen)))
        configs = only(configurations(args.ratio, args.factor, args.cfg), args.only)
        flops = meta_flops(args.arch, configs, [t.shape for t in inputs[0]])
        times, outs = rounds(model, configs, inputs, args.warmup, lambda inp: model(*inp).sample)
        base_time = statistics.median(times["baseline"])
        for label, _ in configs:
            t = statistics.median(times[label])
            err = statistics.mean(relative_error(o, b) for o, b in zip(outs[label], outs["baseline"]))
            row = dict(size=size, batch=args.batch, config=label, seconds=t, speedup=base_time / t, rel_error=err,
                       runs=len(times[label]), flops=flops[label], flop_speedup=flops["baseline"] / flops[label])
            results.append(row)
            print(f"{size:>5} {label:<32} {t:8.2f}s {row['speedup']:6.2f}x  (FLOPs {row['flop_speedup']:.2f}x)  "
                  f"rel.err {err:.4f}", flush=True)
    return report_header(args, cfg_pairs=args.cfg, results=results)


NAME = "unet"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="per denoiser call on the SD 1.5 U-Net architecture: our token methods beside tomesd")
    p.add_argument("--arch", choices=SD_ARCHS, default="sd15", help="sd15 (860M parameters) or tiny-sd (smoke runs)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sizes in pixels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.5, help="ToMe/SiTo ratio")
    p.add_argument("--factor", type=float, default=2.0, help="ToDo factor")
    p.add_argument("--timestep", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds, each on its own input")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--cfg", action="store_true",
                   help="inputs are guidance pairs (batch = 2 x images); ours is told, so both halves share one "
                        "token selection")
    p.add_argument("--only", nargs="*", help="run only configurations whose label contains one of these")
    return p
